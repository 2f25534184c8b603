"""s1fast.decode.scheduler on its own, no model: admission order, page exhaustion, preemption of the newest,
cancellation, and a randomised run in which the oldest request always fits and every request finishes."""

from __future__ import annotations

import random

import torch

from s1fast.decode.kv_cache import KVCache
from s1fast.decode.params import Request, SamplingParams
from s1fast.decode.scheduler import Scheduler

PAGE = 4


def scheduler(rows: int, pages: int | None, positions: int = 64, max_seq_len: int = 64) -> Scheduler:
    """A scheduler over a KV cache of one 1-dim head (no model) with ``pages`` pages (None: dense)."""
    cache = KVCache(layers=1, kv_heads=1, head_dim=1, dtype=torch.float32, device="cpu", page_size=PAGE)
    cache.budget_pages = pages
    cache.ensure(rows, positions)
    return Scheduler(cache, rows, max_seq_len)


def request(prompt_len: int, max_new_tokens: int) -> Request:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Request(list(range(1, prompt_len + 1)), params, params.sampling())


def test_admission_in_submission_order_into_free_rows():
    s = scheduler(rows=2, pages=None)
    for n in (3, 9, 5, 2):
        s.add(request(n, 4))
    plan = s.admit()
    assert plan.requests == [1, 0] and plan.row0 == 0  # the first two, prefilled longest first
    assert plan.positions == [9, 3] and plan.tokens == [list(range(1, 10)), [1, 2, 3]] and plan.fresh == [0, 1]
    assert s.rows == [1, 0] and s.admit() is None  # no free row
    # each row got the pages of its prompt and one step
    assert s.cache.row_pages[0] and len(s.cache.row_pages[0]) == s.cache.pages_for(10)
    pages = s.cache.row_pages[1]
    s.decided(0, None)  # request 1 finished: the last row (request 0) moves into its place, pages and all
    s.decided(1, [7])
    assert s.leave_finished() == [(1, 0)] and s.rows == [0] and s.pos == [3] and s.feeds == [[7]]
    assert s.cache.row_pages[0] == pages and s.cache.row_pages[1] == [] and s.cache.pages_in_use == len(pages)
    plan = s.admit()
    assert plan.requests == [2] and plan.row0 == 1 and s.rows == [0, 2]


def test_page_exhaustion_blocks_the_queue_head_and_those_behind():
    s = scheduler(rows=4, pages=5)  # 20 positions
    s.add(request(10, 2))  # 11 positions to start: 3 pages
    s.add(request(9, 2))  # 10: 3 pages, only 2 left
    s.add(request(2, 2))  # would fit, but waits behind the head
    plan = s.admit()
    assert plan.requests == [0] and list(s.waiting) == [1, 2] and s.cache.pages_free == 2
    s.decided(0, None)
    s.leave_finished()
    assert s.cache.pages_free == 5
    assert s.admit().requests == [1, 2]


def test_preemption_takes_the_newest_and_readmits_it_with_what_it_fed():
    s = scheduler(rows=2, pages=6)  # 24 positions
    s.add(request(7, 30))
    s.add(request(6, 30))
    s.admit()
    assert s.rows == [0, 1] and s.cache.pages_free == 2  # 2 + 2 pages
    for step in range(20):  # both rows take one token per step until the pages run out
        for row in range(len(s.rows)):
            s.decided(row, [100 + step])
        moves = s.leave_finished() + s.preempt()
        if s.preemptions:
            break
        s.feed()
    assert s.preemptions == 1 and s.rows == [0] and list(s.waiting) == [1] and moves == []
    fed = s.pos[0]
    s.feed()
    assert s.pos[0] == fed + 1
    s.decided(0, None)  # the oldest finishes: the newest comes back with its prompt and every token it fed
    s.leave_finished()
    plan = s.admit()
    assert plan.requests == [1] and plan.fresh == []
    assert plan.tokens == [list(range(1, 7)) + [100 + i for i in range(step + 1)]]


def test_cancelled_waiting_requests_leave_the_queue():
    s = scheduler(rows=1, pages=None)
    for n in (3, 4, 5):
        s.add(request(n, 2))
    assert s.drop_waiting(lambda r: r == 1) == [1] and list(s.waiting) == [0, 2]
    assert s.admit().requests == [0]


def test_a_random_run_always_progresses_and_never_exceeds_the_pages():
    """Requests of random lengths on 3 rows with a budget that holds the longest alone: after every step the
    newest rows are preempted if needed, never the oldest running one; pages in use stay within the budget; every
    request finishes (admitted again after each preemption) with its tokens."""
    rng = random.Random(0)
    reqs = [(rng.randint(1, 12), rng.randint(1, 20)) for _ in range(12)]
    most = max(p + n + 1 for p, n in reqs)
    s = scheduler(rows=3, pages=-(-most // PAGE), positions=most)
    for p, n in reqs:
        s.add(request(p, n))
    done, generated = set(), dict.fromkeys(range(len(reqs)), 0)  # tokens fed after the prompt

    def admit():
        plan = s.admit()
        for r in [] if plan is None else set(plan.requests) - set(plan.fresh):
            generated[r] += 1  # a preempted request's prefill feeds its pending token too

    admit()
    for _ in range(1000):
        if not s.rows:
            break
        oldest = min(s.rows)
        for row, r in enumerate(s.rows):
            s.decided(row, None if generated[r] >= reqs[r][1] else [rng.randrange(100)])
            if generated[r] >= reqs[r][1]:
                done.add(r)
        before = s.preemptions
        s.leave_finished()
        s.preempt()
        assert s.preemptions == before or oldest in s.rows or oldest in done  # the newest went, never the oldest
        assert s.cache.pages_in_use <= s.cache.budget_pages
        if s.feed() is not None:
            for r in s.rows:
                generated[r] += 1
                assert s.pos[s.rows.index(r)] == len(s.requests[r].prompt) + generated[r]
        admit()
    assert done == set(range(len(reqs))) and s.preemptions > 0
