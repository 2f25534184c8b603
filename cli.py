"""The ``s1fast`` command: ``s1fast <command> [options]``.

Each command lives in the subpackage that owns it and exposes ``main(argv) -> int``; this file only routes,
importing the command's module lazily so ``s1fast --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": ("s1fast.train.cli", "fine-tune a Qwen model with the s1 SFT recipe (no arguments: the CPU demo)"),
    "generate": ("s1fast.decode.generate", "budget-forced decoding with the KV-cache decoder"),
    "eval": ("s1fast.eval.scaling", "test-time scaling evaluation: accuracy against thinking budget"),
    "data": ("s1fast.data.cli", "the s1K curation pipeline: collect, distill, attempt, classify, select"),
    "bench": ("s1fast.bench.cli", "benchmarks and kernel inspection (kernels | train | decode | inspect | all)"),
    "serve": ("s1fast.decode.serve", "an OpenAI-compatible server with budget forcing per request (extra: serve)"),
    "env": ("s1fast.env", "versions, GPU, kernel paths and whether patch() supports the installed transformers"),
}


def _usage() -> str:
    lines = ["usage: s1fast <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `s1fast <command> --help` for a command's options."]
    return "\n".join(lines)


def quiet_profiler_logs() -> None:
    """torch.profiler's Kineto prints ``USDT: ... profiler_start`` / ``profiler_stop`` on stderr at every profile
    (the benchmarks' CPU memory measurements run one per shape): keep those lines out of the commands' output,
    unless ``KINETO_LOG_LEVEL`` is set (read when the first profile starts; 6 is past Kineto's highest level)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_profiler_logs()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"s1fast: unknown command {name!r}; expected one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
