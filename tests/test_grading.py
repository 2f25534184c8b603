"""Answer extraction and grading on real-looking model outputs and reference answers (AIME / MATH style, GPQA-style
multiple choice), majority-vote classes, and bounded time on hostile answers in and off the main thread."""

import threading
import time

import pytest

pytest.importorskip("math_verify")

from s1fast.eval.grading import (  # noqa: E402 - after the skip
    answer_classes,
    extract_answer,
    grade,
    is_correct,
    is_equiv,
    last_boxed,
    parse_answer,
)

# (model output, the answer that must be extracted)
EXTRACTION = [
    (r"So the probability is $\boxed{\frac{3}{8}}$.", r"\frac{3}{8}"),
    (r"Thus $\boxed{\dfrac{\sqrt{3}}{2}}$", r"\dfrac{\sqrt{3}}{2}"),
    (r"The set is $\boxed{\{1, 2, \{3\}\}}$", r"\{1, 2, \{3\}\}"),  # escaped braces inside
    (r"\boxed{\left( \frac{1}{2}, \frac{\sqrt{3}}{2} \right)}", r"\left( \frac{1}{2}, \frac{\sqrt{3}}{2} \right)"),
    (r"First guess \boxed{12}, but recheck: the answer is \boxed{-7}.", "-7"),
    (r"Area: \boxed {25\pi}", r"25\pi"),
    (r"\boxed 5 is it", "5"),
    (r"We get \fbox{204}", "204"),
    (r"Answer: \boxed{\text{(B)}}", r"\text{(B)}"),
    # a box cut off by the token limit: the previous complete box counts
    (r"Earlier \boxed{17}. Later \boxed{\frac{1}{2", "17"),
    ("<|im_start|>answer\nFinal Answer: 204", "204"),
    ("Answer:\n  $42$.\n", "42"),
    ("**Final Answer:** **113**", "113"),
    ("the answer is 9.", "9"),
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),  # Minerva's format
    (r"Final Answer: \(x = -2\), as checked above.", "x = -2"),
    ("The answer is: **(2,3)**", "(2,3)"),  # a plain tuple after the phrase: the rest of the line
    ("### Final Answer\n2\\sqrt{2}", r"2\sqrt{2}"),  # a heading, the answer on the next line
    ("Final Answer: 2\\sqrt{2}", r"2\sqrt{2}"),  # math-verify alone would read `2`
    ("We tried 12 and 17 and 20.", None),  # no box and no answer phrase: no answer (no anchor-free guess)
    ("I am not sure about this one.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_strips_the_answer_phrase_and_stops_at_the_line():
    text = "Final Answer: The final answer is $\\frac{7}{3}$"
    assert extract_answer(text) == r"\frac{7}{3}"
    assert grade(text + "\nmore text on the next line", "7/3") == (r"\frac{7}{3}", True)


def test_last_boxed_unbalanced_and_absent():
    assert last_boxed(r"\boxed{\frac{1}{2}") is None
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxedx") is None  # another command, not \boxed


# (prediction, reference) pairs that are the same answer
EQUIVALENT = [
    ("42", "42"),
    ("042", "42"),  # AIME answers are integers 0-999, often zero-padded
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("-7", "-7"),
    ("12.0", "12"),
    ("18.90", "18.9"),
    (r"\$18.90", "18.90"),
    (r"\frac{1}{2}", "1/2"),
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"\tfrac{3}{4}", "0.75"),
    (r"-\frac{3}{4}", r"\frac{-3}{4}"),
    (".5", "0.5"),
    (r"10\text{ cm}^2", "10"),
    (r"5 \text{ inches}", "5"),
    (r"\text{(C)}", "(C)"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    (r"50\%", "50"),
    (r"x = 5", "5"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\left[ -2, 5 \right)", "[-2,5)"),
    (r"2\sqrt{2}", r"\sqrt{8}"),  # sympy from here on
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}"),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt3}"),
    (r"x^2+2x+1", r"(x+1)^2"),
    (r"\pi r^2", r"r^2\pi"),
    (r"2^{10}", "1024"),
    (r"\sqrt[3]{8}", "2"),
    (r"6 \cdot 7", "42"),
    (r"\frac{9\pi}{2}", r"4.5\pi"),
    (r"(\frac{1}{2}, 2\sqrt{2})", r"(0.5,\sqrt{8})"),
    ("3, 5", "5, 3"),  # "enter all the solutions, separated by commas": any order
    (r"\frac{1}{2}, -\sqrt{2}", r"-\sqrt2,0.5"),
    (r"x \in [-2, 7]", "[-2,7]"),
    (r"\{-1, \frac{1}{2}\}", r"\frac12, -1"),  # a set: its elements in any order
    (r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}", r"\begin{pmatrix}1\\-2\end{pmatrix}"),  # `\\` is no spacing
]


