"""s1K data: s1's exact text and loss mask with the real Qwen tokenizer, the loaders, the bundled sample and its
generator, length handling, and clear errors for bad input."""

from __future__ import annotations

import errno
import json
import os
import re
import stat

import pytest

from s1fast.files import read_records, write_atomic
from s1fast.model.chat import qwen_tokenizer_path
from s1fast.train import make_sample
from s1fast.train.data import (
    IGNORE_INDEX,
    SAMPLE_PATH,
    example_text,
    load_dataset,
    tokenize_example,
    tokenize_records,
)

# s1's text for one record, written out by hand (not built by the code under test).
RECORD = {
    "question": "What is 2 + 3?",
    "thinking_trajectories": ["  Add them: 2 + 3 = 5.\nWait, check: 5 - 3 = 2.  "],
    "attempt": " The sum is 5. ",
}
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
)
EXPECTED_COMPLETION = (
    "<|im_start|>think\nAdd them: 2 + 3 = 5.\nWait, check: 5 - 3 = 2.\n<|im_start|>answer\n"
    "Answer: The sum is 5.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_path())


def test_text_is_s1s_format():
    assert example_text(RECORD) == (EXPECTED_PROMPT, EXPECTED_COMPLETION)
    # An attempt that already has "Answer:" is kept as it is; several trajectories are joined by newlines.
    prompt, completion = example_text({**RECORD, "thinking_trajectories": ["a", "b"], "attempt": "x\nAnswer: 5"})
    assert completion == "<|im_start|>think\na\nb\n<|im_start|>answer\nx\nAnswer: 5<|im_end|>\n"


def test_s1k_1_1_schema_picks_the_trajectory():
    record = {"question": "q", "deepseek_thinking_trajectory": "deep", "deepseek_attempt": "d",
              "gemini_thinking_trajectory": "gem", "gemini_attempt": "g"}
    assert "think\ndeep\n" in example_text(record)[1] and "Answer: d<" in example_text(record)[1]  # default deepseek
    assert "think\ngem\n" in example_text(record, trajectory="gemini")[1]
    assert "Answer: g<" in example_text(record, trajectory="gemini")[1]
    with pytest.raises(ValueError, match="trajectory must be one of"):
        example_text(record, trajectory="claude")


def test_tokenize_example_mask_and_round_trip(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    out = tokenize_example(RECORD, tokenizer)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    n_masked = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    assert all(x == IGNORE_INDEX for x in labels[:n_masked]) and labels[n_masked:] == ids[n_masked:]
    # The masked prefix is exactly system + user + "<|im_start|>assistant\n", tokenized alone the same way.
    assert tokenizer.decode(ids[:n_masked]) == EXPECTED_PROMPT
    assert ids[:n_masked] == tokenizer(EXPECTED_PROMPT, add_special_tokens=False)["input_ids"]
    assert ids[n_masked - 3:n_masked + 2] == [151644, tokenizer.convert_tokens_to_ids("assistant"), 198, 151644,
                                              tokenizer.convert_tokens_to_ids("think")]
    assert tokenizer.decode(ids) == EXPECTED_PROMPT + EXPECTED_COMPLETION  # no special tokens added
    assert ids[-2:] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), 198]
    assert ids.count(151644) == 5  # system, user, assistant, think, answer


def test_sample_dataset_is_the_generators_output_and_correct(tokenizer):
    rows = read_records(SAMPLE_PATH)
    assert rows == json.loads(json.dumps(make_sample.make_rows(len(rows), seed=0)))  # the committed file is current
    assert 200 <= len(rows) <= 1000
    assert set(rows[0]) == {"question", "solution", "cot_type", "source_type", "metadata", "cot",
                            "thinking_trajectories", "attempt"}
    traces = [r["thinking_trajectories"][0] for r in rows]
    assert 0.15 < sum("Wait" in t for t in traces) / len(rows) < 0.6  # self-corrections, but not everywhere
    assert any("Answer:" in r["attempt"] for r in rows) and any("Answer:" not in r["attempt"] for r in rows)
    checked = 0
    for row in rows:  # answers of the arithmetic kinds, recomputed independently
        q, solution = row["question"], row["solution"].splitlines()[-1]
        m = re.fullmatch(r"(?:What is|Compute|Evaluate) ([0-9 +x-]+)[?.]", q)
        if m:
            value = eval(m.group(1).replace("x", "*"))  # digits and + - * only (matched above)
            assert solution == f"The answer is {value}.", q
            checked += 1
        m = re.fullmatch(r"Solve for x: (-?\d+)x ([+-]) (\d+) = (-?\d+)\.", q)
        if m:
            a, sign, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            x = int(solution.removeprefix("The answer is x = ").rstrip("."))
            assert a * x + (b if sign == "+" else -b) == c, q
            checked += 1
    assert checked > len(rows) // 4
    data = load_dataset(None, tokenizer)
    assert len(data) == len(rows) and not data.dropped


