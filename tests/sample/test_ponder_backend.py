"""The ``ponder`` backend: exact KV-cache sampling from a latent-thought checkpoint.

References are independent of the cache: the model's parallel Jacobi forward run with J at the exactness
bound (K * (L - 1) passes for L tokens), which tests/models/test_ponder.py checks against the sequential
recurrence.
"""

from __future__ import annotations

import pytest
import torch

from megatron_bolt.sample.interfaces import BackendOptions, Request, SamplingParams, load_backend

VOCAB = 50
THOUGHTS = 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megatron_bolt.checkpoint import dist as ckpt
    from megatron_bolt.config import BoltConfig
    from megatron_bolt.config.loader import dump_yaml
    from megatron_bolt.config.schema import ModelConfig
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed

    root = tmp_path_factory.mktemp("ponder_ckpt")
    cfg = BoltConfig()
    cfg.model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, vocab_size=VOCAB, make_vocab_size_divisible_by=16,
                            max_position_embeddings=24, latent_thoughts_per_token=THOUGHTS)
    cfg.data.seq_length = 16
    cfg.train.precision = "fp32"
    with distributed(cfg, seed=7):
        ckpt.save_model(root, 1, build_model(cfg))
    (root / "config.yaml").write_text(dump_yaml(cfg))
    return str(root)


@pytest.fixture
def open_backend(checkpoint):
    """Opens the checkpoint through the registry; a backend owns the parallel state, so one at a time."""
    opened = []

    def make(**extra):
        if opened:
            opened.pop().close()
        opened.append(load_backend("ponder", checkpoint, BackendOptions(extra=extra)))
        return opened[-1]

    yield make
    if opened:
        opened.pop().close()


def exact_logprobs(backend, prompt: list[int], generated: list[int]) -> list[float]:
    """log p of each generated token, from the Jacobi forward with enough passes to be exact."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = backend.model(ids[:, :-1], jacobi_iters=THOUGHTS * ids.shape[1])
    logp = torch.log_softmax(logits[0, :, :VOCAB], dim=-1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(generated)]


def test_greedy_and_sampled_logprobs_are_the_exact_model(open_backend):
    backend = open_backend(prefill="exact")
    prompt = [1, 5, 9, 2]
    [[greedy]] = backend.generate([Request(prompt)], SamplingParams(max_tokens=8, temperature=0))
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 8
    ref = exact_logprobs(backend, prompt, greedy.token_ids)
    assert greedy.logprobs == pytest.approx(ref, abs=1e-5)
    ids = torch.tensor([prompt + greedy.token_ids])
    with torch.no_grad():
        logits = backend.model(ids[:, :-1], jacobi_iters=THOUGHTS * ids.shape[1])[0, len(prompt) - 1:, :VOCAB]
    assert logits.argmax(-1).tolist() == greedy.token_ids

    [samples] = backend.generate([Request(prompt, seed=3)], SamplingParams(n=3, max_tokens=10))
    assert len({tuple(g.token_ids) for g in samples}) > 1
    for g in samples:
        assert g.logprobs == pytest.approx(exact_logprobs(backend, prompt, g.token_ids), abs=1e-5)


def test_samples_depend_only_on_prompt_and_seed(open_backend):
    backend = open_backend()
    params = SamplingParams(n=2, max_tokens=6)
    alone = backend.generate([Request([3, 4, 5], seed=11)], params)[0]
    crowd = backend.generate([Request([9] * 7, seed=1), Request([3, 4, 5], seed=11)], params)[1]
    assert [g.token_ids for g in alone] == [g.token_ids for g in crowd]
    other = backend.generate([Request([3, 4, 5], seed=12)], params)[0]
    assert [g.token_ids for g in other] != [g.token_ids for g in alone]


def test_stops_bans_and_the_position_limit(open_backend):
    backend = open_backend(prefill="exact")
    prompt = [7, 8]
    [[greedy]] = backend.generate([Request(prompt)], SamplingParams(max_tokens=6, temperature=0))
    stop = greedy.token_ids[2]
    first = greedy.token_ids.index(stop)
    [[stopped]] = backend.generate([Request(prompt)], SamplingParams(max_tokens=6, temperature=0,
                                                                     stop_token_ids=(stop,)))
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy.token_ids[: first + 1]
    banned = tuple(range(0, VOCAB, 2))
    [gens] = backend.generate([Request(prompt, seed=1)], SamplingParams(n=4, max_tokens=8, banned_token_ids=banned))
    assert all(t % 2 for g in gens for t in g.token_ids)
    # 24 positions: a 20-token prompt leaves room to feed 4 generated tokens, the 5th cannot be extended
    [[long]] = backend.generate([Request(list(range(20)))], SamplingParams(max_tokens=10, temperature=0))
    assert long.finish_reason == "length" and len(long.token_ids) == 5


def test_jacobi_prefill_is_exact_at_the_bound_and_approximate_below(open_backend):
    prompt = [1, 2, 3, 4, 5, 6]
    params = SamplingParams(n=2, max_tokens=5)
    exact = open_backend(prefill="exact").generate([Request(prompt, seed=2)], params)[0]
    bound = THOUGHTS * (len(prompt) - 1)
    for iterations in (bound, 0):
        backend = open_backend(prefill="jacobi", jacobi_iters=iterations)
        jacobi = backend.generate([Request(prompt, seed=2)], params)[0]
        first = [g.logprobs[0] for g in jacobi]
        if iterations == bound:
            assert [g.token_ids for g in jacobi] == [g.token_ids for g in exact]
            for g, e in zip(jacobi, exact, strict=True):
                assert g.logprobs == pytest.approx(e.logprobs, abs=1e-5)
        else:
            assert max(abs(a - e.logprobs[0]) for a, e in zip(first, exact, strict=True)) > 1e-4
