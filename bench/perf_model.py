"""Static performance model of the Triton kernels (part of ``s1fast bench inspect``): no GPU needed.

For every kernel family (forward + backward through the public function, as training runs it) at the
Qwen2.5-1.5B / 7B shapes in bf16, on a modelled H100 SXM (``GPU``), each figure documented where it is computed:

- bytes moved / minimum: counted under Triton's interpreter (:func:`counting`, :func:`counted`; the method is
  in the comment above ``L2_RESIDENT_BYTES``);
- grid, waves, occupancy and its limiter: :func:`occupancy`;
- predicted share of copy bandwidth: :func:`predict`, a prediction to rank changes by.

Also: Triton launches and PyTorch operator calls per decode step per layer, counted on a tiny random Qwen2
(``decode_launches``, the counter of ``s1fast bench decode``).

Entry points: :func:`run_counts` (the counts, in a child process: :func:`main`), :func:`model_rows`,
:func:`format_model`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator

import torch

GPU = {
    "name": "H100 SXM (modelled)", "sms": 132, "copy_gbps": 3000.0, "launch_gap_us": 2.0, "regs_per_sm": 65536,
    "smem_per_sm": 228 * 1024, "smem_reserved_per_block": 1024, "threads_per_sm": 2048, "blocks_per_sm": 32,
}
MODELS = ("1.5B", "7B")
MODEL_TOKENS = (4096, 8192, 16384, 32768)
FAMILIES = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy")
BYTES_BOUND = {
    "rms_norm": 1.06,
    "rope": 1.001,
    "swiglu": 1.001,
    "cross_entropy": 1.501,
    "fused_linear_cross_entropy": 1.5,
}
"""Stated bound on bytes moved / minimum for forward + backward at 4K-32K tokens; CI fails a kernel above it.
RMSNorm: its fp32 dW partials (264 x N, written and read once) are 5% of the minimum at 4K tokens; cross-entropy:
1.5 plus the per-row scalars (label read twice, lse written and read)."""
COUNT_TOKENS = {"rope": 16, "swiglu": 16, "cross_entropy": 2, "fused_linear_cross_entropy": 2}
"""The smallest token count each family is counted at (see ``count_tokens``)."""
COUNT_SMS = 4
"""The modelled GPU's SM count for the counting runs (then twice that): small, so that persistent grids fill
with few tokens; figures are extended linearly in tokens and SMs to the real GPU."""


def count_tokens(family: str, model: str) -> int:
    """The token count T the family is counted at (then 2T): for RMSNorm, enough rows to fill its persistent
    backward grid on 2 x ``COUNT_SMS`` SMs (its per-program dW partials stop growing there)."""
    if family != "rms_norm":
        return COUNT_TOKENS[family]
    from s1fast.model.shapes import QWEN25_SHAPES

    rms = importlib.import_module("s1fast.kernels.rms_norm")  # the package attribute is the function
    return rms._config(QWEN25_SHAPES[model]["hidden"])[1] * rms._BWD_PROGRAMS_PER_SM * 2 * COUNT_SMS


def _persistent_caps() -> dict[str, int]:
    """Grid-stride kernels: kernel -> most programs per SM their launchers start (the extension stops there;
    a ``TAIL_PHASES`` kernel's programs past it are its tail phase's)."""
    from s1fast.kernels import _common

    rms = importlib.import_module("s1fast.kernels.rms_norm")
    return {"_rms_norm_bwd_kernel": rms._BWD_PROGRAMS_PER_SM, "_scale_kernel": _common._SCALE_PROGRAMS_PER_SM}


# ------------------------------------------------------------------------------------------- counting
# Bytes moved / minimum. Method: the public function runs under Triton's interpreter with every masked load and store
# counted (``counting``: each element whose mask is true adds its size; a second load of the same element counts again,
# so an L2 hit is counted as DRAM traffic: an upper bound) while the launchers size their grids for the modelled GPU
# (``kernels._common.modelled_gpu``). The minimum is what the bench counts: each input read once and each output written
# once (``bench.kernels`` ``moved_bytes``); for the fused linear cross-entropy's Triton kernels, one read and one write
# of each logits chunk. Bytes and grids are counted at two small token counts and extended linearly to 4K-32K tokens
# (exact for these kernels: per-row work plus a per-program part that no longer grows once a persistent grid is full;
# the two counts are chosen past that point). The loss kernels are counted on a few full-vocabulary rows (one program
# per row, so bytes are per row).
L2_RESIDENT_BYTES = 1 << 20
"""A load site (one ``tl.load`` in the kernel's source) whose whole footprint in a launch is at most this is
counted once per launch (a weight row, per-row scalars, labels: they stay in the 50 MB L2); every other
load counts each time it runs, re-reads included."""


def _element_bytes(ptrs) -> int:
    ty = ptrs.get_element_ty() if hasattr(ptrs, "get_element_ty") else ptrs.dtype.element_ty  # 3.9 / 3.6
    return max(1, ty.primitive_bitwidth // 8)


def _kernel_site() -> tuple[str, int, str]:
    """(file, line, function) of the kernel source line running the current load or store: the first frame
    outside Triton."""
    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}triton{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name) if frame is not None else ("?", 0, "?")


def _scale_kernel_bytes(args: dict) -> tuple[int, int]:
    """``_common._scale_kernel`` from its launch arguments (it is elementwise; interpreting it over a [V, H]
    weight gradient takes minutes): every program reads the scale; then nothing in place when it is 1, else
    each element read and written once."""
    x, out, go, n = args["x_ptr"], args["out_ptr"], args["go_ptr"], args["n"]
    if out.data_ptr() == x.data_ptr() and float(go.reshape(-1)[0]) == 1.0:
        return 0, 0
    return n * x.element_size(), n * out.element_size()


TAIL_PHASES = {"_rms_norm_bwd_kernel": "_bwd_reduce"}
"""Kernel -> the ``@triton.jit`` function its tail phase runs in: bytes moved there (``tail_bytes``, also in the
launch's totals) are moved by the programs past the kernel's persistent cap after the capped programs finish
(RMSNorm backward's dW reducers wait for every row program), timed like a launch of that many programs but
without a launch gap."""
FROM_ARGS = {"_scale_kernel": _scale_kernel_bytes}
PER_PROGRAM_LOAD_BYTES = {"_scale_kernel": 4}  # FROM_ARGS kernels: what each program reads besides the data
"""Kernels whose bytes are computed from their launch arguments instead of interpreted (stated per kernel)."""


@contextlib.contextmanager
def counting() -> Iterator[list[dict]]:
    """Inside the block (Triton's interpreter must be on), every kernel launch appends
    ``{"kernel", "grid", "load_bytes", "store_bytes", "tail_bytes", "constexprs"}`` to the yielded list: bytes of
    the elements each masked load / store touches (see ``L2_RESIDENT_BYTES``; ``TAIL_PHASES`` for the tail);
    ``FROM_ARGS`` kernels are not run."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    launches: list[dict] = []
    sites: dict = {}  # (file, line, function) -> [bytes, lowest address, highest address end] in the current launch
    load, store, call = builder.create_masked_load, builder.create_masked_store, interpreter.GridExecutor.__call__

    def touched(ptrs, mask) -> tuple[int, np.ndarray]:
        live = np.broadcast_to(mask.data, ptrs.data.shape)
        return int(np.count_nonzero(live)) * _element_bytes(ptrs), ptrs.data[live] if live.any() else None

    def counted_load(ptrs, mask, other, *rest):
        nbytes, addresses = touched(ptrs, mask)
        if addresses is not None:
            site = sites.setdefault(_kernel_site(), [0, None, None])
            site[0] += nbytes
            low, high = int(addresses.min()), int(addresses.max()) + _element_bytes(ptrs)
            site[1] = low if site[1] is None else min(site[1], low)
            site[2] = high if site[2] is None else max(site[2], high)
        return load(ptrs, mask, other, *rest)

    def counted_store(ptrs, value, mask, *rest):
        nbytes = touched(ptrs, mask)[0]
        launches[-1]["store_bytes"] += nbytes
        if _kernel_site()[2] == TAIL_PHASES.get(launches[-1]["kernel"]):
            launches[-1]["tail_bytes"] += nbytes
        return store(ptrs, value, mask, *rest)

    def counted_call(self, *args, **kwargs):
        grid = self.grid(kwargs) if callable(self.grid) else self.grid  # launchers pass tuples
        constexprs = {k: v for k, v in kwargs.items() if k in self.constexprs}
        launch = {"kernel": self.fn.__name__, "grid": math.prod(grid), "load_bytes": 0, "store_bytes": 0,
                  "tail_bytes": 0, "constexprs": constexprs}
        launches.append(launch)
        if launch["kernel"] in FROM_ARGS:
            params = inspect.signature(self.fn).parameters
            named = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params}).arguments
            launch["load_bytes"], launch["store_bytes"] = FROM_ARGS[launch["kernel"]](named)
            launch["load_bytes"] += PER_PROGRAM_LOAD_BYTES[launch["kernel"]] * launch["grid"]
            return None
        sites.clear()
        result = call(self, *args, **kwargs)
        for (_, _, function), (nbytes, low, high) in sites.items():
            counted_bytes = min(nbytes, high - low) if high - low <= L2_RESIDENT_BYTES else nbytes
            launch["load_bytes"] += counted_bytes
            if function == TAIL_PHASES.get(launch["kernel"]):
                launch["tail_bytes"] += counted_bytes
        return result

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    interpreter.GridExecutor.__call__ = counted_call
    try:
        yield launches
    finally:
        del builder.create_masked_load, builder.create_masked_store  # back to the class's methods
        interpreter.GridExecutor.__call__ = call


@contextlib.contextmanager
def _fp32_cpu_mm() -> Iterator[None]:
    """``torch.mm`` computed in fp32 inside the block: PyTorch's CPU bf16 GEMM takes seconds at the lm_head's
    shape; the fused linear cross-entropy's GEMMs are cuBLAS on a GPU and not counted anyway."""
    mm, upcasts = torch.mm, {}

    def fp32(t):  # the [V, H] weight is upcast once, not at every call
        key = (t.data_ptr(), t.shape, t.stride())
        if key not in upcasts:
            upcasts[key] = t.float()
        return upcasts[key]

    def fp32_mm(a, b, *, out=None):
        product = mm(fp32(a), fp32(b))
        return out.copy_(product) if out is not None else product.to(a.dtype)

    torch.mm = fp32_mm
    try:
        yield
    finally:
        torch.mm = mm


def count_family(family: str, model: str, tokens: int, sms: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Forward + backward of ``family``'s public function at ``(model, tokens)`` under the interpreter on a
    GPU of ``sms`` SMs: ``{"min_bytes", "launches"}``."""
    from s1fast.bench.kernels import _backward, _build
    from s1fast.kernels._common import modelled_gpu
    from s1fast.model.shapes import QWEN25_SHAPES

    torch.manual_seed(0)
    if family == "fused_linear_cross_entropy":
        # its Triton kernels' minimum: each logits chunk read and written once, and the fp32 weight-gradient
        # accumulator read once and the weight gradient written once (the GEMMs are cuBLAS, not counted). A zero
        # weight (the bytes do not depend on its values; random [V, H] weights take seconds to draw on CPU).
        from s1fast.kernels import fused_linear_cross_entropy

        V, H = QWEN25_SHAPES[model]["vocab"], QWEN25_SHAPES[model]["hidden"]
        minimum = 2 * tokens * V * dtype.itemsize + V * H * (4 + dtype.itemsize)
        hidden = torch.randn(tokens, H, dtype=dtype, requires_grad=True)
        weight = torch.zeros(V, H, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, V, (tokens,))
        run = lambda: fused_linear_cross_entropy(hidden, weight, labels).backward()  # noqa: E731
    else:
        case = _build(family, model, tokens, dtype, "cpu", peers=[])
        minimum = case.moved_bytes["fwd_bwd"]
        run = lambda: _backward(case.impls["s1fast"](*case.leaves, *case.others), case.dys)  # noqa: E731
    fast_mm = _fp32_cpu_mm() if family == "fused_linear_cross_entropy" else contextlib.nullcontext()
    with modelled_gpu(sms), counting() as launches, fast_mm:
        run()
    return {"min_bytes": minimum, "launches": launches}


def counted(family: str, model: str, tokens_list=MODEL_TOKENS, sms: int = GPU["sms"]) -> dict[int, dict]:
    """tokens -> counts at that token count on ``sms`` SMs: counted at (T, s), (2T, s) and (2T, 2s) with
    T = ``count_tokens``, s = ``COUNT_SMS``, and extended linearly in tokens and SMs (each figure is per-row
    work plus per-program work); grids of grid-stride kernels capped at their launchers' programs per SM."""
    t, s = count_tokens(family, model), COUNT_SMS
    runs = [count_family(family, model, *at) for at in ((t, s), (2 * t, s), (2 * t, 2 * s))]
    names = [[x["kernel"] for x in r["launches"]] for r in runs]
    if any(n != names[0] for n in names):
        raise RuntimeError(f"perf model: {family} launches differ between the counting runs: {names}")
    caps = _persistent_caps()

    def extend(a, b, c, tokens):  # f(T, S) = f_a + (f_b - f_a) (T - t) / t + (f_c - f_b) (S - s) / s
        return round(a + (b - a) * (tokens - t) / t + (c - b) * (sms - s) / s)

    out = {}
    for tokens in tokens_list:
        launches = []
        for xa, xb, xc in zip(*(r["launches"] for r in runs)):
            x = dict(xa, **{k: extend(xa[k], xb[k], xc[k], tokens)
                            for k in ("grid", "load_bytes", "store_bytes", "tail_bytes")})
            if x["kernel"] in caps:
                capped = min(x["grid"], caps[x["kernel"]] * sms)
                if x["kernel"] in TAIL_PHASES:  # the programs past the cap run the tail phase
                    x["tail_programs"] = x["grid"] - capped
                    if x["tail_programs"] < 1:
                        raise RuntimeError(f"perf model: {x['kernel']} at {tokens} tokens has no programs past its "
                                           "persistent cap to run its tail phase (count_tokens too small)")
                else:
                    x["load_bytes"] -= PER_PROGRAM_LOAD_BYTES.get(x["kernel"], 0) * (x["grid"] - capped)
                x["grid"] = capped
            launches.append(x)
        out[tokens] = {"min_bytes": extend(*(r["min_bytes"] for r in runs), tokens), "launches": launches}
    return out


# ------------------------------------------------------------------------------------------ the model
def occupancy(registers: int, shared_bytes: int, num_warps: int, gpu: dict = GPU) -> tuple[int, str]:
    """(resident programs per SM, what limits it: "registers", "shared memory", "threads", "blocks", or several
    joined by "/" when they tie) for one build on ``gpu``.

    Programs per SM = the smallest of: the register file (65,536 / (warps x 32 x registers rounded up to 8)), shared
    memory (228 KiB / (bytes + 1 KiB reserved)), 2,048 threads and 32 blocks; registers and shared memory from the sm_90
    cubin (``bench.inspect``). waves = grid / (132 x programs per SM).
    """
    threads = num_warps * 32
    limits = {
        "registers": gpu["regs_per_sm"] // (threads * (-(-max(registers, 1) // 8) * 8)),
        "shared memory": gpu["smem_per_sm"] // (shared_bytes + gpu["smem_reserved_per_block"]),
        "threads": gpu["threads_per_sm"] // threads,
        "blocks": gpu["blocks_per_sm"],
    }
    most = min(limits.values())
    return most, "/".join(k for k, v in limits.items() if v == most)  # ties name every limit


def predict(min_bytes: int, launches: list[dict], gpu: dict = GPU) -> dict:
    """Apply the model's formula to launches carrying ``grid``, bytes and ``programs_per_sm``: the predicted share
    of copy bandwidth::

        t_i   = moved_i / (B x eff_i)         eff_i = waves_i / ceil(waves_i), or min(1, grid_i / 132) below one wave
        pct   = (minimum / B) / (sum_i t_i + (launches - 1) x gap)

    with B = ``GPU["copy_gbps"]`` (what a large device copy reaches on an H100 SXM) and gap = ``GPU["launch_gap_us"]``
    between back-to-back launches. Not modelled: memory latency and bytes in flight (a kernel with too few loads in
    flight per SM falls short of B), L2 hits, CPU-side overhead (autograd, Python), clocks. A prediction to rank changes
    by, checked against ``s1fast bench kernels`` on a GPU.

    A kernel's tail phase (``TAIL_PHASES``: work that waits for the rest of its grid) is timed apart, like a launch of
    its programs without the gap:
    ``t_i = (moved_i - tail_i) / (B x eff_i) + tail_i / (B x min(1, tail programs / 132))``.
    """
    bw = gpu["copy_gbps"] * 1e3  # bytes per microsecond
    total_us = (len(launches) - 1) * gpu["launch_gap_us"]
    for x in launches:
        waves = x["grid"] / (gpu["sms"] * x["programs_per_sm"])
        x["waves"] = round(waves, 3)
        eff = waves / math.ceil(waves) if waves >= 1 else min(1.0, x["grid"] / gpu["sms"])
        tail = x.get("tail_bytes", 0)
        total_us += (x["load_bytes"] + x["store_bytes"] - tail) / (bw * max(eff, 1e-9))
        if tail:
            total_us += tail / (bw * min(1.0, x["tail_programs"] / gpu["sms"]))
    moved = sum(x["load_bytes"] + x["store_bytes"] for x in launches)
    return {"moved_bytes": moved, "min_bytes": min_bytes, "bytes_ratio": round(moved / min_bytes, 5),
            "predicted_us": round(total_us, 2), "predicted_pct_of_copy_bw": round(100 * min_bytes / bw / total_us, 1)}


def _build_for(launch: dict, builds: list[dict]) -> dict | None:
    """The sm_90 build of a launch: same kernel function and the launch's constexprs."""
    for b in builds:
        if b["function"] == launch["kernel"] and all(b["constexprs"].get(k) == repr(v)
                                                      for k, v in launch["constexprs"].items()):
            return b
    return None


def count_all(models=MODELS, tokens_list=MODEL_TOKENS, families=FAMILIES) -> list[dict]:
    """``counted`` for every family and model: ``[{"family", "model", "tokens", "min_bytes", "launches"}]``.
    Runs the kernels, so Triton's interpreter must be on (``run_counts`` starts a child process otherwise)."""
    return [{"family": f, "model": m, "tokens": t, **c} for f in families for m in models
            for t, c in counted(f, m, tokens_list).items()]


def run_counts(models=MODELS, tokens_list=MODEL_TOKENS, families=FAMILIES, *, decode: bool = True) -> dict:
    """``{"counts": count_all(...), "decode": decode_launches() or None}``, in a child process with
    ``TRITON_INTERPRET=1`` unless the interpreter is already on here."""
    from s1fast.kernels._common import interpreting

    if interpreting():
        return {"counts": count_all(models, tokens_list, families), "decode": decode_launches() if decode else None}
    cmd = [sys.executable, "-m", "s1fast.bench.perf_model", "--models", ",".join(models),
           "--tokens", ",".join(map(str, tokens_list)), "--families", ",".join(families)]
    if not decode:
        cmd.append("--no-decode")
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"perf model: counting process failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def model_rows(builds: list[dict], counts: list[dict]) -> list[dict]:
    """One row per (family, model, tokens) with one entry per launch; ``builds`` are ``bench.inspect``'s
    sm_90 records (with ``function`` and ``constexprs``) for occupancy, ``counts`` from ``count_all``."""
    rows = []
    for c in counts:
        launches = [dict(x) for x in c["launches"]]
        for x in launches:
            b = _build_for(x, builds)
            if b is None:
                raise RuntimeError(f"perf model: no sm_90 build inspected for launch {x['kernel']} {x['constexprs']} "
                                   "(kernel_specs must describe every launch)")
            x["programs_per_sm"], x["occupancy_limiter"] = occupancy(b["registers"], b["shared_bytes"], b["num_warps"])
            x["registers"] = b["registers"]
        rows.append(
            {
                "family": c["family"],
                "model": c["model"],
                "tokens": c["tokens"],
                "bytes_bound": BYTES_BOUND[c["family"]],
                **predict(c["min_bytes"], launches),
                "launches": launches,
            }
        )
    return rows


def decode_launches() -> dict:
    """Launches per decode step of ``s1fast.decode.Decoder`` on a tiny random Qwen2, as ``constant + per_layer x
    layers`` for Triton launches and for PyTorch operators (each one CUDA kernel on a GPU, all replayed by one CUDA
    graph there), from ``s1fast.bench.decode.launches``: the one counter, shared with ``s1fast bench decode``."""
    from s1fast.bench.decode import launches

    row = launches("cpu")[0]
    layers, triton = row["layers"], row["triton_per_layer"]
    torch_ops = row["launches_per_layer"] - triton
    return {
        "triton_launches_per_layer": triton,
        "torch_ops_per_layer": torch_ops,
        "triton_launches_constant": row["triton_per_step"] - layers * triton,
        "torch_ops_constant": row["launches_per_step"] - row["triton_per_step"] - layers * torch_ops,
    }


COLUMNS = ("family", "model", "tokens", "bytes_ratio", "bytes_bound", "predicted_pct_of_copy_bw", "predicted_us")


def format_model(rows: list[dict]) -> str:
    """A table of the model: one line per (family, model, tokens), then the launches of each at 4K tokens."""
    head = ["kernel", "model", "tokens", "bytes/min", "bound", "pred % copy", "pred us"]
    body = [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    out.append("")
    out.append("launches (first token count of each): kernel  grid  waves  programs/SM (limiter)  regs  MiB moved")
    for r in rows:
        if r["tokens"] != rows[0]["tokens"]:
            continue
        for x in r["launches"]:
            out.append(f"  {r['family']} {r['model']} {r['tokens']}: {x['kernel']}  grid={x['grid']}  "
                       f"waves={x['waves']}  {x['programs_per_sm']}/SM ({x['occupancy_limiter']})  "
                       f"regs={x['registers']}  {(x['load_bytes'] + x['store_bytes']) / 2**20:.1f} MiB")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Child-process entry (``run_counts``): print the counts and decode launches as JSON."""
    import argparse

    csv = lambda v: [x for x in v.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m s1fast.bench.perf_model")
    p.add_argument("--models", type=csv, default=list(MODELS))
    p.add_argument("--tokens", type=lambda v: [int(x) for x in csv(v)], default=list(MODEL_TOKENS))
    p.add_argument("--families", type=csv, default=list(FAMILIES))
    p.add_argument("--no-decode", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(run_counts(args.models, args.tokens, args.families, decode=not args.no_decode)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
