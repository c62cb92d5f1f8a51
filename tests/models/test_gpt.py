"""The Llama-style megatron-core GPTModel built from our config against HF transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch
from conftest import random_llama

from megatron_bolt.config import BoltConfig
from megatron_bolt.convert import llama
from megatron_bolt.convert.mapping import hf_to_megatron, megatron_to_hf

transformers = pytest.importorskip("transformers")


def hf_model(vocab=100, layers=2, heads=4, kv_heads=2, seed=0):
    return random_llama(vocab, layers, heads, kv_heads, seed, attn_implementation="sdpa")


def bolt_config(hf, **model_overrides) -> BoltConfig:
    cfg = BoltConfig()
    cfg.model = llama.model_config_from_hf(hf.config.to_dict(), **model_overrides)
    cfg.data.seq_length = 24
    cfg.train.precision = "fp32"
    return cfg


def megatron_from_hf(hf, cfg):
    from megatron_bolt.models.gpt import build_model

    [model] = build_model(cfg)
    table = llama.mapping_table(cfg.model.transformer_impl, cfg.model.tie_word_embeddings)
    model.load_state_dict(hf_to_megatron(table, hf.state_dict(), cfg.model, cfg.model.padded_vocab_size))
    return model.eval()


@pytest.fixture
def runtime():
    from megatron_bolt.runtime import distributed

    def start(cfg):
        return distributed(cfg)

    return start


@pytest.mark.parametrize("attention", ["sdpa", "unfused"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 4), (4, 1)])
def test_logits_match_hf_llama(runtime, attention, heads, kv_heads):
    hf = hf_model(heads=heads, kv_heads=kv_heads)
    cfg = bolt_config(hf, attention_backend=attention)
    tokens = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(1))
    with runtime(cfg), torch.no_grad():
        model = megatron_from_hf(hf, cfg)
        ours = model(tokens, torch.arange(24).expand(3, 24), None)
        theirs = hf(tokens).logits
        assert ours.shape == (3, 24, cfg.model.padded_vocab_size)
        assert torch.isneginf(ours[..., 100:]).all()  # padding rows take no probability mass
        torch.testing.assert_close(ours[..., :100], theirs, rtol=1e-5, atol=1e-5)
        # per-token loss (labels path) equals HF's cross-entropy
        losses = model(tokens[:, :-1], torch.arange(23).expand(3, 23), None, labels=tokens[:, 1:])
        ref = torch.nn.functional.cross_entropy(theirs[:, :-1].reshape(-1, 100), tokens[:, 1:].reshape(-1),
                                                reduction="none").view(3, 23)
        torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)


def test_forward_backward_reaches_every_parameter(runtime):
    hf = hf_model()
    cfg = bolt_config(hf)
    tokens = torch.randint(0, 100, (2, 24))
    with runtime(cfg):
        model = megatron_from_hf(hf, cfg).train()
        loss = model(tokens[:, :-1], torch.arange(23).expand(2, 23), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_hf_mapping_round_trip_is_bit_identical():
    hf = hf_model(layers=3, heads=8, kv_heads=2)
    cfg = bolt_config(hf)
    table = llama.mapping_table()
    original = hf.state_dict()
    back = megatron_to_hf(table, hf_to_megatron(table, original, cfg.model, 128), cfg.model)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_grouped_qkv_layout_is_per_kv_group():
    """Megatron's fused QKV rows: for each KV group, its query heads, then that group's key, then value."""
    hf = hf_model(heads=4, kv_heads=2)
    cfg = bolt_config(hf)
    fused = hf_to_megatron(llama.mapping_table(), hf.state_dict(), cfg.model, 128)[
        "decoder.layers.0.self_attention.linear_qkv.weight"]
    attn = hf.model.layers[0].self_attn
    d = 16
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    expected = torch.cat([q[0:2 * d], k[0:d], v[0:d], q[2 * d:4 * d], k[d:2 * d], v[d:2 * d]])
    assert torch.equal(fused, expected)


def test_config_translation_round_trip():
    hf = hf_model()
    cfg = llama.model_config_from_hf(hf.config.to_dict())
    back = llama.hf_config_from_model(cfg)
    rebuilt = transformers.LlamaConfig(**back)
    assert llama.model_config_from_hf(rebuilt.to_dict()) == cfg
    assert cfg.rotary_base == 5000.0 and cfg.num_query_groups == 2 and not cfg.tie_word_embeddings


def test_unsupported_hf_configs_are_refused():
    base = hf_model().config.to_dict()
    with pytest.raises(ValueError, match="attention_bias"):
        llama.model_config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="model_type"):
        llama.model_config_from_hf({**base, "model_type": "gpt2"})
