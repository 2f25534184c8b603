"""Shared benchmark plumbing: timing (medians after warm-up), device ceilings, environment.

Every bench module (``kernels``, ``train``, ``decode``, ...) exposes
``run(*, device: str, quick: bool, peers: list[str], headline: bool = False) -> Iterable[dict]``: one flat dict per
measurement, units in the key names (``median_ms``, ``tokens_per_s``, ``peak_mem_mib``, ``gbps``,
``pct_of_copy_bw``). Suites that measure for long are generators that yield each row as soon as it is measured
(``s1fast bench`` writes its results after every row, so a run stopped midway keeps what it measured); a row may
still gain comparison fields (``speedup_vs_eager``...) when its peers are measured, so callers keep the dicts.
``quick``: CPU-CI sizes; ``headline``: only the sizes of the GPU kit's headline figures (bench/README.md).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch


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


def time_ms(
    fn: Callable[..., object],
    *,
    device: str | torch.device,
    quick: bool = False,
    grad_to_none: list[torch.Tensor] | None = None,
    setup: Callable[[], object] | None = None,
) -> float:
    """Median milliseconds of one ``fn()`` call after warm-up.

    CUDA: the L2 cache is cleared (a buffer larger than L2 is written) before every timed call, so each call
    reads its inputs from HBM as a fresh input would (``triton.testing.do_bench``, or the same method with
    CUDA events when ``setup`` is given). CPU: wall-clock time, as many repetitions as fit a small budget.
    ``grad_to_none``: tensors whose ``.grad`` is reset before each call, so backward timings never include
    gradient accumulation. ``setup``: called before every call, outside the timed region, and ``fn`` gets
    its result: ``time_ms(backward, setup=forward)`` times a backward alone, on a fresh graph each time.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and setup is None:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                              grad_to_none=grad_to_none, return_mode="median"))

    def prepare() -> tuple:
        for t in grad_to_none or ():
            t.grad = None
        return () if setup is None else (setup(),)

    if dev.type == "cuda":
        l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=dev)  # as do_bench: larger than any L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> float:
        args = prepare()
        if dev.type == "cuda":
            l2_flush.zero_()
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize(dev)
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - t0) * 1e3

    # As many repetitions as fit a time budget (at least 3): cheap calls get enough samples for a stable
    # median on a noisy CPU, expensive ones stay affordable. The first calls warm up.
    first = [once() for _ in range(3 if dev.type == "cuda" else 1)][-1]
    budget_ms = (40 if quick else 100) if dev.type == "cuda" else (300 if quick else 2000)
    reps = max(3, min(1000 if dev.type == "cuda" else 50, int(budget_ms / max(first, 1e-3))))
    return statistics.median(once() for _ in range(reps))


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
    src = dst = None  # freed before the matmul's inputs are allocated
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


def weight_grad_gemm() -> dict:
    """How fused linear cross-entropy accumulated its fp32 weight gradient on CUDA so far (the fused ``out_dtype``
    GEMM, or the fallback and why; ``kernels.fused_linear_cross_entropy.WEIGHT_GRAD_GEMM``), for a bench row: the
    fallback's [V, H] temporary shows in the memory figures. Empty before any such call (and on CPU)."""
    import importlib

    # the module (the package's attribute of that name is the function)
    found = importlib.import_module("s1fast.kernels.fused_linear_cross_entropy").WEIGHT_GRAD_GEMM
    if found["path"] is None:
        return {}
    return {"weight_grad_gemm": found["path"], **({"weight_grad_gemm_why": found["why"]} if found["why"] else {})}
