"""TensorRT-LLM and vLLM backends: output conversion everywhere, real engines where they import (GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_bolt.sample.interfaces import BackendOptions, Request, SamplingParams, load_backend
from megatron_bolt.sample.trtllm import to_generation
from tests.conftest import random_llama


def _out(tokens, logprobs, reason):
    return SimpleNamespace(token_ids=tokens, logprobs=logprobs, finish_reason=reason)


def test_conversion_reads_the_sampled_tokens_logprob():
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    gen = to_generation(_out([5, 9, 4], [{5: lp(-0.5), 2: lp(-0.1)}, {9: lp(-1.0)}, {4: -2.0}], "stop"), {4})
    assert gen.token_ids == [5, 9, 4] and gen.logprobs == [-0.5, -1.0, -2.0] and gen.finish_reason == "stop"
    assert to_generation(_out([5, 6], [-0.5, -0.25], "length"), {4}).logprob_sum == -0.75


def test_conversion_refuses_a_q_missing_terms():
    with pytest.raises(RuntimeError, match="without returning the stop token"):
        to_generation(_out([5, 9], [-0.5, -1.0], "stop"), {4})
    with pytest.raises(RuntimeError, match="2 log-probabilities for 3 tokens"):
        to_generation(_out([5, 9, 4], [-0.5, -1.0], "stop"), {4})
    assert to_generation(_out([5, 9], [-0.5, -1.0], "stop"), {4}, stop_strings=True).finish_reason == "stop"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    random_llama(vocab=64, seed=2, max_positions=128).save_pretrained(out)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("name", [pytest.param("trtllm", marks=pytest.mark.trtllm),
                                  pytest.param("vllm", marks=pytest.mark.vllm)])
def test_engine_logprobs_match_transformers(name, hf_dir):
    """Raw T = 1 log-probs of the sampled tokens equal transformers' teacher-forced log-softmax (bf16 level)."""
    backend = load_backend(name, str(hf_dir), BackendOptions(dtype="float32"))
    try:
        prompts = [[1, 5, 9, 2], [3], [7] * 9]
        out = backend.generate([Request(p, seed=i) for i, p in enumerate(prompts)],
                               SamplingParams(n=2, max_tokens=16, stop_token_ids=(0,)))
    finally:
        backend.close()
    model = random_llama(vocab=64, seed=2, max_positions=128)
    for prompt, gens in zip(prompts, out, strict=True):
        for g in gens:
            assert len(g.token_ids) == len(g.logprobs) and g.finish_reason in ("stop", "length")
            ids = torch.tensor([prompt + g.token_ids])
            with torch.no_grad():
                ref = torch.log_softmax(model(ids).logits[0].float(), -1)
            expect = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(g.token_ids)]
            assert g.logprobs == pytest.approx(expect, abs=2e-2)
