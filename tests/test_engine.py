"""Continuous batching (``s1fast.decode.engine``) against transformers' greedy generate (fp64), the static decoder
and s1's budget-forcing algorithm (``s1_reference`` of test_decoder), whatever the row cap and admission order."""

from __future__ import annotations

import dataclasses
import random

import pytest
from test_decoder import budget, hf_generate, make_prompts, model_for, one_thread, s1_reference  # noqa: F401 (fixture)

from s1fast.decode.decoder import Decoder
from s1fast.decode.engine import Engine
from s1fast.decode.params import SamplingParams

MIXED = [dict(max_thinking_tokens=30, num_waits=2), dict(max_thinking_tokens=None, num_waits=2),
         dict(max_thinking_tokens=4, num_waits=0), dict(max_thinking_tokens=12, num_waits=1),
         dict(max_thinking_tokens=1, num_waits=3)]  # budgets and waits of five requests


def submit_all(engine, prompts, settings, order):
    """Submit ``prompts[i]`` with ``settings[i]`` in ``order``; returns request index -> prompt index."""
    return {engine.submit(prompts[i], **settings[i]): i for i in order}


@pytest.mark.parametrize("max_rows,seed,page_size", [(1, 0, 16), (2, 1, 1), (3, 2, 4), (8, 3, 16)])
def test_greedy_matches_transformers_and_static(max_rows, seed, page_size):
    """Per-request lengths and stop tokens; any row cap, submission order and page size gives every request the
    tokens transformers gives it alone, and the static decoder's."""
    model = model_for(tied=False)
    rng = random.Random(seed)
    prompts = make_prompts((5, 17, 1, 9, 3, 12), seed=7)
    refs = [hf_generate(model, p, 12) for p in prompts]
    settings = [dict(max_new_tokens=rng.randint(3, 12)) for _ in prompts]
    for i in (1, 4):  # a stop token each request reaches early (its own 3rd token)
        settings[i] = dict(max_new_tokens=12, stop_token_ids=[refs[i][2]])
    expected = []
    for ref, s in zip(refs, settings):
        out = ref[: s["max_new_tokens"]]
        stops = [k for k, t in enumerate(out) if t in s.get("stop_token_ids", ())]
        expected.append(out[: stops[0] + 1] if stops else out)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    dec = Decoder(model, prefill_chunk=4, page_size=page_size)
    paged = []  # rows of different lengths attend over the pages each holds (Decoder._paged_attention)
    attention = dec._paged_attention
    dec._paged_attention = lambda n, *a: (paged.append(n), attention(n, *a))[1]
    engine = Engine(dec, max_rows=max_rows)
    which = submit_all(engine, prompts, settings, order)
    res = engine.run()
    assert len(res.rows) == len(prompts)
    assert max(paged, default=1) == min(max_rows, len(prompts))  # one row: SDPA
    for r, row in enumerate(res.rows):
        i = which[r]
        assert row.tokens == expected[i], (r, i)
        assert row.finish_reason == ("stop" if i in (1, 4) else "length")
        static = dec.generate([prompts[i]], **settings[i]).tokens[0]
        assert static == expected[i]


def test_batch_stays_full_and_streams_in_order():
    """With a cap of 2 rows and 5 requests every decode step runs 2 rows until the queue is empty; the stream
    gives each request's tokens, indexed by submission."""
    model = model_for()
    prompts = make_prompts((4, 6, 3, 8, 5), seed=3)
    lengths = [9, 2, 5, 1, 7]
    dec = Decoder(model)
    rows_per_step = []
    decode = dec._decode
    dec._decode = lambda n, kv, mode: (rows_per_step.append(n), decode(n, kv, mode))[1]
    engine = Engine(dec, max_rows=2)
    for p, k in zip(prompts, lengths):
        engine.submit(p, max_new_tokens=k)
    it = engine.stream()
    got = {i: [] for i in range(5)}
    for r, ids in it:
        got[r] += ids
    assert [got[i] for i in range(5)] == it.result.tokens
    assert [len(t) for t in it.result.tokens] == lengths
    assert [hf_generate(model, p, k) for p, k in zip(prompts, lengths)] == it.result.tokens
    # the queue drains after the last admission: only then may a step run on fewer than 2 rows
    assert rows_per_step[0] == 2 and 1 in rows_per_step
    first_single = rows_per_step.index(1)
    assert all(n == 1 for n in rows_per_step[first_single:])
    # static batching of pairs would need max(9, 2) + max(5, 1) + 7 = 21 steps; the engine about sum / 2
    assert len(rows_per_step) < 21


