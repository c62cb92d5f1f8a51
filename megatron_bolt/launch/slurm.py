"""Submit the whole EM loop to Slurm with plain sbatch: one job (or job array) per stage, chained by afterok.

    python -m megatron_bolt.launch.slurm --config examples/tinyllama_finemath.yaml \\
        --cluster examples/cluster.yaml cluster.account=my_account em.iterations=3 [--dry-run]

(``bash slurm/submit_em.sh`` is the same command.) Overrides starting with ``cluster.`` change the cluster
settings (megatron_bolt.launch.cluster), all others the run's config. The resolved config is written to
RUN_DIR/config.yaml; every stage of megatron_bolt.em.plan becomes ``sbatch slurm/KIND.sbatch <bolt argv>``
with the kind's resources, ``--array=0-(N-1)`` for sharded stages and ``--dependency=afterok:...`` on the
jobs of the stages it needs, so the queue runs the DAG and the submitting shell can go away. A failed job
cancels its dependants (``--kill-on-invalid-dep=yes``). Submitting a run again queues only the stages whose
outputs are missing, and those resume their own partial work (checkpoints, finished shards).

Every argument goes to sbatch as one argv element (no shell in between), so config values holding spaces,
quotes or ``$(...)`` arrive as they are written.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_bolt.config.loader import load_config
from megatron_bolt.config.schema import BoltConfig, ConfigError
from megatron_bolt.em.plan import Stage, build_plan, write_config
from megatron_bolt.launch.cluster import ClusterConfig, load_cluster, split_overrides

log = logging.getLogger(__name__)

REPO_SLURM = Path(__file__).resolve().parents[2] / "slurm"
# Environment each job reads (the sbatch scripts' documented variables); the driver sets or clears all of them.
JOB_ENV = ("BOLT_PYTHON", "BOLT_SAMPLE_PYTHON", "BOLT_CONTAINER_IMAGE", "BOLT_SAMPLE_CONTAINER_IMAGE",
           "BOLT_CONTAINER_MOUNTS", "GPUS_PER_NODE")


class SubmitError(RuntimeError):
    """sbatch refused a job; the message lists the jobs already queued (to scancel them)."""


@dataclass(frozen=True)
class Submission:
    stage: str
    job_id: str  # "<iter0/train>" placeholders in a dry run
    command: tuple[str, ...]  # the sbatch argv
    env: dict[str, str]  # the job variables it was submitted with

    def shell(self) -> str:
        """The submission as one copy-pasteable shell line (``VAR=value`` quoted after the ``=``: a quoted
        ``'VAR=value'`` would be a command name to the shell, not an assignment)."""
        env = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join([*env, shlex.join(self.command)])


def job_env(cluster: ClusterConfig, kind: str) -> dict[str, str]:
    """The variables that select the job's Python, container and GPU count (see the scripts' headers)."""
    sample = kind == "sample"
    env = {"BOLT_SAMPLE_PYTHON" if sample else "BOLT_PYTHON": cluster.python_for(kind)}
    image = cluster.image_for(kind)
    if image:
        env["BOLT_SAMPLE_CONTAINER_IMAGE" if sample else "BOLT_CONTAINER_IMAGE"] = image
        if cluster.container_mounts:
            env["BOLT_CONTAINER_MOUNTS"] = ",".join(cluster.container_mounts)
    if kind in ("train", "score"):
        env["GPUS_PER_NODE"] = str(cluster.resources(kind).gpus_per_node)
    return env


def sbatch_command(stage: Stage, cluster: ClusterConfig, dependencies: list[str], log_dir: Path,
                   sbatch: str = "sbatch", scripts_dir: Path = REPO_SLURM) -> list[str]:
    """The sbatch argv of one stage: resources of its kind, array, afterok dependencies, script, bolt argv."""
    r = cluster.resources(stage.kind)
    name = f"{cluster.job_name_prefix}-{stage.name.replace('/', '-')}"
    cmd = [sbatch, "--parsable", f"--job-name={name}", f"--nodes={r.nodes}", f"--time={r.time}"]
    if r.gpus_per_node:
        cmd.append(f"--gpus-per-node={r.gpus_per_node}")
    if r.cpus_per_task:
        cmd.append(f"--cpus-per-task={r.cpus_per_task}")
    if r.mem:
        cmd.append(f"--mem={r.mem}")
    if cluster.partition_for(stage.kind):
        cmd.append(f"--partition={cluster.partition_for(stage.kind)}")
    if cluster.account:
        cmd.append(f"--account={cluster.account}")
    if cluster.workdir:
        cmd.append(f"--chdir={cluster.workdir}")
    if stage.array:
        limit = f"%{r.array_limit}" if r.array_limit else ""
        cmd += [f"--array=0-{stage.array - 1}{limit}", f"--output={log_dir}/%x-%A_%a.out"]
    else:
        cmd.append(f"--output={log_dir}/%x-%j.out")
    if dependencies:
        cmd += [f"--dependency=afterok:{':'.join(dependencies)}", "--kill-on-invalid-dep=yes"]
    return [*cmd, *r.sbatch_args, str(scripts_dir / f"{stage.kind}.sbatch"), *stage.argv]


def submit(plan: list[Stage], cluster: ClusterConfig, log_dir: str | Path, *, sbatch: str = "sbatch",
           scripts_dir: Path = REPO_SLURM, dry_run: bool = False) -> list[Submission]:
    """Queue every unfinished stage in plan order (so each one's dependencies already have job ids).

    A stage whose outputs all exist (seen from ``cluster.workdir``) is not queued and nothing waits for it:
    resubmitting a run continues it.
    """
    log_dir = Path(log_dir).resolve()
    scripts = {scripts_dir / f"{s.kind}.sbatch" for s in plan}
    missing = sorted(str(p) for p in scripts if not p.is_file())
    if missing:
        raise SubmitError(f"sbatch scripts not found: {', '.join(missing)} (submit from a megatron-bolt checkout)")
    if not dry_run:
        log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the directory of --output
    job_ids: dict[str, str] = {}
    done: list[Submission] = []
    for stage in plan:
        if stage.finished(cluster.workdir or "."):
            log.info("%s: finished, not queued", stage.name)
            continue
        deps = [job_ids[a] for a in stage.after if a in job_ids]
        cmd = sbatch_command(stage, cluster, deps, log_dir, sbatch, scripts_dir)
        env = job_env(cluster, stage.kind)
        if dry_run:
            job_id = f"<{stage.name}>"
        else:
            full_env = {k: v for k, v in os.environ.items() if k not in JOB_ENV} | env
            proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
            job_id = proc.stdout.strip().split(";")[0]  # --parsable prints "ID" or "ID;CLUSTER"
            if proc.returncode != 0 or not job_id:
                queued = " ".join(s.job_id for s in done)
                raise SubmitError(f"sbatch for {stage.name} failed ({proc.returncode}): {proc.stderr.strip()}"
                                  + (f"; already queued: {queued} (scancel {queued})" if queued else ""))
            log.info("%s: job %s%s", stage.name, job_id, f" (array of {stage.array})" if stage.array else "")
        job_ids[stage.name] = job_id
        done.append(Submission(stage.name, job_id, tuple(cmd), env))
    return done


def submit_em(cfg: BoltConfig, run_dir: str, config_path: str, cluster_yaml: str | Path | None,
              dry_run: bool = False, cluster_overrides: list[str] | tuple[str, ...] = (), *,
              sbatch: str = "sbatch") -> list[Submission]:
    """`bolt em --launcher slurm`: plan the run whose resolved config is ``config_path`` and queue all of it.

    The config is validated at the training world size (nodes x GPUs of the train kind) first, so a batch
    size that cannot divide fails here rather than after a queue wait.
    """
    cluster = load_cluster(cluster_yaml, cluster_overrides)
    cfg.validate(cluster.train.nodes * cluster.train.gpus_per_node)
    if not dry_run and not Path(config_path).is_file():
        raise ConfigError(f"{config_path} does not exist: write the resolved config first (em.plan.write_config)")
    plan = build_plan(cfg, run_dir, config_path)
    log_dir = Path(cluster.log_dir or Path(run_dir) / "logs")
    if cluster.workdir and not log_dir.is_absolute():
        log_dir = Path(cluster.workdir) / log_dir
    return submit(plan, cluster, log_dir, sbatch=sbatch, dry_run=dry_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_bolt.launch.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE.yaml", help="The run's config (see examples/).")
    parser.add_argument("--cluster", metavar="FILE.yaml", help="Cluster settings (see examples/cluster.yaml).")
    parser.add_argument("--dry-run", action="store_true", help="Print the sbatch commands; submit nothing.")
    parser.add_argument("--sbatch", default="sbatch", help="sbatch executable.")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Config and cluster.* overrides.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bolt_overrides, cluster_overrides = split_overrides(args.overrides)
    try:
        cfg = load_config(args.config, bolt_overrides)
        run_dir = cfg.em.run_dir
        config_path = str(Path(run_dir) / "config.yaml") if args.dry_run else write_config(cfg, run_dir)
        submissions = submit_em(cfg, run_dir, config_path, args.cluster, args.dry_run, cluster_overrides,
                                sbatch=args.sbatch)
    except (ConfigError, SubmitError) as exc:
        print(f"submit_em: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(s.shell() for s in submissions))
    else:
        print(f"submit_em: queued {len(submissions)} jobs for {run_dir}: {' '.join(s.job_id for s in submissions)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
