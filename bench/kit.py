"""``s1fast bench kit``: the GPU kit. One prepared command for a lent GPU machine (15 minutes of device time in
all, a machine that starts in minutes, no network): the GPU-marked tests and every GPU suite of ``s1fast bench
all`` at the real shapes in at most ``--budget-s`` (default 480 s), results into ``bench/results/<device>/``,
then every target of bench/README.md printed as met / not met with the measured figure (``targets.md``).

On the device machine (see bench/README.md, "GPU kit"): ``bash bench/gpu_kit.sh`` (installs the carried wheels
of ``.whl/`` and s1fast itself without network, then runs this). Each step runs in its own process under a
time cap (``STEPS``), in priority order, never past the overall deadline, so one slow suite cannot take the
others' results down. Left out on purpose: the ``compile`` peer (a per-shape ``torch.compile`` would take the
whole budget) and the ``inspect`` suite (ahead-of-time compilation, which CI runs on CPU).

``--dry-run`` prints the plan and evaluates the targets of an existing results folder (``--out``) without
running anything: what CI checks on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from s1fast.files import atomic_output

BUDGET_S = 480
RESERVE_S = 15  # kept for the target table at the end
# name, command (after ``python -m``), cap in seconds; {out} is the step's results folder
STEPS = (
    ("pytest-gpu", ["pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 80),
    ("kernels", ["s1fast.cli", "bench", "kernels", "--peers", "eager,liger,hf,trl", "--out", "{out}"], 150),
    ("decode", ["s1fast.cli", "bench", "decode", "--peers", "hf", "--out", "{out}"], 70),
    ("train", ["s1fast.cli", "bench", "train", "--peers", "liger", "--out", "{out}"], 90),
    ("sft", ["s1fast.cli", "bench", "sft", "--out", "{out}"], 60),
)


def device_slug() -> str:
    """``nvidia-h200``-style name of CUDA device 0 (the results folder's name), or ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def run_steps(out: Path, budget_s: float, steps=STEPS, python: str = sys.executable) -> list[dict]:
    """Run ``steps`` in order, each capped by its own limit and by what is left of ``budget_s``; the log of each
    goes to ``out/<name>.log``. Returns one record per step: name, seconds, exit status or why it did not run."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s - RESERVE_S
    records = []
    for name, command, cap in steps:
        left = deadline - time.monotonic()
        if left < 10:
            records.append({"step": name, "status": "not run: budget spent"})
            continue
        argv = [python, "-m", *(c.format(out=out / name) for c in command)]
        t0 = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=min(cap, left)).returncode
                status = "passed" if rc == 0 else f"exit {rc}"
            except subprocess.TimeoutExpired:
                status = f"stopped at its {min(cap, left):.0f} s cap"
        records.append({"step": name, "status": status, "seconds": round(time.monotonic() - t0, 1)})
        print(f"kit: {name}: {status} ({records[-1]['seconds']} s)", flush=True)
    return records


# ------------------------------------------------------------------------------------------------ targets
def _rows(out: Path, suite: str) -> list[dict]:
    """Rows of ``suite`` from ``out/<suite>/results.json`` (the kit's layout) or ``out/results.json``
    (``bench all``)."""
    for path in (out / suite / "results.json", out / "results.json"):
        if path.exists():
            rows = json.loads(path.read_text()).get("suites", {}).get(suite, {}).get("rows")
            if rows is not None:
                return [r for r in rows if not r.get("skipped") and not r.get("error")]
    return []


def _verdict(values: list[float], ok, fmt: str) -> tuple[str, str]:
    if not values:
        return "not measured", ""
    return ("met" if all(ok(v) for v in values) else "not met"), fmt


def _flce_bound_mib(r: dict) -> float:
    """One chunk of bf16 logits plus the fp32 weight-gradient accumulator at the row's shape (the target)."""
    import torch

    from s1fast.kernels.fused_linear_cross_entropy import DEFAULT_CHUNK_BUDGET_BYTES, chunk_rows
    from s1fast.model.shapes import QWEN25_SHAPES

    s = QWEN25_SHAPES[r["model"]]
    rows = chunk_rows(r["tokens"], s["vocab"], torch.bfloat16, True, DEFAULT_CHUNK_BUDGET_BYTES["cuda"])
    return (rows * s["vocab"] * 2 + s["vocab"] * s["hidden"] * 4) / 2**20


def evaluate(out: Path) -> list[dict]:
    """Every target of bench/README.md against the results under ``out``: ``{"target", "status", "figure"}``
    with status "met", "not met", "not measured" (no such rows) or "CPU CI" (checked without a GPU)."""
    kern = [r for r in _rows(out, "kernels") if r.get("impl") == "s1fast"]
    liger = {(r["kernel"], r["model"], r["tokens"]): r for r in _rows(out, "kernels") if r.get("impl") == "liger"}
    targets = []

    def add(target, values, ok, fmt):
        status, figure = _verdict(values, ok, fmt)
        targets.append({"target": target, "status": status, "figure": figure})

    bw = [r for r in kern if r["kernel"] in ("rms_norm", "rope", "swiglu") and "fwd_bwd_pct_of_copy_bw" in r]
    worst = min(bw, key=lambda r: r["fwd_bwd_pct_of_copy_bw"], default=None)
    add(
        "RMSNorm, RoPE, SwiGLU fwd+bwd >= 85% of copy bandwidth (1.5B/7B, 4K-32K, bf16)",
        [r["fwd_bwd_pct_of_copy_bw"] for r in bw],
        lambda v: v >= 85,
        worst
        and f"lowest {worst['fwd_bwd_pct_of_copy_bw']:.1f}% ({worst['kernel']} {worst['model']} {worst['tokens']})",
    )
    vs = [(r, liger[k]["fwd_bwd_ms"] / r["fwd_bwd_ms"]) for r in bw
          if (k := (r["kernel"], r["model"], r["tokens"])) in liger and "fwd_bwd_ms" in liger[k]]
    slow = min(vs, key=lambda p: p[1], default=None)
    add("RMSNorm, RoPE, SwiGLU faster than Liger", [x for _, x in vs], lambda v: v > 1.0,
        slow and f"slowest {slow[1]:.2f}x Liger's speed ({slow[0]['kernel']} {slow[0]['model']} {slow[0]['tokens']})")
    ce = [r for r in kern if r["kernel"] == "cross_entropy" and "fwd_bwd_pct_of_copy_bw" in r]
    add("cross-entropy fwd+bwd >= 80% of copy bandwidth (counted on the minimum bytes)",
        [r["fwd_bwd_pct_of_copy_bw"] for r in ce], lambda v: v >= 80,
        ce and f"lowest {min(r['fwd_bwd_pct_of_copy_bw'] for r in ce):.1f}%")
    fl = [r for r in kern if r["kernel"] == "fused_linear_cross_entropy"]
    mem = [(r, r["extra_mem_mib"] / _flce_bound_mib(r)) for r in fl if "extra_mem_mib" in r]
    add("fused linear CE: extra memory <= one chunk + the fp32 weight-gradient accumulator", [x for _, x in mem],
        lambda v: v <= 1.0, mem and f"largest {max(x for _, x in mem):.2f}x that bound")
    sp = [r["fwd_bwd_speedup_vs_eager"] for r in fl if "fwd_bwd_speedup_vs_eager" in r]
    add("fused linear CE wall time no slower than eager linear + CE", sp, lambda v: v >= 1.0,
        sp and f"slowest {min(sp):.2f}x eager's speed")
    train = {(r["impl"], r["model"], r["tokens"]): r for r in _rows(out, "train")}
    t32 = [r for (impl, _, tokens), r in train.items() if impl == "s1fast" and tokens == 32768]
    add(
        "training step at 32K tokens: peak memory <= 1/2 unpatched",
        [r.get("peak_mem_vs_unpatched", 9) for r in t32],
        lambda v: v <= 0.5,
        t32 and ", ".join(f"{r['model']} {r.get('peak_mem_vs_unpatched', float('nan')):.2f}x" for r in t32),
    )
    add(
        "training step at 32K tokens: tokens/s >= 1.3x unpatched",
        [r.get("speedup_vs_unpatched", 0) for r in t32],
        lambda v: v >= 1.3,
        t32 and ", ".join(f"{r['model']} {r.get('speedup_vs_unpatched', float('nan')):.2f}x" for r in t32),
    )
    ahead = [r["tokens_per_s"] / train[("liger", m, t)]["tokens_per_s"] for (i, m, t), r in train.items()
             if i == "s1fast" and ("liger", m, t) in train and "tokens_per_s" in train[("liger", m, t)]]
    add(
        "training step ahead of Liger (0.5B/1.5B)",
        ahead,
        lambda v: v > 1.0,
        ahead and f"lowest {min(ahead):.2f}x Liger",
    )
    dec = [r for r in _rows(out, "decode") if r.get("case") == "decode" and r.get("impl") == "s1fast"
           and r.get("context") == 8192 and r.get("batch") == 1]
    add("decode 1.5B bf16 batch 1 at 8K: >= 70% of the bandwidth limit", [r["pct_of_bw_limit"] for r in dec],
        lambda v: v >= 70, dec and f"{dec[0]['pct_of_bw_limit']:.1f}%")
    add("decode 1.5B bf16 batch 1 at 8K: >= 4x transformers generate", [r.get("speedup_vs_hf", 0) for r in dec],
        lambda v: v >= 4, dec and f"{dec[0].get('speedup_vs_hf', float('nan')):.2f}x")
    sampled = [r for r in _rows(out, "decode") if r.get("case") == "decode" and r.get("impl") == "s1fast_sampled"
               and r.get("context") == 8192 and r.get("batch") == 1]
    share = [r["tokens_per_s"] / dec[0]["tokens_per_s"] for r in sampled if dec and "tokens_per_s" in r]
    add("decode 1.5B bf16 batch 1 at 8K, sampled (T 0.6, top-p 0.95): >= 90% of greedy tokens/s", share,
        lambda v: v >= 0.9, share and f"{100 * share[0]:.1f}% of greedy")
    bf = [r["overhead_pct"] for r in _rows(out, "decode") if r.get("impl") == "in_loop" and "overhead_pct" in r]
    add("budget forcing overhead <= 2%", bf, lambda v: v <= 2, bf and f"{bf[0]:+.1f}%")
    sft = [r for r in _rows(out, "sft") if r.get("impl") == "s1fast" and r.get("model") == "1.5B"
           and r.get("dataset") == "s1K" and "projected_5_epochs_min" in r]
    add("5 epochs of s1K on Qwen2.5-1.5B on one GPU in < 26 min", [r["projected_5_epochs_min"] for r in sft],
        lambda v: v < 26, sft and f"{sft[0]['projected_5_epochs_min']:.1f} min projected")
    targets.append({"target": "memory-bound kernels on sm_90: zero spills, 128-bit global loads", "status": "CPU CI",
                    "figure": "tests/test_inspect.py, s1fast bench inspect"})
    return targets


def format_targets(targets: list[dict]) -> str:
    lines = ["| target | status | measured |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['status']} | {t['figure'] or ''} |" for t in targets]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="s1fast bench kit", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results folder (default: bench/results/<device> in the repository)")
    p.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="wall-clock budget for all steps (default %(default)s)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and evaluate the targets of --out; run nothing"
    )
    args = p.parse_args(argv)
    if args.budget_s < 60:
        p.error(f"--budget-s must be at least 60 seconds, got {args.budget_s:g}")
    repo = Path(__file__).resolve().parent.parent
    out = Path(args.out) if args.out else repo / "bench" / "results" / device_slug()
    if out.exists() and not out.is_dir():
        p.error(f"--out {str(out)!r} is a file; give a directory")
    print(f"kit: results in {out}; budget {args.budget_s:.0f} s; steps:")
    for name, command, cap in STEPS:
        print(f"  {name} (cap {cap} s): python -m {' '.join(command).format(out=out / name)}")
    if args.dry_run:
        if not out.is_dir():
            p.error(f"--dry-run evaluates an existing results folder; {str(out)!r} is not one")
    else:
        os.chdir(repo)  # pytest's tests/ and relative paths
        records = run_steps(out, args.budget_s)
        with atomic_output(str(out / "kit.json")) as f:
            f.write(json.dumps(records, indent=1) + "\n")
    table = format_targets(evaluate(out))
    if not args.dry_run:
        with atomic_output(str(out / "targets.md")) as f:
            f.write(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
