"""A client for OpenAI-compatible chat servers (vLLM, SGLang, DeepSeek's API, ``s1fast serve``), built on the official
``openai`` package: several endpoints sharing the load, bounded concurrency, a timeout per request, and retries with
exponential backoff on 429, 5xx, time-outs, dropped connections and malformed replies, honouring ``Retry-After``.

    client = Client(["http://gpu0:8000/v1", "http://gpu1:8000/v1"], concurrency=16)
    for key, reply in client.map({"q1": [{"role": "user", "content": "2+2?"}]}, max_tokens=4096):
        reply.thinking, reply.answer, reply.tokens, reply.error   # error: None, or why every try failed

A top-level module (beside ``files`` and ``commands``) because two rooms use it: ``s1fast data`` (teachers, students,
the domain classifier) and ``s1fast eval --endpoint`` (budget-forced completions from ``s1fast serve``); ``data``
imports ``eval``, so the client can live in neither without one room importing the other's internals.

Thinking comes from the message's ``reasoning_content`` (vLLM, SGLang, DeepSeek, ``s1fast serve``; ``reasoning`` as
newer vLLM names it), else from ``<think>...</think>`` at the start of the content (R1-style servers that return the
raw text; an unclosed ``<think>`` means the whole content is thinking and there is no answer). The retry loop is
this module's (the ``openai`` client's own retries are off) so that every kind of failure, a 200 with a body that
is not a chat completion included, is retried the same way and a retry moves on to the next endpoint.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer pause is waited for this long
_THINK = re.compile(r"^\s*<think>(.*?)(?:</think>|$)(.*)$", re.DOTALL)


@dataclass
class Reply:
    """One request's outcome: the thinking and the answer (None when ``error``), completion tokens and, where the
    server reports them, reasoning tokens; ``source``: where the thinking came from (``reasoning_content`` or
    ``think_tags``, None when there was none); ``tries``: requests sent; ``extra``: the choice's other fields."""

    thinking: str | None = None
    answer: str | None = None
    tokens: int | None = None
    reasoning_tokens: int | None = None
    finish_reason: str | None = None
    source: str | None = None
    error: str | None = None
    tries: int = 0
    extra: dict | None = None  # the choice's fields beyond OpenAI's (s1fast serve: forced_waits, budget_cut, ...)


def split_thinking(message) -> tuple[str | None, str, str | None]:
    """(thinking, answer, source) of an ``openai`` chat message, as the module docstring says."""
    extra = message.model_extra or {}
    content = message.content or ""
    for name in ("reasoning_content", "reasoning"):
        if isinstance(extra.get(name), str):
            return extra[name], content, "reasoning_content"
    m = _THINK.match(content)
    if m:
        return m.group(1).strip("\n"), m.group(2).strip(), "think_tags"
    return None, content, None