@pytest.mark.parametrize("max_rows", [1, 3])
def test_mixed_budgets_match_s1_reference(max_rows):
    """Different budgets and waits per request in one batch: each request is s1's algorithm token for token."""
    model = model_for(tied=False)
    prompts = make_prompts((6, 13, 3, 9, 6), seed=1)
    base = budget(model, prompts)
    forcings = [dataclasses.replace(base, **c) for c in MIXED]
    engine = Engine(Decoder(model), max_rows=max_rows)
    order = [4, 0, 3, 1, 2]
    which = {engine.submit(prompts[i], max_new_tokens=40, budget=forcings[i]): i for i in order}
    res = engine.run()
    waits = cuts = 0
    for r, row in enumerate(res.rows):
        i = which[r]
        tokens, thinking, w, cut = s1_reference(model, prompts[i], forcings[i], 40)
        assert row.tokens == tokens, (r, i)
        if row.thinking_ended:
            assert (row.thinking_tokens, row.forced_waits, row.budget_cut) == (thinking, w, cut)
        waits, cuts = waits + row.forced_waits, cuts + row.budget_cut
    assert waits > 0 and cuts > 0  # both paths taken


@pytest.mark.parametrize("sampled", [False, True])
def test_page_budget_waits_preempts_and_matches_unconstrained(sampled):
    """A KV budget of 20 pages of 4 positions for 5 requests of up to 16 + 40 positions on 3 rows, mixed budgets
    and waits: running rows that cannot grow preempt the newest (recomputed later from what it fed), the pages
    in use never pass the budget, and every request's tokens equal the unconstrained engine's (itself s1's
    algorithm, above). Sampled with seeds (temperature, top-p), a preempted request draws the same tokens again:
    its noise comes from its key and positions."""
    model = model_for(tied=False)
    prompts = make_prompts((6, 13, 3, 9, 16), seed=1)
    base = budget(model, prompts)
    sampling = [dict(temperature=1.0, seed=i, top_p=0.95 if i % 2 else None) if sampled else {} for i in range(5)]
    settings = [dict(max_new_tokens=40, budget=dataclasses.replace(base, **c), **sampling[i])
                for i, c in enumerate(MIXED)]
    free = Engine(Decoder(model), max_rows=3)
    submit_all(free, prompts, settings, range(5))
    expected = free.run().tokens
    dec = Decoder(model, page_size=4, kv_cache_bytes=21 * 4 * dec_bytes_per_token(model))
    rows_per_step, in_use = [], []
    decode = dec._decode

    def spy(n, kv, mode):
        rows_per_step.append(n)
        in_use.append(dec.cache.pages_in_use)
        return decode(n, kv, mode)

    dec._decode = spy
    engine = Engine(dec, max_rows=3)
    submit_all(engine, prompts, settings, range(5))
    res = engine.run()
    assert res.tokens == expected
    if sampled:  # each request alone draws the same tokens; greedy would not
        assert [Decoder(model).generate([p], **kw).tokens[0] for p, kw in zip(prompts, settings)] == expected
        greedy = {k: v for k, v in settings[0].items() if k in ("max_new_tokens", "budget")}
        assert Decoder(model).generate([prompts[0]], **greedy).tokens[0] != expected[0]
    assert res.preemptions > 0 and max(in_use) <= 20 == res.memory["kv_pages_total"]
    assert res.memory["kv_pages_peak"] <= 20 and res.memory["kv_pages_in_use"] == 0
    assert 3 in rows_per_step and sum(map(len, expected)) > 100


