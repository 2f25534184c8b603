"""``s1fast serve`` on CPU: a random tiny Qwen2 with the real Qwen tokenizer behind a uvicorn server on a free
loopback port; every response checked against ``Decoder.generate`` token for token (greedy)."""

from __future__ import annotations

import json
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
    yield server, f"http://127.0.0.1:{port}", ref
    uv.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    assert choice["token_ids"] == row.tokens
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


def test_stop_string_before_an_incomplete_character(served):
    """Token 46500 is " t" and the first byte of a character that token 94 completes (" tỡ"): a stream holds
    the incomplete character back, but a stop string " t" is complete at 46500 already, as in the text."""
    tok = served[0].tokenizer
    assert tok.decode([46500]) == " t\ufffd" and tok.decode([46500, 94]) == " tỡ"
    text = serve._Text(tok)
    assert not text.add(46500) and text.take() == "" and not text.add(94) and text.take() == " tỡ"
    text = serve._Text(tok, ("x t",))
    assert not text.add(87) and text.take() == ""  # "x" may begin "x t": held
    assert text.add(46500) and text.text == "" and text.take() == ""  # it did: never sent
    text = serve._Text(tok, ("xy",))
    assert not text.add(87) and not text.add(46500) and not text.add(94) and text.take() == "x tỡ"  # released


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
    r = post(url, path, {**base, **fields})
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
    """``s1fast serve`` in a process of its own, SIGTERM with two streams in flight: it stops accepting at once,
    the short stream finishes, the long one (16000 tokens) is cancelled at --shutdown-timeout (an error
    event, no [DONE]), and the process exits with status 0."""
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", model_dir, "--shutdown-timeout", "-1"])
    assert e.value.code == 2
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
        status = proc.wait(30)
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


def test_serve_cli_rejects_bad_arguments(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", model_dir, "--max-rows", "0"])
    assert e.value.code == 2 and "--max-rows must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", "/nonexistent-model", "--device", "cpu"])
    assert e.value.code == 2
    assert "s1fast serve: error: --model (s1fast serve loads local models only)" in capsys.readouterr().err
