"""Answer extraction and checking on hand-written tricky cases (MATH via math-verify, GSM8K, embedded)."""

from __future__ import annotations

import pytest

from megatron_bolt.eval.answers import extract_boxed, extract_gsm8k, extract_math, grade, gsm8k_gold

pytest.importorskip("math_verify")

# (model answer text, gold, expected extraction, expected verdict)
MATH_CASES = [
    ("so the total is \\boxed{5}.", "5", "5", True),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),  # nested braces
    ("first \\boxed{3}, on reflection \\boxed{4}", "4", "4", True),  # the last box counts
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", "\\dfrac{3}{4}", True),
    ("\\boxed{\\tfrac34}", "\\frac{3}{4}", "\\tfrac34", True),
    ("Final Answer: $\\frac{3}{4}$.", "\\frac{3}{4}", "\\frac{3}{4}", True),
    ("Final Answer: 0.75\n\nsomething else", "\\frac34", "0.75", True),
    ("Final Answer: 3/4", "\\frac{3}{4}", "3/4", True),
    ("Final Answer: 12 \\text{ cm}", "12", "12 \\text{ cm}", True),  # units
    ("\\boxed{30^\\circ}", "30", "30^\\circ", True),
    ("Final Answer: 25\\%", "25", "25\\%", True),  # percentages
    ("Final Answer: 0.25", "25\\%", "0.25", True),
    ("\\boxed{-5}", "-5", "-5", True),  # negative numbers
    ("\\boxed{5}", "-5", "5", False),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", "-\\frac{1}{2}", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})",
     "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # LaTeX variants of one tuple
    ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}", "\\sqrt{18}", True),
    ("\\fbox{1000}", "1,000", "1000", True),
    ("Final Answer: \\boxed{7} because 3 + 4 = 7", "7", "7", True),  # a box inside the final line wins
    ("\\boxed{6}", "5", "6", False),
    ("I am not sure what the answer is.", "5", None, False),  # no answer
    ("\\boxed{3", "3", None, False),  # an unclosed box is no answer
    ("Final Answer:   \n", "3", None, False),
]


@pytest.mark.parametrize(("text", "gold", "extracted", "correct"), MATH_CASES)
def test_math_answers(text, gold, extracted, correct):
    assert grade("math", text, gold) == (extracted, correct)


def test_boxed_extraction_keeps_inner_braces_and_ignores_text_after():
    assert extract_boxed("x \\boxed{\\{1, 2\\} \\cup {3}} and then {more}") == "\\{1, 2\\} \\cup {3}"
    assert extract_boxed("\\boxed {x^{2}}") == "x^{2}"
    assert extract_math("no marker at all") is None


GSM8K_CASES = [
    ("Final Answer: 72", "72", "72", True),
    (" The tickets cost $1,234 in total.", "1234", "1234", True),  # thousands separators
    ("Final Answer: $45.00.", "45", "45.00", True),
    ("It was -11 degrees.", "-11", "-11", True),
    ("3 apples and 5 pears make 8", "8", "8", True),  # the final number counts
    ("Final Answer: 22.5 minutes", "22.5", "22.5", True),
    ("Final Answer: 22", "22.5", "22", False),
    ("Final Answer: many", "4", None, False),
]


@pytest.mark.parametrize(("text", "gold", "extracted", "correct"), GSM8K_CASES)
def test_gsm8k_answers(text, gold, extracted, correct):
    assert grade("gsm8k", text, gold) == (extracted, correct)


def test_gsm8k_gold_follows_the_marker():
    assert gsm8k_gold("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,080") == "1080"
    assert gsm8k_gold("no marker 42") is None
    assert extract_gsm8k("2, 3 and 4") == "4"


def test_embedded_answers_use_the_corpus_checker():
    assert grade("embedded", "A: 160.", "160") == (160, True)
    assert grade("embedded", "A: 007.\n\n", "007") == (7, True)
    assert grade("embedded", "A: 161.", "160") == (161, False)
    assert grade("embedded", "", "160") == (None, False)


@pytest.mark.parametrize("task", ["math", "gsm8k", "embedded"])
def test_a_missing_answer_region_is_never_correct(task):
    assert grade(task, None, "5") == (None, False)
