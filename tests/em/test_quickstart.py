"""`bolt quickstart` end to end at a smaller size: every stage runs, the report is written, a rerun resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _quickstart(out, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "megatron_bolt.cli", "quickstart", "--out", str(out),
                           "train.train_iters=12", "train.lr_warmup_iters=2", *overrides],
                          capture_output=True, text=True, timeout=600, env=env)


def test_quickstart_runs_and_resumes(tmp_path):
    first = _quickstart(tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["train"]["steps"] == 12
    assert report["train"]["final_loss"] < report["train"]["first_loss"] - 1.0
    assert report["dataset"]["documents"] == report["corpus"]["num_docs"]
    assert (tmp_path / "checkpoints" / "iter0" / "latest").read_text().strip() == "step_00000012"
    second = _quickstart(tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert json.loads((tmp_path / "report.json").read_text())["train"]["steps"] == 0  # nothing redone
    assert "already trained" in second.stdout
