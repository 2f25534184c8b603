"""``--profile``: run a benchmark under ``torch.profiler`` with named ranges, write a Chrome/Perfetto trace
and summarise where the time went.

Bench code marks its work with ``with region("kernels/rms_norm/s1fast/backward"):`` (per kernel, per layer,
per phase: forward / backward / optimizer, prefill / decode). A region is a ``record_function`` range, plus
an NVTX range on CUDA so Nsight Systems shows the same names; outside :func:`profiled` it costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

_active = False


@contextlib.contextmanager
def region(name: str) -> Iterator[None]:
    """A named range in the profile (and NVTX on CUDA) while profiling; a no-op otherwise."""
    if not _active:
        yield
        return
    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


@contextlib.contextmanager
def profiled(trace_path: str | Path, *, device: str) -> Iterator[dict]:
    """Profile the block; on exit write the trace to ``trace_path`` and fill the yielded dict with
    ``trace`` (its path), ``top_ops`` and ``regions`` (see :func:`summarise`)."""
    global _active
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    result: dict = {}
    _active = True
    try:
        with profile(activities=activities) as prof:
            yield result
    finally:
        _active = False
    Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    result.update(trace=str(trace_path), **summarise(prof, device=device))


def summarise(prof, *, device: str, top: int = 15) -> dict:
    """``top_ops``: the operators / GPU kernels with the most self time and their share of all self time;
    ``regions``: every named range with its total time. Times in ms; on CUDA, device (kernel) time."""
    gpu = torch.device(device).type == "cuda"

    def self_ms(e) -> float:
        return (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1e3

    def total_ms(e) -> float:
        return (e.device_time_total if gpu else e.cpu_time_total) / 1e3

    def is_op(e) -> bool:  # on CUDA the kernels themselves: a CPU op's self device time repeats its kernels'
        return (not getattr(e, "is_user_annotation", False) and self_ms(e) > 0
                and (not gpu or e.device_type != DeviceType.CPU))

    events = prof.key_averages()
    regions = [e for e in events if getattr(e, "is_user_annotation", False)]
    ops = [e for e in events if is_op(e)]
    whole = sum(self_ms(e) for e in ops) or 1.0
    ops.sort(key=self_ms, reverse=True)
    return {
        "top_ops": [{"name": e.key, "self_ms": self_ms(e), "share_pct": 100 * self_ms(e) / whole, "calls": e.count}
                    for e in ops[:top]],
        "regions": sorted(({"name": e.key, "total_ms": total_ms(e), "calls": e.count} for e in regions),
                          key=lambda r: r["name"]),
    }


def format_summary(summary: dict, title: str) -> str:
    lines = [f"== profile: {title} (trace: {summary['trace']})", f"{'share':>7}  {'self ms':>10}  {'calls':>6}  op"]
    lines += [f"{o['share_pct']:6.1f}%  {o['self_ms']:10.3f}  {o['calls']:6d}  {o['name']}" for o in summary["top_ops"]]
    if summary["regions"]:
        lines += ["", f"{'total ms':>10}  {'calls':>6}  region"]
        lines += [f"{r['total_ms']:10.3f}  {r['calls']:6d}  {r['name']}" for r in summary["regions"]]
    return "\n".join(lines)