@pytest.mark.parametrize("prediction,reference", EQUIVALENT)
def test_equivalent_answers_match(prediction, reference):
    assert is_equiv(prediction, reference)
    assert is_equiv(reference, prediction)


# (prediction, reference) pairs that are different answers and must NOT match
DIFFERENT = [
    ("41", "42"),
    ("-7", "7"),
    ("420", "42"),
    ("1,000", "100"),
    (r"\frac{1}{2}", r"\frac{1}{3}"),
    (r"\frac{1}{3}", "0.333"),  # a rounded decimal is not the exact value
    (r"\frac{3}{4}", r"\frac{4}{3}"),
    (r"2\sqrt{3}", r"\sqrt{6}"),
    (r"x^2+1", r"(x+1)^2"),
    (r"(1,2)", r"(2,1)"),
    (r"(1,2)", r"[1,2]"),  # open and closed intervals differ
    (r"(1,2)", r"(1,2,3)"),
    ("3, 5", "5, 5"),  # in any order, but each element once (math-verify reads a bare list as a set: it equates
    # "3,5,5" and "5,3,3", which the hand-written grader told apart)
    (r"\{1, 2\}", r"\{1, 3\}"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 12 \end{pmatrix}"),
    (r"\text{(B)}", "(C)"),
    (r"10\pi", "10"),
    (r"\pi", "3.14159"),
    (None, "5"),
    ("", "5"),
]


@pytest.mark.parametrize("prediction,reference", DIFFERENT)
def test_different_answers_do_not_match(prediction, reference):
    assert not is_equiv(prediction, reference)


def test_integer_reference_given_as_int():
    assert is_equiv("204", 204)
    assert not is_equiv("205", 204)


@pytest.mark.parametrize(
    "prediction",
    [
        r"9^{9^{9^{9}}}",  # an exponent tower: bounded, never evaluated
        r"10^{100000}",
        r"\frac{1}{0}",
        r"__import__('os').system('echo pwned')",
        r"x.__class__",
        r"\frac{\frac{\frac{\frac{1}{2}",
        r"\sqrt[",
        "(" * 400 + "1" + ")" * 400,
        r"\unknowncommand{3}",
        "}}}{{{",
    ],
)
def test_malformed_or_hostile_answers_never_crash_or_hang(prediction):
    start = time.perf_counter()
    assert is_equiv(prediction, "1") is False
    assert time.perf_counter() - start < 3.0  # the size caps, well under math-verify's 5 s limit


HOSTILE_OUTPUTS = [
    r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2^{2^{2^{2^{2^{2}}}}}}", r"\boxed{10^{100000}}", r"\boxed{100000!}",
    "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}", r"Final Answer: 9^{9^{9^{9}}}", "Answer: $" + "{" * 300 + "$",
]


@pytest.fixture(scope="module")
def warm():
    grade(r"\boxed{\frac{1}{2}}", "0.5")  # math-verify's first call imports and compiles (about a second)


