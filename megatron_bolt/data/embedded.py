"""The embedded corpus: arithmetic documents whose latent thoughts matter, generated offline.

It stands in for FineMath + GPT-4o-mini on machines without data or API access (quickstart, tests, CPU
benchmarks). A document is a short sequence of two-step problems; each states its result without the
working, which is exactly the gap latent thoughts fill:

    Q: 037*004+012=?

    A: 160.

Each question and each answer is its own paragraph, so with one sentence unit per chunk (``lam = 0``) the
question is chunk 2k and its answer chunk 2k+1. The programmatic teacher writes the working for answer
chunks only (``037*004=148 148+012=160``); a latent precedes its chunk and can only use the prefix, so it
must come after the question (toy-evidence.md). Numbers are zero-padded to three digits so a character-level
model sees aligned digits. A fixed tenth of the problem space (chosen by hash) never appears in training
documents; the evaluation set is drawn from it, so evaluation measures generalisation, not recall.

``generate_embedded`` writes, under ``out_dir``: ``corpus.jsonl`` ({"text"}; the input of ``bolt prepare``
with ``prepare.chunk_lambda=0``), ``latents.jsonl`` ({"doc_id", "chunk_index", "latent"}; doc_id is the
line number, which is prepare's record index), ``eval.jsonl`` ({"question", "answer", "latent",
"template"}), ``tokenizer/`` (a small byte-level BPE with the latent tokens) and ``manifest.json`` (last).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from megatron_bolt.utils.atomic import atomic_open

HELD_OUT_EVERY = 10  # one problem in ten is reserved for evaluation
TEMPLATES = ("mul_add", "mul_sub", "add_mul")
TOKENIZER_SAMPLE_DOCS = 2000


@dataclass(frozen=True)
class Problem:
    """A two-step arithmetic problem: a*b+c, a*b-c or (a+b)*c."""

    template: str
    a: int
    b: int
    c: int

    def _steps(self) -> tuple[str, int, int]:
        """(first operation, its result, final result)."""
        if self.template == "add_mul":
            first = self.a + self.b
            return f"{self.a:03d}+{self.b:03d}", first, first * self.c
        first = self.a * self.b
        final = first + self.c if self.template == "mul_add" else first - self.c
        return f"{self.a:03d}*{self.b:03d}", first, final

    @property
    def expression(self) -> str:
        if self.template == "add_mul":
            return f"({self.a:03d}+{self.b:03d})*{self.c:03d}"
        op = "+" if self.template == "mul_add" else "-"
        return f"{self.a:03d}*{self.b:03d}{op}{self.c:03d}"

    @property
    def answer(self) -> int:
        return self._steps()[2]

    @property
    def latent(self) -> str:
        """The teacher's working: each step with its result."""
        first, value, final = self._steps()
        second = {"mul_add": "+", "mul_sub": "-", "add_mul": "*"}[self.template]
        return f"{first}={value:03d} {value:03d}{second}{self.c:03d}={final:03d}"

    @property
    def question(self) -> str:
        return f"Q: {self.expression}=?"

    @property
    def answer_text(self) -> str:
        return f"A: {self.answer:03d}."

    def is_held_out(self) -> bool:
        key = f"{self.template}:{self.a}:{self.b}:{self.c}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big") % HELD_OUT_EVERY == 0


def random_problem(rng: random.Random, templates: tuple[str, ...] = TEMPLATES) -> Problem:
    template = rng.choice(templates)
    if template == "add_mul":
        return Problem(template, rng.randint(10, 49), rng.randint(10, 49), rng.randint(2, 9))
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    c = rng.randint(10, 99) if template == "mul_add" else rng.randint(10, min(99, a * b))
    return Problem(template, a, b, c)


def training_problems(rng: random.Random, templates: tuple[str, ...] = TEMPLATES) -> Iterator[Problem]:
    """An endless stream of problems outside the held-out set."""
    while True:
        problem = random_problem(rng, templates)
        if not problem.is_held_out():
            yield problem


@dataclass
class EmbeddedDoc:
    """One document: its text, and the teacher latent of each answer chunk (by chunk index)."""

    text: str
    latents: dict[int, str] = field(default_factory=dict)


def make_document(problems: list[Problem]) -> EmbeddedDoc:
    units, latents = [], {}
    for problem in problems:
        units.append(problem.question)
        latents[len(units)] = problem.latent
        units.append(problem.answer_text)
    return EmbeddedDoc("\n\n".join(units), latents)


def _distinct(problems: Iterator[Problem], count: int) -> list[Problem]:
    """The first ``count`` distinct problems of the stream (the problem space holds about 120k)."""
    seen: dict[Problem, None] = {}
    for problem in islice(problems, 50 * count):
        seen.setdefault(problem, None)
        if len(seen) == count:
            return list(seen)
    raise ValueError(f"could not draw {count} distinct problems: the problem space is too small")


