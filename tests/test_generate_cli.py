"""``s1fast generate`` end to end on CPU: a random tiny Qwen2 saved with the real Qwen tokenizer."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal

import pytest
import torch
import tqdm
from tiny_qwen import save_qwen_vocab_model

from s1fast.cli import main as s1fast_main
from s1fast.kernels import force_backend

engine_module = importlib.import_module("s1fast.decode.engine")
generate = importlib.import_module("s1fast.decode.generate")
patch_module = importlib.import_module("s1fast.model.patch")  # the package attribute is the function


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One-layer Qwen2 over the full Qwen vocabulary (the prompts hold ids up to 151,668) and its tokenizer."""
    return save_qwen_vocab_model(tmp_path_factory.mktemp("tiny_qwen"), hidden=32, intermediate=64, heads=2, kv_heads=1)


@pytest.fixture(autouse=True)
def _threads_restored():
    """generate sets torch's thread count for the process: put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(argv, capsys):
    with force_backend("torch"):  # the kernels' CPU path (the interpreter is covered in test_decoder.py)
        code = s1fast_main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


class RecordingBar(tqdm.tqdm):
    """tqdm that records its count at every update, to see progress happen during the decode."""

    counts: list[int] = []

    def update(self, n=1):
        out = super().update(n)
        RecordingBar.counts.append(self.n)
        return out


def test_generate_one_prompt_budget_cut(model_dir, capsys, tmp_path, monkeypatch):
    out_file = tmp_path / "out.jsonl"
    out_file.write_text("an older file, replaced at the end\n")
    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    RecordingBar.counts = []
    umask = os.umask(0o027)
    try:
        code, out, err = run(["--model", model_dir, "--prompt", "What is 2+2?", "--device", "cpu", "--max-new-tokens",
                              "14", "--max-thinking-tokens", "4", "--out", str(out_file)], capsys)
    finally:
        os.umask(umask)
    assert code == 0
    # token-level progress during the single-prompt decode: the bar counts tokens as the decoder streams them
    # (the 4 thinking tokens one by one, the injected end of thinking at once, ...), with tokens/s on stderr
    assert RecordingBar.counts[-1] == 14 and len(RecordingBar.counts) >= 8
    assert RecordingBar.counts == sorted(RecordingBar.counts) and RecordingBar.counts[0] < 14
    assert "14tok" in err and "tok/s" in err
    # written atomically (no temporary left) with the umask's permissions, not mkstemp's 0600
    assert (out_file.stat().st_mode & 0o777) == 0o640 and os.listdir(tmp_path) == ["out.jsonl"]
    # with --out the rows go to the file, not to stdout; the run's summary is printed
    assert "--- thinking" not in out and "1 prompt(s), 14 tokens" in out and "KV cache" in out
    (record,) = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert record["budget_cut"] and record["thinking_tokens"] == 4 and len(record["tokens"]) == 14
    # "<|im_start|>answer\nFinal Answer:" after the 4 thinking tokens (a newline first unless one ends them)
    assert "<|im_start|>answer\nFinal Answer:" in record["text"] and record["answer"].startswith("\nFinal Answer:")
    assert record["question"] == "What is 2+2?"


def test_generate_jsonl_batches(model_dir, capsys, tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text('{"question": "a?"}\n"b?"\n\n{"prompt": "c?"}\n')
    out_file = tmp_path / "out.jsonl"
    code, out, err = run(["--model", model_dir, "--prompts", str(prompts), "--device", "cpu", "--max-rows", "2",
                          "--max-new-tokens", "6", "--num-waits", "1", "--temperature", "0.8", "--seed", "3",
                          "--out", str(out_file), "--no-progress"], capsys)
    assert code == 0 and out.count("[3 prompts on 2 rows:") == 1 and "tok/s" not in err  # no progress bar
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["question"] for r in records] == ["a?", "b?", "c?"] and all(len(r["tokens"]) == 6 for r in records)


def test_generate_kv_cache_budget_keeps_the_tokens(model_dir, capsys, tmp_path):
    """--kv-cache: a budget of a few pages (12 KiB: 5 pages of 16 positions x 128 bytes) makes rows wait for pages;
    greedy tokens are those of a run without a budget."""
    prompts = tmp_path / "q.jsonl"
    prompts.write_text('"a?"\n"b?"\n"What is 2 + 2?"\n')
    runs = {}
    for budget in ([], ["--kv-cache", "12KiB"]):
        out_file = tmp_path / f"out{len(budget)}.jsonl"
        code, out, err = run(["--model", model_dir, "--prompts", str(prompts), "--device", "cpu", "--max-rows", "3",
                              "--max-new-tokens", "12", "--out", str(out_file), "--no-progress", *budget], capsys)
        assert code == 0, err
        runs[len(budget)] = [json.loads(line)["tokens"] for line in out_file.read_text().splitlines()]
    assert runs[0] == runs[2] and all(len(t) == 12 for t in runs[0])


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--device", "cpu"], "one of the arguments --prompt --prompts is required"),
        (["--prompt", "x", "--prompts", "y"], "not allowed with argument"),
        (["--prompts", "/nonexistent.jsonl"], "no such file"),
        (["--prompt", "x", "--max-new-tokens", "0"], "sampling: max_new_tokens must be an int >= 1, got 0"),
        (["--prompt", "x", "--num-waits", "-1"], "num_waits must be an int >= 0"),
        (["--prompt", "x", "--max-thinking-tokens", "2", "--min-thinking-tokens", "3"], "must not exceed"),
        (["--prompt", "x", "--temperature", "-1"], "sampling: temperature must be a number >= 0, got -1.0"),
        (["--prompt", "x", "--top-p", "1.5"], "sampling: top_p must be None or a number in (0, 1], got 1.5"),
        (["--prompt", "x", "--top-k", "0"], "sampling: top_k must be None or an int >= 1, got 0"),
        (["--prompt", "x", "--max-rows", "0"], "argument --max-rows: expected an integer >= 1, got '0'"),
        (["--prompt", "x", "--dtype", "bfloat16"], "argument --dtype: invalid choice: 'bfloat16'"),
        (["--prompt", "x", "--no-think", "--num-waits", "2"], "--no-think turns budget forcing off"),
        (
            ["--prompt", "x", "--device", "cpu", "--tokenizer", "/nonexistent-tokenizer"],
            "--tokenizer '/nonexistent-tokenizer': no such directory, and not a Hugging Face name (owner/name)",
        ),
        (["--prompt", "x", "--max-seq-len", "1"], "argument --max-seq-len: expected an integer >= 2, got '1'"),
        (["--prompt", "x", "--max-seq-len", "-5"], "argument --max-seq-len: expected an integer >= 2, got '-5'"),
        (["--prompt", "x", "--device", "bogus"], "--device must be cuda[:N] or cpu, got 'bogus'"),
        (["--prompt", "x", "--device", "meta"], "--device must be cuda[:N] or cpu, got 'meta'"),
        (["--prompt", "x", "--threads", "0"], "argument --threads: expected an integer >= 1 and < "),
    ],
)
def test_generate_rejects_bad_arguments(model_dir, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        run(["--model", model_dir, *argv], capsys)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_generate_rejects_missing_model_and_long_prompt(model_dir, capsys, tmp_path):
    with pytest.raises(SystemExit):
        run(["--model", str(tmp_path / "none"), "--prompt", "x"], capsys)
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # known from the tokenized prompt, before the model loads
        run(["--model", model_dir, "--prompt", "x", "--device", "cpu", "--max-seq-len", "20"], capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--max-seq-len 20: the longest prompt (" in err and "--max-new-tokens 4096" in err


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: argument errors must be found before."""
    monkeypatch.setattr(patch_module, "load", lambda *a, **k: pytest.fail("the model was loaded"))


