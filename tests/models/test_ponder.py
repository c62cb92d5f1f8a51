"""PonderLM-2 latent thoughts (models/ponder.py, models/ponder_cache.py) against a naive sequential reference.

The reference runs the recurrence one slot at a time, re-running the decoder over the whole prefix for every
slot (no Jacobi iteration, no KV cache): the ground truth both the parallel training forward and the cached
decoder must reproduce to fp32 tolerance.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from megatron_bolt.config import BoltConfig
from megatron_bolt.config.schema import ConfigError, ModelConfig

VOCAB = 61  # padded to 64: the padding columns must stay out of every distribution


def ponder_config(thoughts: int = 1, hidden: int = 32, **model) -> BoltConfig:
    cfg = BoltConfig()
    cfg.model = ModelConfig(num_layers=2, hidden_size=hidden, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=2 * hidden, vocab_size=VOCAB, make_vocab_size_divisible_by=16,
                            max_position_embeddings=32, latent_thoughts_per_token=thoughts, **model)
    cfg.data.seq_length = 16
    cfg.train.precision = "fp32"
    return cfg


@contextlib.contextmanager
def built(cfg: BoltConfig, seed: int = 0):
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed

    with distributed(cfg, seed=seed):
        [model] = build_model(cfg)
        yield model.eval()


def tokens(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def sequential_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """[b, L, VOCAB] next-token log-probs of the exact recurrence, one slot per decoder call."""
    emb = model.token_embeddings(ids)
    table = model.rotary_pos_emb(ids.shape[1])
    inputs, positions, finals = [], [], []
    for t in range(ids.shape[1]):
        x = emb[t]
        for _ in range(model.thoughts + 1):
            inputs.append(x)
            positions.append(t)
            x = model.decoder(hidden_states=torch.stack(inputs), attention_mask=None,
                              rotary_pos_emb=table[torch.tensor(positions)])[-1]
        finals.append(x)
    logits, _ = model.output_layer(torch.stack(finals))
    return torch.log_softmax(logits[..., :VOCAB].transpose(0, 1), dim=-1)


def jacobi_logprobs(model, ids: torch.Tensor, iterations: int) -> torch.Tensor:
    logits = model(ids, jacobi_iters=iterations)
    assert torch.isneginf(logits[..., VOCAB:]).all()
    return torch.log_softmax(logits[..., :VOCAB], dim=-1)


def test_jacobi_converges_to_the_sequential_recurrence():
    """K = 1: after J Jacobi passes the first J + 1 positions are exact (one more latent settles per pass),
    so J = L - 1 reproduces the whole sequence; J = 0 is visibly wrong everywhere after position 0."""
    length = 8
    with built(ponder_config(thoughts=1)) as model, torch.no_grad():
        ids = tokens(2, length)
        ref = sequential_logprobs(model, ids)
        errors = []
        for iterations in range(length):
            err = (jacobi_logprobs(model, ids, iterations) - ref).abs().amax(dim=(0, 2))
            errors.append(err.max().item())
            assert err[: iterations + 1].max() < 1e-5, (iterations, err)
            if iterations == 0:
                assert err[1:].min() > 1e-3, err
        assert errors[-1] < 1e-5
        assert errors[1] < errors[0] and errors[3] < errors[1], errors


def test_two_thoughts_jacobi_bound_and_cached_decoder_agree_with_the_reference():
    """K = 2: J = K * (L - 1) is exact; the KV-cache decoder is exact with any prefill."""
    from megatron_bolt.models.ponder_cache import PonderDecoder, SlotCache

    length = 6
    with built(ponder_config(thoughts=2)) as model, torch.no_grad():
        ids = tokens(2, length)
        ref = sequential_logprobs(model, ids)
        torch.testing.assert_close(jacobi_logprobs(model, ids, 2 * (length - 1)), ref, rtol=0, atol=1e-5)
        assert (jacobi_logprobs(model, ids, 0) - ref).abs().max() > 1e-3

        decoder = PonderDecoder(model)
        picked = ref[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(decoder.score(ids), picked, rtol=0, atol=1e-5)

        # Prefill the first 4 tokens exactly or by enough Jacobi passes, then decode the rest one by one.
        for prefill in ("exact", "jacobi"):
            cache = SlotCache(model)
            if prefill == "exact":
                hidden = decoder.prefill_exact(cache, ids[:, :4])
            else:
                hidden = decoder.prefill_jacobi(cache, ids[:, :4], iterations=2 * 3)
            assert cache.slots == 4 * 3
            torch.testing.assert_close(decoder.logprobs(hidden), ref[:, 3], rtol=0, atol=1e-5)
            hidden = decoder.step(cache, ids[:, 4], 4)
            torch.testing.assert_close(decoder.logprobs(hidden), ref[:, 4], rtol=0, atol=1e-5)


def test_gradients_flow_through_every_pass():
    """With J at the exactness bound the Jacobi forward is the same function of the weights as the sequential
    recurrence, so its gradients (through all passes, nothing detached) must equal the reference's."""
    length = 5
    with built(ponder_config(thoughts=1)) as model:
        model.train()
        ids = tokens(2, length + 1)
        inputs, labels = ids[:, :-1], ids[:, 1:]
        model(inputs, labels=labels, jacobi_iters=length - 1).sum().backward()
        jacobi = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        ref = sequential_logprobs(model, inputs)
        (-ref.gather(-1, labels[..., None])).sum().backward()
        for name, p in model.named_parameters():
            assert jacobi[name].abs().sum() > 0, f"{name} got no gradient"
            torch.testing.assert_close(jacobi[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_activation_recompute_gives_the_same_loss_and_gradients(recompute):
    ids = tokens(2, 9)
    grads = {}
    for setting in ("none", recompute):
        cfg = ponder_config(thoughts=1)
        cfg.train.recompute = setting
        with built(cfg) as model:
            assert model.config.recompute_granularity == (None if setting == "none" else setting)
            loss = model.train()(ids[:, :-1], labels=ids[:, 1:], jacobi_iters=2)
            loss.sum().backward()
            grads[setting] = [loss.detach()] + [p.grad for p in model.parameters()]
    for ref, got in zip(grads["none"], grads[recompute], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_zero_thoughts_is_the_standard_model():
    """K = 0 builds BoltGPTModel; the ponder forward and the cached decoder at K = 0 reproduce it."""
    from megatron_bolt.models.gpt import BoltGPTModel, block_spec, transformer_config
    from megatron_bolt.models.ponder import PonderGPTModel
    from megatron_bolt.models.ponder_cache import PonderDecoder

    cfg = ponder_config(thoughts=0)
    with built(cfg) as standard, torch.no_grad():
        assert type(standard) is BoltGPTModel
        tconf = transformer_config(cfg)
        ponder = PonderGPTModel(
            thoughts=0, jacobi_train=(2, 4), jacobi_eval=3, jacobi_seed=0, true_vocab_size=VOCAB, config=tconf,
            transformer_layer_spec=block_spec(cfg, tconf, None), vocab_size=cfg.model.padded_vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings, position_embedding_type="rope",
            rotary_base=int(cfg.model.rotary_base)).eval()
        ponder.load_state_dict(standard.state_dict())
        ids = tokens(3, 12)
        positions = torch.arange(11).expand(3, 11)
        assert torch.equal(ponder(ids[:, :-1]), standard(ids[:, :-1], positions, None))
        assert torch.equal(ponder(ids[:, :-1], labels=ids[:, 1:]),
                           standard(ids[:, :-1], positions, None, labels=ids[:, 1:]))
        ref = torch.log_softmax(standard(ids[:, :-1], positions, None)[..., :VOCAB], dim=-1)
        picked = ref.gather(-1, ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(PonderDecoder(standard).score(ids), picked, rtol=0, atol=1e-5)


def test_training_draws_jacobi_iterations_per_micro_batch():
    with built(ponder_config(thoughts=1)) as model:
        ids = tokens(2, 8)
        assert model.jacobi_iterations(ids) == 3  # eval mode: model.jacobi_iters_eval
        model.train()
        draws = [model.jacobi_iterations(tokens(2, 8, seed=s)) for s in range(60)]
        assert set(draws) == {2, 3, 4}
        assert model.jacobi_iterations(ids) == model.jacobi_iterations(ids.clone())
    with built(ponder_config(thoughts=1, jacobi_iters_train=[3, 3], jacobi_iters_eval=5)) as model:
        assert model.jacobi_iterations(ids) == 5
        assert model.train().jacobi_iterations(ids) == 3


def test_paper_embedding_scale_and_initialisation():
    hidden, thoughts = 64, 2
    with built(ponder_config(thoughts=thoughts, hidden=hidden)) as model:
        std = math.sqrt(2 / (5 * hidden))
        assert model.embed_scale == pytest.approx(math.sqrt(2.5 * hidden))
        layer = model.decoder.layers[0]
        expected = {
            "embedding": (model.embedding.word_embeddings.weight, std),
            "qkv": (layer.self_attention.linear_qkv.weight, std),
            "fc1": (layer.mlp.linear_fc1.weight, std),
            "output layer": (model.output_layer.weight, std),
            "attention out": (layer.self_attention.linear_proj.weight, std / math.sqrt(2 * 2 * (thoughts + 1))),
            "mlp out": (layer.mlp.linear_fc2.weight, std / math.sqrt(2 * 2 * (thoughts + 1))),
        }
        for name, (weight, target) in expected.items():
            # A normal truncated at 3 std has std 0.986 of the untruncated one.
            assert weight.std().item() == pytest.approx(0.986 * target, rel=0.08), name
            assert weight.abs().max().item() <= 3 * target + 1e-7, name


def test_config_refuses_what_latent_thoughts_cannot_run():
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=1"):
        cfg = ponder_config()
        cfg.parallel.pipeline_model_parallel_size = 2
        cfg.validate()
    with pytest.raises(ConfigError, match="sequence_parallel"):
        cfg = ponder_config()
        cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel = 2, True
        cfg.validate()
    with pytest.raises(ConfigError, match=r"model.jacobi_iters_train=\[4, 2\]"):
        ponder_config(jacobi_iters_train=[4, 2]).validate()
    with pytest.raises(ConfigError, match="model.latent_thoughts_per_token=-1"):
        ponder_config(thoughts=-1).validate()
    pp = ponder_config(thoughts=0)
    pp.parallel.pipeline_model_parallel_size = 2
    pp.validate()  # the standard model keeps pipeline parallelism


def test_bolt_score_path_uses_the_eval_jacobi_forward():
    """score_sequences (``bolt score``) runs the ponder forward through megatron's schedule in eval mode."""
    from megatron_bolt.score.scorer import score_sequences

    cfg = ponder_config(thoughts=1)
    cfg.train.micro_batch_size = 2
    with built(cfg) as model, torch.no_grad():
        sequences = [tokens(1, 9, seed=3)[0].tolist(), tokens(1, 6, seed=4)[0].tolist()]
        scores = score_sequences(cfg, [model], sequences)
        for seq, got in zip(sequences, scores, strict=True):
            ids = torch.tensor([seq])
            ref = jacobi_logprobs(model, ids[:, :-1], 3).gather(-1, ids[:, 1:, None])[0, :, 0]
            torch.testing.assert_close(torch.tensor(got), ref, rtol=0, atol=1e-5)


def test_training_flops_count_every_pass():
    from megatron_bolt.train.flops import flops_per_token, model_flops_per_token

    cfg = ponder_config(thoughts=1)
    m, seq = cfg.model, cfg.data.seq_length
    shape = dict(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, ffn=64)
    body = flops_per_token(**shape, seq=seq, vocab=0)
    double = flops_per_token(**shape, seq=2 * seq, vocab=0)
    logits = flops_per_token(**shape, seq=seq, vocab=m.padded_vocab_size) - body
    # one plain initial pass, then J = 3 (mean of [2, 4]) Jacobi passes and the final pass over 2 slots
    assert model_flops_per_token(cfg) == pytest.approx(body + 4 * 2 * double + logits)
    cfg.model.latent_thoughts_per_token = 0
    assert model_flops_per_token(cfg) == pytest.approx(body + logits)