def test_request_longer_than_the_page_budget():
    """A request that could not fit the KV budget even alone is refused at submission, naming it; one that
    exactly fits runs, and the next waits for its pages (one row at a time, no preemption)."""
    model = model_for()
    per_page = 4 * dec_bytes_per_token(model)
    dec = Decoder(model, page_size=4, kv_cache_bytes=6 * per_page)  # 5 pages of 4: 20 positions
    engine = Engine(dec, max_rows=2)
    with pytest.raises(ValueError, match=r"Engine.submit: the request may need 23 KV positions .* = 6 pages of 4, "
                                         r"but the KV budget holds 5 pages"):
        engine.submit([1] * 10, max_new_tokens=12)  # 10 + 12 + 1 (an edit's room)
    with pytest.raises(ValueError, match=r"Decoder.generate: prompts\[1\] may need 23 KV positions"):
        dec.generate([[1, 2], [1] * 10], max_new_tokens=12)
    engine.submit([5] * 17, max_new_tokens=2)  # 17 + 1 positions to start: all 5 pages
    engine.submit([7] * 3, max_new_tokens=9)
    rows_per_step = []
    decode = dec._decode
    dec._decode = lambda n, kv, mode: (rows_per_step.append(n), decode(n, kv, mode))[1]
    res = engine.run()
    assert res.tokens == [hf_generate(model, [5] * 17, 2), hf_generate(model, [7] * 3, 9)]
    assert set(rows_per_step) == {1} and res.preemptions == 0
    for kwargs, match in [(dict(kv_cache_bytes=0), "kv_cache_bytes must be None or an int >= 1"),
                          (dict(kv_cache_bytes=per_page), "holds fewer than 2 KV pages"),
                          (dict(kv_cache_fraction=0.5), "kv_cache_fraction needs a CUDA model"),
                          (dict(kv_cache_bytes=per_page, kv_cache_fraction=0.5), "not both"),
                          (dict(page_size=0), "page_size must be None or an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            Decoder(model, **kwargs)


def dec_bytes_per_token(model) -> int:
    cfg = model.config
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 8  # float64 keys and values


def test_sampling_per_request_seed_independent_of_admission():
    model = model_for()
    prompts = make_prompts((5, 8, 3), seed=2)
    kw = [
        dict(max_new_tokens=10, temperature=1.0, seed=11),
        dict(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=12),
        dict(max_new_tokens=8),
    ]
    results = []
    for max_rows, order in ((3, [0, 1, 2]), (1, [2, 1, 0]), (2, [1, 2, 0])):
        engine = Engine(Decoder(model), max_rows=max_rows)
        which = submit_all(engine, prompts, kw, order)
        res = engine.run()
        results.append({which[r]: row.tokens for r, row in enumerate(res.rows)})
    assert results[0] == results[1] == results[2]
    assert results[0][2] == hf_generate(model, prompts[2], 8)
    assert results[0][0] != hf_generate(model, prompts[0], 10)  # it really samples


def test_a_serving_batch_whose_requests_were_all_cancelled_while_waiting_ends_cleanly():
    """What ``Engine.loop`` runs for the requests it takes: when all of them were cancelled before getting a row, the
    batch ends with each "cancelled" (it raised a TypeError, and the loop failed every request posted meanwhile)."""
    from s1fast.decode.engine import _Batch

    engine = Engine(Decoder(model_for()), max_rows=2)
    rows = []
    gone = engine.post(make_prompts((4,))[0], max_new_tokens=5, on_tokens=lambda new, state: None, on_done=rows.append)
    engine.cancel(gone)
    for _ in _Batch(engine.decoder, [], engine.max_rows, engine.inbox).steps():
        pass
    assert [row.finish_reason for row in rows] == ["cancelled"] and engine.in_flight() == 0


def test_a_serving_batch_keeps_no_finished_request():
    """A serving batch runs as long as requests keep coming: each finished request's tokens and state are let go
    once its row went to its listener (they piled up until the batch drained), and its rows are those of run()."""
    from s1fast.decode.engine import _Batch

    model = model_for()
    prompts = make_prompts((5, 8, 3, 6), seed=4)
    want = Engine(Decoder(model), max_rows=1)
    for p in prompts:
        want.submit(p, max_new_tokens=6)
    want = want.run().tokens
    engine = Engine(Decoder(model), max_rows=1)
    rows = {}
    for i, p in enumerate(prompts):
        engine.post(p, max_new_tokens=6, on_tokens=lambda new, state: None,
                    on_done=lambda row, i=i: rows.setdefault(i, row))
    batch = _Batch(engine.decoder, [], engine.max_rows, engine.inbox)
    for _ in batch.steps():  # batch request i is posted request i
        assert all(batch.states[i] is None for i in rows) and not set(rows) & set(batch.sched._seqs)
    assert [rows[i].tokens for i in range(4)] == want and batch.states == [None] * 4 and not batch.sched._seqs


def test_engine_rejects_bad_arguments():
    dec = Decoder(model_for(), max_seq_len=32)
    with pytest.raises(ValueError, match="max_rows must be an int >= 1"):
        Engine(dec, max_rows=0)
    engine = Engine(dec)
    with pytest.raises(ValueError, match="no request submitted"):
        engine.stream()
    with pytest.raises(ValueError, match="Engine.submit: max_new_tokens must be an int >= 1"):
        engine.submit([1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        engine.submit([1] * 30, max_new_tokens=3)
    with pytest.raises(ValueError, match="prompts\\[0\\] is empty"):
        engine.submit([], max_new_tokens=3)
    assert engine.queue == []


def test_sampling_params_is_one_checked_frozen_object():
    """A request's settings: ``SamplingParams`` checks itself when built (errors naming the function it came to,
    through ``of``), is frozen, and a request built from it is the request the same keywords build."""
    params = SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7, stop_token_ids=[3, 3, 5])
    assert params.stop_token_ids == frozenset({3, 5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5
    with pytest.raises(ValueError, match=r"^SamplingParams: temperature must be finite, got inf$"):
        SamplingParams(max_new_tokens=1, temperature=float("inf"))
    with pytest.raises(ValueError, match=r"^Engine.post: top_k must be None or an int >= 1, got 0$"):
        SamplingParams.of("Engine.post", max_new_tokens=1, top_k=0)
    with pytest.raises(TypeError, match=r"^SamplingParams: budget must be None or a BudgetForcing, got dict$"):
        SamplingParams(max_new_tokens=1, budget={})
    dec = Decoder(model_for())
    prompts = make_prompts((4, 6), seed=2)
    built = dec.check_requests("Decoder.generate", prompts, params=params)
    keywords = dec.check_requests("Decoder.generate", prompts, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7,
                                  stop_token_ids=[3, 5])
    assert built == keywords and built[0].sampling.key != built[1].sampling.key  # prompt i: stream i of the seed
    with pytest.raises(TypeError, match="params must be a SamplingParams, given without its settings"):
        dec.check_requests("Engine.post", prompts, params=params, seed=3)
    with pytest.raises(ValueError, match="stop_token_ids must be ints in"):
        dec.check_requests("Engine.post", prompts, params=SamplingParams(max_new_tokens=2, stop_token_ids=[10**6]))
