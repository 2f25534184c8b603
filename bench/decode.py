"""Decode benchmark: s1fast's ``Decoder`` against transformers ``generate``, and in-loop budget forcing
against s1's re-prefill rounds.

Throughput. Decode tokens/s of a random-initialised model (Qwen2.5-1.5B shape in bf16 on GPU; a small Qwen2
in fp32 on CPU) for every (context, batch): the median wall time of ``generate`` for N new tokens minus that
for 1 new token (so the prefill cancels), the same way for every implementation:
- ``s1fast``: ``Decoder.generate`` (CUDA graphs on GPU); its graphs are captured by a first, untimed call;
- ``s1fast_sampled`` (batch 1): the same, sampling at temperature 0.6 with top-p 0.95 (``s1fast eval
  --samples``' default, DeepSeek's pass@1 setting; the top-p sort and the Gumbel-max kernel run inside the step,
  inside its CUDA graph on GPU): what sampling costs against greedy decoding;
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

Mixed workload (``mixed_workload``; issue 12's eval-scale case). 64 requests on 16 rows (32 on 8 with
``--quick``), prompts of 16..64 tokens, thinking budgets spread over 16..1024 (16..256 quick), 0..2 waits each,
an answer of up to 16 tokens, on a TINY model (2 layers, hidden 64) so that a step's cost is its per-step overhead, as
on a GPU where a decode step of a small batch sits on the launch-latency floor; same row cap for every way:
- ``engine``: ``Engine`` (continuous batching) on the paged cache with a KV budget of half the dense layout;
- ``static``: today's static batching, the same requests in fixed batches of row-cap requests, each batch
  run to its longest request (``Engine`` runs of one batch each, which is what ``Decoder.generate`` does);
- ``hf_static`` (peer ``hf``): transformers ``generate`` on the same batches (left-padded), each batch
  for as many tokens as its longest request produced (no budget forcing: the cost of a static batch).
Engine and static runs alternate ``MIXED_REPS`` times after a warm-up and report their median times
(transformers runs once). Tokens/s count the tokens each request produced; ``kv_peak_mib`` is the KV memory the
engine's rows held at the peak (pages in use), ``kv_dense_mib`` the dense layout's ``rows x (longest prompt +
max_new_tokens)``.

Launches (``launches``): device launches per decode step, counted on any machine through the public API:
``Decoder.generate`` on 2- and 4-layer TINY models under a ``TorchDispatchMode`` that counts the aten ops that
launch a kernel (not views, allocations or host-side ops) and Triton launches (inside a Triton launch nothing else
is counted), in ``Decoder._decode`` only (every step must count the same); per layer = the difference / 2. On CPU
the count runs the Triton kernels through the interpreter (a child process with TRITON_INTERPRET=1 unless it is
on already), so it is the Triton attention path's count.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator

import torch

from s1fast.bench.common import device_ceilings, measure
from s1fast.commands import default_device
from s1fast.env import environment
from s1fast.kernels import interpreting
from s1fast.model.shapes import QWEN25_SHAPES, random_qwen

SUMMARY_COLUMNS = ("case", "impl", "attention", "context", "batch", "new_tokens", "tokens_per_s", "speedup_vs_hf",
                   "pct_of_bw_limit", "overhead_pct", "seconds", "speedup_vs_static", "kv_peak_mib", "kv_dense_mib",
                   "kv_peak_vs_dense", "preemptions", "launches_per_step", "launches_per_layer")
PEERS = ("hf", "compile")
MIXED_REPS = 3  # interleaved engine / static runs of the mixed workload; the medians are reported
SMALL = dict(layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=768, vocab=8192, tied=True)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=512, tied=True)


def plan(device: str, quick: bool, headline: bool = False) -> dict:
    """Sizes. ``headline`` (GPU): the GPU kit's figures only: batch 1 at 8K context (no ``s1fast_sdpa`` row), budget
    forcing over 1,024 thinking tokens, the mixed workload at its quick size without transformers (bench/README.md,
    "GPU kit", has the arithmetic of its time)."""
    gpu = torch.device(device).type == "cuda"
    if gpu and headline:
        return dict(shape="1.5B", dtype=torch.bfloat16, contexts=(8192,), batches=(1,), new_tokens=128,
                    bf_prompt=1024, bf_thinking=1024, reps=2)
    if gpu:
        return dict(shape="1.5B", dtype=torch.bfloat16, contexts=(1024,) if quick else (1024, 8192, 32768),
                    batches=(1,) if quick else (1, 16), new_tokens=64 if quick else 256,
                    bf_prompt=1024, bf_thinking=512 if quick else 8192, reps=2 if quick else 3)
    return dict(shape="small", dtype=torch.float32, contexts=(128,) if quick else (128, 1024),
                batches=(1,) if quick else (1, 4), new_tokens=16 if quick else 64, bf_prompt=64,
                bf_thinking=40 if quick else 200, reps=2 if quick else 3)


def build_model(shape: dict, dtype: torch.dtype, device: str, max_positions: int):
    model = random_qwen(shape, device=device, dtype=dtype, max_positions=max_positions, use_cache=True).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _hf_generate(model, ids: torch.Tensor, new_tokens: int, **kw) -> None:
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, **kw)


def _decode_rate(generate, batch: int, new_tokens: int, device: str, reps: int) -> tuple[float, float]:
    """(tokens/s, seconds) of decoding: median time of N new tokens minus that of 1 (the prefill cancels)."""
    t_n = measure(lambda: generate(new_tokens), device=device, warmup=1, reps=reps)["median_ms"]
    t_1 = measure(lambda: generate(1), device=device, warmup=1, reps=reps)["median_ms"]
    seconds = max(t_n - t_1, 1e-9) / 1e3
    return batch * (new_tokens - 1) / seconds, seconds


def throughput(model, decoder, p: dict, device: str, peers: list[str], copy_gbps: float,
               headline: bool = False) -> Iterator[dict]:
    """Yields each row as it is measured; the earlier rows of a (context, batch) gain ``speedup_vs_hf`` when
    ``hf_dynamic`` is measured."""
    from s1fast.decode.decoder import Decoder

    sdpa = None
    if torch.device(device).type == "cuda" and decoder.decode_attention_path != "sdpa" and not headline:
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
                        batch=batch, new_tokens=n, bw_limit_tokens_per_s=limit, step_mib=step_bytes / 2**20)
            impls = {"s1fast": lambda k, prompts=prompts: decoder.generate(prompts, max_new_tokens=k)}
            if batch == 1:
                impls["s1fast_sampled"] = lambda k, prompts=prompts: decoder.generate(
                    prompts, max_new_tokens=k, temperature=0.6, top_p=0.95, seed=0)
            paths = dict.fromkeys(impls, decoder.decode_attention_path)
            if sdpa is not None:
                impls["s1fast_sdpa"] = lambda k, prompts=prompts: sdpa.generate(prompts, max_new_tokens=k)
                paths["s1fast_sdpa"] = sdpa.decode_attention_path
            if "hf" in peers:
                impls["hf_dynamic"] = lambda k, ids=ids: _hf_generate(model, ids, k)
            if "compile" in peers and gpu:
                impls["hf_static_compile"] = lambda k, ids=ids: _hf_generate(
                    model, ids, k, cache_implementation="static"
                )
            found = {}
            for name, fn in impls.items():
                try:
                    rate, seconds = _decode_rate(fn, batch, n, device, p["reps"])
                except torch.OutOfMemoryError:
                    yield dict(base, impl=name, skipped="out of memory")
                    continue
                finally:
                    if gpu:
                        torch.cuda.empty_cache()
                found[name] = dict(
                    base, impl=name, tokens_per_s=rate, seconds=seconds, pct_of_bw_limit=100 * rate / limit
                )
                if name in paths:
                    found[name]["attention"] = paths[name]
                for row in found.values() if "hf_dynamic" in found else ():
                    row["speedup_vs_hf"] = row["tokens_per_s"] / found["hf_dynamic"]["tokens_per_s"]
                yield found[name]
            for dec in (decoder, sdpa):  # the next (context, batch) allocates its own cache
                if dec is not None:
                    dec.release()


def budget_forcing(model, decoder, p: dict, device: str) -> Iterator[dict]:
    """Yields the plain, in-loop and re-prefill rows as each is measured."""
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
                attention=decoder.decode_attention_path)
    rows = {}
    for name, fn in runs.items():
        ms = measure(fn, device=device, warmup=1, reps=p["reps"])["median_ms"]
        row = rows[name] = dict(base, impl=name, seconds=ms / 1e3, tokens_per_s=n / (ms / 1e3))
        if name == "in_loop":
            forced = decoder.generate([prompt], max_new_tokens=n, budget=forcing)
            row.update(forced_waits=forced.forced_waits[0], thinking_ended=forced.thinking_ended[0],
                       overhead_pct=100 * (row["seconds"] / rows["plain"]["seconds"] - 1))
        elif name == "s1_reprefill":
            row.update(rounds=5, in_loop_speedup=row["seconds"] / rows["in_loop"]["seconds"])
        yield row
    decoder.release()


def _workload(n: int, most: int, vocab: int, seed: int = 3) -> list[dict]:
    """``n`` requests: prompts of 16..64 tokens, thinking budgets spread over 16..``most``, 0..2 waits."""
    from s1fast.decode.budget import BudgetForcing

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(5, vocab, (int(torch.randint(16, 65, (1,), generator=g)),), generator=g).tolist()
        think = int(16 * (most / 16) ** (i / max(1, n - 1)))  # geometric: 16 .. most
        bf = BudgetForcing(end_think=[1], wait=[2, 3], budget_end=[1, 4], max_thinking_tokens=think, num_waits=i % 3,
                           end_think_tokens={5, 6, 7})
        out.append(dict(prompt=prompt, max_new_tokens=think + 16 + 2 * 3, budget=bf))
    order = torch.randperm(n, generator=g).tolist()  # long and short traces mixed in submission order
    return [out[i] for i in order]


def mixed_workload(device: str, quick: bool, peers: list[str], headline: bool = False) -> list[dict]:
    """Engine vs static batching vs transformers on the mixed workload (module docstring); ``headline``: the quick
    size, without transformers."""
    import time

    from s1fast.decode.decoder import Decoder
    from s1fast.decode.engine import Engine

    n, most, rows = (32, 256, 8) if quick or headline else (64, 1024, 16)
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    longest = 64 + most + 22 + 8
    model = build_model(TINY, dtype, device, longest + 64)
    reqs = _workload(n, most, TINY["vocab"])
    probe = Decoder(model)
    dense = rows * max(len(r["prompt"]) + r["max_new_tokens"] for r in reqs) * probe.kv_bytes_per_token()
    base = dict(case="mixed", model="tiny", dtype=str(dtype).replace("torch.", ""), batch=rows, requests=n,
                budgets=f"16..{most}", kv_dense_mib=dense / 2**20)

    def engine_run(dec, batch):
        engine = Engine(dec, max_rows=rows)
        for r in batch:
            engine.submit(r["prompt"], max_new_tokens=r["max_new_tokens"], budget=r["budget"])
        return engine.run()

    def timed(fn):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t

    batches = [reqs[i : i + rows] for i in range(0, n, rows)]
    engine_dec, static_dec = Decoder(model, kv_cache_bytes=dense // 2), Decoder(model)
    for dec in (engine_dec, static_dec):
        engine_run(dec, reqs[:rows])  # warm-up (allocations, lazy inits)
    times = collections.defaultdict(list)
    for _ in range(MIXED_REPS):  # interleaved, so that a slower spell of the machine hits both ways alike
        res, seconds = timed(lambda: engine_run(engine_dec, reqs))
        times["engine"].append(seconds)
        static, seconds = timed(lambda: [engine_run(static_dec, b) for b in batches])
        times["static"].append(seconds)
    engine_s, static_s = (statistics.median(times[k]) for k in ("engine", "static"))
    tokens = sum(map(len, res.tokens))
    assert [t for s in static for t in s.tokens] == res.tokens, "the engine and static batching must agree"
    mem = res.memory
    out = [
        dict(base, impl="engine", seconds=engine_s, tokens_per_s=tokens / engine_s, tokens=tokens,
             kv_peak_mib=mem["kv_bytes_peak"] / 2**20, kv_budget_mib=mem["kv_cache_bytes"] / 2**20,
             kv_peak_vs_dense=mem["kv_bytes_peak"] / dense, preemptions=res.preemptions,
             speedup_vs_static=static_s / engine_s),
        dict(base, impl="static", seconds=static_s, tokens_per_s=tokens / static_s, tokens=tokens,
             kv_peak_mib=max(s.memory["kv_bytes_peak"] for s in static) / 2**20),
    ]
    if "hf" in peers and not headline:
        made = iter(res.tokens)

        def hf_batches():
            for b in batches:
                new = max(len(next(made)) for _ in b)
                width = max(len(r["prompt"]) for r in b)
                ids = torch.tensor([[0] * (width - len(r["prompt"])) + r["prompt"] for r in b], device=device)
                mask = (ids != 0).long()  # prompts hold no token 0 (_workload draws from 5 up)
                with torch.inference_mode():
                    model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)

        _, hf_s = timed(hf_batches)  # once: the slowest way, there for scale
        out.append(dict(base, impl="hf_static", seconds=hf_s, tokens_per_s=tokens / hf_s, tokens=tokens))
        out[0]["speedup_vs_hf"] = hf_s / engine_s
    return out


def launches(device: str) -> list[dict]:
    """Device launches per decode step and per layer (module docstring)."""
    if torch.device(device).type == "cpu" and not interpreting():  # the Triton path needs the interpreter
        code = "import json; from s1fast.bench.decode import launches; print(json.dumps(launches('cpu')))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "TRITON_INTERPRET": "1"})
        if out.returncode != 0:
            raise RuntimeError(f"bench decode: launch-counting process failed ({out.returncode}):\n"
                               f"{out.stderr[-4000:]}")
        return json.loads(out.stdout.splitlines()[-1])
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit
    from torch.utils._python_dispatch import TorchDispatchMode

    from s1fast.decode.decoder import Decoder

    # operators that launch nothing: allocations, metadata, views not marked as views, dtype promotion (a host
    # computation), a scalar read
    skip = {"empty", "empty_strided", "empty_like", "new_empty", "_local_scalar_dense", "lift_fresh", "detach",
            "alias", "_unsafe_view", "set_", "resize_", "promote_types"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.aten = self.triton = 0
            self.inside = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.inside and not func.is_view and func.overloadpacket.__name__ not in skip:
                self.aten += 1
            return func(*args, **(kwargs or {}))

    mode = Count()

    def launch(run):
        def counted(*a, **k):
            if k.get("warmup"):
                return run(*a, **k)
            mode.triton += 1
            mode.inside, inside = True, mode.inside
            try:
                return run(*a, **k)
            finally:
                mode.inside = inside

        return counted

    counts = {}
    for layers in (2, 4):
        model = build_model(dict(TINY, layers=layers), torch.float32, device, 64)
        dec = Decoder(model, cuda_graphs=False)
        steps = []

        def step(n, kv, sampling, decode=dec._decode, steps=steps):
            mode.aten = mode.triton = 0
            with mode:
                decode(n, kv, sampling)
            steps.append((mode.aten + mode.triton, mode.triton))

        dec._decode = step
        runs = [(cls, cls.run) for cls in (jit.JITFunction, interpreter.InterpretedFunction)]
        try:
            for cls, run in runs:
                cls.run = launch(run)
            dec.generate([[1, 2, 3, 4, 5]], max_new_tokens=3)  # two decode steps
        finally:
            for cls, run in runs:
                cls.run = run
        if len(set(steps)) != 1:
            raise RuntimeError(f"bench decode: decode steps launched different counts {steps}")
        counts[layers] = (*steps[0], dec.decode_attention_path)
    per_layer, triton_per_layer = ((counts[4][j] - counts[2][j]) / 2 for j in (0, 1))
    return [dict(case="launches", model="tiny", batch=1, attention=counts[4][2], launches_per_step=counts[4][0],
                 triton_per_step=counts[4][1], launches_per_layer=per_layer, triton_per_layer=triton_per_layer,
                 layers=4)]


def run(*, device: str, quick: bool, peers: list[str], headline: bool = False) -> Iterator[dict]:
    """Bench-suite entry point (see the module docstring): yields each row as it is measured."""
    unknown = [x for x in peers if x not in PEERS + ("eager", "liger", "trl")]
    if unknown:
        raise ValueError(f"bench decode: unknown peers {unknown}; expected some of {PEERS}")
    from s1fast.decode.decoder import Decoder, set_cpu_threads

    p = plan(device, quick, headline)
    shape = QWEN25_SHAPES[p["shape"]] if p["shape"] in QWEN25_SHAPES else SMALL
    ceilings = device_ceilings(device, quick=quick)
    longest = max(max(p["contexts"]) + p["new_tokens"], p["bf_prompt"] + p["bf_thinking"] + 16)
    model = build_model(shape, p["dtype"], device, longest + 64)
    decoder = Decoder(model)
    threads = torch.get_num_threads()
    set_cpu_threads(model)  # as `s1fast generate` decodes (one thread for a small model on CPU), for every impl
    try:
        yield dict(case="environment", **environment(device), **ceilings, torch_threads=torch.get_num_threads())
        yield from throughput(model, decoder, p, device, peers, ceilings["copy_gbps"], headline)
        yield from budget_forcing(model, decoder, p, device)
        yield from mixed_workload(device, quick, peers, headline)
        yield from launches(device)
    finally:
        torch.set_num_threads(threads)  # the suites after this one run as before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m s1fast.bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peers", default="hf,compile", help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows = list(run(device=args.device, quick=args.quick, peers=[x for x in args.peers.split(",") if x]))
    for row in rows:
        print(
            {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in row.items()
                if k in SUMMARY_COLUMNS or k == "device"
            }
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
