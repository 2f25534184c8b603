"""Answer extraction and grading for math problems: AIME-style integers and MATH-style LaTeX answers.

``extract_answer(text)`` takes the content of the last ``\\boxed{...}`` (or ``\\fbox``) of a model's output,
nested braces included, else the text after the last "Answer:" / "Final Answer:" / "the answer is".
``is_equiv(prediction, reference)`` compares two answers: exact match after ``normalize``, numbers compared
as exact fractions (so ``042`` = ``42`` and ``0.5`` = ``\\frac{1}{2}``), tuples and intervals element by
element, bare comma-separated lists in any order, then symbolic equivalence with sympy when it is installed.
LaTeX is turned into sympy expressions here (fractions, roots, powers, pi, products): sympy's own LaTeX
parser needs a pinned antlr runtime. Grading never raises on a malformed answer, and sympy work runs under a
time limit with exponents bounded, so an adversarial answer (``9^{9^{9^9}}``) costs at most that limit.
"""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager
from fractions import Fraction

__all__ = ["extract_answer", "last_boxed", "normalize", "is_equiv", "grade"]

SYMPY_TIMEOUT_S = 2.0
_MAX_SYMPY_CHARS = 300
_MAX_EXPONENT = 1000


# ---------------------------------------------------------------------------------------------- extraction

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_ANSWER_PREFIX = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?::|is\b)\s*", re.IGNORECASE)


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


