"""``s1fast eval``: test-time scaling, s1's curve of accuracy against thinking tokens under budget forcing.

For every point of a sweep (``--budgets``: maximum thinking budgets; ``--waits``: numbers of forced "Wait"s),
every problem of a dataset is decoded with budget forcing, graded with math-verify and written to
``OUT/points/<point>.json``; reruns resume; ``OUT/results.json``, ``OUT/results.md`` and ``OUT/scaling.png`` are
rebuilt from every finished point. ``--samples N`` adds parallel scaling (pass@k, cons@k). Entry points:
:func:`evaluate` (an :class:`EvalConfig`; ``main`` parses one from the command line), :func:`sweep`,
:func:`decode_batch`, :func:`parallel_metrics`, :func:`write_reports`; each documents its part.

    s1fast eval --model ckpt/ --problems eval/data/example_problems.jsonl --out runs/scaling \\
        --budgets 512 1024 2048 4096 --waits 0
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from s1fast.commands import (
    AT_LEAST_0,
    COUNT,
    add_device_arguments,
    add_kv_cache_argument,
    budget_or_none,
    check_device,
    check_dtype,
    check_hub_model,
    check_kv_cache,
    check_kv_pages,
    check_model_dir,
    check_sampling,
    default_device,
    load_model,
    read_model_config,
    sigterm_as_interrupt,
)
from s1fast.eval.grading import answer_classes, is_correct, parse_answer
from s1fast.eval.problems import EXAMPLE_PROBLEMS, load_problems
from s1fast.files import write_atomic
from s1fast.model.chat import FORMAT_CHOICES, load_tokenizer, resolve_format


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


# ------------------------------------------------------------------------------------- parallel scaling

# With ``--samples N`` (seeded; temperature 0.6 and top-p 0.95 unless given, as DeepSeek reports pass@1 over samples) a
# point's accuracy is pass@1, the mean over the N samples; it also holds pass@k (Chen et al.'s unbiased estimator) and
# cons@k (majority vote over the first k samples; answers vote together when math-verify finds them equal) for k = 1, 2,
# 4, ... N. The figure then adds s1's parallel curve: cons@k against k times the mean thinking tokens of one sample.
MAX_POINT_ROWS = 1_000_000  # decodes (problems x samples) of one point: each is a request held in memory
SAMPLED = {"temperature": 0.6, "top_p": 0.95}  # with --samples > 1, unless given: DeepSeek-R1's recommended sampling


def sample_ks(n: int) -> list[int]:
    """The k of pass@k and cons@k for n samples: 1, 2, 4, 8, ... up to n, and n."""
    return sorted({2**i for i in range(n.bit_length())} | {n})


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased estimate of pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k),
    the chance that k samples drawn from the n without replacement hold a correct one."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: expected 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(votes: list[int | None], correct: list[bool]) -> bool:
    """Whether the majority vote of one problem's samples is right: the answer class (``grading.answer_classes``;
    None, no answer, does not vote) given by most samples, a tie going to the class that appeared first, is
    right when its first sample is."""
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(v for v in votes if v is not None and counts[v] == top)
    return correct[votes.index(winner)]


def parallel_metrics(records: list[dict], samples: int) -> dict:
    """pass@k (the unbiased estimator) and cons@k (majority vote over the first k samples) for k in
    ``sample_ks(samples)``, averaged over the problems of one point's records."""
    by_problem: dict[int, list[dict]] = {}
    for r in records:
        by_problem.setdefault(r["index"], []).append(r)
    groups = [sorted(rows, key=lambda r: r["sample"]) for rows in by_problem.values()]
    ks = sample_ks(samples)
    return {
        "pass_at_k": {str(k): sum(pass_at_k(len(g), sum(r["correct"] for r in g), k) for g in groups) / len(groups)
                      for k in ks},
        "cons_at_k": {str(k): sum(majority_correct([r["vote"] for r in g[:k]], [r["correct"] for r in g[:k]])
                                  for g in groups) / len(groups) for k in ks},
    }


