"""Answer extraction and grading: math answers with Hugging Face's ``math-verify`` (parse + verify), multiple-choice
letters (GPQA style), and the answer classes of a majority vote.

- :func:`grade`: extract the answer from a model's output and compare it with the reference;
  :func:`parse_answer` / :func:`extract_answer` and :func:`is_correct` / :func:`is_equiv` are its two halves.
- :func:`answer_classes`: the classes of a majority vote.
- :func:`last_boxed`, :func:`choice_letter`: the extraction rules of our own.

The rules are documented where they run: math answers in :func:`parse_answer`, multiple choice in
:func:`choice_letter`, time and size limits above ``TIMEOUT_S``, the vote in :func:`answer_classes`.
Grading never raises on malformed input: errors and time-outs inside math-verify mean "no answer" / "not equal".
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Answer", "parse_answer", "parse_reference", "is_correct", "extract_answer", "is_equiv", "grade",
           "answer_classes", "last_boxed", "choice_letter"]

# math-verify bounds each parse and each comparison with ``signal.alarm`` (``TIMEOUT_S``, whole seconds; the alarm
# replaces one the caller set). Signals work in the main thread only, and math-verify raises elsewhere, so off the main
# thread the limit is off and size caps bound the work: math-verify sees at most the last ``MAX_TEXT_CHARS`` characters
# of a text; a box or answer line longer than ``MAX_ANSWER_CHARS``, or a text with a line nested deeper than
# ``MAX_DEPTH`` brackets (math-verify's LaTeX parser slows down about 1.3x per level), is no answer; a parsed value with
# a power or factorial of more than ``MAX_DIGITS`` digits is never handed to sympy (a tower such as ``9^{9^{9^9}}``
# overran a 1 s alarm by seconds). ``s1fast eval`` grades in its main thread.
TIMEOUT_S = 5  # math-verify's default: a first parse on a busy machine can take a second
MAX_TEXT_CHARS = 8000
MAX_ANSWER_CHARS = 1000
MAX_DEPTH = 12
MAX_DIGITS = 10_000
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Answer:
    """An extracted answer: ``text`` as written (None: there is none) and ``parsed``, math-verify's parse of it
    (sympy value first when it parsed, its string last; empty when nothing parsed) or ``(letter,)`` for a choice."""

    text: str | None
    parsed: tuple = ()


# ---------------------------------------------------------------------------------------------- extraction

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is\b\s*:?|:)\s*|final\s+answer\s*$", re.IGNORECASE)
_MATH_DELIMITER = re.compile(r"\$|\\\(|\\\[")
_CHOICE = re.compile(r"\(([A-Z])\)|(?<![A-Za-z(])([A-Z])\)")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == "{"`` and the index after it; None if it
    never closes. Escaped braces (``\\{``) do not count."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed {x}`` and ``\\boxed x``).
    A box cut off before its closing brace (a truncated output) is skipped for the one before it."""
    for m in reversed(list(_BOX.finditer(text))):
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            group = _braced(text, i)
            if group is not None:
                return group[0].strip()
        else:
            token = re.match(r"[^\s$]+", text[i:])
            if token and i > m.end():  # `\boxed 5`: the argument is the next token
                return token.group(0)
    return None


