"""The FLOPs formula behind MFU: Megatron's closed form, and the TinyLlama figure in docs/benchmarks.md."""

from __future__ import annotations

import pytest

from megatron_bolt.config import load_config
from megatron_bolt.train.flops import flops_per_token, model_flops_per_token, peak_tflops

TINYLLAMA = dict(layers=22, hidden=2048, heads=32, kv_heads=4, head_dim=64, ffn=5632, seq=2048, vocab=32128)


def test_matches_megatron_closed_form():
    L, h, n, g, f, s, V = 22, 2048, 32, 4, 5632, 2048, 32128
    closed = 12 * L * h * h * (1 + g / n + s / h + 1.5 * f / h) + 6 * h * V
    assert flops_per_token(**TINYLLAMA) == pytest.approx(closed, rel=1e-12)


def test_tinyllama_figures():
    assert flops_per_token(**TINYLLAMA) / 1e9 == pytest.approx(7.315, abs=5e-4)
    assert flops_per_token(**TINYLLAMA, causal_halved=True) / 1e9 == pytest.approx(6.762, abs=5e-4)


def test_from_config():
    cfg = load_config(None, ["model.num_layers=22", "model.hidden_size=2048", "model.num_attention_heads=32",
                             "model.num_query_groups=4", "model.ffn_hidden_size=5632", "model.vocab_size=32004",
                             "model.max_position_embeddings=2048", "data.seq_length=2048"])
    assert model_flops_per_token(cfg) == flops_per_token(**TINYLLAMA)


def test_peak():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("cpu") is None
