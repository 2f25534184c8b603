"""Which requests run on which cache rows, and where: the waiting queue, the rows, their positions, admission over
the ``KVCache``'s pages, preemption and leaving. No model: it hands out plain descriptions of what to run
(``Prefill``, ``Feed``, whether a one-token step has its pages) and takes back what was decided (``decided``).

The rules (as vLLM's scheduler, in submission order):
- admission (``admit``): the next waiting requests take the free rows while the free pages hold each one's
  tokens plus one step; the first that does not fit waits, and the ones behind it too;
- a one-token step (``reserve_step``) runs when every row's next position has its page;
- after a step with edits or finished rows, finished rows leave (``leave_finished``: pages freed, the last row
  moved into the hole), then the most recently admitted rows are preempted (``preempt``: pages freed, the
  request put back at the front of the queue with everything it has fed, to be prefilled again) until every
  row can take its feed and one more step; the oldest request always fits alone (the decoder checks that at
  submission), so the batch always makes progress.

A request's ``seq`` is the tokens its row holds followed by its pending feed: what a preempted request is
prefilled with again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from s1fast.decode.kv_cache import KVCache
from s1fast.decode.params import Request


@dataclass
class Prefill:
    """Prefill ``tokens`` (one list per request, longest first) into cache rows ``row0``..; the first tokens go
    to ``positions``. ``fresh``: the requests admitted for the first time (their next token is the prefill's)."""

    row0: int
    requests: list[int]
    tokens: list[list[int]]
    positions: list[int]
    fresh: list[int]


@dataclass
class Feed:
    """Feed every row its ``tokens`` (a decided token, or an edit's several) from ``starts`` in one forward."""

    tokens: list[list[int]]
    starts: list[int]


class Scheduler:
    """Requests (indices in submission order into ``requests``) on at most ``max_rows`` rows of ``cache``.

    ``rows[s]`` is the request on cache row ``s``, ``pos[s]`` the positions that row holds (where its next token
    goes), ``feeds[s]`` what the row feeds next (None: it is finished).
    """

    def __init__(self, cache: KVCache, max_rows: int, max_seq_len: int):
        self.cache, self.max_rows, self.max_seq_len = cache, max_rows, max_seq_len
        self.requests: list[Request] = []
        self.waiting: deque[int] = deque()
        self.rows: list[int] = []
        self.pos: list[int] = []
        self.feeds: list[list[int] | None] = []
        self.preemptions = 0
        self._most: list[int] = []  # per request: the positions it may ever touch
        self._seqs: dict[int, list[int]] = {}  # per request admitted once: held tokens, then its pending feed
        self._admitted: dict[int, int] = {}  # request -> admission rank (preemption takes the newest)

    def add(self, request: Request) -> int:
        """Queue ``request``; its index."""
        self.requests.append(request)
        self._most.append(request.positions(self.max_seq_len))
        self.waiting.append(len(self.requests) - 1)
        return len(self.requests) - 1

    def fits(self, request: Request) -> bool:
        """Whether this cache (its width and pages) can ever hold ``request``."""
        positions = request.positions(self.max_seq_len)
        return positions <= self.cache.positions and self.cache.pages_for(positions) <= self.cache.total_pages

    def drop_waiting(self, which: Callable[[int], bool]) -> list[int]:
        """Take the waiting requests ``which(request)`` out of the queue (cancelled); they are returned."""
        dropped = [r for r in self.waiting if which(r)]
        for r in dropped:
            self.waiting.remove(r)
            self._seqs.pop(r, None)  # a preempted one's tokens
        return dropped

    def admit(self) -> Prefill | None:
        """The next waiting requests that fit the free rows and pages, given rows and their pages (None: none)."""
        cache, new, free = self.cache, [], self.cache.pages_free
        while self.waiting and len(self.rows) + len(new) < self.max_rows:
            r = self.waiting[0]
            need = cache.pages_for(self._need(r, len(self._seqs.get(r, self.requests[r].prompt))))
            if need > free:
                break
            free -= need
            new.append(self.waiting.popleft())
        if not new:
            return None
        fresh = [r for r in new if r not in self._seqs]
        for r in new:
            self._seqs.setdefault(r, list(self.requests[r].prompt))
            self._admitted.setdefault(r, len(self._admitted))
        new.sort(key=lambda r: -len(self._seqs[r]))  # the prefill runs longest first
        row0 = len(self.rows)
        cache.reserve([(row0 + j, self._need(r, len(self._seqs[r]))) for j, r in enumerate(new)])
        self.rows += new
        self.pos += [len(self._seqs[r]) for r in new]
        self.feeds += [None] * len(new)
        return Prefill(row0, new, [self._seqs[r] for r in new], self.pos[row0:], fresh)

    def reserve_step(self) -> bool:
        """Give every row the page of its next position, if the free pages hold them all; whether they did."""
        needs = [(s, self._need(r, p)) for s, (p, r) in enumerate(zip(self.pos, self.rows))]
        if self.cache.missing(needs) > self.cache.pages_free:
            return False
        self.cache.reserve(needs)
        return True

    def advance(self, row: int) -> None:
        """Row ``row``'s pending token went in by a one-token step."""
        self.pos[row] += 1

    def decided(self, row: int, feed: list[int] | None, rewind: int = 0) -> None:
        """Row ``row`` feeds ``feed`` next (None: it is finished), replacing the last ``rewind`` it held."""
        self.pos[row] -= rewind
        self.feeds[row] = feed
        if feed is not None:
            seq = self._seqs[self.rows[row]]
            del seq[self.pos[row] :]
            seq += feed

    def leave_finished(self) -> list[tuple[int, int]]:
        """Finished rows leave (pages freed, the last row moved into each hole); the ``(src, dst)`` row moves."""
        moves = []
        for s in reversed(range(len(self.rows))):
            if self.feeds[s] is None:
                del self._seqs[self.rows[s]]  # never prefilled again: a long-running batch keeps no finished tokens
                moves += self._leave(s)
        return moves

    def preempt(self) -> list[tuple[int, int]]:
        """Preempt the newest rows until the free pages hold every row's feed and one more step; the row moves."""
        moves = []
        while self.cache.missing(self._feed_needs()) > self.cache.pages_free:
            s = max(range(len(self.rows)), key=lambda s: self._admitted[self.rows[s]])
            self.waiting.appendleft(self.rows[s])  # its seq holds what it fed and its feed: prefilled again later
            moves += self._leave(s)
            self.preemptions += 1
        return moves

    def feed(self) -> Feed | None:
        """Every row's feed with its pages (None: no row left); the positions move past it."""
        if not self.rows:
            return None
        self.cache.reserve(self._feed_needs())
        plan = Feed(list(self.feeds), list(self.pos))
        self.pos = [p + len(f) for p, f in zip(self.pos, self.feeds)]
        return plan

    def _need(self, r: int, positions: int) -> int:
        """Positions request ``r`` needs to hold ``positions`` and one step, never past what it may touch."""
        return min(positions + 1, self._most[r])

    def _feed_needs(self) -> list[tuple[int, int]]:
        return [(s, self._need(r, p + len(f))) for s, (p, f, r) in enumerate(zip(self.pos, self.feeds, self.rows))]

    def _leave(self, s: int) -> list[tuple[int, int]]:
        """Row ``s`` leaves (its pages freed); the last row moves into its place (the move, if any)."""
        self.cache.free(s)
        last = len(self.rows) - 1
        moves = []
        if s != last:
            self.cache.move(last, s)
            self.rows[s], self.pos[s], self.feeds[s] = self.rows[last], self.pos[last], self.feeds[last]
            moves.append((last, s))
        del self.rows[last], self.pos[last], self.feeds[last]
        return moves