def decode_batch(decoder, prompts: list[list[int]], forcing, *, max_new_tokens: int, stop_token_ids: list[int],
                 tokenizer, sampling: dict, max_rows: int | None = None) -> list[dict]:
    """One budget-forced ``Decoder.generate`` call; per row: thinking tokens (the decoder's count: the model's
    plus injected waits), answer tokens (what the model wrote after the end-of-thinking text, stop token
    excluded), forced waits, whether the budget cut thinking / thinking ended at all, the full output text,
    and the answer text (None when thinking never ended).

    Thinking tokens are the decoder's count (the model's thinking plus injected "Wait"s); answer tokens are what the
    model wrote after the end-of-thinking text. The answer is extracted from the text after thinking, or from the whole
    output when thinking never ended (``--max-new-tokens`` hit first).
    """
    # continuous batching on max_rows rows (all at once by default); prompt i samples with seed + i
    from s1fast.decode.engine import Engine

    engine = Engine(decoder, max_rows=max_rows or len(prompts))
    seed = sampling.get("seed")
    for i, p in enumerate(prompts):
        engine.submit(p, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, budget=forcing,
                      **{**sampling, "seed": None if seed is None else seed + i})
    result = engine.run()
    # the decoder's answer starts after `<|im_start|>answer`; when the budget cut thinking, the rest of the
    # injected budget_end ("\nFinal Answer:") comes first and is not the model's (s1_compat can end a cut with
    # the bare delimiter instead, as s1 does); when budget_end does not start with the delimiter, the decoder
    # starts the answer after the whole budget_end
    starts = tuple(forcing.budget_end[: len(forcing.end_think)]) == tuple(forcing.end_think)
    forced_tail = list(forcing.budget_end[len(forcing.end_think) :]) if starts else []
    rows = []
    for r in result.rows:
        answer = r.tokens[r.answer_start :] if r.thinking_ended else []
        own = answer[:-1] if answer and answer[-1] in stop_token_ids else answer
        forced_prefix = len(forced_tail) if r.budget_cut and answer[: len(forced_tail)] == forced_tail else 0
        rows.append({
            "thinking_tokens": r.thinking_tokens,
            "answer_tokens": max(0, len(own) - forced_prefix),
            "forced_waits": r.forced_waits,
            "budget_cut": r.budget_cut,
            "thinking_ended": r.thinking_ended,
            "finish_reason": r.finish_reason,
            "output": tokenizer.decode(r.tokens, skip_special_tokens=False),
            "answer_text": tokenizer.decode(answer, skip_special_tokens=True) if r.thinking_ended else None,
        })
    return rows


# ------------------------------------------------------------------------------------------------ outputs



_POINT_NUMBERS = ("num_waits", "accuracy", "correct", "problems", "mean_thinking_tokens", "mean_answer_tokens",
                  "budget_cut_fraction", "time_s")


def _read_point(path: str) -> dict:
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


def _points(out: str) -> list[tuple[str, dict]]:
    """(path, point) of every finished point file in ``out``."""
    points_dir = os.path.join(out, "points")
    paths = sorted(
        os.path.join(points_dir, n) for n in os.listdir(points_dir) if n.endswith(".json") and not n.startswith(".")
    )
    return [(path, _read_point(path)) for path in paths]


def _summary(point: dict) -> dict:
    return {k: v for k, v in point.items() if k not in ("records", "settings")}


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


def _waits(n: int) -> str:
    """``1 forced wait``, ``2 forced waits``: the legend's count."""
    return f"{n} forced wait" if n == 1 else f"{n} forced waits"


