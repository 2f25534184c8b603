"""Benchmark output: one JSON file, a markdown report and PNG plots per suite, written to ``--out``.

Rows are flat dicts whose numeric keys carry their unit (``_ms``, ``_gbps``, ``_mib``, ``_pct...``,
``tokens_per_s``...). Plots need no knowledge of a suite: the x axis is the first size key a suite's rows
have (``tokens``, ``seq_len``, ``context``...), one panel per figure family (time, throughput / bandwidth,
memory), one line per implementation, one file per kernel or model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from s1fast.files import atomic_output

SIZE_KEYS = ("tokens", "seq_len", "context", "context_len", "batch_size", "batch")
SERIES_KEYS = ("impl", "peer", "variant", "mode")
GROUP_KEYS = ("kernel", "model")
PANELS = (
    ("time (ms)", ("fwd_bwd_ms", "step_ms", "median_ms", "ms_per_token", "wall_ms")),
    ("throughput", ("fwd_bwd_gbps", "tokens_per_s", "fwd_bwd_tflops", "gbps")),
    ("memory (MiB)", ("peak_mem_mib", "extra_mem_mib")),
)


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str] | tuple[str, ...] | None = None) -> str:
    """A markdown table over ``columns`` that some row has (default: the union of the rows' keys, ``suite``
    left out), in first-seen order."""
    present: list[str] = []
    for row in rows:
        present += [k for k in row if k != "suite" and k not in present]
    columns = [c for c in columns if c in present] if columns else present
    if not columns:
        return ""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)).replace("|", "/") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    env, ceilings = results["environment"], results.get("ceilings") or {}
    lines = ["# s1fast bench", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- ceiling {k}: {_fmt(v)}" for k, v in ceilings.items()]
    for name, suite in results["suites"].items():
        lines += ["", f"## {name}", ""]
        if "skipped" in suite:
            lines.append(f"skipped: {suite['skipped']}")
            continue
        for key in ("error", "unfinished"):  # with the rows measured before the error, or so far
            if key in suite:
                lines += [f"{key}: {suite[key]}", ""]
        if suite.get("note"):
            lines += [suite["note"], ""]
        lines.append(markdown_table(suite.get("rows", [])))
        if "wall_s" in suite:
            lines += ["", f"wall time: {suite['wall_s']:.1f} s"]
    return "\n".join(lines) + "\n"


def plot_suite(name: str, rows: list[dict], out: Path) -> list[str]:
    """PNG files (time / throughput / memory against size) for one suite's measured rows."""
    rows = [r for r in rows if "skipped" not in r]
    size_key = next((k for k in SIZE_KEYS if any(k in r for r in rows)), None)
    if size_key is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_key = next((k for k in GROUP_KEYS if any(k in r for r in rows)), None)
    series_key = next((k for k in SERIES_KEYS if any(k in r for r in rows)), None)
    files = []
    for group in dict.fromkeys(r.get(group_key) for r in rows):
        grows = [r for r in rows if r.get(group_key) == group and isinstance(r.get(size_key), (int, float))]
        panels = [(title, next((k for k in keys if any(k in r for r in grows)), None)) for title, keys in PANELS]
        panels = [(t, k) for t, k in panels if k]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
        for ax, (title, key) in zip(axes[0], panels):
            # one line per implementation (and per model when a kernel is measured at several)
            labels = dict.fromkeys((r.get(series_key), r.get("model") if group_key != "model" else None)
                                   for r in grows if key in r)
            for impl, model in labels:
                pts = sorted((r[size_key], r[key]) for r in grows
                             if key in r and r.get(series_key) == impl
                             and (model is None or r.get("model") == model))
                label = " ".join(str(x) for x in (impl, model) if x is not None) or key
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(size_key)
            ax.set_ylabel(key)
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{name}: {group}" if group is not None else name)
        fig.tight_layout()
        path = out / f"{name}_{group}.png".replace(" ", "_").replace("/", "_")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files


def write(results: dict, out: str | Path, plots: bool = True) -> list[str]:
    """Write ``results.json``, ``results.md`` and (``plots``) the plots to ``out``; return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    for path, text in zip(paths, (json.dumps(results, indent=1, default=str) + "\n", markdown_report(results))):
        with atomic_output(str(path)) as f:  # a crash never leaves a half-written report over an older one
            f.write(text)
    written = [str(p) for p in paths]
    for name, suite in results["suites"].items() if plots else ():
        written += plot_suite(name, suite.get("rows", []), out)
    return written
