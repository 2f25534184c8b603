"""The whole ``s1fast data`` pipeline against a tiny teacher and student served by ``s1fast serve`` (a subprocess on
a free loopback port, used over HTTP only, through the official ``openai`` client), then the same teacher decoded
by the local engine (``--teacher PATH``), and the result read by ``s1fast train``'s data loader."""

from __future__ import annotations

import json
import os

import pytest
from tiny_qwen import save_qwen_vocab_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("math_verify")

from s1fast.data.cli import main  # noqa: E402
from s1fast.train.data import SAMPLE_PATH  # noqa: E402

QUESTIONS = 4
SETTINGS = ["--max-tokens", "12", "--max-thinking-tokens", "6", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(model directory, base URL) of ``s1fast serve`` over a random 1-layer Qwen2 with the real tokenizer."""
    path = save_qwen_vocab_model(tmp_path_factory.mktemp("teacher"), seed=1, layers=1, tied=False,
                                 initializer_range=0.1, rope_theta=10000.0)
    from test_serve import start_serve

    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    proc, url = start_serve(path, "--device", "cpu", "--max-rows", "4", "--served-model-name", "tiny", log=log)
    yield path, url + "/v1"
    proc.terminate()
    proc.wait(60)


def test_pipeline_against_s1fast_serve(teacher, tmp_path):
    model, url = teacher
    rows = [json.loads(line) for line in open(SAMPLE_PATH)][:QUESTIONS]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "run")
    assert main(["collect", "--out", out, "--pool", f"sample={pool}", "--answer-field", "solution"]) == 0
    assert main(["distill", "--out", out, "--endpoint", url, "--concurrency", "4", *SETTINGS]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "distill.jsonl"))]
    assert len(recs) == QUESTIONS and all(r["error"] is None and r["teacher"] == "tiny" for r in recs)
    assert all(r["thinking"] and 1 <= r["thinking_tokens"] <= 6 and r["tokens"] <= 12 for r in recs)
    # what distill recorded is what the server answers (greedy), asked directly with the openai client
    client = openai.OpenAI(base_url=url, api_key="none")
    question = json.loads(open(os.path.join(out, "questions.jsonl")).readline())
    direct = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question["question"]}],
                                            max_tokens=12, temperature=0, extra_body={"max_thinking_tokens": 6})
    rec = next(r for r in recs if r["id"] == question["id"])
    assert (rec["thinking"], rec["answer"]) == (direct.choices[0].message.reasoning_content,
                                                direct.choices[0].message.content)

    # the local engine decodes the same teacher to the same traces
    local = str(tmp_path / "local")
    os.makedirs(local)
    os.link(os.path.join(out, "questions.jsonl"), os.path.join(local, "questions.jsonl"))
    assert main(["distill", "--out", local, "--teacher", model, "--device", "cpu", *SETTINGS]) == 0
    by_id = {r["id"]: r for r in recs}
    for r in (json.loads(line) for line in open(os.path.join(local, "distill.jsonl"))):
        assert (r["thinking"], r["answer"], r["thinking_tokens"]) == (
            by_id[r["id"]]["thinking"], by_id[r["id"]]["answer"], by_id[r["id"]]["thinking_tokens"])

    assert main(["attempt", "--out", out, "--endpoint", url, "--name", "tiny-student", *SETTINGS]) == 0
    attempts = [json.loads(line) for line in open(os.path.join(out, "attempt.jsonl"))]
    assert len(attempts) == QUESTIONS and all(a["error"] is None and a["correct"] is False for a in attempts)
    assert main(["classify", "--out", out, "--field", "source_type"]) == 0
    assert main(["select", "--out", out, "--size", "3", "--seed", "1"]) == 0
    report = json.load(open(os.path.join(out, "s1k_report.json")))
    assert report["counts"]["selected"] == 3 and report["counts"]["questions"] == QUESTIONS
    assert os.path.getsize(os.path.join(out, "s1k_report.png")) > 1000

    from s1fast.model.chat import load_tokenizer
    from s1fast.train.data import load_dataset

    data = load_dataset(out, load_tokenizer(model))  # `s1fast train --data DIR` reads DIR/s1k.jsonl
    assert len(data) == 3
    assert data.fingerprint() == load_dataset(os.path.join(out, "s1k.jsonl"), load_tokenizer(model)).fingerprint()
    first = json.loads(open(os.path.join(out, "s1k.jsonl")).readline())
    assert set(first) == {"question", "solution", "cot_type", "source_type", "metadata", "cot",
                          "thinking_trajectories", "attempt"}
    assert json.loads(first["metadata"])["domain"].startswith("s1fast/synthetic/")


def test_a_local_model_without_max_tokens_answers_within_its_positions(tmp_path):
    """Without ``--max-tokens`` a local model answers up to what its positions leave after each question (s1's 32,768
    would not fit a 32K-position student: every request was refused)."""
    from s1fast.model.chat import load_tokenizer, resolve_format

    small = save_qwen_vocab_model(tmp_path / "small", seed=1, layers=1, tied=False, initializer_range=0.1,
                                  max_position_embeddings=112)
    rows = [json.loads(line) for line in open(SAMPLE_PATH)][:2]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "run")
    assert main(["collect", "--out", out, "--pool", f"sample={pool}", "--answer-field", "solution"]) == 0
    assert main(["distill", "--out", out, "--teacher", str(small), "--device", "cpu", "--no-progress"]) == 0
    tok = load_tokenizer(str(small), None, "s1")
    fmt = resolve_format("s1", tok)
    questions = {q["id"]: q["question"] for q in map(json.loads, open(os.path.join(out, "questions.jsonl")))}
    recs = [json.loads(line) for line in open(os.path.join(out, "distill.jsonl"))]
    assert len(recs) == 2 and all(r["error"] is None for r in recs)
    for r in recs:
        room = 112 - len(tok(fmt.think_prompt(questions[r["id"]], tok), add_special_tokens=False)["input_ids"])
        assert r["tokens"] == room if r["finish_reason"] == "length" else r["tokens"] < room
    assert any(r["finish_reason"] == "length" for r in recs)  # up to the room, not a smaller default
    assert json.load(open(os.path.join(out, "distill.settings.json")))["teacher"]["max_tokens"] is None