def _gpt2_dir(model_dir, tmp_path) -> str:
    """The tiny model's directory with a GPT-2 config.json."""
    from transformers import GPT2Config

    path = shutil.copytree(model_dir, tmp_path / "gpt2")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(path)
    return str(path)


def _binary_file(tmp_path) -> str:
    path = tmp_path / "prompts.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # what a PNG file starts with
    return str(path)


# Every check the config or the tokenizer can make runs before the weights load (the model has 512 positions).
@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x", "--kv-cache", "1KiB"], "--kv-cache 1 KiB holds fewer than 2 KV pages of this model (2 KiB each: "
                                              "16 tokens in float32); raise it"),
    (["--prompt", "x", "--kv-cache", "10TiB"], "--kv-cache 10 TiB is more than the "),
    (["--prompt", "x", "--max-new-tokens", "1000000000"],
     "--max-new-tokens 1000000000: the longest prompt (32 tokens) plus 1000000000 new tokens exceeds the model's 512 "
     "positions (max_position_embeddings); lower --max-new-tokens or shorten the prompt"),
    (["--prompt", "seven " * 600, "--max-new-tokens", "8"],
     "--max-new-tokens 8: the longest prompt (632 tokens) plus 8 new tokens exceeds the model's 512 positions"),
    (["--prompt", "", "--raw"], "the prompt is empty (no tokens): give text to decode from"),
    (["--prompt", "x", "--max-seq-len", "50000"],
     "--max-seq-len 50000 is more than the model's 512 positions (max_position_embeddings in its config.json)"),
    (["--prompts", "BINARY"], "--prompts: line 1 of BINARY is not valid UTF-8 (byte 0: invalid start byte)"),
    (["--prompts", "DIR"], "--prompts 'DIR' is a directory; give a JSONL file"),  # was: "no such file"
    (["--prompt", "x", "--model", "GPT2"],
     "--model 'GPT2': model_type 'gpt2'; s1fast runs Qwen2, Qwen2.5 and Qwen3 (qwen2, qwen3)"),
])
def test_generate_checks_config_and_prompts_before_loading(model_dir, capsys, tmp_path, no_model_load, argv, message):
    paths = {"BINARY": _binary_file(tmp_path) if "BINARY" in argv else "",
             "GPT2": _gpt2_dir(model_dir, tmp_path) if "GPT2" in argv else "", "DIR": str(tmp_path)}
    argv = [paths.get(a, a) for a in argv]
    message = message.replace("BINARY", paths["BINARY"]).replace("GPT2", paths["GPT2"]).replace("DIR", paths["DIR"])
    with pytest.raises(SystemExit) as e:
        run(["--model", model_dir, "--device", "cpu", *argv], capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"s1fast generate: error: {message}" in err and "Traceback" not in err, err


def _unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return str(locked / "out.jsonl")


@pytest.mark.parametrize("case, message", [
    ("directory", "is a directory; give a file name"),
    ("missing parent", "does not exist; create it first"),
    ("read-only file", "is read-only; make it writable or choose another file"),
    pytest.param("unwritable parent", "no permission to create files in", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes in any directory")),
])
def test_generate_refuses_bad_output_before_loading(model_dir, capsys, tmp_path, no_model_load, case, message):
    path = {
        "directory": lambda: str(tmp_path),
        "missing parent": lambda: str(tmp_path / "no" / "out.jsonl"),
        "read-only file": lambda: str(tmp_path / "ro.jsonl"),
        "unwritable parent": lambda: _unwritable_parent(tmp_path),
    }[case]()
    if case == "read-only file":
        with open(path, "w") as f:
            f.write("keep me\n")
        os.chmod(path, 0o444)
    with pytest.raises(SystemExit) as e:
        run(["--model", model_dir, "--prompt", "x", "--device", "cpu", "--out", path], capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"s1fast generate: error: --out {path!r}" in err and message in err
    if case == "read-only file":
        assert open(path).read() == "keep me\n"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_generate_leaves_the_old_output(model_dir, capsys, tmp_path, monkeypatch, how):
    """Interrupted while decoding, after tokens were streamed: the old file is intact, no temporary file is
    left, one line says so, and the SIGTERM handler is restored."""
    prompts = tmp_path / "q.jsonl"
    prompts.write_text('"a?"\n"b?"\n')
    out_file = tmp_path / "out.jsonl"
    out_file.write_text("old results\n")
    run_engine, batches = engine_module.Engine.run, []

    def interrupted(self, callback=None):
        def stream(row, ids):
            callback(row, ids)
            batches.append(row)
            if len(batches) == 3:
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    raise KeyboardInterrupt

        return run_engine(self, stream)

    monkeypatch.setattr(engine_module.Engine, "run", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    code, _, err = run(["--model", model_dir, "--prompts", str(prompts), "--device", "cpu", "--max-rows", "1",
                        "--max-new-tokens", "6", "--out", str(out_file)], capsys)
    assert code == 130 and len(batches) == 3
    assert err.splitlines()[-1] == f"s1fast generate: interrupted; {out_file} left as it was"
    assert out_file.read_text() == "old results\n" and sorted(os.listdir(tmp_path)) == ["out.jsonl", "q.jsonl"]
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize("case", ["empty", "no weights", "truncated weights", "garbage weights", "garbage config"])
def test_generate_on_a_broken_model_directory_is_one_line(model_dir, capsys, tmp_path, case):
    broken = tmp_path / "broken"
    broken.mkdir()
    weights = os.path.join(model_dir, "model.safetensors")
    if case != "empty":
        shutil.copy(os.path.join(model_dir, "config.json"), broken)
    if case == "truncated weights":
        with open(weights, "rb") as f:
            (broken / "model.safetensors").write_bytes(f.read(os.path.getsize(weights) // 2))
    elif case == "garbage weights":
        (broken / "model.safetensors").write_bytes(os.urandom(4096))
    elif case == "garbage config":
        shutil.copy(weights, broken)
        (broken / "config.json").write_text("{not json")
    argv = ["--model", str(broken), "--prompt", "x", "--device", "cpu", "--max-new-tokens", "4"]
    with pytest.raises(SystemExit) as e:  # the usage, then one line
        run(argv, capsys)
    usage, err = generate._parser().format_usage(), capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and err[len(usage) :].startswith("s1fast generate: error: ")
    assert err[len(usage) :].count("\n") == 1
    if case == "empty":  # an argument error: before anything loads
        assert "holds no config.json" in err
    elif case == "garbage config":  # read before the weights
        assert f"--model {str(broken)!r}: its config.json does not load (OSError: " in err
    else:
        assert f"model {str(broken)!r} does not load: " in err


def test_generate_cpu_threads_and_s1_compat(model_dir, capsys):
    """On CPU a small model decodes on one thread unless --threads says otherwise, and one stderr line says
    which; --s1-compat reaches the budget forcing (4.9M parameters here: the full Qwen vocabulary)."""
    torch.set_num_threads(2)
    argv = ["--model", model_dir, "--prompt", "x", "--device", "cpu", "--max-new-tokens", "8",
            "--max-thinking-tokens", "2"]
    code, _, err = run(argv, capsys)
    assert code == 0 and "s1fast generate: decoding on 1 CPU thread (a small model, 4.9M parameters; --threads N" in err
    assert torch.get_num_threads() == 1
    code, out, err = run([*argv, "--threads", "2", "--num-waits", "1", "--s1-compat"], capsys)
    assert code == 0 and "s1fast generate: decoding on 2 CPU threads (as asked)" in err and torch.get_num_threads() == 2
    assert "--- thinking: 2 tokens" in out and "cut by the budget" in out
