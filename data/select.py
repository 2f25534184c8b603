"""``s1fast data select``: s1's selection of training examples, its ablations, and the s1K-schema output.

Every question becomes an :class:`Item` (its teacher trace length, the students that solved it, its domain, its
quality problems) and then, in order, each step switchable and counted:

1. **quality**: out go questions whose teacher request failed (``error``), that lack a trace or an answer
   (``missing_fields``), or whose question shows a formatting problem s1 removed (:data:`FORMATTING`):
   ``ascii_art`` (two or more lines made only of drawing characters), ``missing_image`` (a reference to a figure,
   image or diagram that is not in the text), ``numbering`` (numbered lines that skip or repeat a number). With the
   step off (``--no-quality``) only the first two reasons remove a question: it could not be a training example.
2. **difficulty**: out go questions that any student solved, and those a student has not attempted.
3. **high-quality sources** (``--high-quality SOURCE[:MIN_TOKENS]``): the remaining questions of those sources that
   the teacher answered correctly (with at least MIN_TOKENS of thinking) are selected first. s1 took AIME and GPQA
   this way, and MATH with more than 5,600 thinking tokens.
4. **diversity** (s1's Algorithm 1, paper appendix): until ``size`` questions are selected or no domain is left, a
   domain is drawn uniformly from those left (``rng.choice`` over the sorted domain names), its questions are
   ranked by teacher thinking tokens, longest first (ties by id), one is drawn with weight ``2**-rank``
   (``rng.choices``) and taken out of the domain; an emptied domain leaves. As in s1's algorithm the domains
   still hold the questions step 3 selected: drawing one again adds nothing.

``rng`` is ``random.Random(seed)``. The paper's ablations (``--method``): ``random`` (quality, then ``rng.sample``),
``longest`` (quality, then the longest traces), ``diversity`` (quality, then step 4 with equal weights).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

METHODS = ("s1", "random", "longest", "diversity")
UNUSABLE = ("error", "missing_fields")  # removed even when the quality step is off
_DRAWING = re.compile(r"^[ \t]*[-+|=_*#/\\.:'`~<>^]{4,}[-+|=_*#/\\.:'`~<>^ \t]*$")
_IMAGE = re.compile(
    r"!\[|<img\b|\b(?:figure|diagram|image|picture|graph|table)s?\s+(?:below|above|shown)\b"
    r"|\bshown\s+(?:below|above|in\s+the\s+(?:figure|diagram|image|picture))\b"
    r"|\b(?:see|in|from)\s+the\s+(?:figure|diagram|image|picture|attached)\b",
    re.IGNORECASE,
)
_NUMBERED = re.compile(r"^\s*\(?(\d{1,3})[.)]\s+\S", re.MULTILINE)


def formatting_problems(text: str) -> list[str]:
    """The formatting problems of a question (module docstring, step 1)."""
    problems = []
    if sum(bool(_DRAWING.match(line)) for line in text.splitlines()) >= 2:
        problems.append("ascii_art")
    if _IMAGE.search(text):
        problems.append("missing_image")
    numbers = [int(n) for n in _NUMBERED.findall(text)]
    if len(numbers) >= 2 and any(b not in (a + 1, 1) for a, b in zip(numbers, numbers[1:])):
        problems.append("numbering")
    return problems


@dataclass
class Item:
    """One question's features for the selection."""

    id: str
    source: str
    domain: str
    length: int  # teacher thinking tokens
    teacher_correct: bool
    solved_by: list[str] = field(default_factory=list)
    unattempted_by: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def diversity_draw(pool: list[Item], size: int, rng: random.Random, *, selected: list[str] | None = None,
                   weighted: bool = True) -> list[str]:
    """Step 4 of the module docstring: ids of ``selected`` (kept, first) and then those drawn."""
    chosen = list(selected or [])
    taken = set(chosen)
    by_domain: dict[str, list[Item]] = defaultdict(list)
    for item in pool:
        by_domain[item.domain].append(item)
    for items in by_domain.values():
        items.sort(key=lambda it: (-it.length, it.id))
    while len(chosen) < size and by_domain:
        domain = rng.choice(sorted(by_domain))
        items = by_domain[domain]
        if weighted:
            i = rng.choices(range(len(items)), weights=[2.0**-rank for rank in range(len(items))])[0]
        else:
            i = rng.randrange(len(items))
        item = items.pop(i)
        if item.id not in taken:
            taken.add(item.id)
            chosen.append(item.id)
        if not items:
            del by_domain[domain]
    return chosen


def select(items: list[Item], *, method: str = "s1", size: int = 1000, seed: int = 0, quality: bool = True,
           difficulty: bool = True, high_quality: dict[str, int] | None = None) -> tuple[list[str], dict]:
    """(selected ids in the order chosen, counts per step) as the module docstring says."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if size < 1:
        raise ValueError(f"--size must be >= 1, got {size}")
    rng = random.Random(seed)
    items = sorted(items, key=lambda it: it.id)
    counts: dict = {"questions": len(items)}
    # without the quality step, only what cannot be a training example (a failed request, no trace) is removed
    removed = [bool(it.problems) and (quality or bool(set(it.problems) & set(UNUSABLE))) for it in items]
    out = [it for it, r in zip(items, removed) if r]
    pool = [it for it, r in zip(items, removed) if not r]
    counts["quality_removed"] = dict(sorted(Counter(it.problems[0] for it in out).items()))
    counts["after_quality"] = len(pool)
    if method == "random":
        chosen = [it.id for it in rng.sample(pool, min(size, len(pool)))]
    elif method == "longest":
        chosen = [it.id for it in sorted(pool, key=lambda it: (-it.length, it.id))[:size]]
    elif method == "diversity":
        chosen = diversity_draw(pool, size, rng, weighted=False)
    else:
        if difficulty:
            unattempted = [it for it in pool if it.unattempted_by]
            solved = [it for it in pool if not it.unattempted_by and it.solved_by]
            pool = [it for it in pool if not it.unattempted_by and not it.solved_by]
            counts["difficulty_removed"] = {"solved": len(solved), "unattempted": len(unattempted)}
            counts["after_difficulty"] = len(pool)
        first = []
        for it in pool:
            if high_quality and it.source in high_quality and it.teacher_correct and it.length >= high_quality[
                    it.source]:
                first.append(it.id)
        if len(first) > size:
            first = sorted(rng.sample(first, size))
        counts["high_quality"] = len(first)
        chosen = diversity_draw(pool, size, rng, selected=first)
    counts["selected"] = len(chosen)
    return chosen, counts