def _check_templates(templates: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [t for t in templates if t not in TEMPLATES]
    if not templates or unknown:
        raise ValueError(f"templates must be a non-empty subset of {TEMPLATES}, got {templates}")
    return tuple(templates)


def iter_documents(num_docs: int, seed: int = 0, min_problems: int = 2, max_problems: int = 4,
                   pool_size: int | None = None, templates: tuple[str, ...] = TEMPLATES) -> Iterator[EmbeddedDoc]:
    """``num_docs`` documents, deterministic in ``seed``; ``pool_size`` limits the distinct problems
    (a data-constrained corpus where each problem recurs, as in the toy study's 3,000); ``templates``
    limits the problem kinds (the toy study used ``mul_add`` alone)."""
    templates = _check_templates(templates)
    if not 1 <= min_problems <= max_problems:
        raise ValueError(f"need 1 <= min_problems <= max_problems, got {min_problems}, {max_problems}")
    if pool_size is not None and pool_size < 1:
        raise ValueError(f"pool_size={pool_size} must be at least 1")
    rng = random.Random(seed)
    source = training_problems(random.Random(f"embedded-train/{seed}"), templates)
    pool = _distinct(source, pool_size) if pool_size is not None else None
    for _ in range(num_docs):
        n = rng.randint(min_problems, max_problems)
        yield make_document([rng.choice(pool) for _ in range(n)] if pool else list(islice(source, n)))


def eval_problems(num: int, seed: int = 0, templates: tuple[str, ...] = TEMPLATES) -> list[Problem]:
    """``num`` distinct held-out problems (never in any training document)."""
    rng = random.Random(f"embedded-eval/{seed}")
    templates = _check_templates(templates)
    held_out = (p for p in iter(lambda: random_problem(rng, templates), None) if p.is_held_out())
    return _distinct(held_out, num) if num else []


_ANSWER = re.compile(r"A:\s*(-?\d+)")
_NUMBER = re.compile(r"-?\d+")


def extract_answer(completion: str) -> int | None:
    """The number after the first ``A:``, else the first number; None when there is none."""
    match = _ANSWER.search(completion)
    if match:
        return int(match.group(1))
    match = _NUMBER.search(completion)
    return int(match.group(0)) if match else None


def check_answer(completion: str, answer: str | int) -> bool:
    return extract_answer(completion) == int(answer)


def load_eval(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class EmbeddedCorpus:
    """Paths and sizes of a generated embedded corpus."""

    root: Path
    corpus: Path
    latents: Path
    eval: Path
    tokenizer: Path
    num_docs: int
    num_chunks: int
    num_latents: int
    num_eval: int


def _write_line(f, obj: dict[str, Any]) -> None:
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def generate_embedded(out_dir: str | Path, num_docs: int, seed: int = 0, num_eval: int = 200,
                      min_problems: int = 2, max_problems: int = 4, pool_size: int | None = None,
                      vocab_size: int = 300, templates: tuple[str, ...] = TEMPLATES) -> EmbeddedCorpus:
    """Write the corpus, teacher latents, eval set and tokenizer (see the module docstring)."""
    from megatron_bolt.data.tokenizer import train_embedded_tokenizer

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    templates = _check_templates(tuple(templates))
    docs_args = (num_docs, seed, min_problems, max_problems, pool_size, templates)
    chunks = latents = 0
    with atomic_open(root / "corpus.jsonl") as corpus, atomic_open(root / "latents.jsonl") as teacher:
        for doc_id, doc in enumerate(iter_documents(*docs_args)):
            _write_line(corpus, {"text": doc.text})
            chunks += 2 * len(doc.latents)
            for chunk_index, latent in doc.latents.items():
                _write_line(teacher, {"doc_id": doc_id, "chunk_index": chunk_index, "latent": latent})
                latents += 1
    with atomic_open(root / "eval.jsonl") as held_out:
        for p in eval_problems(num_eval, seed, templates):
            _write_line(held_out, {"question": p.question + "\n\n", "answer": f"{p.answer:03d}",
                                   "latent": p.latent, "template": p.template})
    sample = islice(iter_documents(*docs_args), TOKENIZER_SAMPLE_DOCS)
    train_embedded_tokenizer((t for d in sample for t in (d.text, *d.latents.values())), root / "tokenizer",
                             vocab_size)
    result = EmbeddedCorpus(root, root / "corpus.jsonl", root / "latents.jsonl", root / "eval.jsonl",
                            root / "tokenizer", num_docs, chunks, latents, num_eval)
    manifest = {"seed": seed, "num_docs": num_docs, "num_chunks": chunks, "num_latents": latents,
                "num_eval": num_eval, "min_problems": min_problems, "max_problems": max_problems,
                "pool_size": pool_size, "vocab_size": vocab_size, "templates": list(templates), "chunk_lambda": 0}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return result
