"""One optimizer step: a non-finite loss stops the run or skips the update, as configured."""

from __future__ import annotations

import pytest
import torch

from megatron_bolt.config import load_config
from megatron_bolt.data.synthetic import CopyTaskRows
from megatron_bolt.train import step as step_module

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
        "model.ffn_hidden_size=64", "model.vocab_size=50", "data.seq_length=8", "train.precision=fp32",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=4", "train.lr_warmup_iters=0"]


@pytest.fixture
def trainer():
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed
    from megatron_bolt.train.setup import build_optimizer, build_scheduler, wrap_ddp

    cfg = load_config(None, TINY)
    with distributed(cfg, seed=3):
        model = wrap_ddp(cfg, build_model(cfg))
        optimizer = build_optimizer(cfg, model)
        yield model, optimizer, build_scheduler(cfg, optimizer), CopyTaskRows(8, 50, seed=0).batch(0, 4)


def _weights(model):
    return [p.detach().clone() for p in model[0].parameters()]


def test_finite_step_updates(trainer):
    model, optimizer, scheduler, batch = trainer
    before = _weights(model)
    out = step_module.train_step(model, optimizer, scheduler, batch, 2, 8)
    assert not out["skipped"] and out["update_successful"] and out["tokens"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(trainer, monkeypatch, policy):
    model, optimizer, scheduler, batch = trainer
    monkeypatch.setattr(step_module, "run_microbatches", lambda *a, **k: (float("nan"), 16))
    before, lr_steps = _weights(model), scheduler.num_steps
    if policy == "stop":
        with pytest.raises(FloatingPointError, match="non-finite loss nan; stopping before the update"):
            step_module.train_step(model, optimizer, scheduler, batch, 2, 8, policy)
    else:
        out = step_module.train_step(model, optimizer, scheduler, batch, 2, 8, policy)
        assert out["skipped"] and not out["update_successful"] and out["grad_norm"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))  # no update applied
    assert scheduler.num_steps == lr_steps


def test_metrics_record_ends_a_line_cut_by_a_failed_write_before_appending(tmp_path):
    from megatron_bolt.train.loop import METRICS, _open_record, read_metrics

    path = tmp_path / METRICS
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a write cut short by a full disk
    with _open_record(path) as f:  # the resumed run redoes step 2
        f.write('{"step": 2, "loss": 1.5}\n')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
