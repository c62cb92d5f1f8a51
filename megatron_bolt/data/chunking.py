"""Sentence chunking of documents, as in BoLT (bolt-method.md, "Data").

A document is split into paragraphs at blank lines, each paragraph into sentences with NLTK's Punkt
(default parameters, so nothing is downloaded), and consecutive sentence units are grouped into chunks of
``1 + Poisson(lam)`` units capped at ``max_units``. A latent thought is later written for every chunk, so
the chunk is the unit of reasoning: ``lam = 7`` (the paper) gives multi-sentence chunks, ``lam = 0`` one
sentence per chunk (the embedded corpus, where a question and its answer must be separate chunks).

Nothing is ever lost: whitespace before a sentence is the start of its unit, trailing whitespace (and a
paragraph's blank lines) ends the last unit, and whitespace-only units are merged into a neighbour, so
``"".join(chunk_text(t)) == t`` for every string. The chunk lengths are drawn from an RNG seeded by an MD5
hash of the text plus ``seed`` (the reference implementation's scheme), so the result depends on the
document alone: the same on every run, machine, shard layout and worker count.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache

import numpy as np

DEFAULT_LAMBDA = 7.0
DEFAULT_MAX_UNITS = 20
DEFAULT_SEED = 42

# A newline, any whitespace, and another newline: a blank line (also "\r\n\r\n" and lines of spaces).
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@cache
def _punkt():
    """One untrained Punkt tokenizer per process (building it is cheap, importing nltk is not)."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer()


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs, each ending with the blank line(s) that close it; they join back to ``text``."""
    parts, start = [], 0
    for match in _PARAGRAPH_BREAK.finditer(text):
        parts.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        parts.append(text[start:])
    return parts


def split_sentences(paragraph: str) -> list[str]:
    """Punkt sentences; each unit starts with the whitespace before it, the last takes the tail."""
    units, last = [], 0
    for _, end in _punkt().span_tokenize(paragraph):
        units.append(paragraph[last:end])
        last = end
    if not units:
        return [paragraph] if paragraph else []
    units[-1] += paragraph[last:]
    return units


def _merge_blank_units(units: list[str]) -> list[str]:
    """Glue whitespace-only units onto the next unit (the previous one at the end): no empty chunks."""
    merged: list[str] = []
    pending = ""
    for unit in units:
        if unit.strip():
            merged.append(pending + unit)
            pending = ""
        else:
            pending += unit
    if pending:
        if merged:
            merged[-1] += pending
        else:
            merged.append(pending)
    return merged


def split_units(text: str) -> list[str]:
    """Sentence units of a document (paragraphs, then Punkt sentences); they join back to ``text``."""
    units = [u for p in split_paragraphs(text) for u in split_sentences(p)]
    return _merge_blank_units(units)


def text_seed(text: str, seed: int = DEFAULT_SEED) -> int:
    """Stable 32-bit seed from the text (MD5, not ``hash()``, which is salted per process)."""
    digest = hashlib.md5(text.encode("utf-8", "surrogatepass")).hexdigest()
    return (int(digest, 16) + seed) & 0xFFFFFFFF


def chunk_lengths(num_units: int, text: str, lam: float = DEFAULT_LAMBDA, max_units: int = DEFAULT_MAX_UNITS,
                  seed: int = DEFAULT_SEED) -> list[int]:
    """Units per chunk: ``min(1 + Poisson(lam), max_units, remaining)`` until the units run out."""
    if lam < 0 or max_units < 1:
        raise ValueError(f"need lam >= 0 and max_units >= 1, got lam={lam}, max_units={max_units}")
    if lam == 0:
        return [1] * num_units
    rng = np.random.default_rng(text_seed(text, seed))
    lengths, remaining = [], num_units
    while remaining > 0:
        n = min(1 + int(rng.poisson(lam)), max_units, remaining)
        lengths.append(n)
        remaining -= n
    return lengths


def chunk_text(text: str, lam: float = DEFAULT_LAMBDA, max_units: int = DEFAULT_MAX_UNITS,
               seed: int = DEFAULT_SEED) -> list[str]:
    """Chunks of a document; ``"".join(chunk_text(text)) == text`` always, and ``[]`` for ``""``."""
    units = split_units(text)
    chunks, start = [], 0
    for n in chunk_lengths(len(units), text, lam, max_units, seed):
        chunks.append("".join(units[start : start + n]))
        start += n
    return chunks
