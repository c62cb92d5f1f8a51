"""The eval runner: accuracy bookkeeping with a scripted backend, then end to end with a tiny random HF Llama."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from conftest import random_llama

from megatron_bolt import cli
from megatron_bolt.config.schema import ConfigError, EvalConfig
from megatron_bolt.data.embedded import generate_embedded, load_eval
from megatron_bolt.data.tokenizer import BoltTokenizer
from megatron_bolt.eval import runner
from megatron_bolt.eval.prompts import build_prompt
from megatron_bolt.eval.runner import evaluate, resolve_model, wilson_interval
from megatron_bolt.eval.tasks import EvalDataError
from megatron_bolt.report import render_report
from megatron_bolt.sample.interfaces import Generation


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_embedded(tmp_path_factory.mktemp("embedded"), num_docs=40, num_eval=10)


@pytest.fixture(scope="module")
def tok(corpus):
    return BoltTokenizer.from_pretrained(corpus.tokenizer)


def true_answer(question: str) -> int:
    expr = re.sub(r"\b0+(\d)", r"\1", question.split("Q: ")[1].split("=?")[0])
    return eval(expr)  # noqa: S307 - our own arithmetic strings


class ScriptedBackend:
    """Deterministic stand-in for a generation backend: the behaviour for each question is set by the test."""

    name = "scripted"

    def __init__(self, tok: BoltTokenizer, modes: dict[str, str]):
        self.tok, self.modes, self.calls, self.closed = tok, modes, [], False

    def generate(self, requests, params):
        self.calls.append((len(requests), params))
        out = []
        for request in requests:
            question = self.tok.decode(request.prompt_token_ids[1:]).split("<|")[0]
            value, enc, i = true_answer(question), self.tok.encode, self.tok.ids
            latent = enc("working") + [i.eol]
            ids, reason = {
                "right": (latent + enc(f"A: {value:03d}.\n\nQ:"), "stop"),
                "wrong": (latent + enc(f"A: {value + 1:03d}.") + [i.sol], "stop"),
                "unfinished": (enc("working and working"), "length"),
                "right_eos": (latent + enc(f"A: {value:03d}.") + [i.eos], "stop"),
                "raw": (enc(f"A: {value:03d}.\n\n"), "length"),
            }[self.modes[question]]
            out.append([Generation(ids, [0.0] * len(ids), reason)])
        return out

    def close(self):
        self.closed = True


def test_wilson_interval_known_values():
    for (correct, n), (low, high) in {(5, 10): (0.2366, 0.7634), (0, 10): (0.0, 0.2775),
                                      (10, 10): (0.7225, 1.0), (81, 263): (0.2553, 0.3662)}.items():
        assert wilson_interval(correct, n) == pytest.approx((low, high), abs=1e-4)


def test_accuracy_bookkeeping_and_per_problem_outputs(corpus, tok, tmp_path):
    questions = [e["question"] for e in load_eval(corpus.eval)]
    cycle = ["right", "wrong", "unfinished", "right_eos"]
    modes = {q: cycle[k % 4] for k, q in enumerate(questions)}
    backend = ScriptedBackend(tok, modes)
    cfg = EvalConfig(data_path=str(corpus.eval), batch_size=3, max_new_tokens=20)
    summary = evaluate(cfg, corpus.tokenizer, tmp_path / "out", backend=backend)

    assert [n for n, _ in backend.calls] == [3, 3, 3, 1] and not backend.closed  # the caller owns it
    params = backend.calls[0][1]
    assert params.temperature == 0 and params.max_tokens == 20 and params.stop_strings == ("Q:",)
    assert summary["accuracy"] == {"value": 0.5, "ci_low": pytest.approx(0.2366, abs=1e-4),
                                   "ci_high": pytest.approx(0.7634, abs=1e-4), "n": 10, "task": "embedded"}
    assert (summary["correct"], summary["no_answer"]) == (5, 2)
    assert summary["finish_reasons"] == {"stop": 8, "length": 2}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary

    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in records] == questions
    for r in records:
        mode, value = modes[r["problem"]], true_answer(r["problem"])
        assert r["correct"] == (mode in ("right", "right_eos"))
        assert r["extracted"] == {"right": value, "right_eos": value, "wrong": value + 1, "unfinished": None}[mode]
        assert r["gold"] == f"{value:03d}"
        assert r["prompt"] == build_prompt("embedded", r["problem"], [], True, tok).text
        assert r["latent"] == ("working and working" if mode == "unfinished" else "working")
        assert r["completion"] == tok.decode(r["completion_token_ids"])
    assert records[0]["answer_text"] == f"A: {true_answer(questions[0]):03d}.\n\n"  # cut before the next "Q:"


def test_raw_models_read_the_answer_directly_with_latent_tokens_banned(corpus, tok, tmp_path):
    questions = [e["question"] for e in load_eval(corpus.eval)]
    backend = ScriptedBackend(tok, dict.fromkeys(questions, "raw"))
    summary = evaluate(EvalConfig(data_path=str(corpus.eval), latent=False, limit=4), corpus.tokenizer,
                       tmp_path, backend=backend)
    assert summary["accuracy"]["value"] == 1.0 and summary["accuracy"]["n"] == 4
    i = tok.ids
    assert set(backend.calls[0][1].banned_token_ids) == {i.sol, i.eol, i.prior, i.posterior}


class CannedBackend:
    """Returns the given completions in request order and keeps the prompts it saw."""

    name = "canned"

    def __init__(self, completions):
        self.completions, self.prompts = completions, []

    def generate(self, requests, params):
        self.prompts += [r.prompt_token_ids for r in requests]
        self.params = params
        return [[Generation(ids, [0.0] * len(ids), "stop")] for ids in self.completions[:len(requests)]]

    def close(self):
        pass


def test_gsm8k_few_shot_end_to_end_with_canned_completions(corpus, tok, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "Ann has 2 cats and gets 3 more. How many?", "answer": "#### 5"}) + "\n"
                    + json.dumps({"question": "What is 10 times 100?", "answer": "#### 1,000"}) + "\n")
    i = tok.ids
    backend = CannedBackend([tok.encode("2 + 3 = 5.") + [i.eol] + tok.encode("Final Answer: 5\n\nQuestion:"),
                             tok.encode("10 * 100 = 1,000.") + [i.eol] + tok.encode("Final Answer: 100") + [i.eos]])
    summary = evaluate(EvalConfig(task="gsm8k", data_path=str(data), num_shots=3), corpus.tokenizer, tmp_path / "o",
                       backend=backend)
    assert summary["accuracy"]["value"] == 0.5 and summary["num_shots"] == 3
    assert backend.params.stop_strings == ("Question:",)
    assert all(p.count(i.eol) == 3 and p[-2:] == [i.sol, i.prior] for p in backend.prompts)
    records = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["extracted"], r["gold"], r["correct"]) for r in records] == [("5", "5", True), ("100", "1000", False)]
    assert records[0]["answer_text"] == "Final Answer: 5\n\n"


def test_generation_budget_fits_the_model_context(corpus, tok, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(corpus.tokenizer, model_dir)
    question = load_eval(corpus.eval)[0]["question"]
    prompt_len = len(build_prompt("embedded", question, [], True, tok).token_ids)
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": prompt_len + 3}))
    cfg = EvalConfig(data_path=str(corpus.eval), limit=1, max_new_tokens=50)
    backend = ScriptedBackend(tok, {question: "right"})
    evaluate(cfg, model_dir, tmp_path / "out", backend=backend)
    assert backend.calls[0][1].max_tokens == 3
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": prompt_len}))
    with pytest.raises(EvalDataError, match="fills the model's .*-token context"):
        evaluate(cfg, model_dir, tmp_path / "out", backend=backend)


def test_config_validation():
    with pytest.raises(ConfigError, match="zero-shot"):
        EvalConfig(task="embedded", num_shots=2)
    with pytest.raises(ConfigError, match="eval.batch_size=0"):
        EvalConfig(batch_size=0)


def test_a_checkpoint_is_exported_once_per_version(tmp_path, monkeypatch):
    from megatron_bolt.convert import hf_io

    step = tmp_path / "ckpt" / "step_00000005"
    step.mkdir(parents=True)
    exports = []

    def fake_export(src, out):
        exports.append(src)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(hf_io, "load_checkpoint_config", lambda p: (step, step.parent, None))
    monkeypatch.setattr(hf_io, "export_hf", fake_export)
    out = tmp_path / "evals" / "embedded"
    first = resolve_model(step.parent, out)
    assert resolve_model(step.parent, out) == first and exports == [step]
    assert first.parent == tmp_path / "evals" / "hf_cache" and first.name.startswith("ckpt-step_00000005-")
    shutil.rmtree(step)
    step.mkdir()  # the same step saved again: a new export
    assert resolve_model(step.parent, out) != first and len(exports) == 2
    assert resolve_model(first, out) == first  # an HF directory is used as it is


# ------------------------------------------------------------------------ end to end with transformers


@pytest.fixture(scope="module")
def hf_model(corpus, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    shutil.copytree(corpus.tokenizer, path, dirs_exist_ok=True)
    model = random_llama(tok.vocab_size, max_positions=64, bos_token_id=tok.ids.bos, eos_token_id=tok.ids.eos)
    model.save_pretrained(str(path))
    return path, model


def greedy(model, ids, steps, banned=()):
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            logits[list(banned)] = -math.inf
            out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("latent", [True, False])
def test_bolt_eval_with_the_hf_backend(corpus, tok, hf_model, tmp_path, latent):
    path, model = hf_model
    out = tmp_path / "eval"
    assert cli.main(["eval", "--ckpt", str(path), f"eval.data_path={corpus.eval}", f"eval.output_dir={out}",
                     "eval.limit=4", "eval.max_new_tokens=10", "eval.batch_size=3", f"eval.latent={latent}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    correct = sum(r["correct"] for r in records)
    assert len(records) == summary["accuracy"]["n"] == 4 and summary["correct"] == correct
    assert (summary["accuracy"]["ci_low"], summary["accuracy"]["ci_high"]) == pytest.approx(wilson_interval(correct, 4))
    i = tok.ids
    banned = () if latent else (i.sol, i.eol, i.prior, i.posterior)
    for r in records:
        prompt = build_prompt("embedded", r["problem"], [], latent, tok)
        ids = r["completion_token_ids"]
        assert ids == greedy(model, prompt.token_ids, len(ids), banned)  # batched + cached == plain greedy
        if r["finish_reason"] == "length":
            assert len(ids) == 10
        else:
            assert ids[-1] in (i.sol, i.eos) or "Q:" in tok.decode(ids)
        assert (r["answer_text"] is None) == (latent and i.eol not in ids)

    # the summary's accuracy is what an EM run's report.json records; the report renders from it
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"run": "tiny", "iterations": [
        {"iteration": 0, "accuracy": summary["accuracy"], "elbo": None, "ess_mean": None}]}))
    md = render_report([run], tmp_path / "report").read_text()
    acc = summary["accuracy"]
    assert f"{100 * acc['value']:.1f}% ({100 * acc['ci_low']:.1f}–{100 * acc['ci_high']:.1f})" in md
    assert (tmp_path / "report" / "accuracy.png").stat().st_size > 0


def test_perplexity_matches_the_models_own_loss(corpus, tok, hf_model, tmp_path):
    from megatron_bolt.eval.perplexity import text_perplexity

    path, model = hf_model
    short, long = "Q: 037*004+012=?\n\nA: 160.", "Q: 001*002+003=?\n\nA: 005.\n\n" * 6
    ids = torch.tensor([[tok.ids.bos, *tok.encode(short)]])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    result = text_perplexity(path, [short], device="cpu")
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result["tokens"] == ids.shape[1] - 1
    long_ids = [tok.ids.bos, *tok.encode(long)]
    assert len(long_ids) > 64  # longer than the context: every token still scored once
    assert text_perplexity(path, [long], device="cpu")["tokens"] == len(long_ids) - 1

    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"text": short}) + "\n")
    assert cli.main(["eval", "--ckpt", str(path), "eval.task=perplexity", f"eval.data_path={data}",
                     f"eval.output_dir={tmp_path / 'ppl'}"]) == 0
    summary = json.loads((tmp_path / "ppl" / runner.SUMMARY).read_text())
    assert summary["perplexity"] == pytest.approx(result["perplexity"])
