"""``s1fast eval``'s files in ``OUT``: the sweep's points (:class:`SweepPoint`), one resumable file per finished point
(``OUT/points/<point>.json``, written atomically with the settings it was computed with), the run's lock, and the
reports rebuilt from every finished point (``results.json``, ``results.md``, ``scaling.png``)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from s1fast.eval.plots import plot
from s1fast.files import write_atomic


@dataclass(frozen=True)
class SweepPoint:
    max_thinking_tokens: int | None  # None: no cap (up to --max-new-tokens)
    num_waits: int

    @property
    def key(self) -> str:
        budget = "none" if self.max_thinking_tokens is None else self.max_thinking_tokens
        return f"budget-{budget}_waits-{self.num_waits}"

    def sort_key(self) -> tuple:
        b = self.max_thinking_tokens
        return (self.num_waits, b is None, b or 0)


def sweep(budgets: list[int | None], waits: list[int]) -> list[SweepPoint]:
    """Every (budget, waits) pair, in order, without repeats: the product of ``--budgets`` (``none`` = no cap) and
    ``--waits``."""
    for b in budgets:
        if b is not None and (not isinstance(b, int) or b < 0):
            raise ValueError(f"budgets: expected non-negative integers or None, got {b!r}")
    for w in waits:
        if not isinstance(w, int) or w < 0:
            raise ValueError(f"waits: expected non-negative integers, got {w!r}")
    return list(dict.fromkeys(SweepPoint(b, w) for b in budgets or [None] for w in waits or [0]))


def point_path(out: str, point: SweepPoint) -> str:
    """The file of ``point`` in ``out``."""
    return os.path.join(out, "points", point.key + ".json")


def write_point(out: str, point: SweepPoint, result: dict) -> None:
    """``result`` (``metrics.point_result``) as the point's file, atomically: a crash leaves it whole or absent."""
    write_atomic(point_path(out, point), json.dumps(result, indent=1))


_POINT_NUMBERS = ("num_waits", "accuracy", "correct", "problems", "mean_thinking_tokens", "mean_answer_tokens",
                  "budget_cut_fraction", "time_s")


def read_point(path: str) -> dict:
    """A finished point file, or a one-line ValueError naming the file (truncated, not JSON, fields missing)."""
    try:
        with open(path, encoding="utf-8") as f:
            point = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"not JSON ({e})"
    else:
        if not isinstance(point, dict):
            problem = f"a JSON {type(point).__name__}, not an object"
        else:
            bad = [
                k
                for k in _POINT_NUMBERS
                if isinstance(point.get(k), bool) or not isinstance(point.get(k), (int, float))
            ]
            bad += [] if isinstance(point.get("settings"), dict) else ["settings"]
            b = point.get("max_thinking_tokens", "missing")
            bad += [] if b is None or (isinstance(b, int) and not isinstance(b, bool)) else ["max_thinking_tokens"]
            problem = f"missing or invalid fields {bad}" if bad else None
        if problem is None:
            return point
    raise ValueError(f"point file {path} is corrupt: {problem}; delete it to recompute that point")


def finished_points(out: str) -> list[tuple[str, dict]]:
    """(path, point) of every finished point file in ``out``."""
    points_dir = os.path.join(out, "points")
    paths = sorted(
        os.path.join(points_dir, n) for n in os.listdir(points_dir) if n.endswith(".json") and not n.startswith(".")
    )
    return [(path, read_point(path)) for path in paths]


def summary(point: dict) -> dict:
    return {k: v for k, v in point.items() if k not in ("records", "settings")}


def check_settings(out: str, settings: dict) -> None:
    """Refuse to mix points computed with different settings: every point file holds its own (so deleting
    run.json changes nothing); then record ``settings`` in run.json."""
    for path, point in finished_points(out):
        old = point["settings"]
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"out {out!r} holds points computed with other settings ({details}; e.g. {path}); "
                             "use a new --out directory")
    write_atomic(os.path.join(out, "run.json"), json.dumps(settings, indent=2))


@contextlib.contextmanager
def exclusive(out: str) -> Iterator[None]:
    """Hold ``out`` for this run (an flock on OUT/.lock, released when the process ends however it ends),
    then remove temporary files that a killed run (SIGKILL) left mid-write.

    One eval at a time holds ``OUT`` (``OUT/.lock``); temporary files of an interrupted write are removed (at once on
    Ctrl-C / SIGTERM, on the next run after a SIGKILL).
    """
    import fcntl

    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"out {out!r} is in use by another s1fast eval (it holds {out}/.lock); "
                             "wait for it to finish or use another --out") from None
        for folder in (out, os.path.join(out, "points")):
            for name in os.listdir(folder):
                if name.startswith(".tmp-"):  # write_atomic's temporary files
                    os.unlink(os.path.join(folder, name))
        yield
    finally:
        os.close(fd)


def markdown_table(points: list[dict]) -> str:
    """One row per point; accuracy is pass@1 (the mean over samples); with --samples N > 1 also cons@N and pass@N."""
    parallel = any(p.get("samples", 1) > 1 for p in points)
    lines = [
        "| max thinking tokens | forced waits | accuracy (%) | correct | mean thinking tokens | "
        "mean answer tokens | budget cut (%) | time (s) |"
        + (" samples | cons@N (%) | pass@N (%) |" if parallel else ""),
        "|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|---:|" * parallel,
    ]
    for p in points:
        budget = "none" if p["max_thinking_tokens"] is None else p["max_thinking_tokens"]
        n = p.get("samples", 1)
        extra = ""
        if parallel:
            extra = (f" {n} | {100 * p['cons_at_k'][str(n)]:.1f} | {100 * p['pass_at_k'][str(n)]:.1f} |"
                     if "cons_at_k" in p else f" {n} | | |")
        lines.append(
            f"| {budget} | {p['num_waits']} | {100 * p['accuracy']:.1f} | {p['correct']}/{p['problems'] * n} | "
            f"{p['mean_thinking_tokens']:.1f} | {p['mean_answer_tokens']:.1f} | "
            f"{100 * p['budget_cut_fraction']:.0f} | {p['time_s']:.1f} |" + extra
        )
    return "\n".join(lines) + "\n"


def write_reports(out: str, settings: dict, environment: dict) -> list[dict]:
    """Rebuild results.json / results.md / scaling.png from every finished point in ``out``; returns the
    point summaries, sorted by waits then budget.

    ``OUT/scaling.png``: accuracy against mean thinking tokens, log x axis.
    """
    summaries = [summary(point) for _, point in finished_points(out)]
    summaries.sort(key=lambda p: SweepPoint(p["max_thinking_tokens"], p["num_waits"]).sort_key())
    write_atomic(os.path.join(out, "results.json"),
                  json.dumps({"settings": settings, "environment": environment, "points": summaries}, indent=2))
    write_atomic(os.path.join(out, "results.md"), markdown_table(summaries))
    if summaries:
        plot(summaries, os.path.join(out, "scaling.png"),
             f"{os.path.basename(os.path.normpath(settings['model']))} on {os.path.basename(settings['problems'])}")
    return summaries
