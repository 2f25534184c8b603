"""Shared benchmark plumbing: Qwen2.5 shapes, timing (medians after warm-up), device ceilings, environment.

Every bench module (``kernels``, ``train``, ``decode``, ...) exposes
``run(*, device: str, quick: bool, peers: list[str]) -> list[dict]``: one flat dict per measurement, units
in the key names (``median_ms``, ``tokens_per_s``, ``peak_mem_mib``, ``gbps``, ``pct_of_copy_bw``).
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

# Qwen2.5 shapes (ANCHORS.md). `kernel_specs(shape)` in each kernel module and the benchmarks take these dicts.
QWEN25_SHAPES: dict[str, dict] = {
    "0.5B": dict(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64, intermediate=4864, vocab=151936, tied=True),
    "1.5B": dict(layers=28, hidden=1536, heads=12, kv_heads=2, head_dim=128, intermediate=8960, vocab=151936, tied=True),
    "7B": dict(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064, tied=False),
    "32B": dict(layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=27648, vocab=152064, tied=False),
}


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, device: str | torch.device, warmup: int = 3, reps: int = 10) -> dict:
    """Median wall time of ``fn()`` after ``warmup`` calls, synchronising the device around each call.

    On CUDA prefer ``triton.testing.do_bench`` for single kernels (it flushes L2); this is for whole steps.
    Returns ``{"median_ms", "min_ms", "max_ms", "reps"}``.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str | torch.device) -> dict:
    """Device name and software versions, recorded with every benchmark run."""
    import transformers
    import triton

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": name,
        "device_type": dev.type,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def time_ms(
    fn: Callable[[], object],
    *,
    device: str | torch.device,
    quick: bool = False,
    grad_to_none: list[torch.Tensor] | None = None,
) -> float:
    """Median milliseconds of one ``fn()`` call after warm-up.

    CUDA: ``triton.testing.do_bench``, which clears the L2 cache (writes a buffer larger than L2) before every
    timed call, so each call reads its inputs from HBM as a fresh input would. CPU: :func:`measure`.
    ``grad_to_none``: tensors whose ``.grad`` is reset before each call, so backward timings never include
    gradient accumulation.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                              grad_to_none=grad_to_none, return_mode="median"))

    def call() -> None:
        for t in grad_to_none or ():
            t.grad = None
        fn()

    # As many repetitions as fit a time budget (at least 3): cheap calls get enough samples for a stable
    # median on a noisy CPU, expensive ones stay affordable.
    t0 = time.perf_counter()
    call()
    once_s = time.perf_counter() - t0
    budget_s = 0.3 if quick else 2.0
    reps = max(3, min(50, int(budget_s / max(once_s, 1e-6))))
    return measure(call, device=device, warmup=0, reps=reps)["median_ms"]  # the call above warmed up


def memory_profile(fn: Callable[[], object], *, device: str | torch.device) -> dict:
    """Memory that ``fn()`` allocates above what was live before the call, measured, not estimated.

    Returns ``peak_mib`` (peak of the bytes allocated during the call, minus frees) and on CPU also
    ``largest_alloc_mib`` (the single largest allocation). CUDA: the caching allocator's counters
    (``max_memory_allocated``). CPU: every allocation and free the CPU allocator reports to
    ``torch.profiler`` (``profile_memory=True``), replayed in time order; ``{}`` when a profiler is already
    running (they cannot nest).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return {"peak_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20}
    from torch.profiler import ProfilerActivity, profile

    if torch._C._autograd._profiler_enabled():
        return {}  # inside `--profile`: profilers do not nest, so CPU memory cannot be measured there
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = largest = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
        largest = max(largest, e.nbytes())
    return {"peak_mib": peak / 2**20, "largest_alloc_mib": largest / 2**20}


@functools.lru_cache(maxsize=None)
def device_ceilings(device: str | torch.device, *, quick: bool = False) -> dict:
    """The device's measured limits, against which every benchmark reports its share.

    ``copy_gbps``: a large tensor copy, counting bytes read plus bytes written. ``matmul_tflops``: a large
    square matrix product, bf16 on GPU and fp32 on CPU (``matmul_dtype``). Measured once per process and
    device (cached), so every suite of a run shares the figures.
    """
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    copy_bytes = 2**30 if gpu else 2**26 if quick else 2**28  # far beyond any L2 / last-level cache
    src = torch.randn(copy_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device=dev, quick=quick)
    del src, dst
    dtype = torch.bfloat16 if gpu else torch.float32
    n = 8192 if gpu else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    mm_ms = time_ms(lambda: a @ b, device=dev, quick=quick)
    return {
        "copy_gbps": 2 * copy_bytes / copy_ms / 1e6,
        "copy_size_mib": copy_bytes / 2**20,
        "matmul_tflops": 2 * n**3 / mm_ms / 1e9,
        "matmul_n": n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
    }


def random_qwen2(shape: dict, *, device: str | torch.device, layers: int | None = None, dtype: torch.dtype = torch.float32,
                 max_positions: int = 32768, use_cache: bool = False):
    """A random-initialised (seed 0) transformers ``Qwen2ForCausalLM`` of a ``QWEN25_SHAPES``-style dict
    (``layers`` overrides its depth), with Qwen2.5's RMSNorm eps and rope theta, SDPA attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"] if layers is None else layers, num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], vocab_size=shape["vocab"],
        tie_word_embeddings=shape["tied"], rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=max_positions,
        attn_implementation="sdpa", use_cache=use_cache,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(dtype)
