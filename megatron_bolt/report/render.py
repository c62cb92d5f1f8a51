"""``bolt report``: one markdown page and a plot per metric comparing EM runs across iterations.

    bolt report runs/raw runs/latent runs/bolt --out runs/report

Each run directory holds ``report.json`` (written by the EM loop after every iteration)::

    {"run": "bolt", "iterations": [{"iteration": 0,
        "accuracy": {"value": 0.21, "ci_low": 0.16, "ci_high": 0.27, "n": 200, "task": "embedded"},
        "elbo": {"1": -35.2, "2": -34.1, "4": -33.5}, "ess_mean": 1.7,
        "train": {"loss_curve": [[step, loss], ...], "final_loss": 0.9, "tokens": 123456, "steps": 150},
        "seconds": {"estep": 12.0, "build": 1.0, "train": 60.1, "eval": 5.0}}, ...]}

Any metric may be missing or null: plots and table cells skip it. Figures (PNG, one per metric, every run in
the same colour throughout): ``accuracy.png`` (with 95% CI bars; a run with a single evaluation, such as a
raw baseline, is drawn as a shaded reference band, and runs that all have one evaluation become a bar
chart), ``elbo.png`` (one line per run and number of samples n), ``ess.png`` and ``loss.png`` (one panel
per run, one curve per iteration). ``render_report`` is what the EM loop calls after each iteration.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_bolt.utils.atomic import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
STAGES = ("estep", "build", "train", "eval")
_N_STYLES = {"1": ":", "2": "--", "4": "-"}


class ReportError(ValueError):
    """A run directory whose report.json cannot be read; the message names it."""


@dataclass
class Run:
    name: str
    path: Path
    iterations: list[dict[str, Any]]


def _num(value: Any) -> float | None:
    """A finite number, else None (missing, null, a string or NaN all count as absent)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    file = path / REPORT_JSON
    if not file.is_file():
        raise ReportError(f"{path} has no {REPORT_JSON} (the EM loop writes it after each iteration)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("iterations"), list):
        raise ReportError(f"{file} must be an object with an 'iterations' list")
    iterations = [it for it in data["iterations"] if isinstance(it, dict) and _num(it.get("iteration")) is not None]
    iterations.sort(key=lambda it: it["iteration"])
    return Run(str(data.get("run") or path.name), path, iterations)


def _accuracy(it: dict[str, Any]) -> tuple[float, float, float] | None:
    acc = _dict(it.get("accuracy"))
    value = _num(acc.get("value"))
    if value is None:
        return None
    low, high = _num(acc.get("ci_low")), _num(acc.get("ci_high"))
    return value, value if low is None else low, value if high is None else high


def _elbo(it: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, raw in _dict(it.get("elbo")).items() if (v := _num(raw)) is not None}


def _loss_curve(it: dict[str, Any]) -> list[tuple[float, float]]:
    curve = _dict(it.get("train")).get("loss_curve")
    points = [(_num(p[0]), _num(p[1])) for p in curve or [] if isinstance(p, (list, tuple)) and len(p) == 2]
    return [(s, v) for s, v in points if s is not None and v is not None]


# ------------------------------------------------------------------------------------------------- plots


def _figure(**kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**kwargs)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def _colors(runs: list[Run]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {run.name: cmap(i % 10) for i, run in enumerate(runs)}


def _task_label(runs: list[Run]) -> str:
    tasks = sorted({str(_dict(it.get("accuracy")).get("task")) for r in runs for it in r.iterations
                    if _dict(it.get("accuracy")).get("task")})
    return ", ".join(tasks) or "held-out"


def plot_accuracy(runs: list[Run], colors: dict[str, Any], path: Path) -> bool:
    series = {r.name: [(it["iteration"], a) for it in r.iterations if (a := _accuracy(it))] for r in runs}
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return False
    fig, ax = _figure(figsize=(7, 4.2))
    if all(len(pts) == 1 for pts in series.values()):  # final results only: compare runs side by side
        names = list(series)
        values = [100 * series[n][0][1][0] for n in names]
        errors = [[100 * (p[0][1][0] - p[0][1][1]) for p in series.values()],
                  [100 * (p[0][1][2] - p[0][1][0]) for p in series.values()]]
        ax.bar(names, values, yerr=errors, capsize=6, color=[colors[n] for n in names])
        for i, v in enumerate(values):
            ax.annotate(f"{v:.1f}%", (i, v), textcoords="offset points", xytext=(8, 3), fontsize=9)
        ax.set_xlabel("run")
    else:
        xs = [x for pts in series.values() for x, _ in pts if len(pts) > 1]
        span = (min(xs) - 0.2, max(xs) + 0.2)
        curves = [name for name, pts in series.items() if len(pts) > 1]
        for name, pts in series.items():
            if len(pts) == 1:  # a baseline evaluated once: a reference band across the iterations
                _, (value, low, high) = pts[0]
                ax.axhspan(100 * low, 100 * high, color=colors[name], alpha=0.15)
                ax.hlines(100 * value, *span, colors=[colors[name]], linestyles="--", label=f"{name} (one eval)")
                continue
            shift = 0.04 * (curves.index(name) - (len(curves) - 1) / 2)  # keep error bars of runs apart
            x = [p[0] + shift for p in pts]
            y = [100 * p[1][0] for p in pts]
            err = [[100 * (p[1][0] - p[1][1]) for p in pts], [100 * (p[1][2] - p[1][0]) for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=4, color=colors[name], label=name)
        ax.set_xlim(*span)
        ax.set_xticks(sorted(set(xs)))
        ax.set_xlabel("EM iteration (0 = warm start)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Accuracy on {_task_label(runs)} with 95% Wilson intervals")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def plot_elbo(runs: list[Run], colors: dict[str, Any], path: Path) -> bool:
    fig, ax = _figure(figsize=(7, 4.2))
    drawn = False
    for run in runs:
        for n in sorted({k for it in run.iterations for k in _elbo(it)}, key=float):
            pts = [(it["iteration"], _elbo(it)[n]) for it in run.iterations if n in _elbo(it)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], _N_STYLES.get(n, "-."), marker="o",
                    color=colors[run.name], label=f"{run.name}, n={n}")
            drawn = True
    if not drawn:
        return False
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("ELBO estimate (nats per chunk)")
    ax.set_title("Held-out ELBO: logsumexp(log w[:n]) - log n (higher is better)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)
    return True


def plot_ess(runs: list[Run], colors: dict[str, Any], path: Path) -> bool:
    fig, ax = _figure(figsize=(7, 4.2))
    drawn = False
    for run in runs:
        pts = [(it["iteration"], v) for it in run.iterations if (v := _num(it.get("ess_mean"))) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[run.name], label=run.name)
            drawn = True
    if not drawn:
        return False
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("mean ESS (1: one sample dominates; K: uniform)")
    ax.set_title("E-step weights: mean effective sample size per chunk")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)
    return True


def plot_loss(runs: list[Run], path: Path) -> bool:
    import matplotlib

    with_curves = [r for r in runs if any(_loss_curve(it) for it in r.iterations)]
    if not with_curves:
        return False
    cols = min(3, len(with_curves))
    rows = -(-len(with_curves) // cols)
    fig, axes = _figure(nrows=rows, ncols=cols, figsize=(4.5 * cols + 1, 3.6 * rows + 0.6), sharey=True,
                        squeeze=False, layout="constrained")
    cmap = matplotlib.colormaps["viridis"]
    for ax in axes.flat[len(with_curves):]:
        ax.set_visible(False)
    for ax, run in zip(axes.flat, with_curves, strict=False):  # spare panels were hidden above
        curves = [(it["iteration"], c) for it in run.iterations if (c := _loss_curve(it))]
        for i, (iteration, curve) in enumerate(curves):
            ax.plot([p[0] for p in curve], [p[1] for p in curve], color=cmap(i / max(len(curves) - 1, 1) * 0.85),
                    label=f"iteration {iteration:g}")
        ax.set_title(run.name)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for row in axes:
        row[0].set_ylabel("training loss (all tokens)")
    fig.suptitle("M-step training loss per EM iteration")
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------- markdown


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _acc_cell(it: dict[str, Any]) -> str:
    acc = _accuracy(it)
    return "–" if acc is None else f"{100 * acc[0]:.1f}% ({100 * acc[1]:.1f}–{100 * acc[2]:.1f})"


def _iteration_table(run: Run) -> list[str]:
    ns = sorted({k for it in run.iterations for k in _elbo(it)}, key=float)
    head = ["iteration", "accuracy (95% CI)", "n", *(f"ELBO n={n}" for n in ns), "mean ESS", "final loss",
            "steps", "tokens", *(f"{s} s" for s in STAGES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for it in run.iterations:
        train, seconds = _dict(it.get("train")), _dict(it.get("seconds"))
        n = _num(_dict(it.get("accuracy")).get("n"))
        cells = [f"{it['iteration']:g}", _acc_cell(it), _fmt(n, ".0f"), *(_fmt(_elbo(it).get(k), ".2f") for k in ns),
                 _fmt(_num(it.get("ess_mean")), ".2f"), _fmt(_num(train.get("final_loss")), ".4f"),
                 _fmt(_num(train.get("steps")), ".0f"), _fmt(_num(train.get("tokens")), ",.0f"),
                 *(_fmt(_num(seconds.get(s)), ".1f") for s in STAGES)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _overview(runs: list[Run]) -> list[str]:
    lines = ["| run | iterations | first accuracy | last accuracy | best accuracy |", "|---|---|---|---|---|"]
    for run in runs:
        evaluated = [it for it in run.iterations if _accuracy(it)]
        if evaluated:
            best = max(evaluated, key=lambda it: _accuracy(it)[0])
            cells = [_acc_cell(evaluated[0]), _acc_cell(evaluated[-1]), f"{_acc_cell(best)} at {best['iteration']:g}"]
        else:
            cells = ["–"] * 3
        lines.append(f"| {run.name} | {len(run.iterations)} | " + " | ".join(cells) + " |")
    return lines


def render_report(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots for ``run_dirs``; returns the markdown path."""
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ReportError("no run directories given")
    seen: dict[str, int] = {}
    for run in runs:  # two runs with one name would share a colour and a legend entry
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({run.path})"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = _colors(runs)
    plots = {
        "accuracy": plot_accuracy(runs, colors, out / "accuracy.png"),
        "elbo": plot_elbo(runs, colors, out / "elbo.png"),
        "ess": plot_ess(runs, colors, out / "ess.png"),
        "loss": plot_loss(runs, out / "loss.png"),
    }
    titles = {"accuracy": "Accuracy", "elbo": "Held-out ELBO", "ess": "Effective sample size",
              "loss": "Training loss"}
    lines = ["# BoLT report", "", "Runs: " + ", ".join(f"`{r.name}` ({r.path})" for r in runs), "",
             *_overview(runs), ""]
    for key, drawn in plots.items():
        if not drawn:  # a plot left over from an earlier render would contradict the page
            (out / f"{key}.png").unlink(missing_ok=True)
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({key}.png)" if drawn else "No data in any run.", ""]
    lines += ["## Per-iteration summary", ""]
    for run in runs:
        lines += [f"### {run.name}", "", *(_iteration_table(run) if run.iterations else ["No iterations yet."]), ""]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines))
    log.info("wrote %s (%s)", report, ", ".join(k for k, v in plots.items() if v) or "no plots")
    return report


def main(cfg, args) -> int:
    try:
        render_report(args.runs, args.out)
    except ReportError as exc:
        print(f"bolt report: {exc}", file=sys.stderr)
        return 2
    return 0
