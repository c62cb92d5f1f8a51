"""The HF backend: raw log-probabilities, per-sequence determinism, stops, filters, exact sampling law."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_bolt.sample.interfaces import (
    BackendOptions,
    BackendUnavailable,
    Request,
    SamplingParams,
    backend_available,
    load_backend,
)
from tests.conftest import random_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    random_llama(vocab=40, seed=3).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def backend(hf_dir):
    return load_backend("hf", hf_dir, BackendOptions(device="cpu", max_batch_size=5))


def _teacher_forced(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def test_logprobs_are_raw_teacher_forced_values_with_ragged_prompts(backend):
    prompts = [[1, 5, 9], [2], [7, 7, 7, 7, 7, 3], [4, 11]]
    out = backend.generate([Request(p, seed=i) for i, p in enumerate(prompts)],
                           SamplingParams(n=3, max_tokens=12))
    assert [len(g) for g in out] == [3] * 4
    for prompt, gens in zip(prompts, out, strict=True):
        for g in gens:
            assert len(g.token_ids) == len(g.logprobs) == 12 and g.finish_reason == "length"
            ref = _teacher_forced(backend.model, prompt, g.token_ids)
            assert g.logprobs == pytest.approx(ref, abs=1e-4)


def test_samples_depend_only_on_prompt_and_seed(backend):
    params = SamplingParams(n=2, max_tokens=10)
    alone = backend.generate([Request([3, 4, 5], seed=11)], params)[0]
    crowd = backend.generate([Request([9] * 7, seed=1), Request([3, 4, 5], seed=11), Request([2], seed=5)], params)[1]
    assert [g.token_ids for g in alone] == [g.token_ids for g in crowd]
    assert alone[0].token_ids != alone[1].token_ids  # the n samples of one request differ
    other = backend.generate([Request([3, 4, 5], seed=12)], params)[0]
    assert other[0].token_ids != alone[0].token_ids


def test_stop_token_ends_a_sequence_and_is_included(backend):
    params = SamplingParams(n=8, max_tokens=30, stop_token_ids=(0, 1, 2, 3, 4, 5, 6, 7))
    gens = backend.generate([Request([10, 20], seed=0)], params)[0]
    stopped = [g for g in gens if g.finish_reason == "stop"]
    assert stopped, "with 8 of 40 tokens stopping, some of 8 samples stop within 30 tokens"
    for g in stopped:
        assert g.token_ids[-1] < 8 and all(t >= 8 for t in g.token_ids[:-1])
        assert len(g.logprobs) == len(g.token_ids)
    for g in gens:
        if g.finish_reason == "length":
            assert len(g.token_ids) == 30 and all(t >= 8 for t in g.token_ids)


def test_greedy_banned_and_topk(backend):
    greedy = backend.generate([Request([1, 2, 3])], SamplingParams(temperature=0, max_tokens=6))[0][0]
    ids, tokens = [1, 2, 3], []
    for _ in range(6):
        with torch.no_grad():
            nxt = int(backend.model(torch.tensor([ids])).logits[0, -1].argmax())
        tokens.append(nxt)
        ids.append(nxt)
    assert greedy.token_ids == tokens
    banned = tuple(set(tokens))
    other = backend.generate([Request([1, 2, 3])], SamplingParams(temperature=0, max_tokens=6,
                                                                  banned_token_ids=banned))[0][0]
    assert not set(other.token_ids) & set(banned)
    top2 = backend.generate([Request([1, 2, 3], seed=s) for s in range(6)],
                            SamplingParams(n=2, top_k=2, max_tokens=1))
    with torch.no_grad():
        best2 = set(backend.model(torch.tensor([[1, 2, 3]])).logits[0, -1].topk(2).indices.tolist())
    assert {g.token_ids[0] for gens in top2 for g in gens} <= best2


def test_sampling_frequencies_match_exact_enumeration(tmp_path):
    """With a 4-token vocabulary, q over all sequences of <= 2 tokens (token 0 stops) is enumerable exactly."""
    random_llama(vocab=4, seed=5, max_positions=16).save_pretrained(tmp_path)
    be = load_backend("hf", str(tmp_path), BackendOptions(device="cpu", max_batch_size=4000))
    prompt = [1, 2, 3]
    exact = {}
    with torch.no_grad():
        for length in (1, 2):
            for seq in itertools.product(range(4), repeat=length):
                if (length == 1 and seq[0] != 0) or (length == 2 and seq[0] == 0):
                    continue
                exact[seq] = math.exp(sum(_teacher_forced(be.model, prompt, list(seq))))
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-5)
    draws = be.generate([Request(prompt, seed=0)], SamplingParams(n=4000, max_tokens=2, stop_token_ids=(0,)))[0]
    counts: dict[tuple, int] = {}
    for g in draws:
        counts[tuple(g.token_ids)] = counts.get(tuple(g.token_ids), 0) + 1
        assert math.exp(g.logprob_sum) == pytest.approx(exact[tuple(g.token_ids)], rel=1e-4)
    tv = 0.5 * sum(abs(counts.get(s, 0) / 4000 - p) for s, p in exact.items())
    assert tv < 0.04, f"total variation {tv:.3f} between sampled and exact q"


def test_missing_backend_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorrt_llm" else real(name, *a))
    ok, why = backend_available("trtllm")
    assert not ok and "tensorrt_llm" in why and "pypi.nvidia.com" in why
    with pytest.raises(BackendUnavailable, match="pip install"):
        load_backend("trtllm", "/nonexistent")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        load_backend("llamacpp", "/nonexistent")


def test_bad_params_and_prompts_fail_clearly(backend):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        backend.generate([Request([1, 999])], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty prompt"):
        backend.generate([Request([])], SamplingParams(max_tokens=2))
