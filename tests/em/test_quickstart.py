"""`bolt quickstart` (the EM loop end to end) at a smaller size: every stage runs, the report has every
iteration's figures and renders, and a run killed twice (mid-training, mid-sampling) and rerun ends with the
same report (wall times aside) and the same resampled latents as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SMALL = ["train.train_iters=12", "train.lr_warmup_iters=2", "estep.sampling.max_new_tokens=32", "eval.limit=20",
         "train.log_interval=4"]


def _cmd(out):
    return [sys.executable, "-m", "megatron_bolt.cli", "quickstart", "--out", str(out), *SMALL]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}


def _run(out):
    proc = subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def _kill_when(out, ready, timeout=600):
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the kill point"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _without_seconds(report):
    report.pop("config_hash")  # the paths in the config differ between the two output directories
    for it in report["iterations"]:
        it.pop("seconds")
        if it["estep"]:
            it["estep"].pop("sampling")
    return report


def test_quickstart_runs_resumes_and_survives_kills(tmp_path):
    ref = tmp_path / "ref"
    first = _run(ref)
    report = json.loads((ref / "report.json").read_text())
    assert [it["iteration"] for it in report["iterations"]] == [0, 1, 2]
    for it in report["iterations"]:
        assert it["accuracy"]["n"] == 20 and 0 <= it["accuracy"]["ci_low"] <= it["accuracy"]["value"]
        assert it["train"]["steps"] == 12 and len(it["train"]["loss_curve"]) == 12
        assert set(it["elbo"]) == {"1", "2"} and all(v < 0 for v in it["elbo"].values())
        assert it["seconds"]["train"] > 0
    for it in report["iterations"][1:]:
        assert 1.0 <= it["ess_mean"] <= 2.0 and it["estep"]["chunks"] > 0
    curve = report["iterations"][0]["train"]["loss_curve"]
    assert curve[-1][1] < curve[0][1] - 1.0
    assert {"accuracy.png", "elbo.png", "loss.png"} <= {p.name for p in ref.glob("*.png")}
    assert "iter" in first.stdout and "report.md" in first.stdout
    assert (ref / "report.md").read_text().count("|") > 10

    again = _run(ref)  # a finished run: nothing is redone
    assert "em: stage" not in again.stderr

    out = tmp_path / "killed"
    em = out / "em"
    _kill_when(out, lambda: (em / "iter0" / "checkpoints" / "metrics.jsonl").is_file()
               and (em / "iter0" / "checkpoints" / "metrics.jsonl").read_text().count("\n") >= 5)
    _kill_when(out, lambda: any((em / "iter1" / "estep" / "samples").glob("*.partial")))
    _run(out)
    assert _without_seconds(json.loads((out / "report.json").read_text())) == _without_seconds(report)
    for i in (1, 2):
        latents = f"iter{i}/estep/latents.jsonl"
        assert (em / latents).read_bytes() == (ref / "em" / latents).read_bytes()
