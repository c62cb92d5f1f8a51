"""Sentence chunking: exact round trips, unit boundaries, chunk-length law and determinism."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from megatron_bolt.data.chunking import chunk_lengths, chunk_text, split_units, text_seed

TEXTS = {
    "prose": "Hello world. This is Dr. Smith's test! Is it?  Yes.\n\nA new paragraph starts here. It ends.",
    "unicode": "Ça va? Très bien… 数学很有趣。Ελληνικά: α² + β² = γ². Emoji 🎉 here. Done.\n",
    "code": "Consider:\n\n```python\ndef f(x):\n    return x + 1.  # odd.\n```\n\nThen f(1) = 2. Fine.",
    "latex": "Let $x^2 = 4$. Then $x = \\pm 2$.\n\n\\begin{align}\na &= b. \\\\\nc &= d.\n\\end{align}\nQED.",
    "crlf": "First line.\r\nSecond sentence here.\r\n\r\nNext paragraph. Again.\r\n",
    "empty_lines": "\n\n\nStart after blank lines. Then more.\n\n\n\n   \n\nEnd.   \n\n\n",
    "no_punctuation": "just some words without any sentence punctuation at all\nand a second line",
    "empty": "",
    "whitespace_only": "  \n\n \t\n",
    "single_char": "x",
    "numbers": "Value 3.14 is pi. e is 2.718. The sum is 5.858.",
}


@pytest.mark.parametrize("lam", [0.0, 1.0, 7.0])
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip_is_exact(name, lam):
    text = TEXTS[name]
    chunks = chunk_text(text, lam=lam, max_units=20)
    assert "".join(chunks) == text
    assert all(chunks), "no empty chunk"
    if text.strip():
        assert all(c.strip() for c in chunks), "no whitespace-only chunk when the text has content"
    assert (chunks == []) == (text == "")


def test_units_keep_whitespace_before_the_sentence_and_blank_lines_after_the_paragraph():
    assert split_units("Hello world. This is a test.\n\nNew paragraph.") == [
        "Hello world.", " This is a test.\n\n", "New paragraph."]
    assert split_units("\n\nLead. Tail.  ") == ["\n\nLead.", " Tail.  "]
    assert split_units("   ") == ["   "]
    assert split_units("") == []


def test_a_blank_line_always_ends_a_unit_even_without_punctuation():
    units = split_units("no punctuation here\n\nsecond paragraph\r\n\r\nthird")
    assert units == ["no punctuation here\n\n", "second paragraph\r\n\r\n", "third"]


def test_lambda_zero_gives_one_unit_per_chunk():
    text = TEXTS["prose"]
    assert chunk_text(text, lam=0) == split_units(text)
    assert len(split_units(text)) == 7  # untrained Punkt knows no abbreviations: "Dr." ends a sentence


def test_chunk_lengths_follow_one_plus_poisson_and_respect_the_cap():
    lengths = chunk_lengths(40_000, "some document", lam=7, max_units=1000)
    assert sum(lengths) == 40_000
    assert abs(sum(lengths[:-1]) / len(lengths[:-1]) - 8.0) < 0.2
    capped = chunk_lengths(10_000, "some document", lam=7, max_units=5)
    assert max(capped) == 5 and min(capped[:-1]) >= 1
    assert sum(capped) == 10_000


def test_seed_is_md5_of_text_plus_seed_as_in_the_reference():
    text = "déjà vu"
    expected = (int(hashlib.md5(text.encode()).hexdigest(), 16) + 42) & 0xFFFFFFFF
    assert text_seed(text, 42) == expected
    assert chunk_lengths(500, text, 7, 20, seed=1) != chunk_lengths(500, text, 7, 20, seed=2)
    assert chunk_lengths(500, text, 7, 20) != chunk_lengths(500, text + ".", 7, 20)


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="lam"):
        chunk_text("A. B.", lam=-1)
    with pytest.raises(ValueError, match="max_units"):
        chunk_text("A. B.", max_units=0)


def test_chunking_is_identical_in_a_fresh_process_with_another_hash_seed():
    long_text = " ".join(f"Sentence number {i} is here." for i in range(300))
    texts = [long_text, *TEXTS.values()]
    script = ("import json, sys\nfrom megatron_bolt.data.chunking import chunk_text\n"
              "print(json.dumps([chunk_text(t) for t in json.load(sys.stdin)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), capture_output=True,
                         text=True, env=env, check=True).stdout
    assert json.loads(out) == [chunk_text(t) for t in texts]
    assert len(chunk_text(long_text)) > 10
