"""``s1fast eval``'s numbers: grading a point's decodes (math-verify, :mod:`s1fast.eval.grading`), majority-vote
classes, a point's summary, and parallel scaling (pass@k, cons@k).

With ``--samples N`` (seeded; temperature 0.6 and top-p 0.95 unless given, as DeepSeek reports pass@1 over samples) a
point's accuracy is pass@1, the mean over the N samples; it also holds pass@k (Chen et al.'s unbiased estimator) and
cons@k (majority vote over the first k samples; answers vote together when math-verify finds them equal) for k = 1, 2,
4, ... N. The figure then adds s1's parallel curve: cons@k against k times the mean thinking tokens of one sample.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict

from s1fast.eval.grading import answer_classes, is_correct, parse_answer


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


def grade(problems: list[dict], order: list[tuple[int, int]], rows: list[dict]) -> list[dict]:
    """The records of one point: each decoded ``row`` (``order``: its problem and sample) with its answer extracted
    (from the text after thinking, else the whole output) and graded against the problem's reference, and the
    majority-vote class of each problem's answers (``vote``); rows are grouped by problem, samples in order."""
    records, answers = [], []
    for (i, s), row in zip(order, rows):
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
    samples = len(order) // len(problems)
    for i in range(len(problems)):  # majority-vote classes of each problem's answers
        for s, vote in enumerate(answer_classes(answers[i * samples : (i + 1) * samples])):
            records[i * samples + s]["vote"] = vote
    return records


def point_result(point, records: list[dict], *, problems: int, samples: int, max_new_tokens: int, elapsed: float,
                 settings: dict) -> dict:
    """What a point file holds: the point, accuracy (pass@1), pass@k / cons@k, means per decode, timing, the
    settings and every record."""
    n = len(records)
    return {
        **asdict(point), "accuracy": sum(r["correct"] for r in records) / n,
        "correct": sum(r["correct"] for r in records), "problems": problems, "samples": samples,
        **parallel_metrics(records, samples),
        "mean_thinking_tokens": sum(r["thinking_tokens"] for r in records) / n,
        "mean_answer_tokens": sum(r["answer_tokens"] for r in records) / n,
        "mean_forced_waits": sum(r["forced_waits"] for r in records) / n,
        "budget_cut_fraction": sum(r["budget_cut"] for r in records) / n,
        "max_new_tokens": max_new_tokens, "time_s": elapsed,
        "tokens_per_s": sum(r["thinking_tokens"] + r["answer_tokens"] for r in records) / max(elapsed, 1e-9),
        "settings": settings, "records": records,
    }
