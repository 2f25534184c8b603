"""Continuous batching: a queue of requests decoded on a fixed number of cache rows, each row refilled as soon as
its request finishes.

Every request has its own prompt, ``max_new_tokens``, sampling settings (temperature, top-k, top-p, seed), stop
tokens and ``BudgetForcing`` (its own thinking budget and waits). The engine runs the decoder's loop (one token
per row per step, the host deciding one step late, edits fed in one multi-token forward; see
``s1fast.decode.decoder``) on at most ``max_rows`` rows. When rows finish, the finished rows leave (the last
rows' caches move into the holes) and the next requests of the queue, in submission order, are prefilled into
the free rows right there, between two decode steps; their first tokens join the next step. So the batch stays
full until the queue runs dry, instead of shrinking to the longest trace as a static batch does. Results come
back per request in submission order (``GenerationResult.rows``), streamed as ``(request, new_token_ids)``.

Each request's tokens do not depend on the other requests: greedy decoding gives what it gives alone, and so does
sampling (``s1fast.decode.sampling``: a request's noise comes from its own key and positions, so a seeded request
draws the same tokens in any batch, in any admission order and after a preemption). ``Decoder.generate`` /
``stream`` are this engine with every prompt admitted at once.

Cache: the decoder's paged KV cache; ``run`` says how requests are admitted into its pages and preempted.

Serving (``s1fast.decode.serve``): ``loop()`` runs in a thread of its own; other threads ``post`` requests
(with callbacks for their tokens and their end) and ``cancel`` them. The loop takes the posted requests
between two decode steps, into free rows; a cancelled request leaves at the next step. A posted request
that needs more cache positions than the running batch's cache holds waits until that batch drains.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from s1fast.decode.budget import BudgetForcing, RowState
from s1fast.decode.results import GenerationStream, RowResult
from s1fast.decode.sampling import Sampling


@dataclass(frozen=True)
class Request:
    """One prompt and how to decode it (checked by ``check_request``)."""

    prompt: list[int]
    max_new_tokens: int
    stop: frozenset[int]
    budget: BudgetForcing | None
    sampling: Sampling

    def positions(self, max_seq_len: int) -> int:
        """Cache positions the request may touch: prompt, new tokens (with s1_compat's overshoot), one edit."""
        feed, over = (self.budget.longest_injection(), self.budget.compat_overshoot()) if self.budget else (1, 0)
        p = len(self.prompt)
        return max(p + self.max_new_tokens, min(max_seq_len, p + over)) + feed


def check_sampling(fn: str, decoder, *, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, budget):
    """The settings of a request, checked (one line naming the argument); returns (stop set, ``Sampling`` without
    its key)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{fn}: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"{fn}: temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{fn}: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"{fn}: top_p must be None or a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{fn}: seed must be None or an int, got {seed!r}")
    if isinstance(stop_token_ids, (str, bytes, int)) or not isinstance(stop_token_ids, (Sequence, set, frozenset)):
        raise TypeError(f"{fn}: stop_token_ids must be a list of token ids, got {type(stop_token_ids).__name__}")
    stop = frozenset(decoder._check_ids("stop_token_ids", stop_token_ids))
    if budget is not None:
        if not isinstance(budget, BudgetForcing):
            raise TypeError(f"{fn}: budget must be None or a BudgetForcing, got {type(budget).__name__}")
        decoder._check_ids("budget token ids", sorted(budget.token_ids()))
    return stop, Sampling() if temperature == 0 else Sampling(float(temperature), top_k, top_p)


class Engine:
    """Continuous batching over a ``Decoder``: ``submit`` requests, then ``run()`` (a ``GenerationResult``,
    rows in submission order) or ``stream()`` (``(request, new_token_ids)`` pairs, ``.result`` at the end).

    Args:
        decoder: a ``s1fast.decode.decoder.Decoder``.
        max_rows: cache rows, the most requests decoded at once.
    """

    def __init__(self, decoder, max_rows: int = 16):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"Engine: max_rows must be an int >= 1, got {max_rows!r}")
        self.decoder = decoder
        self.max_rows = max_rows
        self.queue: list[Request] = []
        self._inbox: deque[Request] = deque()  # posted, not yet taken by the loop
        self._inbox_lock = threading.Condition()
        self._listeners: dict[int, tuple] = {}  # id(request) -> (request, on_tokens, on_done) until done
        self._cancelled: set[int] = set()

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
        self.queue.append(request)
        return len(self.queue) - 1

    def stream(self):
        """Decode every queued request (the queue is emptied); ``(request, new_token_ids)`` as tokens are
        decided, the ``GenerationResult`` as ``.result`` once exhausted."""
        if not self.queue:
            raise ValueError("Engine.stream: no request submitted")
        requests, self.queue = self.queue, []
        return GenerationStream(run(self.decoder, requests, self.max_rows))

    def run(self, callback=None):
        """``stream()`` to the end; ``callback(request, new_token_ids)`` for each step's news."""
        it = self.stream()
        for request, new in it:
            if callback is not None:
                callback(request, new)
        return it.result

    # --- serving: requests posted from other threads while ``loop()`` runs -------------------------------

    def post(self, prompt: Sequence[int], *, on_tokens, on_done, **settings) -> Request:
        """Thread-safe: hand a request (``submit``'s arguments, checked here) to the running ``loop()``, which
        admits it between two decode steps. ``on_tokens(new_ids, row_state)`` is called for each step's news and
        ``on_done(row)`` once (a ``RowResult``, ``finish_reason`` "cancelled" after ``cancel``; None when the
        engine failed), both on the loop's thread. Returns the request, the handle for ``cancel``."""
        (request,) = self.decoder.check_requests("Engine.post", [prompt], **settings)
        with self._inbox_lock:
            self._listeners[id(request)] = (request, on_tokens, on_done)
            self._inbox.append(request)
            self._inbox_lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Thread-safe: stop ``request`` (a client gone); its row is freed at the next step."""
        with self._inbox_lock:
            if id(request) in self._listeners:
                self._cancelled.add(id(request))

    def cancel_all(self) -> None:
        """Thread-safe: ``cancel`` every request posted and not yet done."""
        with self._inbox_lock:
            self._cancelled.update(self._listeners)

    def in_flight(self) -> int:
        """Requests posted and not yet done."""
        with self._inbox_lock:
            return len(self._listeners)

    def loop(self, stop: threading.Event) -> None:
        """Serve posted requests until ``stop`` is set (then every request left is cancelled): wait for
        requests, decode them with continuous batching, admitting the newly posted ones between steps."""
        while True:
            with self._inbox_lock:
                while not self._inbox and not stop.is_set():
                    self._inbox_lock.wait(0.1)
                if stop.is_set():
                    self._cancelled.update(self._listeners)
                    if not self._inbox and not self._listeners:
                        return
                if not self._inbox:
                    continue
            reqs: list[Request] = []
            try:
                for _ in run(self.decoder, reqs, self.max_rows, inbox=self):
                    pass  # the news go to the listeners (_news)
            except Exception:  # noqa: BLE001 (a failed step fails the requests in flight, the loop goes on)
                for _, _, on_done in self._drop(list(self._listeners)):
                    on_done(None)

    def _drop(self, keys: list[int]) -> list[tuple]:
        with self._inbox_lock:
            self._inbox = deque(r for r in self._inbox if id(r) not in keys)
            self._cancelled.difference_update(keys)
            return [self._listeners.pop(k) for k in keys if k in self._listeners]

    # the ``inbox`` protocol of ``run``
    def _take(self, fits=None) -> list[Request]:
        """The posted requests in order, up to the first that does not ``fits(request)`` the running cache."""
        out = []
        with self._inbox_lock:
            while self._inbox and (fits is None or fits(self._inbox[0])):
                out.append(self._inbox.popleft())
        return out

    def _interrupt(self, free: bool) -> bool:
        """Whether the run must stop its fast path: a cancellation, or posted requests and free rows."""
        return bool(self._cancelled) or (free and bool(self._inbox))

    def _is_cancelled(self, request: Request) -> bool:
        return id(request) in self._cancelled

    def _news(self, request: Request, state: RowState, new: list[int]) -> None:
        self._listeners[id(request)][1](new, state)

    def _finished(self, request: Request, state: RowState) -> None:
        for _, _, on_done in self._drop([id(request)]):
            on_done(RowResult.from_state(state, self.decoder.tokenizer))


@torch.inference_mode()
def run(dec, reqs: list[Request], max_rows: int, inbox: Engine | None = None) -> Iterator[tuple[int, list[int]]]:
    """The decode loop over ``reqs`` on at most ``max_rows`` cache rows of ``dec`` (a generator of
    ``(request, new_token_ids)`` returning the ``GenerationResult``). With ``inbox`` (an ``Engine`` serving
    posted requests), ``reqs`` grows with the requests posted meanwhile: taken before each admission (those
    that fit the cache; a longer one waits for the next run, which sizes the cache for it), cancelled ones
    leave at the next step, and ``inbox._finished(request, state)`` is called as each request leaves.

    Pages (``dec.cache``): a request is admitted when the free pages hold its prompt plus one step (in
    submission order: the first that does not fit waits, and the ones behind it too); before each decode step
    every row gets the page its next token needs. When the free pages do not cover that, the step is not
    launched: the host decides the pending tokens, and the most recently admitted rows are preempted (pages
    freed, request put back at the front of the queue with everything it has fed, to be prefilled again when
    pages free up) until the others can take their next feed and one more step. The oldest request always
    fits alone (checked at submission), so the batch always makes progress; greedy tokens do not change."""
    from s1fast.decode.decoder import _bucket

    def new_state(r: Request) -> RowState:
        return RowState(r.prompt[-1], r.budget, r.max_new_tokens, r.stop, dec.max_seq_len - len(r.prompt))

    if inbox is not None:
        reqs.extend(inbox._take())
    states = [new_state(r) for r in reqs]
    most = [r.positions(dec.max_seq_len) for r in reqs]  # positions a request may ever touch
    cap = max_rows if inbox is not None else min(max_rows, len(reqs))
    dec._ensure_cache(cap, _bucket(max(most)))
    cache = dec.cache
    device = dec.device
    sync = lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None  # noqa: E731
    waiting = deque(range(len(reqs)))
    slots: list[int] = []  # cache row -> request
    pos: list[int] = []  # per cache row: positions filled = where the next token goes
    seqs: dict[int, list[int]] = {}  # request -> the tokens its row holds, then its pending feed (to recompute it)
    admitted: dict[int, int] = {}  # request -> when it was first admitted (preemption takes the newest)
    fresh: set[int] = set()  # requests whose next decided token is their prefill's (not a decode token)
    emitted = steps = preempted = 0
    admit_s = 0.0

    def sample(logits: torch.Tensor, row0: int, rows: list[int], positions: list[int]) -> torch.Tensor:
        """Tokens for ``rows`` (requests, on cache rows row0...) going to ``positions``; the first token of a
        thinking round is never one that ends thinking (s1: vLLM's min_tokens=1)."""
        masked = [(s, t) for s, r in enumerate(rows) if states[r].mask_enders for t in sorted(states[r].enders)]
        if masked:
            at = torch.tensor(masked, device=device)
            logits[at[:, 0], at[:, 1]] = float("-inf")
        return dec._sample(logits, row0, positions, max(reqs[r].sampling.mode for r in rows))

    def fits(request: Request) -> bool:  # a posted request this run's cache can hold
        positions = request.positions(dec.max_seq_len)
        return positions <= cache.positions and cache.pages_for(positions) <= cache.total_pages

    def admit() -> torch.Tensor | None:
        """Prefill the next waiting requests into the free rows while their pages fit; their first tokens."""
        if inbox is not None:
            taken = inbox._take(fits)
            waiting.extend(range(len(reqs), len(reqs) + len(taken)))
            reqs.extend(taken)
            states.extend(map(new_state, taken))
            most.extend(r.positions(dec.max_seq_len) for r in taken)
            for r in [r for r in waiting if inbox._is_cancelled(reqs[r])]:
                waiting.remove(r)
                states[r].finish_reason = "cancelled"
                inbox._finished(reqs[r], states[r])
        new, free = [], cache.pages_free
        while waiting and len(slots) + len(new) < cap:
            r = waiting[0]
            need = cache.pages_for(min(len(seqs.get(r, reqs[r].prompt)) + 1, most[r]))  # its tokens and one step
            if need > free:
                break
            free -= need
            new.append(waiting.popleft())
        if not new:
            return None
        for r in new:
            if r not in seqs:
                seqs[r] = list(reqs[r].prompt)
                fresh.add(r)
            admitted.setdefault(r, len(admitted))
        new.sort(key=lambda r: -len(seqs[r]))  # the prefill runs longest first
        row0 = len(slots)
        cache.reserve([(row0 + j, min(len(seqs[r]) + 1, most[r])) for j, r in enumerate(new)])
        slots.extend(new)
        pos.extend(len(seqs[r]) for r in new)
        dec._set_sampling(row0, [reqs[r].sampling for r in new])
        return sample(dec._prefill([seqs[r] for r in new], row0), row0, new, pos[row0:])

    def decide(slot: int, token: int) -> list[int] | None:
        nonlocal emitted
        r = slots[slot]
        state = states[r]
        before = len(state.tokens)
        feed = state.step(token)
        if r in fresh:
            fresh.discard(r)
        else:
            emitted += len(state.tokens) - before
        pos[slot] -= state.rewind  # s1_compat: the feed replaces what was decoded past the budget
        if feed is not None:
            seq = seqs[r]
            del seq[pos[slot] :]
            seq += feed
        return feed

    def news(before: list[int]) -> Iterator[tuple[int, list[int]]]:
        for slot, r in enumerate(slots):
            if len(states[r].tokens) > before[slot]:
                if inbox is not None:
                    inbox._news(reqs[r], states[r], states[r].tokens[before[slot] :])
                yield r, states[r].tokens[before[slot] :]

    def load(tokens: torch.Tensor):
        n = len(slots)
        dec._ids[:n, 0] = tokens
        dec._pos[:n] = torch.tensor(pos)
        return dec._fetch(tokens)

    def leave(s: int) -> None:
        """Row ``s`` leaves (its pages freed); the last row moves into its place."""
        cache.free(s)
        last = len(slots) - 1
        if s != last:
            dec._move_row(last, s)
            slots[s], pos[s], feeds[s] = slots[last], pos[last], feeds[last]
        del slots[last], pos[last], feeds[last]

    def feed_needs() -> list[tuple[int, int]]:
        return [(s, min(p + len(f) + 1, most[r])) for s, (p, f, r) in enumerate(zip(pos, feeds, slots))]

    t0 = time.perf_counter()
    pending = load(admit())
    sync()
    t1 = time.perf_counter()
    while slots:
        n = len(slots)
        # Launch the next step on the guess that the pending tokens are fed as they are (when the pages of
        # every row's next position are there) ...
        step_needs = [(s, min(p + 1, most[r])) for s, (p, r) in enumerate(zip(pos, slots))]
        launched = cache.missing(step_needs) <= cache.pages_free
        if launched:
            cache.reserve(step_needs)
            dec._decode(n, max(pos) + 1, max(reqs[r].sampling.mode for r in slots))  # samples into dec._ids
            speculative = dec._fetch(dec._ids[:n, 0])
            steps += 1
        # ... and meanwhile decide on the pending tokens.
        before = [len(states[r].tokens) for r in slots]
        toks = pending()
        feeds = [decide(s, t) for s, t in enumerate(toks)]
        # kept: fed as the guess assumed (no rewind, and the guess was sampled without a mask)
        kept = [launched and f == [t] and not (states[r].rewind or states[r].mask_enders)
                for f, t, r in zip(feeds, toks, slots)]
        if all(kept) and not (inbox is not None and inbox._interrupt(len(slots) < cap)):
            yield from news(before)
            pos = [p + 1 for p in pos]
            pending = speculative
            continue
        # An edit, a finished row or no pages for the step: the guess stands only for rows that kept their token.
        guessed = speculative() if launched else None
        for s in range(n):
            if kept[s]:
                pos[s] += 1
                feeds[s] = decide(s, guessed[s])
        yield from news(before)
        if inbox is not None:
            for s, r in enumerate(slots):
                if feeds[s] is not None and inbox._is_cancelled(reqs[r]):
                    feeds[s], states[r].finish_reason = None, "cancelled"
                if feeds[s] is None:
                    inbox._finished(reqs[r], states[r])
        for s in reversed(range(n)):
            if feeds[s] is None:
                leave(s)
        # every row takes its feed and one more step: preempt the newest rows until the pages suffice
        while cache.missing(feed_needs()) > cache.pages_free:
            s = max(range(len(slots)), key=lambda s: admitted[slots[s]])
            waiting.appendleft(slots[s])  # seqs[request] holds what it fed and its feed: prefilled again later
            leave(s)
            preempted += 1
        parts = []
        if slots:  # one forward feeds every row its tokens (edits several at once), padded to the longest
            cache.reserve(feed_needs())
            n, width = len(slots), max(map(len, feeds))
            ids = torch.tensor([f + f[-1:] * (width - len(f)) for f in feeds], device=device)
            last = torch.tensor([len(f) - 1 for f in feeds], device=device)
            start = torch.tensor(pos, device=device)
            parts.append(sample(dec._forward(ids, start, max(pos) + width, last), 0, slots,
                                [p + len(f) for p, f in zip(pos, feeds)]))
            steps += 1
            pos = [p + len(f) for p, f in zip(pos, feeds)]
        ta = time.perf_counter()
        first = admit()  # rows freed: the next requests take them
        admit_s += time.perf_counter() - ta
        if first is not None:
            parts.append(first)
        if not parts:
            break
        pending = load(parts[0] if len(parts) == 1 else torch.cat(parts))
    sync()
    t2 = time.perf_counter()
    return dec._result(states, t1 - t0 + admit_s, t2 - t1 - admit_s, emitted, steps, preempted)