def _timeout() -> int | None:
    """math-verify's time limit: SIGALRM, which only the main thread can set (the comment above ``TIMEOUT_S``)."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=None)
def _configs(choices: int | None) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, StringExtractionConfig

    if choices is not None:
        return (StringExtractionConfig(strings=tuple(LETTERS[:choices]), try_extract_without_anchor=False,
                                       lowercase=False),)
    return LatexExtractionConfig(try_extract_without_anchor=False), ExprExtractionConfig(
        try_extract_without_anchor=False
    )


def _depth(text: str) -> int:
    """The deepest bracket nesting of any line of ``text``."""
    deepest = 0
    for line in text.splitlines():
        depth = 0
        for c in line:
            depth = depth + 1 if c in "([{" else max(0, depth - 1) if c in ")]}" else depth
            deepest = max(deepest, depth)
    return deepest


def _bounded(value) -> bool:
    """Whether sympy can work on a parsed ``value`` in bounded time: no power or factorial in it would have more
    than MAX_DIGITS digits (checked inside out, so ``9^{9^{9^9}}`` is refused before anything large is built)."""
    import math

    import sympy

    if isinstance(value, str):
        return True
    try:
        nodes = [
            n for e in (value if isinstance(value, sympy.MatrixBase) else [value]) for n in sympy.postorder_traversal(e)
        ]
        for node in nodes:
            if isinstance(node, sympy.Pow) and not node.exp.free_symbols:
                size = 1.0 if node.base.free_symbols else math.log10(max(abs(complex(node.base.evalf(15))), 10.0))
                if not abs(complex(node.exp.evalf(15))) * size <= MAX_DIGITS:
                    return False
            elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.gamma, sympy.binomial)):
                if not all(a.free_symbols or abs(complex(a.evalf(15))) <= MAX_DIGITS / 2 for a in node.args):
                    return False
    except Exception:  # noqa: BLE001 - an expression sympy cannot even evaluate numerically is not graded
        return False
    return True


def _parse(text: str, choices: int | None = None) -> tuple:
    """math-verify's parse of ``text``, its values that could take unbounded time dropped."""
    from math_verify import parse

    if _depth(text) > MAX_DEPTH:
        return ()
    try:
        parsed = parse(text, extraction_config=_configs(choices), parsing_timeout=_timeout())
    except Exception:  # noqa: BLE001 - parse catches its own errors; this is belt and braces for "never raises"
        return ()
    return tuple(v for v in parsed if _bounded(v))


def _boxed(answer: str) -> Answer:
    """An answer already cut out of its text (a box's content, an answer line, a prediction), parsed as a box."""
    if len(answer) > MAX_ANSWER_CHARS or not answer.strip():
        return Answer(None)
    return Answer(answer, _parse(f"\\boxed{{{answer}}}"))


def _answer_line(text: str) -> str | None:
    """What follows the last answer phrase (on the next non-empty line when its own line ends there), without
    markdown bold or a final period, when that holds no math delimiters (math-verify reads delimited math)."""
    lines = text.splitlines()
    for n in range(len(lines) - 1, -1, -1):
        matches = list(_ANSWER_LINE.finditer(lines[n]))
        if matches:
            rest = lines[n][matches[-1].end() :]
            if not rest.strip(" \t*#"):
                rest = next((line for line in lines[n + 1 :] if line.strip()), "")
            rest = rest.strip(" \t*").rstrip(".").strip(" \t*")
            return rest if rest and not _MATH_DELIMITER.search(rest) else None
    return None


def choice_letter(text: str, choices: int) -> str | None:
    """The letter (of the first ``choices`` letters) that ``text`` answers with, or None.

    Multiple choice (``choices=n``: the letters A, B, ... of n options; the reference is a letter, ``C`` or ``(C)``):
    the last box when it holds a letter (``\\boxed{C}``, ``\\boxed{\\text{(C)}}``), else math-verify's string extraction
    anchored on an answer phrase ("Answer: C", "the answer is **C**"), after ``(C)`` and ``C)`` are rewritten to ``C``
    (math-verify reads bare letters only).
    """
    box = last_boxed(text)
    if box is not None:
        inner = re.sub(r"\\text(?:bf|rm|normal)?\s*\{([^{}]*)\}", r"\1", box).strip(" $*.()")
        if len(inner) == 1 and inner in LETTERS[:choices]:
            return inner
    rewritten = _CHOICE.sub(lambda m: m.group(1) or m.group(2), text[-MAX_TEXT_CHARS:])
    parsed = _parse(rewritten, choices)
    return parsed[0] if parsed else None