@pytest.mark.parametrize("output", HOSTILE_OUTPUTS)
def test_hostile_outputs_are_bounded_in_the_main_thread(output, warm):
    start = time.perf_counter()
    assert grade(output, "1")[1] is False
    assert time.perf_counter() - start < 3.0


def test_grading_off_the_main_thread_has_no_alarm_but_stays_bounded(warm):
    """math-verify's time limit is SIGALRM, which only the main thread may set (math-verify raises ValueError
    elsewhere): off it grading runs without the alarm, still right, never raising, and the size caps keep
    hostile answers cheap."""
    results = []

    def work():
        start = time.perf_counter()
        results.append([grade(r"so $\boxed{\dfrac{1}{2}}$", "0.5"), grade(r"\boxed{x^2+2x+1}", "(x+1)^2"),
                        grade("Answer: (C)", "C", choices=4)])
        results.append([grade(output, "1")[1] for output in HOSTILE_OUTPUTS])
        results.append(time.perf_counter() - start)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and len(results) == 3
    assert results[0] == [(r"\dfrac{1}{2}", True), ("x^2+2x+1", True), ("C", True)]
    assert results[1] == [False] * len(HOSTILE_OUTPUTS) and results[2] < 10.0


# (model output, reference letter, the letter that must be extracted): GPQA-style multiple choice, 4 options
CHOICES = [
    ("Answer: (C)", "C", "C"),
    (r"So the answer is $\boxed{C}$.", "C", "C"),
    (r"\boxed{\text{(B)}}", "B", "B"),
    ("the answer is C", "(C)", "C"),
    ("After all that, the correct answer is **D**.", "D", "D"),
    ("Answer: A) 2 s, since t = sqrt(2h/g)", "A", "A"),
    ("(B) looked right at first, but the answer is (D).", "D", "D"),
    ("Final Answer: The final answer is $\\boxed{A}$. I hope it is correct.", "B", "A"),
    ("Answer: (E)", "E", None),  # only A-D exist
    ("I believe it is the second one.", "B", None),
    (r"\boxed{42}", "C", None),
]


@pytest.mark.parametrize("output,reference,letter", CHOICES)
def test_multiple_choice(output, reference, letter):
    assert grade(output, reference, choices=4) == (letter, letter is not None and letter == reference.strip("()"))
    wrong = "A" if reference.strip("()") != "A" else "B"
    assert grade(output, wrong, choices=4)[1] is (letter == wrong)


def test_multiple_choice_predictions():
    assert is_equiv("(C)", "C", choices=4) and is_equiv("C", "(C)", choices=4)
    assert not is_equiv("B", "C", choices=4) and not is_equiv(None, "C", choices=4)
    assert not is_equiv("Z", "Z", choices=4)  # not one of the 4 letters


def test_grade_on_a_full_budget_forced_output():
    output = (
        "\nLet me compute 13 * 17 = 221. Wait, check: 13*17 = 221, yes.\n"
        "<|im_start|>answer\nFinal Answer: The product is $\\boxed{221}$."
    )
    assert grade(output, "221") == ("221", True)
    assert grade(output, "222") == ("221", False)


def test_answer_classes_group_equal_answers():
    """Majority-vote classes: answers math-verify finds equal share the class of the first of them; classes are
    numbered in order of appearance; no answer has no class."""
    outputs = [r"\boxed{\frac{1}{2}}", "Final Answer: 0.5", r"\boxed{3}", "nothing here", r"\boxed{\dfrac{2}{4}}",
               r"\boxed{x = 3}", r"\boxed{\sqrt{9}}", r"\boxed{-3}"]
    answers = [parse_answer(o) for o in outputs]
    assert answer_classes(answers) == [0, 0, 1, None, 0, 1, 1, 2]
    letters = [
        parse_answer(o, choices=4) for o in ["Answer: (B)", r"\boxed{B}", "Answer: C", "no idea", "the answer is B"]
    ]
    assert answer_classes(letters) == [0, 0, 1, None, 0]
    assert [is_correct(a, "B", choices=4) for a in letters] == [True, True, False, False, True]
