"""The report of ``s1fast data select``: counts per step and per domain and source, and a histogram of teacher
thinking tokens (the pool that reached the selection against the selected questions), as JSON, markdown and PNG."""

from __future__ import annotations

import json
from collections import Counter

from s1fast.files import write_atomic


def write_report(stem: str, args, counts: dict, items: list, chosen: list[str], students: list[str],
                 formats: Counter) -> str:
    """Write ``{stem}_report.json``, ``{stem}_report.md`` and ``{stem}_report.png``; returns the markdown."""
    by_id = {it.id: it for it in items}
    picked = [by_id[i] for i in chosen]
    report = {"method": args.method, "size": args.size, "seed": args.seed, "quality": not args.no_quality,
              "difficulty": not args.no_difficulty, "high_quality": args.high_quality, "students": students,
              "counts": counts, "teacher_formats": dict(formats),
              "domains": dict(Counter(it.domain for it in picked).most_common()),
              "sources": dict(Counter(it.source for it in picked).most_common()),
              "thinking_tokens": _stats([it.length for it in picked])}
    write_atomic(f"{stem}_report.json", json.dumps(report, indent=1) + "\n")
    lines = [f"# s1fast data select: method {args.method}, size {args.size}, seed {args.seed}", "",
             "| step | count |", "|---|---|", f"| questions | {counts['questions']} |"]
    for reason, n in counts.get("quality_removed", {}).items():
        lines.append(f"| quality: removed ({reason}) | {n} |")
    if "after_quality" in counts:
        lines.append(f"| after quality | {counts['after_quality']} |")
    for reason, n in counts.get("difficulty_removed", {}).items():
        lines.append(f"| difficulty: removed ({reason}) | {n} |")
    if "after_difficulty" in counts:
        lines.append(f"| after difficulty | {counts['after_difficulty']} |")
    if "high_quality" in counts:
        lines.append(f"| high-quality sources, taken first | {counts['high_quality']} |")
    lines += [f"| selected | {counts['selected']} |", "", f"{len(report['domains'])} domains: "
              + ", ".join(f"{d} {n}" for d, n in report["domains"].items()), "",
              "sources: " + ", ".join(f"{s} {n}" for s, n in report["sources"].items()), "",
              "teacher thinking tokens of the selection: "
              + ", ".join(f"{k} {v:g}" for k, v in report["thinking_tokens"].items())]
    text = "\n".join(lines) + "\n"
    write_atomic(f"{stem}_report.md", text)
    _histogram(f"{stem}_report.png", [it.length for it in items if not it.problems], [it.length for it in picked],
               args.method)
    return text


def _stats(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    values = sorted(values)
    return {"count": len(values), "mean": sum(values) / len(values), "median": values[len(values) // 2],
            "max": values[-1], "total": sum(values)}


def _histogram(path: str, pool: list[int], picked: list[int], method: str) -> None:
    """The PNG (matplotlib's Agg backend; saved to a temporary name, then renamed)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(pool + picked or [0], 30)  # the same bins for both
    ax.hist(pool, bins=bins, alpha=0.5, label=f"passed quality ({len(pool)})")
    ax.hist(picked, bins=bins, alpha=0.7, label=f"selected, {method} ({len(picked)})")
    ax.set_xlabel("teacher thinking tokens")
    ax.set_ylabel("questions")
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