def plot(points: list[dict], path: str, title: str) -> None:
    """s1's figure of sequential against parallel scaling: accuracy (pass@1) against mean thinking tokens per
    problem (log x), one solid line per number of waits over the budgets (or one line over the waits when the
    budget does not vary), each point labelled with its budget / waits; with --samples N > 1 also, per point, a
    dashed line of majority voting: cons@k against k times the point's mean thinking tokens, k = 1, 2, 4, ... N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    one_budget = len({p["max_thinking_tokens"] for p in points}) == 1
    groups: dict[str, list[dict]] = {}
    for p in points:
        name = "budget forcing" if one_budget else f"budget forcing, {_waits(p['num_waits'])}"
        groups.setdefault(name, []).append(p)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=150)
    for name, group in groups.items():
        group = sorted(group, key=lambda p: p["mean_thinking_tokens"])
        xs = [max(p["mean_thinking_tokens"], 1.0) for p in group]  # a budget of 0 would sit at -inf on a log axis
        ys = [100 * p["accuracy"] for p in group]
        ax.plot(xs, ys, marker="o", label=name)
        for p, x, y in zip(group, xs, ys):
            label = f"W{p['num_waits']}" if one_budget else (
                "no cap" if p["max_thinking_tokens"] is None else str(p["max_thinking_tokens"]))
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    accuracies = [100 * p["accuracy"] for p in points]
    for p in points:
        if "cons_at_k" not in p or p.get("samples", 1) < 2:
            continue
        ks = sorted(map(int, p["cons_at_k"]))
        xs = [max(k * p["mean_thinking_tokens"], 1.0) for k in ks]
        ys = [100 * p["cons_at_k"][str(k)] for k in ks]
        accuracies += ys
        budget = "no cap" if p["max_thinking_tokens"] is None else p["max_thinking_tokens"]
        ax.plot(xs, ys, marker=".", linestyle="--", label=f"majority vote (budget {budget}, {_waits(p['num_waits'])})")
        for k, x, y in zip(ks, xs, ys):
            ax.annotate(f"@{k}", (x, y), textcoords="offset points", xytext=(-14, 4), fontsize=6)
    ax.set_xscale("log", base=2)  # ticks at powers of two, like s1's figure (512, 1K, 2K, ...)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v < 1024 else f"{v / 1024:g}K"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.1)
    low, high = max(0.0, min(accuracies) - 5), min(100.0, max(accuracies) + 5)
    ax.set_ylim(max(0.0, min(low, high - 10)), min(100.0, max(high, low + 10)))
    ax.set_xlabel("average thinking tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(out: str, settings: dict, environment: dict) -> list[dict]:
    """Rebuild results.json / results.md / scaling.png from every finished point in ``out``; returns the
    point summaries, sorted by waits then budget.

    ``OUT/scaling.png``: accuracy against mean thinking tokens, log x axis.
    """
    summaries = [_summary(point) for _, point in _points(out)]
    summaries.sort(key=lambda p: SweepPoint(p["max_thinking_tokens"], p["num_waits"]).sort_key())
    write_atomic(os.path.join(out, "results.json"),
                  json.dumps({"settings": settings, "environment": environment, "points": summaries}, indent=2))
    write_atomic(os.path.join(out, "results.md"), markdown_table(summaries))
    if summaries:
        plot(summaries, os.path.join(out, "scaling.png"),
             f"{os.path.basename(os.path.normpath(settings['model']))} on {os.path.basename(settings['problems'])}")
    return summaries


# ------------------------------------------------------------------------------------------------- driver

@dataclass
class EvalConfig:
    model: str
    problems: str
    out: str
    budgets: list  # ints, None = no cap
    waits: list
    tokenizer: str | None = None
    question_field: str | None = None  # None: found by name (s1fast.eval.problems)
    answer_field: str | None = None
    limit: int | None = None
    split: str = "test"
    max_rows: int = 16  # problems (samples) decoded at once
    max_new_tokens: int = 32768
    max_answer_tokens: int = 2048
    temperature: float | None = None  # None: 0 (greedy) for one sample, SAMPLED's for several
    top_k: int | None = None
    top_p: float | None = None  # None: no cut for one sample, SAMPLED's for several
    seed: int | None = 0
    samples: int = 1  # per problem and point: pass@1 is their mean; cons@k and pass@k over them
    choice_seed: int = 0  # shuffles GPQA's options
    dtype: str | None = None  # a key of commands.DTYPES; None: commands.default_dtype(device)
    device: str = field(default_factory=default_device)
    progress: bool = True
    s1_compat: bool = False  # BudgetForcing.s1_compat: s1's evaluation code, quirks included
    format: str = "s1"  # reasoning format (s1fast.model.chat.FORMAT_CHOICES)
    threads: int | None = None  # CPU threads (None: set_cpu_threads' default)
    kv_cache: dict = field(default_factory=dict)  # Decoder's KV budget (commands.kv_cache_budget); not a result setting


def _check_settings(out: str, settings: dict) -> None:
    """Refuse to mix points computed with different settings: every point file holds its own (so deleting
    run.json changes nothing); then record ``settings`` in run.json."""
    for path, point in _points(out):
        old = point["settings"]
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"out {out!r} holds points computed with other settings ({details}; e.g. {path}); "
                             "use a new --out directory")
    write_atomic(os.path.join(out, "run.json"), json.dumps(settings, indent=2))


@contextlib.contextmanager
def _exclusive(out: str) -> Iterator[None]:
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


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Run every missing point of the sweep and rebuild the reports; returns the point summaries.

    For every point of a sweep (a maximum thinking budget and a number of forced "Wait"s), every problem of a JSONL /
    parquet / Hugging Face dataset (MATH-500, AIME, GPQA Diamond: :mod:`s1fast.eval.problems`) is decoded ``--samples``
    times with budget forcing on ``--max-rows`` rows of one reused :class:`s1fast.decode.Decoder` (continuous batching),
    each answer is extracted and graded with math-verify (:mod:`s1fast.eval.grading`), and the point is written
    atomically to ``OUT/points/<point>.json`` with the settings it was computed with. A rerun with the same settings
    skips finished points, so a crashed or extended sweep only computes what is missing; a point file computed with
    other settings is refused, naming it and what differs (the model is known by its path: evaluate new weights saved
    over old ones in a new ``OUT``), as is a corrupt one.
    """
    if importlib.util.find_spec("matplotlib") is None:  # before hours of decoding, not after
        raise ImportError("s1fast eval draws scaling.png with matplotlib: pip install matplotlib")
    if importlib.util.find_spec("math_verify") is None:
        raise ImportError("s1fast eval grades answers with math-verify: pip install math-verify")
    COUNT.check("samples", cfg.samples)
    sampled = cfg.samples > 1
    temperature = cfg.temperature if cfg.temperature is not None else SAMPLED["temperature"] if sampled else 0.0
    top_p = cfg.top_p if cfg.top_p is not None else SAMPLED["top_p"] if sampled else None
    if sampled and temperature == 0:
        raise ValueError(f"samples: {cfg.samples} greedy samples (temperature 0) would all be the same; "
                         "give --temperature > 0 or leave it to the default")
    COUNT.check("max_rows", cfg.max_rows)
    if cfg.threads is not None:
        COUNT.check("threads", cfg.threads)
    check_sampling(max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_k=cfg.top_k, top_p=top_p,
                   seed=cfg.seed)
    device = check_device(cfg.device)
    check_kv_cache(cfg.kv_cache, device)
    dtype = check_dtype(cfg.dtype, device)
    COUNT.check("max_answer_tokens", cfg.max_answer_tokens)
    check_hub_model(cfg.model)  # a local directory, or a Hugging Face name the cache or the Hub knows
    if os.path.isdir(cfg.model):
        check_model_dir(cfg.model)
    check_kv_pages(cfg.kv_cache, read_model_config(cfg.model), dtype)
    points = sweep(cfg.budgets, cfg.waits)
    problems = load_problems(cfg.problems, question_field=cfg.question_field, answer_field=cfg.answer_field,
                             limit=cfg.limit, split=cfg.split, choice_seed=cfg.choice_seed)
    if len(problems) * cfg.samples > MAX_POINT_ROWS:
        raise ValueError(f"samples: {cfg.samples:,} samples of {len(problems):,} problems are "
                         f"{len(problems) * cfg.samples:,} decodes per point, more than s1fast eval holds "
                         f"({MAX_POINT_ROWS:,}); lower --samples or --limit")
    def where(name: str | None) -> str | None:  # local paths absolute, so a rerun from elsewhere matches
        return os.path.abspath(name) if name is not None and os.path.exists(name) else name

    settings = {
        "model": where(cfg.model), "tokenizer": where(cfg.tokenizer), "problems": where(cfg.problems),
        "problems_sha256": hashlib.sha256(json.dumps(problems, sort_keys=True).encode()).hexdigest(),
        "num_problems": len(problems), "max_new_tokens": cfg.max_new_tokens,
        "max_answer_tokens": cfg.max_answer_tokens, "temperature": temperature, "top_k": cfg.top_k,
        "top_p": top_p, "seed": cfg.seed, "dtype": str(dtype).removeprefix("torch."),  # float32, bfloat16, ...
        "grader": f"math-verify {importlib.metadata.version('math-verify')}",
        **({"samples": cfg.samples} if sampled else {}),
        **({"s1_compat": True} if cfg.s1_compat else {}),  # absent when off: runs from before it still resume
        **({"format": cfg.format} if cfg.format != "s1" else {}),  # likewise
    }
    os.makedirs(os.path.join(cfg.out, "points"), exist_ok=True)
    with _exclusive(cfg.out):
        return _run(cfg, settings, points, problems, device, dtype)


