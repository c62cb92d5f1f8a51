"""Prompt construction byte for byte (token ids and text) against the formats of bolt-method.md."""

from __future__ import annotations

import json

import pytest

from megatron_bolt.data.embedded import generate_embedded
from megatron_bolt.data.tokenizer import BoltTokenizer
from megatron_bolt.eval import demos
from megatron_bolt.eval.prompts import Completion, Demo, build_prompt, load_demos, read_completion, sampling_params
from megatron_bolt.eval.tasks import EvalDataError

SOL, EOL, PRIOR = "<|START_OF_LATENT|>", "<|END_OF_LATENT|>", "<|PRIOR_PREFIX|>"
DEMOS = [Demo("What is $1+1$?", "One plus one is two.", "2"), Demo("Halve {8}.", "8 / 2 = 4.", "4")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = generate_embedded(tmp_path_factory.mktemp("embedded"), num_docs=20, num_eval=4)
    return BoltTokenizer.from_pretrained(corpus.tokenizer)


def expected_ids(tok, parts):
    """Independent assembly: text pieces encoded one by one, special tokens by id."""
    ids = []
    for part in parts:
        ids += tok.encode(part) if isinstance(part, str) else [part]
    return ids


def check(tok, prompt, text, parts):
    assert prompt.text == text
    assert prompt.token_ids == expected_ids(tok, parts)
    # transformers' own encoding of the text (special tokens recognised) gives the same ids
    assert prompt.token_ids == tok.hf(text, add_special_tokens=False)["input_ids"]


def test_math_latent_prompt(tok):
    i = tok.ids
    prompt = build_prompt("math", "Find $x$ if $2x=6$.", DEMOS, True, tok)
    text = ("<s>Problem:\nWhat is $1+1$?\n" + SOL + PRIOR + "One plus one is two." + EOL + "Final Answer: 2\n\n"
            "Problem:\nHalve {8}.\n" + SOL + PRIOR + "8 / 2 = 4." + EOL + "Final Answer: 4\n\n"
            "Problem:\nFind $x$ if $2x=6$.\n" + SOL + PRIOR)
    parts = [i.bos, "Problem:\nWhat is $1+1$?\n", i.sol, i.prior, "One plus one is two.", i.eol,
             "Final Answer: 2\n\nProblem:\nHalve {8}.\n", i.sol, i.prior, "8 / 2 = 4.", i.eol,
             "Final Answer: 4\n\nProblem:\nFind $x$ if $2x=6$.\n", i.sol, i.prior]
    check(tok, prompt, text, parts)


def test_math_raw_prompt(tok):
    prompt = build_prompt("math", "Find $x$.", DEMOS[:1], False, tok)
    text = "<s>Problem:\nWhat is $1+1$?\nFinal Answer: 2\n\nProblem:\nFind $x$.\n"
    check(tok, prompt, text, [tok.ids.bos, text[3:]])


def test_gsm8k_latent_prompt(tok):
    i = tok.ids
    prompt = build_prompt("gsm8k", "Tom has 3 pens.", DEMOS[:1], True, tok)
    text = ("<s>Question: What is $1+1$?\n\nFinal Answer:" + SOL + PRIOR + "One plus one is two." + EOL
            + "Final Answer: 2\n\nQuestion: Tom has 3 pens.\n\nFinal Answer:" + SOL + PRIOR)
    parts = [i.bos, "Question: What is $1+1$?\n\nFinal Answer:", i.sol, i.prior, "One plus one is two.", i.eol,
             "Final Answer: 2\n\nQuestion: Tom has 3 pens.\n\nFinal Answer:", i.sol, i.prior]
    check(tok, prompt, text, parts)


def test_gsm8k_raw_prompt(tok):
    prompt = build_prompt("gsm8k", "Tom has 3 pens.", DEMOS[:1], False, tok)
    text = "<s>Question: What is $1+1$?\n\nFinal Answer: 2\n\nQuestion: Tom has 3 pens.\n\nFinal Answer:"
    check(tok, prompt, text, [tok.ids.bos, text[3:]])


def test_embedded_prompts_are_zero_shot(tok):
    q = "Q: 037*004+012=?\n\n"
    check(tok, build_prompt("embedded", q, [], True, tok), "<s>" + q + SOL + PRIOR,
          [tok.ids.bos, q, tok.ids.sol, tok.ids.prior])
    check(tok, build_prompt("embedded", q, [], False, tok), "<s>" + q, [tok.ids.bos, q])


def test_special_token_strings_in_a_problem_stay_text(tok):
    prompt = build_prompt("math", f"Is {EOL} a token?", [], True, tok)
    assert prompt.token_ids.count(tok.ids.eol) == 0
    assert prompt.token_ids[-2:] == [tok.ids.sol, tok.ids.prior]
    assert f"Is {EOL} a token?" in prompt.text


def test_bundled_and_file_demonstrations(tok, tmp_path):
    math = load_demos("math", None, None)
    assert len(math) == 4 and math[0].problem == demos.MATH[0]["problem"]
    assert len(load_demos("gsm8k", None, None)) == 8
    assert load_demos("embedded", None, None) == []
    path = tmp_path / "shots.jsonl"
    path.write_text("\n".join(json.dumps({"problem": d.problem, "latent": d.latent, "answer": d.answer})
                              for d in DEMOS) + "\n")
    assert load_demos("math", str(path), 2) == DEMOS
    with pytest.raises(EvalDataError, match="holds only 2 demonstrations"):
        load_demos("math", str(path), 3)
    path.write_text(json.dumps([{"question": "q", "answer": "1"}]))
    with pytest.raises(EvalDataError, match=r"lacks string field\(s\) \['problem', 'latent'\]"):
        load_demos("gsm8k", str(path), 1)


def test_sampling_params_are_greedy_with_the_task_stops(tok):
    i = tok.ids
    latent = sampling_params("math", tok, True, 64)
    assert (latent.temperature, latent.max_tokens, latent.n) == (0.0, 64, 1)
    assert latent.stop_token_ids == (i.sol, i.eos) and latent.stop_strings == ("Problem:",)
    assert latent.banned_token_ids == ()
    raw = sampling_params("gsm8k", tok, False, 8)
    assert set(raw.banned_token_ids) == {i.sol, i.eol, i.prior, i.posterior}
    assert raw.stop_strings == ("Question:",)


def test_read_completion_splits_latent_and_answer(tok):
    i = tok.ids
    ids = tok.encode("037*004=148") + [i.eol] + tok.encode("A: 160.\n\nQ: 001")
    assert read_completion("embedded", ids, tok, True) == Completion("037*004=148", "A: 160.\n\n")
    assert read_completion("embedded", ids[:3] + [i.sol], tok, True) == Completion("037", None)  # never closed
    raw = tok.encode("Final Answer: 4\n\nProblem:") + [i.eos]
    assert read_completion("math", raw, tok, False) == Completion(None, "Final Answer: 4\n\n")
