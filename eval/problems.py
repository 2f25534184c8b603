"""Problem sets for ``s1fast eval``: a local .jsonl / .json / .parquet file or a Hugging Face dataset name, read by
the one reader of s1fast (:func:`s1fast.train.data.read_records`), with the field names of the standard sets
mapped to ``{"question", "answer"}`` (plus ``"choices"``, the number of options, for multiple choice):

- MATH-500 (``problem`` / ``answer``), AIME 2024 / 2025 (``problem`` / ``answer``, also ``Problem`` / ``Answer``;
  integer answers become strings; an ``id`` / ``ID`` field is ignored), s1fast's own (``question`` / ``answer``);
  field names match in any case;
- GPQA Diamond: ``Question`` with ``Correct Answer`` and ``Incorrect Answer 1..3``. The options are shuffled
  (GPQA lists the correct one first) deterministically by ``choice_seed`` and the question text, and written
  after the question as ``(A) ...`` lines; the answer is the correct letter. A set that already has a
  ``choices`` list keeps its order; its ``answer`` is a letter, a 0-based index or the text of one choice.

``--question-field`` / ``--answer-field`` name the fields explicitly instead. Bundled samples of each shape
(written for s1fast, not copied from the sets) lie in ``eval/data/``.
"""

from __future__ import annotations

import os
import random

from s1fast.files import read_records

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
EXAMPLE_PROBLEMS = os.path.join(DATA, "example_problems.jsonl")
SAMPLES = {
    "math500": os.path.join(DATA, "math500_sample.jsonl"),
    "aime2024": os.path.join(DATA, "aime2024_sample.json"),
    "aime2025": os.path.join(DATA, "aime2025_sample.jsonl"),
    "gpqa_diamond": os.path.join(DATA, "gpqa_diamond_sample.jsonl"),
}
QUESTION_FIELDS = ("question", "problem")
GPQA_FIELDS = ("correct answer", "incorrect answer 1", "incorrect answer 2", "incorrect answer 3")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _field(row: dict, names: tuple[str, ...]) -> str | None:
    """The first field of ``row`` whose name, in any case, is one of ``names``."""
    lower = {k.lower(): k for k in row if isinstance(k, str)}
    return next((lower[n] for n in names if n in lower), None)


def lettered(question: str, options: list[str]) -> str:
    """``question`` followed by its options as ``(A) ...`` lines."""
    lines = [f"({LETTERS[i]}) {option}" for i, option in enumerate(options)]
    return f"{question.strip()}\n\n" + "\n".join(lines) + "\n\nAnswer with the letter of the correct option."


def _text(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        return None
    return str(value).strip()


def _choice_answer(answer, options: list[str]) -> int | None:
    """The index of the correct option, from a letter, a 0-based index or the option's text."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer if 0 <= answer < len(options) else None
    text = _text(answer)
    if text is None:
        return None
    letter = text.strip("()").upper()
    if len(letter) == 1 and letter in LETTERS[: len(options)]:
        return LETTERS.index(letter)
    return options.index(text) if text in options else None


def load_problems(source: str, *, question_field: str | None = None, answer_field: str | None = None,
                  limit: int | None = None, split: str = "test", choice_seed: int = 0,
                  rows: list | None = None) -> list[dict]:
    """``[{"question": str, "answer": str[, "choices": int]}, ...]`` from a .jsonl / .json / .parquet file or a
    dataset name (its ``split``); fields found as the module docstring says unless named. ``rows``: the source's
    rows when the caller has already read them (``source`` then only names it in messages)."""
    rows = read_records(source, split=split, what="problems") if rows is None else rows
    problems = []
    for i, row in enumerate(rows[:limit]):
        if not isinstance(row, dict):
            raise ValueError(f"problems {source}: row {i} is a {type(row).__name__}, expected an object")
        where = f"problems {source}: row {i}"
        q_key = question_field if question_field is not None else _field(row, QUESTION_FIELDS)
        question = row.get(q_key) if q_key is not None else None
        if not isinstance(question, str) or not question.strip():
            expected = repr(question_field) if question_field is not None else " or ".join(map(repr, QUESTION_FIELDS))
            raise ValueError(f"{where} has no non-empty string field {expected} (fields: {sorted(row)}); "
                             "pick the field with --question-field")
        gpqa = [_field(row, (name,)) for name in GPQA_FIELDS] if answer_field is None else [None]
        choices_key = _field(row, ("choices",))
        a_key = answer_field if answer_field is not None else _field(row, ("answer",))
        if all(gpqa):
            options = [_text(row[k]) for k in gpqa]
            if None in options:
                raise ValueError(f"{where}: GPQA fields {list(GPQA_FIELDS)} must be non-empty strings")
            order = list(range(len(options)))
            random.Random(f"{choice_seed}\0{question}").shuffle(order)  # str seeds hash the same in every run
            problems.append({"question": lettered(question, [options[j] for j in order]),
                             "answer": LETTERS[order.index(0)], "choices": len(options)})
            continue
        if choices_key is not None:
            options = row[choices_key]
            if (
                not isinstance(options, list)
                or not 2 <= len(options) <= len(LETTERS)
                or any(_text(o) is None for o in options)
            ):
                raise ValueError(f"{where}: field {choices_key!r} must be a list of 2 to 26 non-empty strings")
            options = [_text(o) for o in options]
            correct = _choice_answer(row.get(a_key) if a_key is not None else None, options)
            if correct is None:
                raise ValueError(f"{where}: field {a_key or 'answer'!r} must name one of its {len(options)} choices "
                                 "(a letter, a 0-based index or the choice's text)")
            problems.append(
                {"question": lettered(question, options), "answer": LETTERS[correct], "choices": len(options)}
            )
            continue
        answer = _text(row.get(a_key)) if a_key is not None else None
        if answer is None:
            raise ValueError(f"{where} has no answer in field {answer_field or 'answer'!r} (a string or number; "
                             f"fields: {sorted(row)}); pick the field with --answer-field")
        problems.append({"question": question, "answer": answer})
    if not problems:
        raise ValueError(f"problems {source}: no problems")
    return problems
