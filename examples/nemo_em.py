"""The BoLT EM loop as a nemo-run experiment: one task per stage of megatron_bolt.em.plan, chained by the plan.

    # here, one stage at a time (LocalExecutor; torchrun for the distributed stages):
    python examples/nemo_em.py --config examples/tiny_em.yaml [--nproc-per-node 2] [key=value ...]
    # on Slurm from a login node (LocalTunnel) or through SSH; the queue runs the DAG (afterok), detached:
    python examples/nemo_em.py --config examples/tinyllama_finemath.yaml --executor slurm \\
        --cluster examples/cluster.yaml cluster.account=my_account [--ssh-host login.example.com --ssh-user me \\
        --remote-dir /shared/nemo-run] [--dryrun]

Configuration is what every `bolt` command takes (a YAML file plus key=value overrides) and, for Slurm, the
cluster file of the sbatch driver (``cluster.*`` overrides), read with our own loader: one config system,
so no ``run.cli`` factories. Each task is a ``run.Script`` that runs ``python -m megatron_bolt.cli <argv>``;
the command is written into the script with shell quoting, because nemo-run joins a Script's ``args``
unquoted into the sbatch file (and quotes torchrun's arguments even where no shell reads them). Sharded
stages become one Slurm array job (``array=0-N``, the task id replaces ``{shard}``); nemo-run has no local
arrays, so locally they become one task per shard. A task whose stage already finished (all its outputs
exist) succeeds at once, so running the experiment again continues the run; a task whose inputs are
missing fails at once, since nemo-run's local DAG starts the next stage even after a failure. Needs the
``nemo`` extra.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from megatron_bolt.config.loader import load_config
from megatron_bolt.config.schema import ConfigError
from megatron_bolt.em.plan import SHARD, Stage, build_plan, write_config
from megatron_bolt.launch.cluster import ClusterConfig, load_cluster, split_overrides

ARRAY_TASK = '"$SLURM_ARRAY_TASK_ID"'


def _quote(arg: str, shard: str) -> str:
    """One argv element as shell text; ``{shard}`` becomes ``shard`` (a number, or the array task variable)."""
    if SHARD not in arg:
        return shlex.quote(arg)
    return shard.join(shlex.quote(piece) if piece else "" for piece in arg.split(SHARD))


def stage_script(stage: Stage, needs: list[str], python: str, shard: str = "", workdir: str | None = None):
    """The task's shell script: succeed at once if the stage already finished (a rerun continues the run),
    refuse to start without its inputs, else run the stage's `bolt` argv."""
    import nemo_run as run

    lines = ["set -euo pipefail"]
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)}")
    lines.append(f"finished=1; for f in {' '.join(map(shlex.quote, stage.outputs))}; do [ -e \"$f\" ] || finished=0; "
                 f"done; if [ $finished = 1 ]; then echo {shlex.quote(f'bolt: {stage.name} already finished')}; "
                 "exit 0; fi")
    if needs:
        lines.append(f"for f in {' '.join(map(shlex.quote, needs))}; do [ -e \"$f\" ] || "
                     "{ echo \"bolt: $f is missing: a stage this one needs did not finish\" >&2; exit 1; }; done")
    argv = " ".join(_quote(a, shard) for a in stage.argv)
    lines.append(f"exec {shlex.quote(python)} -m megatron_bolt.cli {argv}")
    return run.Script(inline="\n".join(lines) + "\n")


def _sbatch_parameters(args: list[str]) -> dict[str, str | bool]:
    """cluster.KIND.sbatch_args (['--exclusive', '--qos=high']) as SlurmExecutor.additional_parameters."""
    params: dict[str, str | bool] = {}
    for arg in args:
        key, sep, value = arg.removeprefix("--").partition("=")
        params[key] = value if sep else True
    return params


def slurm_executor(stage: Stage, cluster: ClusterConfig, tunnel):
    """The kind's resources and container; a failed dependency cancels the job instead of leaving it pending."""
    import nemo_run as run

    r = cluster.resources(stage.kind)
    extra = _sbatch_parameters(r.sbatch_args) | ({"kill_on_invalid_dep": "yes"} if stage.after else {})
    array = f"0-{stage.array - 1}" + (f"%{r.array_limit}" if r.array_limit else "") if stage.array else None
    return run.SlurmExecutor(
        account=cluster.account, partition=cluster.partition_for(stage.kind), nodes=r.nodes,
        ntasks_per_node=r.gpus_per_node if stage.distributed else 1, gpus_per_node=r.gpus_per_node or None,
        cpus_per_task=r.cpus_per_task, mem=r.mem, time=r.time, container_image=cluster.image_for(stage.kind),
        container_mounts=list(cluster.container_mounts), tunnel=tunnel, packager=run.Packager(),
        launcher="torchrun" if stage.distributed else None, array=array,
        dependency_type="afterok", job_name_prefix=f"{cluster.job_name_prefix}-",
        additional_parameters=extra or None, poll_estimated_start_time=False,
    )