def _strip_math(s: str) -> str:
    s = s.strip().strip("*").strip()  # markdown bold around the answer
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def extract_answer(text: str) -> str | None:
    """The answer a model gave in ``text``: the last boxed expression, else what follows the last
    "Answer:" / "Final Answer:" / "the answer is" (the next non-empty line when that line is empty),
    without math delimiters or a final period. None when there is neither."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = text.splitlines()
    for n in range(len(lines) - 1, -1, -1):
        matches = list(_ANSWER_PREFIX.finditer(lines[n]))
        if not matches:
            continue
        rest = lines[n][matches[-1].end() :].strip()
        if not rest:
            rest = next((line.strip() for line in lines[n + 1 :] if line.strip()), "")
        while (m := _ANSWER_PREFIX.match(rest)) is not None:  # "Final Answer: The final answer is 5"
            rest = rest[m.end() :]
        # "The final answer is $5$. I hope it is correct.": the leading math span is the answer
        if span := _MATH_SPAN.match(rest.strip()):
            return next(g for g in span.groups() if g is not None).strip() or None
        rest = _strip_math(rest.strip().rstrip("."))
        return _strip_math(rest.rstrip(".")) or None
    return None


# ----------------------------------------------------------------------------------------- normalisation

_UNIT_WRAPPERS = r"\\(?:text|textrm|textnormal|mbox|mathrm)"


def _brace_args(s: str, command: str, nargs: int) -> str:
    """Rewrite ``\\frac12`` / ``\\frac1{2}`` / ``\\sqrt2`` into the braced form ``\\frac{1}{2}`` / ``\\sqrt{2}``."""
    out, i, pattern = [], 0, re.compile(re.escape(command) + r"(?![A-Za-z])")
    while (m := pattern.search(s, i)) is not None:
        out.append(s[i : m.end()])
        i = m.end()
        for _ in range(nargs):
            while i < len(s) and s[i] == " ":
                i += 1
            if i >= len(s):
                break
            if s[i] == "{":
                group = _braced(s, i)
                if group is None:
                    break
                out.append("{" + group[0] + "}")
                i = group[1]
            elif s[i] == "\\":
                name = re.match(r"\\[A-Za-z]+", s[i:])
                token = name.group(0) if name else s[i : i + 2]
                out.append("{" + token + "}")
                i += len(token)
            elif s[i] != "[":  # `\sqrt[3]{x}` keeps its optional argument
                out.append("{" + s[i] + "}")
                i += 1
    out.append(s[i:])
    return "".join(out)


def normalize(answer: str) -> str:
    """Canonical string form of an answer: math delimiters, spacing commands, ``\\left``/``\\right``, ``\\dfrac``
    / ``\\tfrac``, degree signs, percent and dollar signs, a trailing ``\\text{...}`` unit and a final period
    removed; ``\\frac12`` braced; a single-letter ``x =`` dropped; thousands separators and a trailing ``.0``
    removed from numbers; all whitespace removed."""
    s = _strip_math(str(answer))
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])|\\displaystyle", "", s)
    s = re.sub(r"(?<!\\)\\[,!;: ]|~", "", s)  # spacing commands, not the `\\` row break
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°", "", s)
    s = re.sub(r"\\?[%$]", "", s)
    s = s.replace("{,}", ",")
    # a unit: a \text{...} (maybe squared) after a quantity; a lone \text{...} is the answer itself
    s = re.sub(r"(?<=[\d}).])\s*" + _UNIT_WRAPPERS + r"\{[^{}]*\}(?:\^\{?\d\}?)?\s*$", "", s)
    s = re.sub(r"(?:" + _UNIT_WRAPPERS + r"|\\text(?:bf|it))\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\0", s)  # `\pi r` must not become `\pir`
    s = re.sub(r"\s+", "", s).replace("\0", " ").rstrip(".")
    s = _brace_args(_brace_args(s, "\\frac", 2), "\\sqrt", 1)
    if s.count("=") == 1 and re.match(r"^[A-Za-z]=", s):
        s = s[2:]
    s = re.sub(r"^[A-Za-z]\\in(?![A-Za-z])", "", s)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[-+]?\d+\.0+", s):
        s = s[: s.index(".")]
    s = re.sub(r"^([-+]?)\.(\d)", r"\g<1>0.\2", s)
    if m := re.fullmatch(r"([-+]?\d+)/(\d+)", s):
        s = "\\frac{%s}{%s}" % m.groups()
    return s


def _number(s: str) -> Fraction | None:
    """The exact value of a normalised integer, decimal or integer fraction (``-\\frac{3}{4}``, ``\\frac{-3}{4}``)."""
    try:
        if re.fullmatch(r"[-+]?\d+(?:\.\d+)?", s):
            return Fraction(s)
        if m := re.fullmatch(r"([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}", s):
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError):
        pass
    return None


def _split_top_level(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _elements(s: str) -> tuple[str, list[str]] | None:
    """``(a,b)`` / ``[a,b)`` / ``a,b`` / ``\\{a,b\\}`` as its brackets and elements; None for a single expression."""
    brackets = ""
    if s.startswith("\\{") and s.endswith("\\}"):  # a set: its elements in any order, like a bare list
        s = s[2:-2]
    elif len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _split_top_level(s[1:-1])[1:]:
        brackets, s = s[0] + s[-1], s[1:-1]
    parts = _split_top_level(s)
    return (brackets, parts) if len(parts) > 1 else None


# ------------------------------------------------------------------------------------------------ sympy

_COMMANDS = {"pi": " pi ", "infty": " oo ", "cdot": "*", "times": "*", "div": "/", "sin": " sin ", "cos": " cos ",
             "tan": " tan ", "ln": " log ", "log": " log ", "exp": " exp "}
_NAMES = {"pi", "oo", "sqrt", "sin", "cos", "tan", "log", "exp"}


class _Unsupported(Exception):
    pass


def _argument(s: str, i: int) -> tuple[str, int]:
    """The argument of a command or ``^`` at ``s[i]``: a brace group, a command name, or one character."""
    if i >= len(s):
        raise _Unsupported
    if s[i] == "{":
        group = _braced(s, i)
        if group is None:
            raise _Unsupported
        return group
    if s[i] == "\\":
        name = re.match(r"\\[A-Za-z]+", s[i:])
        if name is None:
            raise _Unsupported
        return name.group(0), i + name.end()
    return s[i], i + 1


def _latex_to_python(s: str) -> str:
    """A normalised LaTeX expression as a sympy-parsable string; raises ``_Unsupported`` for anything else."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = re.match(r"\\([A-Za-z]+)", s[i:])
            if m is None:
                raise _Unsupported
            name, i = m.group(1), i + m.end()
            if name == "frac":
                num, i = _argument(s, i)
                den, i = _argument(s, i)
                out.append(f"(({_latex_to_python(num)})/({_latex_to_python(den)}))")
            elif name == "sqrt":
                index = None
                if i < len(s) and s[i] == "[":
                    close = s.find("]", i)
                    if close < 0:
                        raise _Unsupported
                    index, i = s[i + 1 : close], close + 1
                arg, i = _argument(s, i)
                root = _latex_to_python(arg)
                out.append(f" sqrt({root})" if index is None else f"(({root})**(1/({_latex_to_python(index)})))")
            elif name in _COMMANDS:
                out.append(_COMMANDS[name])
            else:
                raise _Unsupported
        elif c == "^":
            arg, i = _argument(s, i + 1)
            out.append(f"**({_latex_to_python(arg)})")
        elif c == "{":
            group = _braced(s, i)
            if group is None:
                raise _Unsupported
            out.append(f"({_latex_to_python(group[0])})")
            i = group[1]
        elif c.isascii() and (c.isalnum() or c in "+-*/(). "):
            out.append(c)
            i += 1
        else:
            raise _Unsupported
    return "".join(out)


