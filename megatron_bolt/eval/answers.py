"""Answer extraction and checking: MATH with math-verify, GSM8K by its final number, the embedded task exactly.

MATH: the answer is the content of the last ``\\boxed{...}`` (braces balanced, so ``\\boxed{\\frac{1}{2}}``
survives), else the text after the last ``Final Answer:`` on its line (the format our prompts teach).
math-verify parses both sides as LaTeX and compares them symbolically, so ``\\dfrac{1}{2}``, ``0.5`` and
``1/2`` match, units and ``\\%`` are normalised, and a wrong sign does not match.

GSM8K: gold answers end with ``#### 42``; a prediction's answer is its last number, thousands separators
removed (``1,200`` is 1200), compared as a decimal (``45.0`` equals ``45``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from megatron_bolt.data.embedded import extract_answer as extract_embedded

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FINAL = "Final Answer:"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces; None if there is none."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i]
                break
    return found


def _strip_math(answer: str) -> str:
    """``$x$.`` -> ``x``: the answer without its sentence punctuation and math delimiters."""
    answer = answer.strip().rstrip(".").strip()
    spans = re.findall(r"\$+([^$]+)\$+", answer)
    return (spans[-1] if spans else answer).strip()


def extract_math(text: str) -> str | None:
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip()
    at = text.rfind(_FINAL)
    if at < 0:
        return None
    answer = _strip_math(text[at + len(_FINAL):].strip().split("\n", 1)[0])
    return answer or None


def verify_math(predicted: str | None, gold: str) -> bool:
    """Symbolic equality under math-verify (``pip install math-verify``, the ``eval`` extra)."""
    if not predicted:
        return False
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise ImportError("MATH answers are checked with math-verify: pip install 'megatron-bolt[eval]'") from exc
    gold_parsed, predicted_parsed = parse(f"${gold}$"), parse(f"${predicted}$")
    return bool(gold_parsed and predicted_parsed and verify(gold_parsed, predicted_parsed))


def gsm8k_gold(answer_field: str) -> str | None:
    """The number after ``####`` in a GSM8K answer, commas removed; None when the marker is missing."""
    if "####" not in answer_field:
        return None
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "") or None


def extract_gsm8k(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def verify_gsm8k(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return Decimal(predicted) == Decimal(gold.replace(",", ""))
    except InvalidOperation:
        return False


def grade(task: str, answer_text: str | None, gold: str) -> tuple[str | int | None, bool]:
    """(extracted answer, correct) for one problem; no answer text means no answer."""
    if answer_text is None:
        return None, False
    if task == "math":
        predicted = extract_math(answer_text)
        return predicted, verify_math(predicted, gold)
    if task == "gsm8k":
        predicted = extract_gsm8k(answer_text)
        return predicted, verify_gsm8k(predicted, gold)
    if task == "embedded":
        value = extract_embedded(answer_text)
        return value, value is not None and value == int(gold)
    raise ValueError(f"no grader for task {task!r}")
