"""TP=2, PP=2 (plain and interleaved), DP=2 (plain and distributed optimizer) and sequence parallel train
to the same losses as one process for the same weights and batches; a TP=2 checkpoint loads at TP=1 with
identical outputs. All parallel layouts run in one torchrun launch of 2 gloo ranks (see worker.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = str(ROOT / "tests" / "distributed" / "worker.py")
BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=128", "model.vocab_size=100", "model.max_position_embeddings=32",
    "data.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=8", "train.train_iters=4",
    "train.lr=3e-3", "train.lr_warmup_iters=0", "train.precision=fp32",
]
LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "pp2_vpp2": ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"],
    "dp2": [],
    "dp2_distopt": ["parallel.use_distributed_optimizer=true"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, launch):
    tmp = tmp_path_factory.mktemp("parallel")
    init = str(tmp / "init")
    reference = [
        {"name": "init", "mode": "make-init", "overrides": BASE, "save": init},
        {"name": "ws1", "mode": "train", "overrides": BASE, "init": init, "save": str(tmp / "ws1")},
        *({"name": f"recompute_{kind}", "mode": "train", "init": init, "save": str(tmp / f"recompute_{kind}"),
           "overrides": BASE + [f"train.recompute={kind}"]} for kind in ("full", "selective")),
        {"name": "learn", "mode": "train", "init": init, "save": str(tmp / "learn"),
         "overrides": BASE + ["train.train_iters=40", "train.lr=1e-2", "train.lr_warmup_iters=4"]},
    ]
    parallel = [
        {"name": name, "mode": "train", "overrides": BASE + extra, "init": init, "save": str(tmp / name)}
        for name, extra in LAYOUTS.items()
    ]
    # TP=1 (two data-parallel replicas) reading the checkpoint the TP=2 run saved.
    parallel.append({"name": "tp2_ckpt_at_tp1", "mode": "eval", "overrides": BASE, "init": str(tmp / "tp2")})
    out = {}
    for plan, nproc in ((reference, 1), (parallel, 2)):
        plan_file, out_file = tmp / f"plan{nproc}.json", tmp / f"out{nproc}.json"
        plan_file.write_text(json.dumps(plan))
        launch([WORKER, str(plan_file), str(out_file)], nproc=nproc)
        out.update(json.loads(out_file.read_text()))
    return out


def test_tiny_model_learns_the_copy_task(results):
    losses = results["learn"]["losses"]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"loss went from {first:.3f} to {last:.3f}"


@pytest.mark.parametrize("layout", [*LAYOUTS, "recompute_full", "recompute_selective"])
def test_same_losses_as_world_size_1(results, layout):
    ref, got = results["ws1"], results[layout]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=2e-5)
    np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=1e-4)
    np.testing.assert_allclose(got["eval"], ref["eval"], rtol=1e-4, atol=2e-5)


def test_tp2_checkpoint_loads_at_tp1(results):
    np.testing.assert_allclose(results["tp2_ckpt_at_tp1"]["eval"], results["tp2"]["eval"], rtol=0, atol=1e-5)
