"""Decode benchmark: s1fast's ``Decoder`` against transformers ``generate``, and in-loop budget forcing
against s1's re-prefill rounds.

Throughput. Decode tokens/s of a random-initialised model (Qwen2.5-1.5B shape in bf16 on GPU; a small Qwen2
in fp32 on CPU) for every (context, batch): the median wall time of ``generate`` for N new tokens minus that
for 1 new token (so the prefill cancels), the same way for every implementation:
- ``s1fast``: ``Decoder.generate`` (CUDA graphs on GPU); its graphs are captured by a first, untimed call;
- ``s1fast_sdpa`` (GPU, when ``s1fast`` runs another attention): the same decoder with ``attention="sdpa"``,
  to show what the decode-attention kernel buys;
- ``hf_dynamic`` (peer ``hf``): transformers ``generate`` with its default cache (DynamicCache);
- ``hf_static_compile`` (peer ``compile``, GPU only): ``generate(cache_implementation="static")``, for which
  transformers compiles the forward itself; warmed up before timing.
Every decoder row names the attention its one-token steps ran (``attention``: "triton" for s1fast's
split-over-sequence ``decode_attention``, "flash" for flash-attn, "sdpa"). Each row has the bandwidth limit:
tokens/s if every step only read the weights plus the used KV cache
(``weights + batch * kv_bytes_per_token * (context + N / 2)``) at the measured copy bandwidth
(``device_ceilings``), and the measured share of it (``pct_of_bw_limit``).

Budget forcing (batch 1). One thinking run of ``thinking`` tokens with 4 forced waits, three ways:
- ``plain``: the decoder without budget forcing, same token count (the baseline for the overhead);
- ``in_loop``: the decoder with ``BudgetForcing(num_waits=4)``; the delimiter is the token the random model
  loops on (found by a short greedy probe), and the tokens it emits end thinking too, so the waits really
  happen; ``overhead_pct`` against ``plain``;
- ``s1_reprefill``: s1's way on the same engine: 5 rounds of ``thinking / 5`` tokens, each a new ``generate``
  call on the whole history (one prefill per round), "Wait" appended between rounds.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from s1fast.bench.common import device_ceilings, measure
from s1fast.env import environment
from s1fast.model.shapes import QWEN25_SHAPES, random_qwen2

SUMMARY_COLUMNS = ("case", "impl", "attention", "context", "batch", "new_tokens", "tokens_per_s", "speedup_vs_hf",
                   "pct_of_bw_limit", "overhead_pct", "seconds")  # fmt: skip
PEERS = ("hf", "compile")
SMALL = dict(layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=768, vocab=8192, tied=True)


def plan(device: str, quick: bool) -> dict:
    gpu = torch.device(device).type == "cuda"
    if gpu:
        return dict(shape="1.5B", dtype=torch.bfloat16, contexts=(1024,) if quick else (1024, 8192, 32768),
                    batches=(1,) if quick else (1, 16), new_tokens=64 if quick else 256,
                    bf_prompt=1024, bf_thinking=512 if quick else 8192, reps=2 if quick else 3)  # fmt: skip
    return dict(shape="small", dtype=torch.float32, contexts=(128,) if quick else (128, 1024), batches=(1, 4),
                new_tokens=24 if quick else 64, bf_prompt=64, bf_thinking=60 if quick else 200, reps=3)  # fmt: skip


def build_model(shape: dict, dtype: torch.dtype, device: str, max_positions: int):
    model = random_qwen2(shape, device=device, dtype=dtype, max_positions=max_positions, use_cache=True).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _hf_generate(model, ids: torch.Tensor, new_tokens: int, **kw) -> None:
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, **kw)  # fmt: skip


def _decode_rate(generate, batch: int, new_tokens: int, device: str, reps: int) -> tuple[float, float]:
    """(tokens/s, seconds) of decoding: median time of N new tokens minus that of 1 (the prefill cancels)."""
    t_n = measure(lambda: generate(new_tokens), device=device, warmup=1, reps=reps)["median_ms"]
    t_1 = measure(lambda: generate(1), device=device, warmup=1, reps=reps)["median_ms"]
    seconds = max(t_n - t_1, 1e-9) / 1e3
    return batch * (new_tokens - 1) / seconds, seconds


def throughput(model, decoder, p: dict, device: str, peers: list[str], copy_gbps: float) -> list[dict]:
    from s1fast.decode.decoder import Decoder

    rows = []
    sdpa = None
    if torch.device(device).type == "cuda" and decoder.decode_attention_path != "sdpa":
        sdpa = Decoder(model, max_seq_len=decoder.max_seq_len, attention="sdpa")
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    weights = decoder.memory()["weights_bytes"]
    gpu = torch.device(device).type == "cuda"
    for context in p["contexts"]:
        for batch in p["batches"]:
            ids = torch.randint(0, vocab, (batch, context), generator=g)
            prompts = ids.tolist()
            ids = ids.to(device)
            n = p["new_tokens"]
            step_bytes = weights + batch * decoder.kv_bytes_per_token() * (context + n / 2)
            limit = batch * copy_gbps * 1e9 / step_bytes
            base = dict(case="decode", model=p["shape"], dtype=str(p["dtype"]).replace("torch.", ""), context=context,
                        batch=batch, new_tokens=n, bw_limit_tokens_per_s=limit, step_mib=step_bytes / 2**20)  # fmt: skip
            impls = {"s1fast": lambda k: decoder.generate(prompts, max_new_tokens=k)}
            paths = {"s1fast": decoder.decode_attention_path}
            if sdpa is not None:
                impls["s1fast_sdpa"] = lambda k: sdpa.generate(prompts, max_new_tokens=k)
                paths["s1fast_sdpa"] = sdpa.decode_attention_path
            if "hf" in peers:
                impls["hf_dynamic"] = lambda k: _hf_generate(model, ids, k)
            if "compile" in peers and gpu:
                impls["hf_static_compile"] = lambda k: _hf_generate(model, ids, k, cache_implementation="static")
            found = {}
            for name, fn in impls.items():
                try:
                    rate, seconds = _decode_rate(fn, batch, n, device, p["reps"])
                except torch.OutOfMemoryError:
                    rows.append(dict(base, impl=name, skipped="out of memory"))
                    continue
                finally:
                    if gpu:
                        torch.cuda.empty_cache()
                found[name] = dict(base, impl=name, tokens_per_s=rate, seconds=seconds, pct_of_bw_limit=100 * rate / limit)
                if name in paths:
                    found[name]["attention"] = paths[name]
            for row in found.values():
                if "hf_dynamic" in found:
                    row["speedup_vs_hf"] = row["tokens_per_s"] / found["hf_dynamic"]["tokens_per_s"]
                rows.append(row)
            for dec in (decoder, sdpa):  # the next (context, batch) allocates its own cache
                if dec is not None:
                    dec.release()
    return rows


def budget_forcing(model, decoder, p: dict, device: str) -> list[dict]:
    from s1fast.decode.budget import BudgetForcing

    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (p["bf_prompt"],), generator=g).tolist()
    n = p["bf_thinking"]
    probe = decoder.generate([prompt], max_new_tokens=min(n, 256)).tokens[0]
    t = collections.Counter(probe).most_common(1)[0][0]  # the token the random model loops on
    # the first token after a wait may not end thinking (s1's min_tokens=1), so the model may wander off its
    # loop: the tokens it emits end thinking too, a set grown until the 4 waits happen
    enders = set(probe)
    for _ in range(8):
        forcing = BudgetForcing(end_think=[t], wait=[t, t], budget_end=[t, 0], num_waits=4, end_think_tokens=enders)
        forced = decoder.generate([prompt], max_new_tokens=min(n, 256), budget=forcing)
        if forced.forced_waits[0] == 4:
            break
        enders |= set(forced.tokens[0])
    runs = {
        "plain": lambda: decoder.generate([prompt], max_new_tokens=n),
        "in_loop": lambda: decoder.generate([prompt], max_new_tokens=n, budget=forcing),
    }

    def s1_rounds():
        history = list(prompt)
        for r in range(5):
            history += decoder.generate([history], max_new_tokens=n // 5).tokens[0]
            if r < 4:
                history += list(forcing.wait)

    runs["s1_reprefill"] = s1_rounds
    base = dict(case="budget_forcing", model=p["shape"], context=p["bf_prompt"], batch=1, new_tokens=n,
                attention=decoder.decode_attention_path)  # fmt: skip
    rows = {}
    for name, fn in runs.items():
        ms = measure(fn, device=device, warmup=1, reps=p["reps"])["median_ms"]
        rows[name] = dict(base, impl=name, seconds=ms / 1e3, tokens_per_s=n / (ms / 1e3))
    forced = decoder.generate([prompt], max_new_tokens=n, budget=forcing)
    rows["in_loop"].update(forced_waits=forced.forced_waits[0], thinking_ended=forced.thinking_ended[0],
                           overhead_pct=100 * (rows["in_loop"]["seconds"] / rows["plain"]["seconds"] - 1))  # fmt: skip
    rows["s1_reprefill"].update(rounds=5, in_loop_speedup=rows["s1_reprefill"]["seconds"] / rows["in_loop"]["seconds"])
    decoder.release()
    return list(rows.values())


def run(*, device: str, quick: bool, peers: list[str]) -> list[dict]:
    """Bench-suite entry point (see the module docstring)."""
    unknown = [x for x in peers if x not in PEERS + ("eager", "liger")]
    if unknown:
        raise ValueError(f"bench decode: unknown peers {unknown}; expected some of {PEERS}")
    from s1fast.decode.decoder import Decoder

    p = plan(device, quick)
    shape = QWEN25_SHAPES[p["shape"]] if p["shape"] in QWEN25_SHAPES else SMALL
    ceilings = device_ceilings(device, quick=quick)
    longest = max(max(p["contexts"]) + p["new_tokens"], p["bf_prompt"] + p["bf_thinking"] + 16)
    model = build_model(shape, p["dtype"], device, longest + 64)
    decoder = Decoder(model)
    rows = [dict(case="environment", **environment(device), **ceilings, torch_threads=torch.get_num_threads())]
    rows += throughput(model, decoder, p, device, peers, ceilings["copy_gbps"])
    rows += budget_forcing(model, decoder, p, device)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s1fast.bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peers", default="hf,compile", help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows = run(device=args.device, quick=args.quick, peers=[x for x in args.peers.split(",") if x])
    for row in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k in SUMMARY_COLUMNS or k == "device"})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
