"""The embedded corpus: correct teacher latents, chunk alignment, held-out evaluation, answer checking."""

from __future__ import annotations

import json
import re

import pytest

from megatron_bolt.data.chunking import chunk_text
from megatron_bolt.data.embedded import (
    Problem,
    check_answer,
    eval_problems,
    extract_answer,
    generate_embedded,
    iter_documents,
    load_eval,
)

STEP = re.compile(r"(\d{3})([+*-])(\d{3})=(\d{3})")
OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate_embedded(tmp_path_factory.mktemp("embedded"), num_docs=300, seed=7, num_eval=50)


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def check_latent(question: str, latent: str, answer_chunk: str) -> None:
    """Every step's arithmetic holds, steps chain, operands come from the question, result is the answer."""
    steps = [STEP.fullmatch(s) for s in latent.split(" ")]
    assert len(steps) == 2 and all(steps), latent
    for m in steps:
        assert OPS[m[2]](int(m[1]), int(m[3])) == int(m[4]), latent
    assert steps[0][4] == steps[1][1]
    operands = re.findall(r"\d{3}", question)
    assert sorted(operands) == sorted([steps[0][1], steps[0][3], steps[1][3]])
    assert int(steps[1][4]) == extract_answer(answer_chunk)


def test_teacher_latents_are_correct_and_sit_on_the_answer_chunk_after_its_question(generated):
    docs = [chunk_text(d["text"], lam=0) for d in lines(generated.corpus)]
    latents = lines(generated.latents)
    assert len(docs) == 300 and len(latents) == generated.num_latents > 600
    for entry in latents:
        chunks, k = docs[entry["doc_id"]], entry["chunk_index"]
        assert k % 2 == 1 and chunks[k].startswith("A: ") and chunks[k - 1].startswith("Q: ")
        check_latent(chunks[k - 1], entry["latent"], chunks[k])
    assert sum(map(len, docs)) == generated.num_chunks == 2 * len(latents)


def test_every_template_produces_correct_working():
    problems = [Problem("mul_add", 37, 4, 12), Problem("mul_sub", 37, 4, 12), Problem("add_mul", 37, 12, 4)]
    for problem in problems:
        check_latent(problem.question, problem.latent, problem.answer_text)
    assert Problem("mul_add", 37, 4, 12).latent == "037*004=148 148+012=160"
    assert Problem("add_mul", 37, 12, 4).question == "Q: (037+012)*004=?"
    assert Problem("mul_sub", 10, 2, 20).answer_text == "A: 000."


def test_generation_is_deterministic_in_the_seed(tmp_path):
    a = generate_embedded(tmp_path / "a", num_docs=40, seed=3, num_eval=10)
    b = generate_embedded(tmp_path / "b", num_docs=40, seed=3, num_eval=10)
    c = generate_embedded(tmp_path / "c", num_docs=40, seed=4, num_eval=10)
    for name in ("corpus", "latents", "eval"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes()
        assert getattr(a, name).read_bytes() != getattr(c, name).read_bytes()
    assert (a.tokenizer / "tokenizer.json").read_bytes() == (b.tokenizer / "tokenizer.json").read_bytes()


def test_evaluation_problems_never_appear_in_training_documents(generated):
    held_out = load_eval(generated.eval)
    assert len(held_out) == 50 == len({e["question"] for e in held_out})
    corpus_text = "".join(d["text"] for d in lines(generated.corpus))
    big_corpus = "".join(d.text for d in iter_documents(3000, seed=7))
    for entry in held_out:
        question = entry["question"].strip()
        assert question not in corpus_text and question not in big_corpus
        assert check_answer(f"A: {entry['answer']}.", entry["answer"])
    assert all(p.is_held_out() for p in eval_problems(50, seed=7))


def test_pool_size_limits_the_distinct_problems():
    docs = list(iter_documents(200, seed=1, pool_size=5))
    questions = {line for d in docs for line in d.text.split("\n\n") if line.startswith("Q:")}
    assert len(questions) == 5
    with pytest.raises(ValueError):
        next(iter_documents(1, pool_size=0))


def test_templates_restrict_the_problem_kinds_of_documents_and_evaluation(tmp_path):
    corpus = generate_embedded(tmp_path / "c", num_docs=60, seed=2, num_eval=20, min_problems=1, max_problems=1,
                               templates=("mul_sub",))
    docs = lines(corpus.corpus)
    assert len(docs) == 60 and all(len(chunk_text(d["text"], lam=0)) == 2 for d in docs)
    assert all(re.fullmatch(r"Q: \d{3}\*\d{3}-\d{3}=\?", d["text"].split("\n\n")[0]) for d in docs)
    assert {e["template"] for e in load_eval(corpus.eval)} == {"mul_sub"}
    assert json.loads((corpus.root / "manifest.json").read_text())["templates"] == ["mul_sub"]
    # The default keeps every template and the same stream as before the option existed.
    assert [d.text for d in iter_documents(5, seed=1)] == [
        d.text for d in iter_documents(5, seed=1, templates=("mul_add", "mul_sub", "add_mul"))]
    for bad in ((), ("div",)):
        with pytest.raises(ValueError, match="templates"):
            next(iter_documents(1, templates=bad))


@pytest.mark.parametrize(("completion", "answer", "ok"), [
    ("A: 160.", "160", True),
    ("A: 036.", "36", True),
    ("A: 161.", "160", False),
    ("037*004=148 148+012=160 A: 150.", "160", False),  # the stated answer counts, not the working
    ("the result is 160", 160, True),
    ("no number at all", "160", False),
    ("", "0", False),
    ("A: -12", "-12", True),
])
def test_check_answer(completion, answer, ok):
    assert check_answer(completion, answer) is ok
