"""``s1fast data collect``: question pools -> one normalised, deduplicated, decontaminated question file.

Each pool (.jsonl / .json / .parquet, or a dataset name) is read with ``s1fast.eval.problems.load_problems``, so its
fields are found as ``s1fast eval`` finds them (MATH-500, AIME, GPQA, s1K's ``question`` / ``solution``, or named
with ``--question-field`` / ``--answer-field``). In the order the pools are given, each question is:

1. normalised (:func:`s1fast.data.store.normalise`) and keyed by :func:`s1fast.data.store.question_id` (its
   lowercased words);
2. dropped as ``contaminated`` when one of its word 8-grams (lowercased words; a question of fewer than 8 words is
   one n-gram of all of them) is an 8-gram of a question of an evaluation set (s1's decontamination);
3. dropped as ``duplicate`` when an earlier question has its key;
4. dropped as ``near_duplicate`` when the Jaccard similarity of its 8-gram set with an earlier kept question's is
   at least ``near_dup`` (default 0.8).

Kept questions carry ``id``, ``question``, ``answer`` (the reference the grader uses), ``choices`` (multiple
choice), ``solution`` (the pool's ``solution`` field, else the answer), ``cot_type`` (the pool's, else ``math``),
``source`` (the pool's name) and ``metadata`` (the pool's other fields).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

from s1fast.data.store import normalise, question_id, words
from s1fast.eval.problems import SAMPLES, load_problems
from s1fast.files import read_records

N = 8
DEFAULT_EVAL_SETS = ("math500", "aime2024", "gpqa_diamond")  # s1's; bundled samples unless files are given
REASONS = ("contaminated", "duplicate", "near_duplicate")
_TAKEN = {"question", "problem", "answer", "solution", "cot_type"}


def ngrams(text: str, n: int = N) -> set[tuple[str, ...]]:
    """Word n-grams of ``text`` (:func:`s1fast.data.store.words`); fewer than ``n`` words: one n-gram of all."""
    w = words(text)
    if len(w) < n:
        return {tuple(w)} if w else set()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def eval_ngrams(sets: list[str]) -> dict[tuple[str, ...], str]:
    """Every 8-gram of the evaluation sets' questions, mapped to the set's name (a name of
    ``s1fast.eval.problems.SAMPLES``, a file or a dataset name)."""
    grams: dict[tuple[str, ...], str] = {}
    for name in sets:
        for p in load_problems(SAMPLES.get(name, name)):
            for g in ngrams(p["question"]):
                grams.setdefault(g, name)
    return grams


def read_pool(source: str, path: str, *, question_field: str | None = None, answer_field: str | None = None) -> list:
    """The pool's questions as records (module docstring), in file order."""
    rows = read_records(path, what=f"pool {source}")
    problems = load_problems(path, question_field=question_field, answer_field=answer_field, split="train", rows=rows)
    out = []
    for row, p in zip(rows, problems):
        skip = _TAKEN | {question_field, answer_field}
        meta = {k: v for k, v in row.items() if isinstance(k, str) and k.lower() not in skip and k not in skip}
        question = normalise(p["question"])
        solution = row.get("solution")
        record = {"id": question_id(question), "question": question, "answer": p["answer"],
                  "solution": solution if isinstance(solution, str) and solution.strip() else p["answer"],
                  "cot_type": row.get("cot_type") if isinstance(row.get("cot_type"), str) else "math",
                  "source": source, "metadata": json.loads(json.dumps(meta, default=str))}
        if "choices" in p:
            record["choices"] = p["choices"]
        out.append(record)
    return out


def collect(pools: list[tuple[str, str]], *, eval_sets: list[str] = DEFAULT_EVAL_SETS, near_dup: float = 0.8,
            question_field: str | None = None, answer_field: str | None = None) -> tuple[list[dict], dict]:
    """(kept question records, report) for ``pools``, ``(source name, path)`` pairs; the report has counts per
    source and reason and each dropped question with its reason and what it matched.

    Near duplicates are found without comparing every pair (prefix filtering, Chaudhuri et al. 2006): with the
    8-grams of each question ordered rarest first over all pools, two questions whose Jaccard similarity is at least
    ``t`` share one of the first ``n - ceil(t * n) + 1`` 8-grams of each (``n`` its number of 8-grams); only kept
    questions sharing such a gram are compared, and exactly."""
    if not 0 < near_dup <= 1:
        raise ValueError(f"--near-dup must be in (0, 1], got {near_dup}")
    contamination = eval_ngrams(list(eval_sets))
    read = [(source, record, ngrams(record["question"])) for source, path in pools
            for record in read_pool(source, path, question_field=question_field, answer_field=answer_field)]
    frequency = Counter(g for _, _, grams in read for g in grams)

    def prefix(grams: set) -> list:
        n = len(grams)
        return sorted(grams, key=lambda g: (frequency[g], g))[: n - math.ceil(near_dup * n - 1e-9) + 2]  # +1 spare

    kept: list[dict] = []
    grams_of: list[set] = []
    by_gram: dict[tuple, list[int]] = defaultdict(list)
    seen: set[str] = set()
    counts: dict[str, Counter] = {source: Counter() for source, _ in pools}
    dropped = []
    for source, record, grams in read:
        c = counts[source]
        c["read"] += 1
        hit = next((contamination[g] for g in grams if g in contamination), None)
        reason, match = None, None
        if hit is not None:
            reason, match = "contaminated", hit
        elif record["id"] in seen:
            reason, match = "duplicate", record["id"]
        else:
            head = prefix(grams)
            for j in sorted({j for g in head for j in by_gram.get(g, ())}):
                shared = len(grams & grams_of[j])
                if shared / (len(grams) + len(grams_of[j]) - shared) >= near_dup:
                    reason, match = "near_duplicate", kept[j]["id"]
                    break
        if reason is not None:
            c[reason] += 1
            dropped.append({"id": record["id"], "source": source, "reason": reason, "match": match})
            continue
        c["kept"] += 1
        seen.add(record["id"])
        for g in head:
            by_gram[g].append(len(kept))
        grams_of.append(grams)
        kept.append(record)
    report = {"eval_sets": list(eval_sets), "near_dup": near_dup,
              "sources": {s: {k: c.get(k, 0) for k in ("read", *REASONS, "kept")} for s, c in counts.items()},
              "kept": len(kept), "dropped": dropped}
    return kept, report
