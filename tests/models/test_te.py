"""The Transformer Engine seam: a clear install message without TE; TE and FP8 runs where TE exists."""

from __future__ import annotations

import pytest
import torch

from megatron_bolt.config import load_config
from megatron_bolt.models import te

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=100", "data.seq_length=32"]


def test_missing_te_names_what_to_install(monkeypatch):
    monkeypatch.setattr(te, "available", lambda: (False, "ImportError: No module named 'transformer_engine'"))
    with pytest.raises(RuntimeError) as err:
        te.layer_spec()
    assert "install the 'te' extra" in str(err.value) and "No module named" in str(err.value)


def test_fp8_needs_the_te_spec():
    cfg = load_config(None, TINY + ["train.precision=fp8"])
    with pytest.raises(ValueError, match="train.precision=fp8 needs model.transformer_impl=transformer_engine"):
        cfg.validate(1)


def _build_and_step(overrides):
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed

    cfg = load_config(None, TINY + overrides)
    with distributed(cfg, seed=5):
        [model] = build_model(cfg)
        tokens = torch.randint(0, 100, (2, 33), device="cuda")
        loss = model(tokens[:, :-1], torch.arange(32, device="cuda").expand(2, 32), None, labels=tokens[:, 1:])
        loss.mean().backward()
        return loss.detach().float(), [p.grad for p in model.parameters()]


@pytest.mark.gpu
@pytest.mark.te
def test_te_spec_trains_in_bf16():
    loss, grads = _build_and_step(["model.transformer_impl=transformer_engine", "train.precision=bf16"])
    assert torch.isfinite(loss).all() and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.te
def test_te_fp8_hybrid_delayed_scaling():
    loss, _ = _build_and_step(["model.transformer_impl=transformer_engine", "train.precision=fp8",
                               "train.fp8_format=hybrid", "train.fp8_recipe=delayed"])
    assert torch.isfinite(loss).all()
