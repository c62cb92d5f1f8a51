"""Latent thoughts (model.latent_thoughts_per_token=1) under tensor parallelism, in one launch of 2 gloo ranks:
TP=2 trains to the same losses as TP=1 (two data-parallel replicas) for the same weights and batches (random
Jacobi counts included); a TP=2 checkpoint evaluates identically at TP=1; the ``ponder`` generation backend
decodes the same tokens and log-probs at TP=2 as at TP=1. Few, cheap passes (J in [1, 2]): every pass costs
two all-reduces per layer under TP, slow on gloo."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = str(ROOT / "tests" / "distributed" / "worker.py")
BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=128", "model.vocab_size=100", "model.max_position_embeddings=32",
    "model.latent_thoughts_per_token=1", "model.jacobi_iters_train=[1,2]", "model.jacobi_iters_eval=1",
    "data.seq_length=16", "train.micro_batch_size=4", "train.global_batch_size=8", "train.train_iters=2",
    "train.lr=3e-3", "train.lr_warmup_iters=0", "train.precision=fp32",
]
TP2 = ["parallel.tensor_model_parallel_size=2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, launch):
    tmp = tmp_path_factory.mktemp("ponder_parallel")
    init = str(tmp / "init")

    def train(name, extra):
        return {"name": name, "mode": "train", "overrides": BASE + extra, "init": init, "save": str(tmp / name)}

    plan = [
        {"name": "init", "mode": "make-init", "overrides": BASE, "save": init},
        train("tp1", []),
        train("tp2", TP2),
        {"name": "tp2_ckpt_at_tp1", "mode": "eval", "overrides": BASE, "init": str(tmp / "tp2")},
        {"name": "generate_tp1", "mode": "generate", "overrides": BASE, "init": str(tmp / "tp1")},
        {"name": "generate_tp2", "mode": "generate", "overrides": BASE + TP2, "init": str(tmp / "tp1")},
    ]
    plan_file, out_file = tmp / "plan.json", tmp / "out.json"
    plan_file.write_text(json.dumps(plan))
    launch([WORKER, str(plan_file), str(out_file)], nproc=2)
    return json.loads(out_file.read_text())


def test_tp2_trains_like_tp1(results):
    ref, got = results["tp1"], results["tp2"]
    assert len(got["losses"]) == 2
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=2e-5)
    np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=1e-4)
    np.testing.assert_allclose(got["eval"], ref["eval"], rtol=1e-4, atol=2e-5)


def test_tp2_checkpoint_loads_at_tp1(results):
    np.testing.assert_allclose(results["tp2_ckpt_at_tp1"]["eval"], results["tp2"]["eval"], rtol=0, atol=1e-5)


def test_tp2_decodes_like_tp1(results):
    ref, got = results["generate_tp1"]["generate"], results["generate_tp2"]["generate"]
    assert len(got) == 4
    for (ref_ids, ref_logps), (ids, logps) in zip(ref, got, strict=True):
        assert ids == ref_ids
        np.testing.assert_allclose(logps, ref_logps, rtol=0, atol=1e-5)
