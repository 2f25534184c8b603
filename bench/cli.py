"""``s1fast bench``: one command for every benchmark.

    s1fast bench kernels|train|decode|sft|serve|all [--device D] [--quick | --headline] [--out DIR] [--peers LIST]
                                                    [--profile]
    s1fast bench inspect [--json] [--models 0.5B,...] [--arch sm_90,sm_80] [--no-model]
    s1fast bench kit [--dry-run] [--out DIR] [--minutes M]     (the GPU kit, see bench/kit.py)

Every run first records the environment (device, versions, git commit) and measures the device's ceilings
(copy bandwidth, matmul TFLOP/s), then runs the suites, each a module ``s1fast.bench.<suite>`` exposing
``run(*, device, quick, peers, headline) -> Iterable[dict]`` (``bench/common.py``). A suite whose module is not
there (yet) is reported as skipped with the reason; one that fails is reported with its error and the rows it
measured, and the run goes on (exit status 1). Prints each suite's main columns; writes every figure to
``results.json``, ``results.md`` and PNG plots to ``--out`` (and with ``--profile`` a Chrome / Perfetto trace per
suite, with the top operators printed). ``results.json`` and ``results.md`` are rewritten (atomically) after every
row a suite yields, so a run stopped at any point keeps what it measured: its suite then says ``unfinished``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from s1fast.bench.common import device_ceilings
from s1fast.commands import add_device_arguments, check_device
from s1fast.env import environment

SUITES = ("kernels", "train", "decode", "sft", "serve", "data", "inspect")
PEERS = ("eager", "compile", "liger", "hf", "trl")


def _peers(value: str) -> list[str]:
    peers = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peers {unknown}; expected a comma-separated subset of {PEERS}")
    return peers


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="s1fast bench",
        description="Benchmarks against peers and the device's measured limits. "
        "`s1fast bench inspect --help` for the ahead-of-time kernel inspection and the static performance model, "
        "`s1fast bench kit --help` for the GPU kit.",
    )
    p.add_argument("suite", choices=(*SUITES, "all", "kit"),  # kit: handled by main before parsing
                   help="the suite to run; `all` runs every suite; `inspect` and `kit` take their own options "
                        "(`s1fast bench inspect --help`, `s1fast bench kit --help`)")
    add_device_arguments(p, dtypes=())  # each suite runs the dtypes it measures
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes and few repetitions (CPU CI mode)")
    size.add_argument("--headline", action="store_true",
                      help="only the sizes of the headline figures (the GPU kit's plan, bench/README.md)")
    p.add_argument(
        "--out", default="bench-out", help="directory for JSON, markdown, plots, traces (default: %(default)s)"
    )
    p.add_argument("--peers", type=_peers, default=None,
                   help=f"comma-separated subset of {','.join(PEERS)} (default: all; on CPU with --quick all but "
                   "compile, whose CPU compile time would dominate the run)")
    p.add_argument("--profile", action="store_true",
                   help="run each suite under torch.profiler: Chrome/Perfetto trace in --out, top ops printed")
    return p


def _load(suite: str):
    """The suite's module, or the reason it cannot run."""
    name = f"s1fast.bench.{suite}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return f"bench/{suite}.py is not written yet"
        return f"needs the missing module {e.name!r}"


UNFINISHED = "rows measured so far: the suite had not finished when this was written"


def _run_suite(suite: str, args, peers: list[str], result: dict, save) -> tuple | None:
    """Runs the suite into ``result`` (``rows``, then ``wall_s`` and the rest), calling ``save()`` after every row
    it yields; returns the columns to print (its ``SUMMARY_COLUMNS``, if it has them). On an error ``result`` keeps
    the rows measured before it."""
    module = _load(suite)
    if isinstance(module, str):
        result["skipped"] = module
        return None
    t0 = time.perf_counter()
    result.update(unfinished=UNFINISHED, rows=[])
    save()  # the environment and the ceilings, before the first row

    def measure() -> None:
        for row in module.run(device=args.device, quick=args.quick, peers=peers, headline=args.headline):
            result["rows"].append(row)
            save()

    if args.profile:
        from s1fast.bench.profiling import format_summary, profiled

        with profiled(Path(args.out) / f"trace_{suite}.json", device=args.device) as summary:
            measure()
        result["profile"] = summary
        print(format_summary(summary, suite))
    else:
        measure()
    del result["unfinished"]
    result["wall_s"] = time.perf_counter() - t0
    if hasattr(module, "backend_note"):
        result["note"] = module.backend_note()
    return getattr(module, "SUMMARY_COLUMNS", None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["inspect"]:
        from s1fast.bench.inspect import main as inspect_main

        return inspect_main(argv[1:])
    if argv[:1] == ["kit"]:
        from s1fast.bench.kit import main as kit_main

        return kit_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    # the output directory before anything runs, not after a long benchmark
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a file; give a directory (created if missing)")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out!r}: cannot create the directory ({e.strerror})")
    if not os.access(args.out, os.W_OK | os.X_OK):
        parser.error(f"--out {args.out!r}: no permission to write in it")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # Triton launches on the current device, not on its arguments' device
    peers = args.peers
    if peers is None:
        peers = [p for p in PEERS if not (p == "compile" and device.type == "cpu" and args.quick)]

    from s1fast.bench.report import markdown_table, write

    print(f"s1fast bench {args.suite}: device={args.device} quick={args.quick} headline={args.headline} "
          f"peers={','.join(peers)}")
    results = {
        "environment": environment(args.device),
        "arguments": {"suite": args.suite, "device": args.device, "quick": args.quick, "headline": args.headline,
                      "peers": peers},
        "ceilings": device_ceilings(args.device, quick=args.quick),
        "suites": {},
    }
    for key, value in {**results["environment"], **results["ceilings"]}.items():
        print(f"  {key}: {value}")
    failed = False
    for suite in SUITES if args.suite == "all" else (args.suite,):
        print(f"\n== {suite}", flush=True)
        outcome = results["suites"][suite] = {}
        try:
            columns = _run_suite(suite, args, peers, outcome, lambda: write(results, args.out, plots=False))
        except Exception as e:  # one broken suite must not hide the others' results (nor its own rows so far)
            traceback.print_exc()
            outcome.pop("unfinished", None)
            outcome["error"], columns = f"{type(e).__name__}: {e}", None
            failed = True
        if outcome.get("note"):
            print(outcome["note"])
        if outcome.get("rows"):
            print(markdown_table(outcome["rows"], columns))
        if "rows" not in outcome or "error" in outcome:
            print(f"skipped: {outcome['skipped']}" if "skipped" in outcome else f"error: {outcome['error']}")
    written = write(results, args.out)
    print("\nwrote " + ", ".join(written))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
