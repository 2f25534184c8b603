"""Shared benchmark plumbing: Qwen2.5 shapes, timing (medians after warm-up), device ceilings, environment.

Every bench module (``kernels``, ``train``, ``decode``, ...) exposes
``run(*, device: str, quick: bool, peers: list[str]) -> list[dict]``: one flat dict per measurement, units
in the key names (``median_ms``, ``tokens_per_s``, ``peak_mem_mib``, ``gbps``, ``pct_of_copy_bw``).
"""

from __future__ import annotations

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
