"""``bolt em``: run the EM plan (``plan.py``) on this machine, resumable stage by stage.

    bolt em --config examples/tiny_em.yaml
    bolt em --config examples/tinyllama_finemath.yaml --launcher slurm --cluster examples/cluster.yaml

Locally every stage runs in this process, one after another, through the same ``bolt`` argv a cluster
launcher submits (one import of megatron-core for the whole loop). A stage that finishes writes
``RUN/manifests/<iteration>/<stage>.json`` (argv, config hash, seconds, outputs) atomically; a rerun skips
stages whose manifest and outputs exist and resumes the first unfinished one, which itself resumes from its
own partial state (training from its last checkpoint, sampling from its last complete batch). The resolved
config is RUN/config.yaml; rerunning with a config that differs (other than more iterations) is refused.
After the last stage, ``report.json`` and ``report.md`` with plots summarise every iteration.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from megatron_bolt.config.loader import config_hash
from megatron_bolt.config.schema import BoltConfig, ConfigError
from megatron_bolt.em.plan import Stage, build_plan, write_config
from megatron_bolt.utils.atomic import write_text_atomic

log = logging.getLogger(__name__)


class EMError(RuntimeError):
    """A stage failed; the message names it and the command to rerun it alone."""


def _manifest_path(run_dir: Path, stage: Stage) -> Path:
    return run_dir / "manifests" / f"{stage.name}.json"


def _finished(run_dir: Path, stage: Stage) -> dict[str, Any] | None:
    path = _manifest_path(run_dir, stage)
    if not path.is_file() or not stage.finished():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def run_stage(stage: Stage) -> None:
    from megatron_bolt.cli import main as bolt

    tasks = [stage.shard_argv(s) for s in range(stage.array)] if stage.array else [stage.argv]
    for argv in tasks:
        rc = bolt(list(argv))
        if rc:
            raise EMError(f"stage {stage.name} failed (exit {rc}); rerun `bolt em` to resume, or run it alone: "
                          f"bolt {shlex.join(argv)}")


def run_plan(cfg: BoltConfig) -> tuple[Path, list[Stage], dict[str, float]]:
    """Run every unfinished stage; returns (run dir, plan, seconds per stage)."""
    run_dir = Path(cfg.em.run_dir)
    config_path = write_config(cfg, str(run_dir))
    plan = build_plan(cfg, str(run_dir), config_path)
    digest = config_hash(cfg)
    seconds: dict[str, float] = {}
    for stage in plan:
        done = _finished(run_dir, stage)
        if done is not None:
            seconds[stage.name] = done["seconds"]
            continue
        log.info("em: stage %s", stage.name)
        start = time.perf_counter()
        run_stage(stage)
        seconds[stage.name] = round(time.perf_counter() - start, 2)
        if not stage.finished():
            missing = [o for o in stage.outputs if not Path(o).exists()]
            raise EMError(f"stage {stage.name} exited cleanly but did not write {missing}")
        _manifest_path(run_dir, stage).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(_manifest_path(run_dir, stage), json.dumps(
            {"stage": stage.name, "argv": list(stage.argv), "config_hash": digest, "seconds": seconds[stage.name],
             "outputs": list(stage.outputs), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")
    return run_dir, plan, seconds


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def iteration_report(run_dir: Path, i: int, seconds: dict[str, float]) -> dict[str, Any]:
    """One iteration's figures, from the files its stages wrote (the ``bolt report`` input contract)."""
    from megatron_bolt.train.loop import read_metrics

    it = run_dir / f"iter{i}"
    ev = _read(it / "eval" / "summary.json") or {}
    estep = _read(it / "estep" / "estep.json")
    heldout = _read(it / "heldout" / "estep.json")
    history = read_metrics(it / "checkpoints")
    kinds = {"estep": ("sample", "score", "merge"), "build": ("build",), "train": ("train",),
             "export": ("export",), "eval": ("eval",), "heldout": ("heldout",)}
    return {
        "iteration": i,
        "accuracy": ev.get("accuracy"),
        # ELBO of this iteration's model on held-out documents; without them, the E-step's (previous model).
        "elbo": (heldout or {}).get("elbo"),
        "estep_elbo": (estep or {}).get("elbo"),
        "ess_mean": (estep or {}).get("mean_ess"),
        "estep": {k: estep[k] for k in ("chunks", "with_latent", "no_valid_sample", "mean_latent_tokens",
                                        "sampling")} if estep else None,
        "train": {"loss_curve": [[h["step"], h["loss"]] for h in history],
                  "final_loss": history[-1]["loss"] if history else None,
                  "tokens": sum(h["tokens"] for h in history), "steps": len(history)},
        "seconds": {kind: round(sum(seconds.get(f"iter{i}/{s}", 0.0) for s in stages), 2)
                    for kind, stages in kinds.items() if any(f"iter{i}/{s}" in seconds for s in stages)},
    }


