"""bolt report: markdown tables and PNG plots from report.json files, tolerant of missing metrics."""

from __future__ import annotations

import json
import math

import pytest

from megatron_bolt import cli
from megatron_bolt.report import ReportError, render_report


def loss_curve(start, end, steps=150):
    return [[s, end + (start - end) * math.exp(-s / 40)] for s in range(0, steps + 1, 10)]


def iteration(i, acc, elbo=None, ess=None, final_loss=0.9, low=None, high=None):
    return {"iteration": i,
            "accuracy": {"value": acc, "ci_low": low or acc - 0.05, "ci_high": high or acc + 0.06, "n": 200,
                         "task": "embedded"},
            "elbo": elbo, "ess_mean": ess,
            "train": {"loss_curve": loss_curve(2.5, final_loss), "final_loss": final_loss, "tokens": 123456,
                      "steps": 150},
            "seconds": {"estep": 12.0 if i else None, "build": 1.0, "train": 60.1, "eval": 5.0}}


def write_run(root, name, iterations):
    root.mkdir(parents=True)
    (root / "report.json").write_text(json.dumps({"run": name, "iterations": iterations}))
    return root


@pytest.fixture
def runs(tmp_path):
    raw = write_run(tmp_path / "raw", "raw", [iteration(0, 0.087, final_loss=0.78)])
    latent = write_run(tmp_path / "latent", "teacher latents", [iteration(0, 0.398, final_loss=0.33)])
    bolt = write_run(tmp_path / "bolt", "bolt K=4", [
        iteration(2, 0.314, {"1": -33.9, "2": -33.1, "4": -32.6}, 2.1, 0.41),
        iteration(0, 0.21, None, None, 0.69),  # out of order on purpose: sorted by iteration
        iteration(1, 0.246, {"1": -35.2, "2": -34.1, "4": -33.5}, 1.7, 0.43),
        {"iteration": 3},  # started, nothing measured yet
    ])
    return [raw, latent, bolt]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_renders_tables_and_every_plot(runs, tmp_path):
    out = tmp_path / "report"
    report = render_report(runs, out)
    md = report.read_text()
    for name in ("accuracy", "elbo", "ess", "loss"):
        width, height = png_size(out / f"{name}.png")
        assert width > 500 and height > 300
        assert f"({name}.png)" in md
    assert "| raw | 1 | 8.7% (3.7–14.7) | 8.7% (3.7–14.7) | 8.7% (3.7–14.7) at 0 |" in md
    assert "| bolt K=4 | 4 | 21.0% (16.0–27.0) | 31.4% (26.4–37.4) | 31.4% (26.4–37.4) at 2 |" in md
    bolt_table = md.split("### bolt K=4")[1]
    assert ("| iteration | accuracy (95% CI) | n | ELBO n=1 | ELBO n=2 | ELBO n=4 | mean ESS | final loss | steps "
            "| tokens | estep s | build s | train s | eval s |") in bolt_table
    rows = [line for line in bolt_table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows[0] == ("| 0 | 21.0% (16.0–27.0) | 200 | – | – | – | – | 0.6900 | 150 | 123,456 | – | 1.0 | 60.1 "
                       "| 5.0 |")
    assert rows[1].startswith("| 1 | 24.6% (19.6–30.6) | 200 | -35.20 | -34.10 | -33.50 | 1.70 | 0.4300 |")
    assert rows[3] == "| 3 | – | – | – | – | – | – | – | – | – | – | – | – | – |"


def test_only_final_results_become_a_bar_chart_and_empty_metrics_are_skipped(runs, tmp_path):
    out = tmp_path / "report"
    render_report(runs, out)
    render_report(runs[:2], out)  # neither has ELBO or ESS: the earlier plots must not linger
    md = (out / "report.md").read_text()
    assert (out / "accuracy.png").is_file() and (out / "loss.png").is_file()
    assert not (out / "elbo.png").exists() and not (out / "ess.png").exists()
    assert md.count("No data in any run.") == 2


def test_bad_inputs(tmp_path):
    with pytest.raises(ReportError, match="has no report.json"):
        render_report([tmp_path], tmp_path / "out")
    (tmp_path / "report.json").write_text(json.dumps({"run": "x"}))
    with pytest.raises(ReportError, match="'iterations' list"):
        render_report([tmp_path], tmp_path / "out")
    (tmp_path / "report.json").write_text(json.dumps({"run": "x", "iterations": [{"iteration": 0}]}))
    md = render_report([tmp_path], tmp_path / "out").read_text()
    assert md.count("No data in any run.") == 4  # nothing measured is not an error


def test_duplicate_run_names_stay_apart(tmp_path):
    a = write_run(tmp_path / "a", "bolt", [iteration(0, 0.2)])
    b = write_run(tmp_path / "b", "bolt", [iteration(0, 0.3)])
    md = render_report([a, b], tmp_path / "out").read_text()
    assert "### bolt\n" in md and f"### bolt ({b})" in md


def test_bolt_report_command(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()
    assert cli.main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "has no report.json" in capsys.readouterr().err
