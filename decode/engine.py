"""Continuous batching: a queue of requests decoded on a fixed number of cache rows, each row refilled as soon as
its request finishes.

Every request has its own prompt and ``SamplingParams`` (``max_new_tokens``, temperature, top-k, top-p, seed, stop
tokens and ``BudgetForcing``: its own thinking budget and waits; ``s1fast.decode.params``). The engine only
orchestrates, one step at a time (``_Batch.steps``), the named parts of the decode room:

- the ``Scheduler`` (``s1fast.decode.scheduler``) says which requests run on which rows, admits them over the KV
  cache's pages and preempts the newest when pages run out;
- the runner (the ``Decoder``'s runner methods: ``start``, ``prefill``, ``step``, ``feed``, ``load``,
  ``move_row``) runs the model: one token per row per step, the host deciding one step late, edits fed in one
  multi-token forward (see ``s1fast.decode.decoder``);
- each request's budget-forcing state (``RowState``, ``s1fast.decode.budget``) decides what each row feeds next;
- the news stream out as ``(request, new_token_ids)`` (to ``Inbox`` listeners when serving).

When rows finish, the finished rows leave (the last rows' caches move into the holes) and the next requests of
the queue, in submission order, are prefilled into the free rows right there, between two decode steps; their
first tokens join the next step. So the batch stays full until the queue runs dry, instead of shrinking to the
longest trace as a static batch does. Results come back per request in submission order
(``GenerationResult.rows``).

Each request's tokens do not depend on the other requests: greedy decoding gives what it gives alone, and so does
sampling (``s1fast.decode.sampling``: a request's noise comes from its own key and positions, so a seeded request
draws the same tokens in any batch, in any admission order and after a preemption). ``Decoder.generate`` /
``stream`` are this engine with the prompts submitted in order (prompt ``i`` drawing from stream ``i`` of the
seed) on at most ``max_rows`` rows.

Serving (``s1fast.decode.serve``): ``loop()`` runs in a thread of its own; other threads ``post`` requests
(with callbacks for their tokens and their end) and ``cancel`` them (the ``Inbox``). The loop takes the posted
requests between two decode steps, into free rows; a cancelled request leaves at the next step. A posted request
that needs more cache positions than the running batch's cache holds waits until that batch drains.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from s1fast.decode.budget import BudgetForcing, RowState
from s1fast.decode.params import Request
from s1fast.decode.results import GenerationResult, GenerationStream, RowResult
from s1fast.decode.scheduler import Scheduler


class Inbox:
    """Requests posted from other threads for a running ``Engine.loop`` (thread-safe), with their listeners
    (``on_tokens(new_ids, row_state)``, ``on_done(row_result or None)``) and cancellations."""

    def __init__(self):
        self.lock = threading.Condition()
        self.posted: deque[Request] = deque()  # not yet taken by the loop
        self.listeners: dict[int, tuple] = {}  # id(request) -> (request, on_tokens, on_done) until done
        self.cancelled: set[int] = set()

    def post(self, request: Request, on_tokens: Callable, on_done: Callable) -> None:
        """Hand ``request`` to the loop, with its listeners."""
        with self.lock:
            self.listeners[id(request)] = (request, on_tokens, on_done)
            self.posted.append(request)
            self.lock.notify()

    def cancel(self, requests: list[Request] | None = None) -> None:
        """Cancel ``requests`` (None: every one not yet done)."""
        with self.lock:
            keys = self.listeners if requests is None else [id(r) for r in requests if id(r) in self.listeners]
            self.cancelled.update(keys)

    def in_flight(self) -> int:
        with self.lock:
            return len(self.listeners)

    def take(self, fits: Callable[[Request], bool] | None = None) -> list[Request]:
        """The posted requests in order, up to the first that does not ``fits(request)`` the running cache."""
        out = []
        with self.lock:
            while self.posted and (fits is None or fits(self.posted[0])):
                out.append(self.posted.popleft())
        return out

    def interrupt(self, free_rows: bool) -> bool:
        """Whether the loop must leave its fast path: a cancellation, or posted requests and free rows."""
        return bool(self.cancelled) or (free_rows and bool(self.posted))

    def is_cancelled(self, request: Request) -> bool:
        return id(request) in self.cancelled

    def news(self, request: Request, state: RowState, new: list[int]) -> None:
        self.listeners[id(request)][1](new, state)

    def finished(self, request: Request, row: RowResult | None) -> None:
        """``request`` is done (``row`` None: the engine failed): its ``on_done``, once."""
        for _, _, on_done in self.drop([id(request)]):
            on_done(row)

    def drop(self, keys: list[int]) -> list[tuple]:
        """Forget the requests of ``keys`` (ids); their listeners."""
        with self.lock:
            self.posted = deque(r for r in self.posted if id(r) not in keys)
            self.cancelled.difference_update(keys)
            return [self.listeners.pop(k) for k in keys if k in self.listeners]


class Engine:
    """Continuous batching over a ``Decoder``: ``submit`` requests, then ``run()`` (a ``GenerationResult``,
    rows in submission order) or ``stream()`` (``(request, new_token_ids)`` pairs, ``.result`` at the end).

    Args:
        decoder: a ``s1fast.decode.decoder.Decoder`` (its runner methods and ``check_requests``).
        max_rows: cache rows, the most requests decoded at once.
    """

    def __init__(self, decoder, max_rows: int = 16):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"Engine: max_rows must be an int >= 1, got {max_rows!r}")
        self.decoder = decoder
        self.max_rows = max_rows
        self.queue: list[Request] = []
        self.inbox = Inbox()

    def submit(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        budget: BudgetForcing | None = None,
    ) -> int:
        """Queue one request (arguments as ``Decoder.generate``'s, for one prompt: with ``seed``, the tokens of
        ``Decoder.generate([prompt], seed=seed)``). Returns its index in the results."""
        (request,) = self.decoder.check_requests("Engine.submit", [prompt], max_new_tokens=max_new_tokens,
                                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                                 stop_token_ids=stop_token_ids, budget=budget)
        return self.enqueue([request])[0]

    def enqueue(self, requests: list[Request]) -> list[int]:
        """Queue checked requests (``Decoder.check_requests``); their indices in the results."""
        self.queue += requests
        return list(range(len(self.queue) - len(requests), len(self.queue)))

    def stream(self) -> GenerationStream:
        """Decode every queued request (the queue is emptied); ``(request, new_token_ids)`` as tokens are
        decided, the ``GenerationResult`` as ``.result`` once exhausted."""
        if not self.queue:
            raise ValueError("Engine.stream: no request submitted")
        requests, self.queue = self.queue, []
        return GenerationStream(_Batch(self.decoder, requests, min(self.max_rows, len(requests))).steps())

    def run(self, callback=None) -> GenerationResult:
        """``stream()`` to the end; ``callback(request, new_token_ids)`` for each step's news."""
        it = self.stream()
        for request, new in it:
            if callback is not None:
                callback(request, new)
        return it.result

    # --- serving: requests posted from other threads while ``loop()`` runs -------------------------------

    def post(self, prompt: Sequence[int], *, on_tokens, on_done, **settings) -> Request:
        """Thread-safe: hand a request (``submit``'s arguments, or ``params=SamplingParams(...)``, checked here) to
        the running ``loop()``, which admits it between two decode steps. ``on_tokens(new_ids, row_state)`` is
        called for each step's news and ``on_done(row)`` once (a ``RowResult``, ``finish_reason`` "cancelled"
        after ``cancel``; None when the engine failed), both on the loop's thread. Returns the request, the handle
        for ``cancel``."""
        (request,) = self.decoder.check_requests("Engine.post", [prompt], **settings)
        self.inbox.post(request, on_tokens, on_done)
        return request

    def cancel(self, request: Request) -> None:
        """Thread-safe: stop ``request`` (a client gone); its row is freed at the next step."""
        self.inbox.cancel([request])

    def cancel_all(self) -> None:
        """Thread-safe: ``cancel`` every request posted and not yet done."""
        self.inbox.cancel()

    def in_flight(self) -> int:
        """Requests posted and not yet done."""
        return self.inbox.in_flight()

    def loop(self, stop: threading.Event) -> None:
        """Serve posted requests until ``stop`` is set (then every request left is cancelled): wait for
        requests, decode them with continuous batching, admitting the newly posted ones between steps."""
        inbox = self.inbox
        while True:
            with inbox.lock:
                while not inbox.posted and not stop.is_set():
                    inbox.lock.wait(0.1)
                if stop.is_set():
                    inbox.cancelled.update(inbox.listeners)
                    if not inbox.posted and not inbox.listeners:
                        return
                if not inbox.posted:
                    continue
            try:
                for _ in _Batch(self.decoder, [], self.max_rows, inbox).steps():
                    pass  # the news go to the listeners
            except Exception:  # noqa: BLE001 (a failed step fails the requests in flight, the loop goes on)
                for _, _, on_done in inbox.drop(list(inbox.listeners)):
                    on_done(None)


