"""``s1fast eval``: test-time scaling, s1's curve of accuracy against thinking tokens under budget forcing.

For every point of a sweep (a maximum thinking budget and a number of forced "Wait"s), every problem of a
JSONL / parquet / Hugging Face dataset is decoded with budget forcing in batches by one reused
:class:`s1fast.model.Decoder`, the answer is extracted and graded (:mod:`s1fast.bench.grading`), and the point
is written atomically to ``OUT/points/<point>.json`` with the settings it was computed with. A rerun with the
same settings skips finished points, so a crashed or extended sweep only computes what is missing; a point
file computed with other settings is refused, naming it and what differs (the model is known by its path:
evaluate new weights saved over old ones in a new ``OUT``), as is a corrupt one. One eval at a time holds
``OUT`` (``OUT/.lock``); temporary files of an interrupted write are removed (at once on Ctrl-C / SIGTERM,
on the next run after a SIGKILL).
Then ``OUT/results.json``, ``OUT/results.md`` and ``OUT/scaling.png`` (accuracy against mean thinking tokens,
log x axis) are rebuilt from every finished point.

Prompts are s1's: ``s1fast.model.chat.think_prompt``: the ChatML turns followed by ``<|im_start|>think``.
The sweep is the product of ``--budgets`` (``none`` = no cap) and ``--waits``. Thinking tokens are the decoder's
count (the model's thinking plus injected "Wait"s); answer tokens are what the model wrote after the
end-of-thinking text. The answer is extracted from the text after thinking, or from the whole output when
thinking never ended (``--max-new-tokens`` hit first).

    s1fast eval --model ckpt/ --problems bench/data/example_problems.jsonl --out runs/scaling \\
        --budgets 512 1024 2048 4096 --waits 0
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch

from s1fast.bench.grading import extract_answer, is_equiv
from s1fast.model.chat import IM_END, load_tokenizer, think_prompt
from s1fast.model.cli import check_device, check_model_dir, load_model, sigterm_as_interrupt
from s1fast.train.data import read_records, write_atomic

EXAMPLE_PROBLEMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "example_problems.jsonl")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


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
    """Every (budget, waits) pair, in order, without repeats."""
    for b in budgets:
        if b is not None and (not isinstance(b, int) or b < 0):
            raise ValueError(f"budgets: expected non-negative integers or None, got {b!r}")
    for w in waits:
        if not isinstance(w, int) or w < 0:
            raise ValueError(f"waits: expected non-negative integers, got {w!r}")
    return list(dict.fromkeys(SweepPoint(b, w) for b in budgets or [None] for w in waits or [0]))


def load_problems(source: str, *, question_field: str = "question", answer_field: str = "answer",
                  limit: int | None = None, split: str = "test") -> list[dict]:
    """``[{"question": str, "answer": str}, ...]`` from a .jsonl / .json / .parquet file or a dataset name
    (its ``split``)."""
    rows = read_records(source, split=split, what="problems")
    problems = []
    for i, row in enumerate(rows[:limit]):
        if not isinstance(row, dict):
            raise ValueError(f"problems {source}: row {i} is a {type(row).__name__}, expected an object")
        question, answer = row.get(question_field), row.get(answer_field)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"problems {source}: row {i} has no non-empty string field {question_field!r} "
                             f"(fields: {sorted(row)}); pick the field with --question-field")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ValueError(f"problems {source}: row {i} has no answer in field {answer_field!r} (a string or "
                             f"number; fields: {sorted(row)}); pick the field with --answer-field")
        problems.append({"question": question, "answer": str(answer).strip()})
    if not problems:
        raise ValueError(f"problems {source}: no problems")
    return problems


def decode_batch(decoder, prompts: list[list[int]], forcing, *, max_new_tokens: int, stop_token_ids: list[int],
                 tokenizer, sampling: dict) -> list[dict]:
    """One budget-forced ``Decoder.generate`` call; per row: thinking tokens (the decoder's count: the model's
    plus injected waits), answer tokens (what the model wrote after the end-of-thinking text, stop token
    excluded), forced waits, whether the budget cut thinking / thinking ended at all, the full output text,
    and the answer text (None when thinking never ended)."""
    result = decoder.generate(prompts, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                              budget=forcing, **sampling)
    # the decoder's answer starts after `<|im_start|>answer`; when the budget cut thinking, the rest of the
    # injected budget_end ("\nFinal Answer:") comes first and is not the model's
    forced_prefix = len(forcing.budget_end) - len(forcing.end_think)
    if tuple(forcing.budget_end[: len(forcing.end_think)]) != tuple(forcing.end_think):
        forced_prefix = 0  # the decoder then starts the answer after the whole budget_end
    rows = []
    for r in result.rows:
        answer = r.tokens[r.answer_start :] if r.thinking_ended else []
        own = answer[:-1] if answer and answer[-1] in stop_token_ids else answer
        rows.append({
            "thinking_tokens": r.thinking_tokens,
            "answer_tokens": max(0, len(own) - (forced_prefix if r.budget_cut else 0)),
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
            bad = [k for k in _POINT_NUMBERS if isinstance(point.get(k), bool) or not isinstance(point.get(k), (int, float))]
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
    paths = sorted(os.path.join(points_dir, n) for n in os.listdir(points_dir) if n.endswith(".json") and not n.startswith("."))
    return [(path, _read_point(path)) for path in paths]


def _summary(point: dict) -> dict:
    return {k: v for k, v in point.items() if k not in ("records", "settings")}


def markdown_table(points: list[dict]) -> str:
    lines = ["| max thinking tokens | forced waits | accuracy (%) | correct | mean thinking tokens | "
             "mean answer tokens | budget cut (%) | time (s) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        budget = "none" if p["max_thinking_tokens"] is None else p["max_thinking_tokens"]
        lines.append(f"| {budget} | {p['num_waits']} | {100 * p['accuracy']:.1f} | {p['correct']}/{p['problems']} | "
                     f"{p['mean_thinking_tokens']:.1f} | {p['mean_answer_tokens']:.1f} | "
                     f"{100 * p['budget_cut_fraction']:.0f} | {p['time_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: str, title: str) -> None:
    """Accuracy against mean thinking tokens (log x), one line per number of waits over the budgets (or one
    line over the waits when the budget does not vary), each point labelled with its budget / waits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    one_budget = len({p["max_thinking_tokens"] for p in points}) == 1
    groups: dict[str, list[dict]] = {}
    for p in points:
        name = "forced waits" if one_budget else f"{p['num_waits']} forced waits"
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
    ax.set_xscale("log", base=2)  # ticks at powers of two, like s1's figure (512, 1K, 2K, ...)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v < 1024 else f"{v / 1024:g}K"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.1)
    accuracies = [100 * p["accuracy"] for p in points]
    low, high = max(0.0, min(accuracies) - 5), min(100.0, max(accuracies) + 5)
    ax.set_ylim(max(0.0, min(low, high - 10)), min(100.0, max(high, low + 10)))
    ax.set_xlabel("average thinking tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(out: str, settings: dict, environment: dict) -> list[dict]:
    """Rebuild results.json / results.md / scaling.png from every finished point in ``out``; returns the
    point summaries, sorted by waits then budget."""
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
    question_field: str = "question"
    answer_field: str = "answer"
    limit: int | None = None
    split: str = "test"
    batch_size: int = 16
    max_new_tokens: int = 32768
    max_answer_tokens: int = 2048
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = 0
    dtype: str = "auto"
    device: str = "auto"
    progress: bool = True


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
    then remove temporary files that a killed run (SIGKILL) left mid-write."""
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
    """Run every missing point of the sweep and rebuild the reports; returns the point summaries."""
    if importlib.util.find_spec("matplotlib") is None:  # before hours of decoding, not after
        raise ImportError("s1fast eval draws scaling.png with matplotlib: pip install matplotlib")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {cfg.batch_size!r}")
    if cfg.max_new_tokens < 1 or cfg.max_answer_tokens < 1:
        raise ValueError(f"max_new_tokens and max_answer_tokens: expected positive integers, got "
                         f"{cfg.max_new_tokens!r} and {cfg.max_answer_tokens!r}")
    if not os.path.isdir(cfg.model) and (cfg.model.count("/") != 1 or cfg.model.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"model {cfg.model!r}: no such directory, and not a Hugging Face name (owner/name)")
    if os.path.isdir(cfg.model):
        check_model_dir(cfg.model)
    if cfg.temperature < 0 or (cfg.top_p is not None and not 0 < cfg.top_p <= 1):
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {cfg.temperature!r} and {cfg.top_p!r}")
    points = sweep(cfg.budgets, cfg.waits)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    check_device(device, "device")
    dtype_name = cfg.dtype if cfg.dtype != "auto" else "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    problems = load_problems(cfg.problems, question_field=cfg.question_field, answer_field=cfg.answer_field,
                             limit=cfg.limit, split=cfg.split)
    def where(name: str | None) -> str | None:  # local paths absolute, so a rerun from elsewhere matches
        return os.path.abspath(name) if name is not None and os.path.exists(name) else name

    settings = {
        "model": where(cfg.model), "tokenizer": where(cfg.tokenizer), "problems": where(cfg.problems),
        "problems_sha256": hashlib.sha256(json.dumps(problems, sort_keys=True).encode()).hexdigest(),
        "num_problems": len(problems), "max_new_tokens": cfg.max_new_tokens,
        "max_answer_tokens": cfg.max_answer_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
        "top_p": cfg.top_p, "seed": cfg.seed, "dtype": dtype_name,
    }
    os.makedirs(os.path.join(cfg.out, "points"), exist_ok=True)
    with _exclusive(cfg.out):
        return _run(cfg, settings, points, problems, device, dtype_name)


def _run(cfg: EvalConfig, settings: dict, points: list[SweepPoint], problems: list[dict], device: str,
         dtype_name: str) -> list[dict]:
    """``evaluate`` once ``cfg.out`` is held: check the finished points, decode the missing ones, report."""
    from tqdm.auto import tqdm

    from s1fast.bench.common import environment
    from s1fast.model import BudgetForcing, Decoder

    _check_settings(cfg.out, settings)
    pending = [p for p in points if not os.path.exists(os.path.join(cfg.out, "points", p.key + ".json"))]
    if len(pending) < len(points):
        print(f"s1fast eval: {len(points) - len(pending)} of {len(points)} points already in {cfg.out}, skipped")

    if pending:
        tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
        model = load_model(cfg.model, dtype=DTYPES[dtype_name], device=device)
        prompts = [tokenizer(think_prompt(p["question"]), add_special_tokens=False)["input_ids"] for p in problems]
        stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, "<|endoftext|>")]
        base = BudgetForcing.from_tokenizer(tokenizer)
        room = base.longest_injection()  # the injected end of thinking (with s1's newline) on top of the budget

        def new_tokens(point: SweepPoint) -> int:
            if point.max_thinking_tokens is None:
                return cfg.max_new_tokens
            return min(cfg.max_new_tokens, point.max_thinking_tokens + room + cfg.max_answer_tokens)

        decoder = Decoder(model, max_seq_len=max(map(len, prompts)) + max(map(new_tokens, pending)))
        sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
        bar = tqdm(total=len(pending) * len(problems), unit="problem", disable=not cfg.progress)
        for point in pending:
            bar.set_description(point.key)
            forcing = replace(base, max_thinking_tokens=point.max_thinking_tokens, num_waits=point.num_waits)
            records, elapsed = [], 0.0
            for n, start in enumerate(range(0, len(problems), cfg.batch_size)):
                t0 = time.perf_counter()
                rows = decode_batch(decoder, prompts[start : start + cfg.batch_size], forcing,
                                    max_new_tokens=new_tokens(point), stop_token_ids=stop_ids, tokenizer=tokenizer,
                                    sampling={**sampling, "seed": None if cfg.seed is None else cfg.seed + n})
                elapsed += time.perf_counter() - t0
                for i, row in enumerate(rows, start):
                    text = row.pop("answer_text")
                    extracted = extract_answer(row["output"] if text is None else text)
                    records.append({"index": i, "reference": problems[i]["answer"], "extracted": extracted,
                                    "correct": is_equiv(extracted, problems[i]["answer"]), **row})
                bar.update(len(rows))
                bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}")
            n = len(records)
            result = {
                **asdict(point), "accuracy": sum(r["correct"] for r in records) / n,
                "correct": sum(r["correct"] for r in records), "problems": n,
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


def _budget(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        budget = int(value)
    except ValueError:
        budget = -1
    if budget < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'none', got {value!r}")
    return budget


def _non_negative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return n


def _positive(value: str) -> int:
    n = _non_negative(value)
    if n == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def parse_args(argv: list[str]) -> EvalConfig:
    p = argparse.ArgumentParser(prog="s1fast eval", description=__doc__.split("\n\n")[0],
                                epilog="example:\n" + __doc__.split("\n\n")[-1].rstrip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or Hugging Face name")
    p.add_argument("--problems", required=True,
                   help=f"problems: .jsonl/.json/.parquet with question and answer fields, or a dataset name "
                        f"(example: {EXAMPLE_PROBLEMS})")
    p.add_argument("--out", required=True, help="output directory (reruns resume in it)")
    p.add_argument("--budgets", nargs="+", type=_budget, default=[],
                   help="maximum thinking tokens per point ('none' = no cap); default: no cap")
    p.add_argument("--waits", nargs="+", type=_non_negative, default=[],
                   help="numbers of forced 'Wait's when the model ends thinking early; default: 0")
    p.add_argument("--tokenizer", help="tokenizer path or name (default: the model's, else Qwen's)")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--limit", type=_positive, help="use only the first N problems")
    p.add_argument("--split", default="test", help="split of a dataset given by name")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--max-new-tokens", type=_positive, default=32768,
                   help="cap on generated tokens (thinking, injected and answer) for every point")
    p.add_argument("--max-answer-tokens", type=_positive, default=2048,
                   help="answer tokens allowed after a capped thinking budget")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as s1 evaluates")
    p.add_argument("--top-k", type=_positive)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return EvalConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        with sigterm_as_interrupt():  # SIGTERM as Ctrl-C: temporary files are removed on the way out
            summaries = evaluate(cfg)
    except (ValueError, OSError, ImportError) as e:  # bad problems, model, tokenizer, settings or output directory
        print(f"s1fast eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"s1fast eval: interrupted; finished points are kept in {cfg.out}: rerun to resume", file=sys.stderr)
        return 130
    print(markdown_table(summaries), end="")
    print(f"s1fast eval: results in {os.path.join(cfg.out, 'results.json')}, results.md, scaling.png")
    return 0