def _run(cfg: EvalConfig, settings: dict, points: list[SweepPoint], problems: list[dict], device: torch.device,
         dtype: torch.dtype) -> list[dict]:
    """``evaluate`` once ``cfg.out`` is held: check the finished points, decode the missing ones, report.

    Prompts are those of the reasoning format (``--format``, ``s1fast.model.chat``): s1's by default, the ChatML turns
    followed by ``<|im_start|>think``; ``r1`` / ``qwen3`` (the chat template, the \\boxed{} instruction, ``<think>\\n``)
    or ``auto`` (read from the tokenizer); budget cuts append the format's end of thinking.
    """
    from tqdm.auto import tqdm

    from s1fast.decode import BudgetForcing, Decoder
    from s1fast.decode.decoder import set_cpu_threads
    from s1fast.env import environment

    _check_settings(cfg.out, settings)
    pending = [p for p in points if not os.path.exists(os.path.join(cfg.out, "points", p.key + ".json"))]
    if len(pending) < len(points):
        print(f"s1fast eval: {len(points) - len(pending)} of {len(points)} points already in {cfg.out}, skipped")

    if pending:  # a first line at once: loading a large model takes a while
        print(f"s1fast eval: {len(pending)} point(s) of {len(problems)} problem(s) x {settings.get('samples', 1)} "
              f"sample(s) to decode; loading {cfg.model}", flush=True)
        tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, cfg.format)
        fmt = resolve_format(cfg.format, tokenizer)
        model = load_model(cfg.model, dtype=dtype, device=device)
        note = set_cpu_threads(model, cfg.threads)
        if note:
            print(f"s1fast eval: {note}", file=sys.stderr)
        prompts = [tokenizer(fmt.think_prompt(p["question"], tokenizer), add_special_tokens=False)["input_ids"]
                   for p in problems]
        stop_ids = fmt.stop_ids(tokenizer)
        base = BudgetForcing.from_tokenizer(tokenizer, s1_compat=cfg.s1_compat, format=fmt)
        room = base.longest_injection()  # the injected end of thinking (with s1's newline) on top of the budget

        def new_tokens(point: SweepPoint) -> int:
            if point.max_thinking_tokens is None:
                return cfg.max_new_tokens
            return min(cfg.max_new_tokens, point.max_thinking_tokens + room + cfg.max_answer_tokens)

        needed = max(map(len, prompts)) + max(map(new_tokens, pending))
        # s1_compat decodes past the budget as s1 does, up to the model's length (vLLM's max_model_len)
        decoder = Decoder(
            model,
            max_seq_len=max(needed, model.config.max_position_embeddings) if cfg.s1_compat else needed,
            **cfg.kv_cache,
        )
        sampling = {k: settings[k] for k in ("temperature", "top_k", "top_p")}
        samples = settings.get("samples", 1)
        rows_of = [(i, s) for i in range(len(problems)) for s in range(samples)]  # each problem's samples together
        bar = tqdm(total=len(pending) * len(rows_of), unit="sample" if samples > 1 else "problem",
                   disable=not cfg.progress)
        for point in pending:
            bar.set_description(point.key)
            forcing = replace(base, max_thinking_tokens=point.max_thinking_tokens, num_waits=point.num_waits)
            records, answers, elapsed = [], [], 0.0
            # one engine run per point: cfg.max_rows rows, each refilled as soon as its row finishes
            for batch in (rows_of,):
                t0 = time.perf_counter()
                rows = decode_batch(decoder, [prompts[i] for i, _ in batch], forcing,
                                    max_new_tokens=new_tokens(point), stop_token_ids=stop_ids, tokenizer=tokenizer,
                                    sampling={**sampling, "seed": cfg.seed}, max_rows=cfg.max_rows)
                elapsed += time.perf_counter() - t0
                for (i, s), row in zip(batch, rows):
                    text = row.pop("answer_text")
                    choices = problems[i].get("choices")
                    answer = parse_answer(row["output"] if text is None else text, choices=choices)
                    answers.append(answer)
                    records.append(
                        {
                            "index": i,
                            "sample": s,
                            "reference": problems[i]["answer"],
                            "extracted": answer.text,
                            "correct": is_correct(answer, problems[i]["answer"], choices=choices),
                            **row,
                        }
                    )
                bar.update(len(rows))
                bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}")
            for i in range(len(problems)):  # majority-vote classes of each problem's answers
                for s, vote in enumerate(answer_classes(answers[i * samples : (i + 1) * samples])):
                    records[i * samples + s]["vote"] = vote
            n = len(records)
            result = {
                **asdict(point), "accuracy": sum(r["correct"] for r in records) / n,
                "correct": sum(r["correct"] for r in records), "problems": len(problems), "samples": samples,
                **parallel_metrics(records, samples),
                "mean_thinking_tokens": sum(r["thinking_tokens"] for r in records) / n,
                "mean_answer_tokens": sum(r["answer_tokens"] for r in records) / n,
                "mean_forced_waits": sum(r["forced_waits"] for r in records) / n,
                "budget_cut_fraction": sum(r["budget_cut"] for r in records) / n,
                "max_new_tokens": new_tokens(point), "time_s": elapsed,
                "tokens_per_s": sum(r["thinking_tokens"] + r["answer_tokens"] for r in records) / max(elapsed, 1e-9),
                "settings": settings, "records": records,
            }
            write_atomic(os.path.join(cfg.out, "points", point.key + ".json"), json.dumps(result, indent=1))
        bar.close()
    return write_reports(cfg.out, settings, environment(device))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s1fast eval", description=__doc__.split("\n\n")[0],
                                epilog="example:\n" + __doc__.split("\n\n")[-1].rstrip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or Hugging Face name")
    p.add_argument("--problems", required=True,
                   help=f"problems: .jsonl/.json/.parquet, or a dataset name; MATH-500, AIME and GPQA Diamond "
                        f"fields are recognised (samples of each: {os.path.dirname(EXAMPLE_PROBLEMS)})")
    p.add_argument("--out", required=True, help="output directory (reruns resume in it)")
    p.add_argument("--budgets", nargs="+", type=budget_or_none, default=[],
                   help="maximum thinking tokens per point ('none' = no cap); default: no cap")
    p.add_argument("--waits", nargs="+", type=AT_LEAST_0, default=[],
                   help="numbers of forced 'Wait's when the model ends thinking early; default: 0")
    p.add_argument("--tokenizer", help="tokenizer path or name (default: the model's, else Qwen's)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="s1",
                   help="reasoning format: prompt and thinking delimiters (default: s1; auto: read from the tokenizer)")
    p.add_argument("--question-field", help="field of the question (default: question or problem, in any case)")
    p.add_argument("--answer-field", help="field of the answer (default: answer, in any case; GPQA's own fields)")
    p.add_argument("--choice-seed", type=int, default=0, help="seed of the shuffle of GPQA's options")
    p.add_argument("--limit", type=COUNT, help="use only the first N problems")
    p.add_argument("--split", default="test", help="split of a dataset given by name")
    p.add_argument("--max-rows", type=COUNT, default=16, help="problems (samples) decoded at once (default 16)")
    p.add_argument("--max-new-tokens", type=COUNT, default=32768,
                   help="cap on generated tokens (thinking, injected and answer) for every point")
    p.add_argument("--max-answer-tokens", type=COUNT, default=2048,
                   help="answer tokens allowed after a capped thinking budget")
    p.add_argument("--samples", type=COUNT, default=1,
                   help="samples per problem and point: accuracy is pass@1 (their mean), with cons@k (majority vote) "
                        "and pass@k for k = 1, 2, 4, ... N")
    p.add_argument(
        "--temperature",
        type=float,
        help=f"0 = greedy; default: 0 (as s1 evaluates) for one sample, {SAMPLED['temperature']} for several",
    )
    p.add_argument("--top-k", type=COUNT)
    p.add_argument("--top-p", type=float, help=f"default: none for one sample, {SAMPLED['top_p']} for several")
    p.add_argument("--seed", type=int, default=0)
    add_device_arguments(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--s1-compat", action="store_true",
                   help="budget forcing exactly as s1's evaluation code, its two quirks included (see the README)")
    p.add_argument(
        "--threads", type=COUNT, help="CPU threads (default on CPU: 1 for a model under 100M parameters)"
    )
    add_kv_cache_argument(p)
    return p


def parse_args(argv: list[str]) -> EvalConfig:
    return EvalConfig(**vars(_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    cfg = EvalConfig(**vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv))))
    try:
        with sigterm_as_interrupt():  # SIGTERM as Ctrl-C: temporary files are removed on the way out
            summaries = evaluate(cfg)
    except (ValueError, OSError, ImportError) as e:  # bad problems, model, tokenizer, settings or output directory
        parser.error(str(e))
    except KeyboardInterrupt:
        print(f"s1fast eval: interrupted; finished points are kept in {cfg.out}: rerun to resume", file=sys.stderr)
        return 130
    print(markdown_table(summaries), end="")
    print(f"s1fast eval: results in {os.path.join(cfg.out, 'results.json')}, results.md, scaling.png")
    return 0