def test_make_sample_cli_writes_the_file(tmp_path):
    out = tmp_path / "s.jsonl"
    assert make_sample.main(["--rows", "12", "--seed", "3", "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == json.loads(
        json.dumps(make_sample.make_rows(12, 3))
    )
    assert make_sample.make_rows(12, 4) != make_sample.make_rows(12, 3)


def test_parquet_jsonl_and_json_read_the_same(tmp_path, tokenizer):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = make_sample.make_rows(6, seed=1)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    make_sample.write_jsonl(rows, str(tmp_path / "d.jsonl"))
    want = tokenize_records(rows, tokenizer)
    for ext in ("parquet", "json", "jsonl"):
        assert load_dataset(str(tmp_path / f"d.{ext}"), tokenizer).examples == want, ext


def test_long_examples_are_reported_and_dropped_never_cut(tmp_path, tokenizer):
    rows = make_sample.make_rows(5, seed=2)
    rows[3]["thinking_trajectories"] = ["step " * 400]
    path = str(tmp_path / "d.jsonl")
    make_sample.write_jsonl(rows, path)
    full = tokenize_records(rows, tokenizer)
    long = len(full[3]["input_ids"])
    data = load_dataset(path, tokenizer, block_size=300)
    assert data.dropped == [(3, long)] and data.indices == [0, 1, 2, 4]
    assert data.examples == [full[i] for i in (0, 1, 2, 4)]  # the rest untouched
    with pytest.raises(ValueError, match=rf"longer than block_size=300.*\(3, {long}\)"):
        load_dataset(path, tokenizer, block_size=300, drop_long=False)
    with pytest.raises(ValueError, match="every example"):
        load_dataset(path, tokenizer, block_size=10)


def test_bad_input_errors_name_the_problem(tmp_path, tokenizer):
    path = str(tmp_path / "d.jsonl")

    def write(rows):
        make_sample.write_jsonl(rows, path)

    write([{"question": "q", "attempt": "a"}])  # s1K without its trace: named as such, not as s1K-1.1's columns
    with pytest.raises(ValueError, match=r"missing column\(s\) \['thinking_trajectories'\]; expected"):
        load_dataset(path, tokenizer)
    write([{"question": "q", "deepseek_thinking_trajectory": "t"}])  # s1K-1.1 without its attempt
    with pytest.raises(ValueError, match=r"missing column\(s\) \['deepseek_attempt'\]; expected"):
        load_dataset(path, tokenizer)
    write([])
    with pytest.raises(ValueError, match="is empty"):
        load_dataset(path, tokenizer)
    rows = make_sample.make_rows(3)
    rows[2]["thinking_trajectories"] = []
    write(rows)
    with pytest.raises(ValueError, match="row 2: no thinking trajectory"):
        load_dataset(path, tokenizer)
    rows[2]["thinking_trajectories"] = ["ok"]
    rows[1]["question"] = "  "
    write(rows)
    with pytest.raises(ValueError, match="row 1: column 'question' is empty"):
        load_dataset(path, tokenizer)
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="line 4 is not valid JSON"):
        read_records(path)
    with pytest.raises(ValueError, match="expected a .parquet, .jsonl or .json"):
        read_records(__file__)  # an existing .py file
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):  # owner/name-shaped, but a file name
        read_records("data/missing.jsonl")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        load_dataset(None, tokenizer, block_size=0)


def test_tokenizer_without_delimiters_is_rejected():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz<|>_")}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", name_or_path="plain-chars")
    with pytest.raises(ValueError, match=r"tokenizer 'plain-chars' has no single token for '<\|im_start\|>'"):
        tokenize_example(RECORD, plain)


def test_dataset_name_needs_datasets_or_loads_it():
    """A Hugging Face name goes to `datasets` (not installed here: a clear error saying what to install)."""
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed; loading by name needs the network")
    with pytest.raises(ImportError, match="simplescaling/s1K.*pip install datasets"):
        read_records("simplescaling/s1K")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face dataset name"):
        read_records("no/such/file.jsonl")