def _to_sympy(s: str):
    """Parse a normalised answer into an unevaluated sympy expression, or None when it is not one we can
    handle safely: only digits, operators, brackets, single-letter symbols and known function names reach
    sympy's parser (it evaluates Python), and every power's exponent is bounded."""
    import sympy
    from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    if len(s) > _MAX_SYMPY_CHARS:
        return None
    try:
        code = _latex_to_python(s)
    except (_Unsupported, RecursionError):
        return None
    names = set(re.findall(r"[A-Za-z]{2,}", code))
    if not code.strip() or not names <= _NAMES or re.search(r"\.(?!\d)|[A-Za-z]\.", code):
        return None
    local = {c: sympy.Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    local.update(pi=sympy.pi, oo=sympy.oo, sqrt=sympy.sqrt, sin=sympy.sin, cos=sympy.cos, tan=sympy.tan,
                 log=sympy.log, exp=sympy.exp)
    transformations = standard_transformations + (implicit_multiplication_application,)
    expr = parse_expr(code, local_dict=local, transformations=transformations, evaluate=False)
    if not isinstance(expr, sympy.Expr):
        return None
    for node in sympy.postorder_traversal(expr):  # inner exponents first, so each evalf below is cheap
        if isinstance(node, sympy.Pow) and not node.exp.free_symbols:
            e = node.exp.evalf(15)
            if not e.is_finite or abs(e) > _MAX_EXPONENT:
                return None
    return expr


class _Timeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float):
    """Raise ``_Timeout`` after ``seconds`` (SIGALRM; only in the main thread and when no other interval timer
    is running, otherwise no limit: the exponent bound above still keeps the work finite)."""
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if usable and signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        usable = False
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sympy_equal(a: str, b: str, timeout: float) -> bool:
    try:
        import sympy
    except ImportError:
        return False
    try:
        with _time_limit(timeout):
            ea, eb = _to_sympy(a), _to_sympy(b)
            if ea is None or eb is None:
                return False
            diff = sympy.simplify(ea - eb)
            if diff == 0:
                return True
            if diff.free_symbols:
                return False
            value = complex(diff.evalf(30))  # nested radicals simplify() leaves alone
            scale = max(1.0, abs(complex(eb.evalf(30))))
            return abs(value) <= 1e-12 * scale
    except Exception:  # noqa: BLE001 - any failure inside sympy (or the time limit) means "not shown equal"
        return False


# ----------------------------------------------------------------------------------------------- grading

def is_equiv(prediction: str | None, reference: str | int | float, *, sympy_timeout: float = SYMPY_TIMEOUT_S) -> bool:
    """Whether ``prediction`` is the same answer as ``reference`` (see the module docstring)."""
    if prediction is None:
        return False
    a, b = normalize(prediction), normalize(str(reference))
    if not a or not b:
        return False
    if a == b:
        return True
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    ea, eb = _elements(a), _elements(b)
    if ea is None and eb is None:
        return _sympy_equal(a, b, sympy_timeout)
    if ea is None or eb is None or ea[0] != eb[0] or len(ea[1]) != len(eb[1]):
        return False
    if ea[0]:  # a tuple or an interval: element by element
        return all(is_equiv(x, y, sympy_timeout=sympy_timeout) for x, y in zip(ea[1], eb[1]))
    unmatched = list(eb[1])  # a bare list ("all solutions, separated by commas"): in any order
    for x in ea[1]:
        match = next((y for y in unmatched if is_equiv(x, y, sympy_timeout=sympy_timeout)), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


def grade(output: str, reference: str | int | float) -> tuple[str | None, bool]:
    """Extract the answer from a model's ``output`` and compare it with ``reference``."""
    answer = extract_answer(output)
    return answer, is_equiv(answer, reference)
