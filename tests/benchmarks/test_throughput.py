"""benchmarks/throughput.py (the summary over its stages' JSON, a failing stage) and score_throughput's agreement
check; no model runs here (the scripts themselves are run by hand, docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tp():
    return load("throughput")


TRAIN = {"loops": {"bolt": {"tokens_per_s": 60000.0, "mfu": 0.466}, "bare": {"error": "out of memory: ..."},
                   "hf": {"tokens_per_s": 44000.0, "mfu": 0.33}},
         "ratios": {"bolt/hf": 60000 / 44000}}
SAMPLE = {"results": [{"backend": "hf", "generated_tokens_per_s": 500.0, "ratio_vs_hf": 1.0},
                      {"backend": "trtllm", "generated_tokens_per_s": 5000.0, "ratio_vs_hf": 10.0}],
          "skipped": {"vllm": "backend 'vllm' needs the 'vllm' package, which is not installed: pip install vllm"},
          "failed": {}}
SCORE = {"impls": {"bolt": {"tokens_per_s": 2000.0, "mfu": None}, "hf": {"tokens_per_s": 1000.0, "mfu": None}},
         "ratio": 2.0, "ratio_paired_median": 1.9, "ratio_per_round": [1.8, 1.9, 2.1],
         "agreement": {"agree": True, "max_abs_diff": 2e-6, "mean_abs_diff": 1e-7}}


def test_summary_rows_carry_the_ratios_errors_and_skips(tp):
    stages = {"train": {"result": TRAIN}, "sample": {"result": SAMPLE}, "score": {"result": SCORE}}
    rows = tp.summary_rows(stages)
    notes = [r[4] for r in rows]
    assert rows[0][:4] == ("M-step (trained tokens/s, median step)", "bolt", 60000.0, 0.466)
    assert "bolt/hf 1.364" in notes and "out of memory: ..." in notes
    assert "trtllm/hf 10.000" in notes
    assert "skipped: backend 'vllm' needs the 'vllm' package, which is not installed" in notes
    assert any(n.startswith("bolt/hf 2.000 (fastest passes") for n in notes)
    assert any(n.startswith("agrees with hf") for n in notes)
    assert [r[1] for r in rows] == ["bolt", "bare", "hf", "hf", "trtllm", "vllm", "bolt", "hf"]


def test_a_failed_stage_is_a_row_not_a_crash(tp, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    good = tmp_path / "good.py"
    good.write_text("import json, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                    f"json.dump({SCORE!r}, open(out, 'w'))\n")
    monkeypatch.setitem(tp.STAGES, "train", (str(bad), "M-step", "trained tokens/s"))
    monkeypatch.setitem(tp.STAGES, "score", (str(good), "scoring", "scored tokens/s"))
    stale = tmp_path / "x-train.json"
    stale.write_text("{}")  # an earlier run's file must not pass for this run's result
    failed = tp.run_stage("train", "cpu-tiny", stale, [], timeout=60)
    ok = tp.run_stage("score", "cpu-tiny", tmp_path / "x-score.json", [], timeout=60)
    assert failed["returncode"] == 3 and failed["error"] == "exit status 3" and "result" not in failed
    assert not stale.exists()
    assert ok["returncode"] == 0 and ok["result"]["ratio"] == 2.0
    rows = tp.summary_rows({"train": failed, "score": ok})
    assert rows[0][4] == "FAILED: exit status 3" and rows[1][1] == "bolt"
    report = {"preset": "cpu-tiny", "date": "2026-11-22", "machine": "m",
              "git": {"commit": "abc", "tracked_changes": True}, "stages": {"train": failed, "score": ok},
              "summary": rows}
    tp.print_summary(report)
    assert "FAILED: exit status 3" in capsys.readouterr().out
    json.dumps(report)  # the combined report is JSON-serialisable


def test_score_agreement_verdicts():
    score = load("score_throughput")
    same = [[-10.0, -9.5], [-10.2, -10.4]]
    assert score.agreement(same, [[x + 5e-5 for x in row] for row in same], "float32")["agree"]
    assert not score.agreement(same, [[x + 5e-4 for x in row] for row in same], "float32")["agree"]
    bf16 = score.agreement(same, [[x + 0.01 for x in row] for row in same], "bfloat16")
    assert bf16["agree"] and bf16["mean_abs_diff"] == pytest.approx(0.01)
    assert not score.agreement(same, [[x + 0.3 for x in row] for row in same], "bfloat16")["agree"]