def test_rows_that_are_not_records_or_not_utf8_name_the_file_and_line(tmp_path, tokenizer):
    good = json.dumps(RECORD)
    path = tmp_path / "d.jsonl"
    for bad, kind in (("[1, 2]", "array"), ('"text"', "string"), ("7", "number"), ("null", "null")):
        path.write_text(f"{good}\n\n{bad}\n")  # line 3: blank lines count
        with pytest.raises(ValueError, match=rf"d.jsonl: line 3 is a JSON {kind}, expected an object"):
            read_records(str(path))
    path.write_bytes(good.encode() + b"\n" + '{"question": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"d.jsonl: line 2 is not valid UTF-8 \(byte 17: invalid continuation byte\)"):
        read_records(str(path))
    whole = tmp_path / "d.json"
    whole.write_text(json.dumps([RECORD, [1]]))
    with pytest.raises(ValueError, match=r"d.json: item 2 is a JSON array, expected an object"):
        read_records(str(whole))
    whole.write_text(json.dumps(RECORD))
    with pytest.raises(ValueError, match=r"d.json: expected a JSON array of records, got a JSON object"):
        read_records(str(whole))
    whole.write_bytes(b"[\xff]")
    with pytest.raises(ValueError, match=r"d.json is not valid UTF-8"):
        read_records(str(whole))
    with pytest.raises(ValueError, match=r"row 0: expected a record \(columns by name\), got list"):
        tokenize_records([[1, 2]], tokenizer)
    pytest.importorskip("pyarrow")
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"d.parquet: not a readable parquet file"):
        read_records(str(tmp_path / "d.parquet"))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_write_atomic_gives_the_umask_permissions_and_leaves_no_temporaries(tmp_path, monkeypatch, umask):
    """As a plain open() would (mkstemp's 0600 would not); a failed write (a full disk) keeps the old file."""
    path = tmp_path / "out.json"
    old = os.umask(umask)
    try:
        write_atomic(str(path), "one")
        write_atomic(str(path), "two")  # replacing a file
    finally:
        os.umask(old)
    assert path.read_text() == "two" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(str(path), "three")
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["out.json"]


def test_an_example_past_the_models_positions_is_warned_about(tmp_path, capsys, monkeypatch):
    """issue 28's probe round: `s1fast train --block-size` beyond the model's positions trained an example longer than
    them with no word (s1 never cuts, so the example stays; the user is told, before the model loads)."""
    from tiny_qwen import save_qwen_vocab_model

    from s1fast.train import cli

    class Loading(Exception):
        pass

    model = save_qwen_vocab_model(tmp_path / "model", hidden=32, intermediate=64, heads=2, kv_heads=1)  # 512 positions
    rows = make_sample.make_rows(3, seed=2)
    make_sample.write_jsonl(rows, str(tmp_path / "short.jsonl"))
    rows[1]["thinking_trajectories"] = ["step " * 600]
    make_sample.write_jsonl(rows, str(tmp_path / "long.jsonl"))
    monkeypatch.setattr(cli, "_build_model", lambda *a, **k: (_ for _ in ()).throw(Loading()))
    for data, warned in (("short", False), ("long", True)):
        with pytest.raises(Loading):
            cli.main(["--model", model, "--data", str(tmp_path / f"{data}.jsonl"), "--out", str(tmp_path / data),
                      "--device", "cpu", "--no-progress"])
        err = capsys.readouterr().err
        assert ("s1fast train: warning: the longest example has " in err) == warned, err
    assert re.search(r"has \d{3} tokens, more than the model's 512 positions \(max_position_embeddings in its "
                     r"config.json\); .* \(--block-size 512 drops such examples\)\n", err), err


@pytest.mark.parametrize("error", [ConnectionError("Couldn't reach 'nobody/none' on the Hub (OfflineModeIsEnabled)"),
                                   FileNotFoundError("Dataset 'nobody/none' doesn't exist on the Hub"),
                                   ValueError('Unknown split "test". Should be one of [\'train\'].')])
def test_a_dataset_name_that_does_not_load_names_the_argument(error, monkeypatch):
    """issue 28's probe round: `s1fast eval --problems nobody/none` offline printed datasets' own line, naming
    neither --problems nor what it was."""
    datasets = pytest.importorskip("datasets")

    def fail(*args, **kwargs):  # what datasets raises offline, for a name the Hub lacks, for a missing split
        raise error

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(ValueError) as e:
        read_records("nobody/none", what="problems")
    assert str(e.value) == (f"problems 'nobody/none': the Hugging Face dataset does not load ({type(error).__name__}: "
                            f"{error})")