def add_stages(exp, plan: list[Stage], *, cluster: ClusterConfig | None, tunnel=None, nproc_per_node: int = 1) -> dict:
    """Add every stage to ``exp``: Slurm executors from ``cluster`` (with ``tunnel``), else local ones.

    Returns {task name: stage name}. Local tasks also depend on the task before them, so one runs at a time
    (stages share the machine's GPUs); on Slurm the plan's own dependencies let independent stages overlap.
    """
    import nemo_run as run

    outputs = {s.name: s.outputs for s in plan}
    task_ids: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    previous: list[str] = []
    for stage in plan:
        needs = [path for name in stage.after for path in outputs[name]]
        deps = [t for name in stage.after for t in task_ids[name]]
        base = stage.name.replace("/", "-")
        if cluster is not None:
            script = stage_script(stage, needs, cluster.python_for(stage.kind), ARRAY_TASK, cluster.workdir)
            tasks = [(base, script, slurm_executor(stage, cluster, tunnel))]
        else:
            env = {"PATH": str(Path(sys.executable).parent)}  # nemo-run launches `torchrun` from PATH
            launcher = "torchrun" if stage.distributed else None
            nproc = nproc_per_node if stage.distributed else 1
            shards = [f"-{k}" for k in range(stage.array)] if stage.array else [""]
            tasks = [(base + suffix, stage_script(stage, needs, sys.executable, suffix[1:]),
                      run.LocalExecutor(ntasks_per_node=nproc, launcher=launcher, env_vars=env)) for suffix in shards]
        task_ids[stage.name] = []
        for name, script, executor in tasks:
            after = deps if cluster is not None else sorted(set(deps) | set(previous))
            task_id = exp.add(script, executor=executor, name=name, dependencies=after or None)
            task_ids[stage.name].append(task_id)
            names[task_id] = stage.name
            previous = [task_id]
    return names


def _tunnel(args):
    """SSH to a login node, or run sbatch right here (a login node) through LocalTunnel."""
    import nemo_run as run

    if args.ssh_host:
        return run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.remote_dir, identity=args.identity)
    return run.LocalTunnel(job_dir=args.remote_dir or "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE.yaml", help="The run's config (see examples/).")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--cluster", metavar="FILE.yaml", help="Cluster settings for --executor slurm.")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="Local: processes of distributed stages.")
    parser.add_argument("--ssh-host", help="Slurm login node to reach through SSH (default: sbatch runs here).")
    parser.add_argument("--ssh-user", help="SSH user.")
    parser.add_argument("--identity", help="SSH private key (default: the SSH agent / password).")
    parser.add_argument("--remote-dir", help="nemo-run's job directory on the cluster (scripts and logs).")
    parser.add_argument("--title", help="Experiment title (default: bolt-em-RUN_DIR_NAME).")
    parser.add_argument("--dryrun", action="store_true", help="Print what would run; launch nothing.")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Config and cluster.* overrides.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bolt_overrides, cluster_overrides = split_overrides(args.overrides)
    try:
        cfg = load_config(args.config, bolt_overrides)
        cluster = load_cluster(args.cluster, cluster_overrides) if args.executor == "slurm" else None
        if cluster is not None and not cluster.account:
            raise ConfigError("nemo-run's SlurmExecutor needs an account: set cluster.account")
        if args.ssh_host and not (args.ssh_user and args.remote_dir):
            raise ConfigError("--ssh-host needs --ssh-user and --remote-dir (nemo-run's job directory on the cluster)")
        cfg.validate(cluster.train.nodes * cluster.train.gpus_per_node if cluster else args.nproc_per_node)
        run_dir = cfg.em.run_dir
        config_path = str(Path(run_dir) / "config.yaml") if args.dryrun else write_config(cfg, run_dir)
        plan = build_plan(cfg, run_dir, config_path)
    except ConfigError as exc:
        print(f"nemo_em: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("NEMORUN_HOME", str(Path.home() / ".nemo_run"))  # read when nemo_run is imported
    import nemo_run as run
    from torchx.specs import AppState

    tunnel = _tunnel(args) if cluster else None
    title = args.title or f"bolt-em-{Path(run_dir).name}"
    with run.Experiment(title, skip_status_at_exit=True) as exp:
        names = add_stages(exp, plan, cluster=cluster, tunnel=tunnel, nproc_per_node=args.nproc_per_node)
        if args.dryrun:
            exp.dryrun(log=True, delete_exp_dir=False)
            print(f"nemo_em: dry run of {len(names)} tasks; nothing launched")
            return 0
        exp.run(detach=cluster is not None)
        jobs = list(exp.jobs)
    if cluster is not None:
        for job in jobs:
            print(f"nemo_em: {names[job.id]}: {job.handle}")
        return 0
    failed = [names[job.id] + f" ({job.id})" for job in jobs if job.state != AppState.SUCCEEDED]
    if failed:
        print(f"nemo_em: failed or not run: {', '.join(failed)}; logs under {os.environ['NEMORUN_HOME']}",
              file=sys.stderr)
        return 1
    print(f"nemo_em: all {len(jobs)} tasks succeeded; outputs in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
