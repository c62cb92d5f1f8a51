"""Distributed checkpoints: round trip, atomic publication, 'latest', keep-last, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_bolt.checkpoint import dist as ckpt
from megatron_bolt.config import load_config

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
        "model.ffn_hidden_size=64", "model.vocab_size=50", "data.seq_length=8", "train.precision=fp32"]


@pytest.fixture
def world():
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed

    cfg = load_config(None, TINY)
    with distributed(cfg, seed=7):
        yield cfg, build_model


def _params(model):
    return {k: v.detach().clone() for k, v in model[0].state_dict().items() if torch.is_tensor(v)}


def test_round_trip_and_latest(world, tmp_path):
    cfg, build = world
    model = build(cfg)
    ckpt.save_model(tmp_path, 3, model, {"note": "x"})
    ckpt.save_model(tmp_path, 5, model)
    assert (tmp_path / "latest").read_text().strip() == "step_00000005"
    assert ckpt.list_steps(tmp_path) == [3, 5]
    assert ckpt.read_meta(tmp_path / "step_00000003")["note"] == "x"
    other = build(cfg)
    with torch.no_grad():
        for p in other[0].parameters():
            p.add_(1.0)
    meta = ckpt.load_model(ckpt.resolve(tmp_path), other)
    assert meta["step"] == 5
    for name, tensor in _params(model).items():
        assert torch.equal(_params(other)[name], tensor), name


def test_partial_save_is_never_latest(world, tmp_path):
    cfg, build = world
    model = build(cfg)
    ckpt.save_model(tmp_path, 1, model)
    # A crash mid-save leaves a .partial directory; the pointer still names the last complete step.
    (tmp_path / ".step_00000002.partial").mkdir()
    (tmp_path / ".step_00000002.partial" / "__0_0.distcp").write_bytes(b"half")
    assert ckpt.resolve(tmp_path) == tmp_path / "step_00000001"
    ckpt.save_model(tmp_path, 2, model)  # the next save cleans the leftover and publishes
    assert not list(tmp_path.glob(".step_*.partial"))
    assert ckpt.resolve(tmp_path) == tmp_path / "step_00000002"


def test_keep_last(world, tmp_path):
    cfg, build = world
    model = build(cfg)
    for step in (1, 2, 3, 4):
        ckpt.save(tmp_path, step, ckpt.model_sharded_state_dict(model), keep_last=2)
    assert ckpt.list_steps(tmp_path) == [3, 4]


def test_clear_errors(tmp_path):
    assert ckpt.resolve(tmp_path / "new") is None
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(ckpt.CheckpointError, match="not saved by bolt"):
        ckpt.resolve(foreign)
    with pytest.raises(ckpt.CheckpointError, match="missing bolt_meta.json"):
        ckpt.load(foreign, {})


def test_loading_a_different_architecture_fails_clearly(world, tmp_path):
    cfg, build = world
    ckpt.save_model(tmp_path, 1, build(cfg))
    bigger = load_config(None, TINY + ["model.hidden_size=64"])
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model(ckpt.resolve(tmp_path), build(bigger))
    assert "does not fit this model" in str(err.value)
    assert "linear_proj.weight is (2, 32, 32) in the checkpoint but (2, 64, 64) in this model" in str(err.value)


def test_random_state_round_trip(world, tmp_path):
    import random

    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    cfg, build = world
    ckpt.save(tmp_path, 1, ckpt.model_sharded_state_dict(build(cfg)), save_rng=True)

    def draws():
        with get_cuda_rng_tracker().fork():
            tracked = torch.rand(3)
        return random.random(), torch.rand(3), tracked

    expected = draws()
    draws()  # move every generator on
    assert ckpt.load_rng(ckpt.resolve(tmp_path))
    got = draws()
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