def write_report(cfg: BoltConfig, run_dir: Path, seconds: dict[str, float], name: str | None = None
                 ) -> dict[str, Any]:
    from megatron_bolt.report.render import render_report

    report = {"run": name or run_dir.name, "config_hash": config_hash(cfg),
              "iterations": [iteration_report(run_dir, i, seconds) for i in range(cfg.em.iterations + 1)]}
    write_text_atomic(run_dir / "report.json", json.dumps(report, indent=1) + "\n")
    render_report([run_dir], run_dir)
    return report


def summary_table(report: dict[str, Any]) -> str:
    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    lines = [f"{'iter':>4} {'accuracy':>16} {'ELBO(n=max)':>11} {'ESS':>5} {'final loss':>10} {'tokens':>9} "
             f"{'seconds':>8}"]
    for it in report["iterations"]:
        acc = it["accuracy"]
        acc_s = f"{acc['value']:.1%} [{acc['ci_low']:.0%},{acc['ci_high']:.0%}]" if acc else "-"
        elbo = it["elbo"] or it["estep_elbo"] or {}
        top = elbo[max(elbo, key=int)] if elbo else None
        lines.append(f"{it['iteration']:>4} {acc_s:>16} {fmt(top, '.2f'):>11} {fmt(it['ess_mean'], '.2f'):>5} "
                     f"{fmt(it['train']['final_loss']):>10} {it['train']['tokens']:>9} "
                     f"{sum(it['seconds'].values()):>8.1f}")
    return "\n".join(lines)


def main(cfg: BoltConfig, args) -> int:
    from megatron_bolt.runtime.world import world_from_env

    if getattr(args, "launcher", "local") == "slurm":
        from megatron_bolt.launch.slurm import SubmitError, submit_em

        try:
            path = str(Path(cfg.em.run_dir) / "config.yaml") if args.dry_run else write_config(cfg, cfg.em.run_dir)
            done = submit_em(cfg, cfg.em.run_dir, path, args.cluster, dry_run=args.dry_run,
                             cluster_overrides=args.cluster_overrides)
        except (ConfigError, SubmitError) as exc:
            print(f"bolt em: {exc}", file=sys.stderr)
            return 2
        print("\n".join(s.shell() for s in done) if args.dry_run else
              f"em: queued {len(done)} jobs: {' '.join(s.job_id for s in done)}")
        return 0
    if world_from_env().world_size > 1:
        print("bolt em: the local runner is one process; on a cluster use --launcher slurm or examples/nemo_em.py "
              "(each stage then gets its own torchrun)", file=sys.stderr)
        return 2
    try:
        run_dir, _, seconds = run_plan(cfg)
    except (ConfigError, EMError) as exc:
        print(f"bolt em: {exc}", file=sys.stderr)
        return 2
    report = write_report(cfg, run_dir, seconds)
    print(summary_table(report))
    print(f"em: report {run_dir / 'report.md'}")
    return 0