def retry_after(headers) -> float | None:
    """Seconds a ``Retry-After`` (or ``retry-after-ms``) header asks for, or None."""
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms") is not None:
            seconds = float(headers["retry-after-ms"]) / 1000
        elif headers.get("retry-after") is not None:
            seconds = float(headers["retry-after"])
        else:
            return None
    except ValueError:  # an HTTP date: rare from model servers, so treated as no hint
        return None
    # a pause time.sleep takes: never negative or NaN (either raised out of chat()), at most the cap
    return None if math.isnan(seconds) else min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class Client:
    """Chat completions over ``endpoints`` (base URLs ending in ``/v1``), each request sent to the next endpoint in
    turn and retried there on failure.

    Args:
        endpoints: one or more base URLs.
        model: the model name sent; None: the first id the first endpoint lists at ``/v1/models``.
        api_key_env: the environment variable holding the API key (unset: the key "none", for local servers).
        concurrency: requests in flight at once, over all endpoints.
        timeout: seconds a request may take (connect to last byte).
        retries: tries after the first, for 429 / 5xx / time-outs / connection errors / malformed replies.
        backoff: the first pause in seconds; doubled per retry up to ``max_backoff``, with jitter; a
            ``Retry-After`` header replaces it.
    """

    def __init__(self, endpoints: list[str], *, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 600.0, retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 60.0):
        import openai

        check_client_settings(endpoints, concurrency=concurrency, timeout=timeout, retries=retries, backoff=backoff)
        if not 0 <= max_backoff <= MAX_WAIT_S:  # nan too
            raise ValueError(f"Client: max_backoff must be >= 0 and at most {MAX_WAIT_S} seconds, got {max_backoff}")
        key = os.environ.get(api_key_env) or "none"
        self.clients = [openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=0) for url in endpoints]
        self.endpoints, self.concurrency, self.retries = list(endpoints), concurrency, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._model = model

    @property
    def model(self) -> str:
        """The model name sent with every request (asked of the first endpoint once, when not given)."""
        with self._lock:
            if self._model is None:
                models = self.clients[0].models.list().data
                if not models:
                    raise ValueError(f"{self.endpoints[0]} lists no model at /v1/models; give the model name")
                self._model = models[0].id
            return self._model

    def chat(self, messages: list[dict] | None = None, *, prompt: str | list[int] | None = None, **params) -> Reply:
        """One chat completion with retries (``params``: the request's fields; those the ``openai`` client does not
        know, e.g. ``max_thinking_tokens``, go in ``extra_body``); with ``prompt`` instead of ``messages``, one
        completion (``/v1/completions``: the text in ``Reply.answer``). Never raises for the server's failures: the
        last error is in ``Reply.error``; a call with both or neither of ``messages`` and ``prompt`` is a ValueError."""
        import openai

        if (messages is None) == (prompt is None):
            raise ValueError("Client.chat: give messages (a chat) or prompt (a completion), one of the two")
        known = {"max_tokens", "temperature", "top_p", "seed", "stop", "n"}
        body = {k: v for k, v in params.items() if k in known and v is not None}
        extra = {k: v for k, v in params.items() if k not in known and v is not None}
        error = None
        for attempt in range(self.retries + 1):
            with self._lock:
                i = next(self._turn) % len(self.clients)
            pause = None
            try:
                if prompt is not None:
                    r = self.clients[i].completions.create(model=self.model, prompt=prompt, extra_body=extra, **body)
                    choice = r.choices[0]
                    thinking, answer, source = None, choice.text, None
                else:
                    r = self.clients[i].chat.completions.create(model=self.model, messages=messages,
                                                                extra_body=extra, **body)
                    choice = r.choices[0]
                    thinking, answer, source = split_thinking(choice.message)
                usage = r.usage
                details = getattr(usage, "completion_tokens_details", None) if usage is not None else None
                return Reply(thinking=thinking, answer=answer, tokens=usage.completion_tokens if usage else None,
                             reasoning_tokens=getattr(details, "reasoning_tokens", None),
                             finish_reason=choice.finish_reason, source=source, tries=attempt + 1,
                             extra=dict(choice.model_extra or {}))
            except openai.APIStatusError as e:
                error = f"{self.endpoints[i]}: HTTP {e.status_code}: {str(e)[:200]}"
                if e.status_code not in RETRY_STATUS:
                    return Reply(error=error, tries=attempt + 1)
                pause = retry_after(e.response.headers)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                error = f"{self.endpoints[i]}: {type(e).__name__}: {str(e)[:200]}"
            except (openai.APIError, ValueError, TypeError, AttributeError, IndexError) as e:  # not a completion
                error = f"{self.endpoints[i]}: malformed reply: {type(e).__name__}: {str(e)[:200]}"
            if attempt < self.retries:
                if pause is None:
                    pause = min(self.backoff * 2.0 ** min(attempt, 64), self.max_backoff) * (1 - 0.25 * random.random())
                time.sleep(pause)
        return Reply(error=f"{self.retries + 1} tries failed; last: {error}", tries=self.retries + 1)

    def map(self, jobs: dict | Iterable[tuple], **params) -> Iterator[tuple]:
        """``(key, Reply)`` for each ``(key, request)`` of ``jobs`` (a dict or pairs; a request is the messages, or a
        dict of :meth:`chat`'s arguments: ``messages`` or ``prompt`` and fields of its own, e.g. ``seed``), as they
        finish, with at most ``concurrency`` requests in flight; ``params``: fields of every request. The requests
        run on daemon threads: stopping the iteration (Ctrl-C) sends no new request and does not wait for those in
        flight, whose replies are dropped."""
        pending = iter(jobs.items() if isinstance(jobs, dict) else jobs)
        done: queue.Queue = queue.Queue()

        def work(key, request):
            request = request if isinstance(request, dict) else {"messages": request}
            try:
                done.put((key, self.chat(**{**params, **request}), None))
            except BaseException as e:  # noqa: BLE001  (a bug, not a server failure: raised in the caller's thread)
                done.put((key, None, e))

        running = 0
        while True:
            for key, request in itertools.islice(pending, self.concurrency - running):
                threading.Thread(target=work, args=(key, request), daemon=True, name="s1fast-client").start()
                running += 1
            if not running:
                return
            key, reply, error = done.get()
            running -= 1
            if error is not None:
                raise error
            yield key, reply


def add_client_arguments(group) -> None:
    """The command-line options of a :class:`Client` (``--endpoint`` repeatable, ``--model-name``, ``--api-key-env``,
    ``--concurrency``, ``--timeout``, ``--retries``, ``--backoff``), on an argparse parser or group."""
    group.add_argument("--endpoint", action="append", default=[], metavar="URL",
                       help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1; repeat to spread "
                            "the requests over several servers")
    group.add_argument("--model-name", help="model name sent to the servers (default: the first at /v1/models)")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key "
                       "(default: %(default)s; unset: no key)")
    group.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default: %(default)s)")
    group.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    group.add_argument("--retries", type=int, default=5,
                       help="retries on 429 / 5xx / time-outs / malformed replies, with backoff (default: %(default)s)")
    group.add_argument("--backoff", type=float, default=1.0, help="first retry pause in seconds, doubled per retry "
                       "unless the server sends Retry-After (default: %(default)s)")


MAX_WAIT_S = 7 * 24 * 3600  # --timeout and --backoff at most: past it a deadline overflows the clock


def check_client_settings(endpoints: list[str], *, concurrency: int, timeout: float, retries: int,
                          backoff: float) -> None:
    """The client's settings, or a one-line ValueError naming the command-line option."""
    if not endpoints:
        raise ValueError("--endpoint: give at least one server URL")
    for url in endpoints:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"--endpoint {url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    if not 0 < timeout <= MAX_WAIT_S:  # nan and inf too; a longer one overflows the clock's time_t
        raise ValueError(f"--timeout must be > 0 and at most {MAX_WAIT_S} seconds (a week), got {timeout}")
    if retries < 0:
        raise ValueError(f"--retries must be >= 0, got {retries}")
    if not 0 <= backoff <= MAX_WAIT_S:
        raise ValueError(f"--backoff must be >= 0 and at most {MAX_WAIT_S} seconds (a week), got {backoff}")