def parse_answer(text: str, *, choices: int | None = None) -> Answer:
    """The answer a model gave in ``text``; ``choices``: multiple choice with that many options
    (:func:`choice_letter`).

    ``math_verify.parse`` extracts the answer and turns it into sympy, ``math_verify.verify`` compares it with the
    reference, also parsed (numbers, fractions, radicals, sets, intervals, tuples, matrices, equations such as
    ``x = 5``, units, degrees, percentages). Extraction rules of our own are kept only where math-verify lacks them:

    - the boxed answer is the content of the *last complete* ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed {x}``
      and ``\\boxed x``), and only that box is given to math-verify: math-verify joins every box of a text into one set
      (a model that boxes a first guess and then its answer would be graded on both), reads a box cut off by the token
      limit up to the end of the text, and knows neither ``\\fbox`` nor a space before the brace;
    - without a box the answer must follow an answer phrase: math-verify's own phrases ("Answer:", "final answer is",
      "the answer is", Minerva's "I hope it is correct"), with its anchor-free fallback (the last number or LaTeX span
      anywhere in the text) off, so a text without a box or an answer phrase has no answer;
    - an answer phrase followed by plain text without math delimiters (``Final Answer: 2\\sqrt{2}``, ``Answer: (2,3)``,
      ``The answer is: **-2, 4**``, a ``### Final Answer`` heading with the answer on the next line): math-verify reads
      only the first number of such text (``2``, ``-2``) or nothing, so the rest of the last such line is the answer, as
      a box would be, when math-verify can parse it (else math-verify extracts from the text).
    """
    if not isinstance(text, str):
        return Answer(None)
    if choices is not None:
        letter = choice_letter(text, choices)
        return Answer(letter, () if letter is None else (letter,))
    box = last_boxed(text)
    if box is not None:
        return _boxed(box)
    text = text[-MAX_TEXT_CHARS:]
    line = _answer_line(text)
    if line is not None:
        answer = _boxed(line)
        if answer.parsed and not isinstance(answer.parsed[0], str):  # it parsed: math-verify would cut it short
            return answer
    parsed = _parse(text)
    return Answer(parsed[-1].strip().strip("*").strip() or None, parsed) if parsed else Answer(None)


def extract_answer(text: str, *, choices: int | None = None) -> str | None:
    """The answer ``text`` gives, as written (None when it gives none)."""
    return parse_answer(text, choices=choices).text


# ----------------------------------------------------------------------------------------------- grading

@lru_cache(maxsize=4096)
def parse_reference(reference: str | int | float, choices: int | None = None) -> Answer:
    """A reference answer, parsed (a letter for multiple choice; an empty ``parsed`` when it is not one)."""
    reference = str(reference).strip()
    if choices is not None:
        letter = reference.strip("()")
        return Answer(reference, (letter,) if len(letter) == 1 and letter in LETTERS[:choices] else ())
    return _boxed(reference)


def _equal(gold: Answer, answer: Answer) -> bool:
    if gold.text is None or answer.text is None:
        return False
    if gold.text == answer.text:
        return True
    if not gold.parsed or not answer.parsed:
        return False
    from math_verify import verify

    try:
        return bool(verify(list(gold.parsed), list(answer.parsed), timeout_seconds=_timeout()))
    except Exception:  # noqa: BLE001 - as in _parse
        return False


def is_correct(answer: Answer, reference: str | int | float, *, choices: int | None = None) -> bool:
    """Whether a parsed answer is the reference answer."""
    gold = parse_reference(reference, choices)
    if choices is not None:
        return bool(gold.parsed) and answer.parsed == gold.parsed
    return _equal(gold, answer)


def is_equiv(prediction: str | None, reference: str | int | float, *, choices: int | None = None) -> bool:
    """Whether an extracted answer ``prediction`` is the same answer as ``reference``."""
    if not isinstance(prediction, str):
        return False
    if choices is not None:
        return is_correct(parse_reference(prediction, choices), reference, choices=choices)
    return is_correct(_boxed(prediction), reference)


def grade(output: str, reference: str | int | float, *, choices: int | None = None) -> tuple[str | None, bool]:
    """Extract the answer from a model's ``output`` and compare it with ``reference``."""
    answer = parse_answer(output, choices=choices)
    return answer.text, is_correct(answer, reference, choices=choices)


def answer_classes(answers: list[Answer]) -> list[int | None]:
    """Class of each answer for a majority vote: answers the same as an earlier one (math-verify, with the
    earlier one as the reference; letters: equal) share its class. Classes are numbered in order of first
    appearance; None for no answer.

    ``answer_classes`` puts each answer in the class of the first earlier answer that math-verify finds equal to it
    (letters: the same letter), so answers written differently (``0.5``, ``\\frac{1}{2}``) vote together.
    """
    representatives: list[Answer] = []
    classes: list[int | None] = []
    for answer in answers:
        if answer.text is None:
            classes.append(None)
            continue
        match = next((c for c, rep in enumerate(representatives)
                      if rep.text == answer.text or _equal(rep, answer)), None)
        if match is None:
            representatives.append(answer)
            match = len(representatives) - 1
        classes.append(match)
    return classes