class _Batch:
    """One run of the decode loop over ``requests`` on at most ``rows`` cache rows of ``runner`` (a ``Decoder``).
    With ``inbox``, the requests posted meanwhile join: taken before each admission (those that fit the cache;
    a longer one waits for the next run, which sizes the cache for it), cancelled ones leave at the next step,
    and the inbox hears each step's news and each request's end."""

    def __init__(self, runner, requests: list[Request], rows: int, inbox: Inbox | None = None):
        self.runner, self.inbox = runner, inbox
        if inbox is not None:
            requests = requests + inbox.take()
        cache = runner.start(rows, max(r.positions(runner.max_seq_len) for r in requests))
        self.sched = Scheduler(cache, rows, runner.max_seq_len)
        self.states: list[RowState] = []
        for r in requests:
            self.add(r)
        self.fresh: set[int] = set()  # requests whose next decided token is their prefill's (not a decode token)
        self.emitted = self.steps_run = 0
        self.admit_s = 0.0

    def add(self, r: Request) -> None:
        self.sched.add(r)
        self.states.append(RowState(r.prompt[-1], r.budget, r.max_new_tokens, r.stop,
                                    self.runner.max_seq_len - len(r.prompt)))

    @torch.inference_mode()
    def steps(self) -> Iterator[tuple[int, list[int]]]:
        """The loop (a generator of ``(request, new_token_ids)`` returning the ``GenerationResult``; serving: None,
        each row went to its listener): launch the
        next one-token step on the guess that the pending tokens are fed as they are, meanwhile decide on the
        pending tokens; where an edit, a finished row, a cancellation or missing pages break the guess, rows
        leave or are preempted, every row takes its feed in one forward and free rows are refilled."""
        sched, runner = self.sched, self.runner
        t0 = time.perf_counter()
        first = self.admit()  # None: every request taken was cancelled while it waited (serving)
        pending = None if first is None else runner.load(first, sched.pos)
        runner.synchronize()
        t1 = time.perf_counter()
        while sched.rows:
            n = len(sched.rows)
            launched = sched.reserve_step()
            if launched:
                speculative = runner.step(n, max(sched.pos) + 1, self.mode(sched.rows))
                self.steps_run += 1
            before = [len(self.states[r].tokens) for r in sched.rows]
            toks = pending()
            feeds = [self.decide(s, t) for s, t in enumerate(toks)]
            # kept: fed as the guess assumed (no rewind, and the guess was sampled without a mask)
            kept = [launched and f == [t] and not (self.states[r].rewind or self.states[r].mask_enders)
                    for f, t, r in zip(feeds, toks, sched.rows)]
            if all(kept) and not (self.inbox is not None and self.inbox.interrupt(n < sched.max_rows)):
                yield from self.news(before)
                for s in range(n):
                    sched.advance(s)
                pending = speculative
                continue
            # The guess stands only for rows that kept their token.
            guessed = speculative() if launched else None
            for s in range(n):
                if kept[s]:
                    sched.advance(s)
                    self.decide(s, guessed[s])
            yield from self.news(before)
            self.leave()
            parts = []
            plan = sched.feed()
            if plan is not None:  # one forward feeds every row its tokens (edits several at once)
                parts.append(runner.feed(plan.tokens, plan.starts, self.banned(sched.rows), self.mode(sched.rows)))
                self.steps_run += 1
            ta = time.perf_counter()
            first = self.admit()  # rows freed: the next requests take them
            self.admit_s += time.perf_counter() - ta
            if first is not None:
                parts.append(first)
            if not parts:
                break
            pending = runner.load(parts[0] if len(parts) == 1 else torch.cat(parts), sched.pos)
        runner.synchronize()
        if self.inbox is not None:
            return None  # every request's row went to its listener
        t2 = time.perf_counter()
        rows = [RowResult.from_state(st, runner.tokenizer) for st in self.states]
        return GenerationResult(rows, t1 - t0 + self.admit_s, t2 - t1 - self.admit_s, self.emitted, self.steps_run,
                                runner.memory(), sched.preemptions)

    def admit(self) -> torch.Tensor | None:
        """Prefill the next waiting requests into the free rows while their pages fit; their first tokens."""
        sched, inbox = self.sched, self.inbox
        if inbox is not None:
            for r in inbox.take(sched.fits):
                self.add(r)
            for r in sched.drop_waiting(lambda r: inbox.is_cancelled(sched.requests[r])):
                self.states[r].finish_reason = "cancelled"
                self.finished(r)
        plan = sched.admit()
        if plan is None:
            return None
        self.fresh.update(plan.fresh)
        settings = [sched.requests[r].sampling for r in plan.requests]
        return self.runner.prefill(plan.row0, plan.tokens, settings, plan.positions, self.banned(plan.requests))

    def decide(self, row: int, token: int) -> list[int] | None:
        """Row ``row``'s request takes ``token`` (budget forcing); what it feeds next goes to the scheduler."""
        r = self.sched.rows[row]
        state = self.states[r]
        before = len(state.tokens)
        feed = state.step(token)
        if r in self.fresh:
            self.fresh.discard(r)
        else:
            self.emitted += len(state.tokens) - before
        self.sched.decided(row, feed, state.rewind)  # s1_compat: the feed replaces what was decoded past the budget
        return feed

    def news(self, before: list[int]) -> Iterator[tuple[int, list[int]]]:
        """Each row's tokens decided since ``before`` (token counts per row), streamed out."""
        for s, r in enumerate(self.sched.rows):
            state = self.states[r]
            if len(state.tokens) > before[s]:
                if self.inbox is not None:
                    self.inbox.news(self.sched.requests[r], state, state.tokens[before[s] :])
                yield r, state.tokens[before[s] :]

    def leave(self) -> None:
        """Cancelled and finished rows leave, then the newest are preempted until the pages suffice."""
        sched = self.sched
        if self.inbox is not None:
            for s, r in enumerate(sched.rows):
                if sched.feeds[s] is not None and self.inbox.is_cancelled(sched.requests[r]):
                    sched.decided(s, None)
                    self.states[r].finish_reason = "cancelled"
                if sched.feeds[s] is None:
                    self.finished(r)
        for src, dst in sched.leave_finished() + sched.preempt():
            self.runner.move_row(src, dst)

    def finished(self, r: int) -> None:
        """Serving: request ``r``'s row goes to its listener; its state is let go (a batch under steady traffic runs
        for as long as the server, and would keep every request's tokens)."""
        self.inbox.finished(self.sched.requests[r], RowResult.from_state(self.states[r], self.runner.tokenizer))
        self.states[r] = None

    def banned(self, requests: list[int]) -> list[frozenset[int]]:
        """Per request: the tokens its next token must not be (those ending thinking, at a round's start)."""
        return [self.states[r].enders if self.states[r].mask_enders else frozenset() for r in requests]

    def mode(self, requests: list[int]) -> int:
        """The sampling mode a step over ``requests`` runs (the highest of theirs)."""
        return max(self.sched.requests[r].sampling.mode for r in requests)
