"""``s1fast bench kit``: the GPU kit. One prepared command for a lent GPU machine (15 minutes of device time in
all, starts included; no network): the headline figures first, each step in its own process under a time cap, in
the order of issue 24: kernels at 8K and 32K tokens, decode at 8K context (greedy, sampled, transformers, budget
forcing, the mixed workload), one training step at 32K tokens, the GPU-marked tests, then the SFT projection if
time is left. Results go to ``bench/results/<device>/<step>/``; at the end, every target of bench/README.md is
printed as met / not met with the measured figure (``targets.md``).

On the device machine (bench/README.md, "GPU kit"): ``bash bench/gpu_kit.sh`` (installs the carried wheels and
s1fast, falling back to the tree on PYTHONPATH, then runs this). Nothing measured is lost to a cap: every suite
writes its rows as it measures them (``s1fast bench`` rewrites ``results.json`` after each row), a step past its
cap is stopped (its whole process group) with its rows kept, and the kit re-packs ``--pack`` (default ``$OUT``,
what the device tool brings back: ``bench-results.tgz``, ``kit.json``, ``targets.md``) before the first step,
every ``PACK_EVERY_S`` during a step and after every step, so even a device call cut at its limit returns what
was measured until shortly before.

Each step's cap is ``MARGIN`` x an estimate of its time on an H100 computed in ``PLAN`` (the arithmetic is in
bench/README.md); ``--minutes`` (default ``DEFAULT_MINUTES``) is the budget for all steps and scales every cap by
``minutes / DEFAULT_MINUTES``. A step starts only while half its cap is left in the budget. ``--dry-run`` prints
the plan and evaluates the targets of an existing results folder (``--out``) without running anything.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from s1fast.files import atomic_output

DEFAULT_MINUTES = 6.25  # + about 0.5 min of install (gpu_kit.sh): under the 7-minute command bench/README.md plans for
RESERVE_S = 15  # of the budget, kept for the last packing and the target table
MARGIN = 1.25  # cap = MARGIN x estimate
PACK_EVERY_S = 20
START_S = 12  # a step's process: Python + torch + transformers imports, CUDA context, the device ceilings


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # after ``python``; ``{out}``: the step's results folder
    estimate_s: float  # its time on an H100, computed (bench/README.md, "GPU kit")

    @property
    def cap_s(self) -> float:
        return MARGIN * self.estimate_s


def _bench(suite: str, *args: str) -> tuple[str, ...]:
    return ("-m", "s1fast.cli", "bench", suite, "--headline", *args, "--out", "{out}")


# Estimates (seconds on an H100; bench/README.md has the figures behind each term). TRITON: a cold Triton compile.
TRITON = 1.5
PLAN = (
    # 20 compiles (s1fast's and Liger's); 24 memory-bound rows (4 families x 2 sizes x 3 impls) at ~0.8 s (three
    # do_bench timings of ~0.15 s + the backward loop + one memory pass); cross-entropy at 32K (10 GB of logits,
    # eager ~60 ms a call x ~25 calls) 3 s; fused linear CE, ~21 calls a row of 6NHV = 4.6e13 FLOP at 32K:
    # 1.7 + 2.1 + 5.3 s (s1fast, eager, Liger 2-4x slower), a quarter of that at 8K: 11 s; TRL's fused LM head
    # (fused linear CE rows only): 1 compile + ~21 calls of 8NHV (4 GEMMs) at 32K and 8K: 3 s
    Step("kernels", _bench("kernels", "--peers", "eager,liger,trl"), START_S + 21 * TRITON + 24 * 0.8 + 3 + 11 + 3),
    # model build 2 s; 7 compiles + graph capture; greedy + sampled: 3 x 128 steps of ~1.5 ms + 3 x 8K prefills
    # (~50 ms) each, 2 s; transformers generate ~25 ms a token: 3 x 3.2 s + prefills, 10 s; budget forcing: 3
    # ways x 3 runs x 1,024 tokens x 1.5 ms + probes and re-prefills, 17 s; mixed workload (quick size, host-bound:
    # 15 s, the CPU figure of bench/README.md); launch count on the TINY models 7 s
    Step("decode", _bench("decode", "--peers", "hf"), START_S + 2 + 7 * TRITON + 2 + 2 + 10 + 17 + 15 + 7),
    # one step of 1.5B at 32K: 5.8e14 FLOP + 1.9e14 recomputed under checkpointing at ~350 TFLOP/s: 2.2 s;
    # 5 steps (warm-up, memory, 3 timed) + a 3 s build per implementation, unpatched and s1fast; 10 compiles
    Step("train", _bench("train", "--peers", ""), START_S + 2 * (3 + 5 * 2.2) + 10 * TRITON),
    # collection (every test module's imports) 15 s; 23 GPU tests at ~2 s (compiles, allocations past 2^31)
    Step("pytest-gpu", ("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"), 5 + 15 + 23 * 2),
    # if time is left: 1.5B on s1K, 3 steps (warm-up + 2 timed) of 16 examples (~75K tokens, ~1e15 FLOP: 3 s) + a
    # 5 s FSDP build, unpatched and s1fast; 10 compiles
    Step("sft", _bench("sft"), START_S + 2 * (5 + 3 * 3) + 10 * TRITON),
)


def device_slug() -> str:
    """``nvidia-h200``-style name of CUDA device 0 (the results folder's name), or ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def _command(step: Step, out: Path) -> list[str]:
    return [a.replace("{out}", str(out / step.name)) for a in step.argv]


def _stop(proc: subprocess.Popen) -> None:
    """The step's whole process group (a suite's own children too, which could hold the GPU): SIGTERM, then
    SIGKILL for whatever is left after 5 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone
        pass
    proc.wait()


def run_steps(out: Path, budget_s: float, steps: list[tuple[Step, float]], save=lambda records: None,
              python: str = sys.executable) -> list[dict]:
    """Runs ``steps`` ((step, cap in seconds)) in order, each in its own process group under its cap and what is
    left of ``budget_s`` (a step starts only while half its cap is left), its log in ``out/<name>.log``.
    ``save(records)`` runs before the first step, every ``PACK_EVERY_S`` during a step and after each. Returns one
    record per step: name, command, estimate and cap, status, seconds."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s - RESERVE_S
    records = [{"step": s.name, "command": shlex.join(_command(s, out)), "estimate_s": round(s.estimate_s, 1),
                "cap_s": round(cap, 1), "status": "pending"} for s, cap in steps]
    # the kit's environment for every step: gloo (the one-rank FSDP group of bench sft) on the loopback interface
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    for step, _ in steps:  # this run's rows and logs only, in every pack (a step the budget leaves out included)
        shutil.rmtree(out / step.name, ignore_errors=True)
        (out / f"{step.name}.log").unlink(missing_ok=True)
    save(records)
    for (step, cap), record in zip(steps, records):
        limit = min(cap, deadline - time.monotonic())
        if limit < cap / 2:
            record["status"] = "not run: budget spent"
            continue
        t0 = time.monotonic()
        with open(out / f"{step.name}.log", "w") as log:
            proc = subprocess.Popen([python, *_command(step, out)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            record["status"] = "running"
            try:
                while True:
                    try:
                        rc = proc.wait(min(PACK_EVERY_S, max(0.0, t0 + limit - time.monotonic())))
                        record["status"] = "passed" if rc == 0 else f"exit {rc}"
                        break
                    except subprocess.TimeoutExpired:
                        if time.monotonic() >= t0 + limit:
                            _stop(proc)
                            record["status"] = f"stopped at its {limit:.0f} s cap"
                            break
                        record["seconds"] = round(time.monotonic() - t0, 1)
                        save(records)
            except KeyboardInterrupt:  # Ctrl-C: stop the step, keep and pack what it measured
                _stop(proc)
                record["status"] = "interrupted"
                record["seconds"] = round(time.monotonic() - t0, 1)
                save(records)
                raise
        record["seconds"] = round(time.monotonic() - t0, 1)
        print(f"kit: {step.name}: {record['status']} ({record['seconds']} s)", flush=True)
        save(records)
    if records and records[-1]["status"].startswith("not run"):  # a step that ran was saved after it ran
        save(records)  # with the steps the budget left out
    return records


def pack(out: Path, records: list[dict], meta: dict, pack_dir: Path | None) -> None:
    """``kit.json`` (``meta`` + the step records) and ``targets.md`` into ``out``; with ``pack_dir``, those two and
    ``bench-results.tgz`` (``out``, under its path in the repository when it is inside it) there. Every file is
    replaced atomically."""
    kit = {**meta, "steps": records}
    table = format_targets(evaluate(out))
    unfinished = [f"{r['step']} ({r['status']})" for r in records if r["status"] not in ("passed", "pending")]
    if unfinished:
        table += "\n\nSteps that did not pass (the rows they measured count above; kit.json, <step>.log): " + ", ".join(
            unfinished)
    texts = {"kit.json": json.dumps(kit, indent=1) + "\n", "targets.md": table + "\n"}
    for folder in (out, pack_dir) if pack_dir else (out,):
        for name, text in texts.items():
            with atomic_output(str(folder / name)) as f:
                f.write(text)
    if pack_dir:
        repo = Path(__file__).resolve().parent.parent
        try:
            arcname = str(out.resolve().relative_to(repo))
        except ValueError:
            arcname = out.name
        _archive(out, arcname, pack_dir / "bench-results.tgz")


def _archive(folder: Path, arcname: str, dest: Path) -> None:
    """``folder``'s files as they are now (a running step keeps writing: each file is read whole first, atomic
    writes' temporary files and files gone meanwhile are left out) into a .tgz at ``dest``, replaced atomically."""
    partial = dest.with_name(f".{dest.name}.partial")
    with tarfile.open(partial, "w:gz") as tar:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                path = Path(root, name)
                if name.startswith(".tmp-"):
                    continue
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                info = tarfile.TarInfo(str(Path(arcname, path.relative_to(folder))))
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(partial, dest)


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
    mixed = [r for r in _rows(out, "decode") if r.get("case") == "mixed" and r.get("impl") == "engine"]
    add("decode engine, mixed workload: tokens/s >= 1.5x static batching", [r["speedup_vs_static"] for r in mixed],
        lambda v: v >= 1.5, mixed and f"{mixed[0]['speedup_vs_static']:.2f}x ({mixed[0]['requests']} requests, "
        f"budgets {mixed[0]['budgets']}, {mixed[0]['batch']} rows)")
    add("decode engine, mixed workload: peak KV <= 1/2 the dense layout", [r["kv_peak_vs_dense"] for r in mixed],
        lambda v: v <= 0.5, mixed and f"{mixed[0]['kv_peak_vs_dense']:.3f} of dense")
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
    from s1fast.env import git_commit

    p = argparse.ArgumentParser(allow_abbrev=False, prog="s1fast bench kit", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results folder (default: bench/results/<device> in the repository)")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help="wall-clock budget for all steps; scales every step's cap (default %(default)s)")
    p.add_argument("--budget-s", type=float, help="the same budget in seconds (overrides --minutes)")
    p.add_argument("--pack", default=os.environ.get("OUT"),
                   help="folder for bench-results.tgz, kit.json and targets.md, re-packed as the kit goes "
                   "(default: $OUT, the device tool's; none when unset)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and evaluate the targets of --out; run nothing"
    )
    args = p.parse_args(argv)
    budget = args.budget_s if args.budget_s is not None else 60 * args.minutes
    if not (math.isfinite(budget) and budget >= 60):  # NaN or inf: no cap would ever stop a step
        p.error(f"--budget-s must be at least 60 seconds, got {args.budget_s:g}" if args.budget_s is not None
                else f"--minutes must be at least 1, got {args.minutes:g}")
    pack_dir = Path(args.pack) if args.pack else None
    if pack_dir and not pack_dir.is_dir():
        p.error(f"--pack {str(pack_dir)!r} is not a directory")
    repo = Path(__file__).resolve().parent.parent
    out = Path(args.out) if args.out else repo / "bench" / "results" / device_slug()
    if out.exists() and not out.is_dir():
        p.error(f"--out {str(out)!r} is a file; give a directory")
    if args.dry_run and not out.is_dir():
        p.error(f"--dry-run evaluates an existing results folder; {str(out)!r} is not one")
    scale = budget / (60 * DEFAULT_MINUTES)
    steps = [(step, step.cap_s * scale) for step in PLAN]
    meta = {"commit": git_commit(), "device": device_slug(), "budget_s": budget, "cap_scale": round(scale, 3)}
    print(f"kit: commit {meta['commit']}; results in {out}; budget {budget:.0f} s (caps x {scale:.2f}); steps:")
    for step, cap in steps:
        print(f"  {step.name} (estimate {step.estimate_s:.0f} s, cap {cap:.0f} s): python "
              f"{shlex.join(_command(step, out))}")
    if args.dry_run:
        print("\n" + format_targets(evaluate(out)))
        return 0
    os.chdir(repo)  # pytest's tests/ and relative paths
    # SIGTERM (a device call's time limit) as Ctrl-C: the running step's own process group is stopped too (it would
    # go on using the GPU) and what was measured is packed
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_steps(out, budget, steps, lambda records: pack(out, records, meta, pack_dir))
    except KeyboardInterrupt:
        print("kit: interrupted; what was measured is packed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\n{(out / 'targets.md').read_text()}", end="")
    if pack_dir:
        print(f"kit: packed into {pack_dir}: bench-results.tgz (tar -xzf it in the repository), kit.json, targets.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
