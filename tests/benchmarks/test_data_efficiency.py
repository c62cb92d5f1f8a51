"""benchmarks/data_efficiency.py: its statistics, and the smoke preset end to end (every arm, then a resume)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "data_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("data_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_mean_ci_is_the_student_t_interval(bench):
    m, lo, hi = bench.mean_ci([0.1, 0.2, 0.3])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert m == pytest.approx(0.2) and lo == pytest.approx(0.2 - half, abs=1e-5)
    assert hi == pytest.approx(0.2 + half, abs=1e-5)
    assert bench.mean_ci([0.4]) == (0.4, 0.4, 0.4)


def test_summary_groups_seeds_per_arm_and_iteration(bench):
    rows = [{"arm": "raw", "iteration": None, "seed": s, "accuracy": {"value": v}, "elbo": None, "final_loss": 1.0}
            for s, v in enumerate((0.1, 0.3))]
    rows += [{"arm": "bolt-k4", "iteration": 1, "seed": s, "accuracy": {"value": v}, "elbo": e, "final_loss": 0.5}
             for s, (v, e) in enumerate(((0.5, -3.0), (0.7, float("-inf"))))]
    table = {(r["arm"], r["iteration"]): r for r in bench.summarise(rows)}
    assert table[("raw", None)]["accuracy"][0] == pytest.approx(0.2) and table[("raw", None)]["elbo"] is None
    assert table[("bolt-k4", 1)]["per_seed"] == [0.5, 0.7]
    assert table[("bolt-k4", 1)]["elbo"] == (-3.0, -3.0, -3.0)  # a non-finite estimate is left out, not averaged


def test_preset_overrides_parse_into_the_dataclass(bench):
    p = bench.apply_overrides(bench.PRESETS["smoke"],
                              ["steps=9", "ks=1,8", "lr=0.01", "templates=mul_add,mul_sub", "warm_raw=false"])
    assert (p.steps, p.ks, p.lr, p.templates, p.warm_raw) == (9, (1, 8), 0.01, ("mul_add", "mul_sub"), False)
    with pytest.raises(SystemExit, match="unknown"):
        bench.apply_overrides(p, ["nope=1"])


@pytest.mark.slow
def test_smoke_preset_runs_every_arm_and_resumes(tmp_path):
    out = tmp_path / "de"
    cmd = [sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    arms = {(r["arm"], r["iteration"]) for r in results["table"]}
    assert arms == {("raw", None), ("teacher", None), ("warm", 0), ("bolt-k1", 1), ("bolt-k2", 1)}
    by = {(r["arm"], r["iteration"]): r for r in results["table"]}
    assert by[("raw", None)]["elbo"] is None and by[("warm", 0)]["elbo"] is not None
    assert (out / "data_efficiency.png").stat().st_size > 0 and "| bolt-k2 | 1 |" in (out / "results.md").read_text()
    # Every K shares one warm start (hard links), and the K = 2 E-step drew two samples per chunk.
    warm_ckpt = next((out / "seed0" / "warm" / "iter0" / "checkpoints").rglob("*.distcp"))
    shared = out / "seed0" / "bolt-k2" / warm_ckpt.relative_to(out / "seed0" / "warm")
    assert shared.stat().st_ino == warm_ckpt.stat().st_ino
    estep = json.loads((out / "seed0" / "bolt-k2" / "iter1" / "estep" / "estep.json").read_text())
    assert estep["num_samples"] == 2
    # A rerun finds every stage done and reports the same figures.
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
