"""Cluster settings for the launchers: one YAML file (examples/cluster.yaml) plus ``cluster.*`` overrides.

Resources are per stage kind (``cpu``, ``sample``, ``score``, ``train``, ``eval``, see megatron_bolt.em.plan),
because the kinds want different machines and even different software: sampling runs in a TensorRT-LLM
environment, training in the trainer's. A YAML file only needs the keys it changes; every kind keeps its own
defaults for the rest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from megatron_bolt.config.loader import apply_overrides, from_dict, read_yaml, to_dict
from megatron_bolt.config.schema import ConfigError, opt
from megatron_bolt.em.plan import Kind

KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(kw_only=True)
class StageResources:
    """What one job of a stage kind asks for; an array job asks for it once per task."""

    nodes: int = opt(1, "Nodes per job; only train spans several (one torchrun per node).")
    gpus_per_node: int = opt(0, "GPUs per node; distributed stages (train, score) start one process per GPU.")
    cpus_per_task: int | None = opt(None, "CPU cores for the job's one task per node (None: the partition default).")
    mem: str | None = opt(None, "Memory per node, e.g. '200G' (None: the partition default).")
    time: str = opt("04:00:00", "Wall-clock limit (sbatch --time).")
    partition: str | None = opt(None, "Partition for this kind (None: cluster partition).")
    container_image: str | None = opt(None, "pyxis/enroot image for this kind (None: cluster container_image).")
    python: str | None = opt(None, "Python that runs `-m megatron_bolt.cli` for this kind (None: cluster python).")
    array_limit: int | None = opt(None, "Array tasks running at once (sbatch --array=0-N%LIMIT); None: no limit.")
    sbatch_args: list[str] = opt([], "Extra sbatch arguments, one per item, e.g. ['--exclusive', '--qos=high'].")


def _resources(**defaults: Any) -> Any:
    return field(default_factory=lambda: StageResources(**defaults),
                 metadata={"help": f"Resources of one job of this kind (defaults: {defaults})."})


@dataclass(kw_only=True)
class ClusterConfig:
    """Where and how the EM stages run; shared by the sbatch driver and the nemo-run experiment."""

    account: str | None = opt(None, "Slurm account (sbatch --account); None: the user's default.")
    partition: str | None = opt(None, "Default partition; a kind's own partition wins.")
    python: str = opt(".venv/bin/python", "Python with megatron-bolt installed (in containers: usually 'python').")
    container_image: str | None = opt(None, "Default pyxis image (srun --container-image); None: run on the host.")
    container_mounts: list[str] = opt([], "pyxis mounts 'SRC:DST'; mount the checkout and the run directory at the "
                                          "same paths so that the stages' paths mean the same inside.")
    workdir: str | None = opt(None, "Directory jobs start in, the checkout on the shared file system (None: where "
                                    "you submit from); relative paths in the config resolve against it.")
    log_dir: str | None = opt(None, "Job logs (None: RUN_DIR/logs).")
    job_name_prefix: str = opt("bolt", "Job names are PREFIX-iterN-STAGE.")
    cpu: StageResources = _resources(cpus_per_task=16, time="04:00:00")
    sample: StageResources = _resources(gpus_per_node=1, cpus_per_task=8, time="04:00:00")
    score: StageResources = _resources(gpus_per_node=8, cpus_per_task=64, time="04:00:00")
    train: StageResources = _resources(gpus_per_node=8, cpus_per_task=64, time="24:00:00")
    eval: StageResources = _resources(gpus_per_node=1, cpus_per_task=8, time="02:00:00")

    def resources(self, kind: str) -> StageResources:
        if kind not in KINDS:
            raise ConfigError(f"unknown stage kind {kind!r} (known: {', '.join(KINDS)})")
        return getattr(self, kind)

    def python_for(self, kind: str) -> str:
        return self.resources(kind).python or self.python

    def image_for(self, kind: str) -> str | None:
        return self.resources(kind).container_image or self.container_image

    def partition_for(self, kind: str) -> str | None:
        return self.resources(kind).partition or self.partition


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, section by section, so a YAML that sets ``train.time`` keeps train's GPUs."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _control_characters(value: Any, key: str = "") -> list[str]:
    """Keys whose string values hold control characters (newline, CR, NUL, ...): a job script generated from
    them could not be quoted safely (a newline ends an ``#SBATCH`` comment line and starts a command)."""
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _control_characters(v, f"{key}{name}.")]
    if isinstance(value, list):
        return [k for v in value for k in _control_characters(v, key)]
    if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
        return [key.rstrip(".")]
    return []


def load_cluster(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ClusterConfig:
    """Defaults <- YAML file <- ``key=value`` overrides (``cluster.`` prefixes are accepted and dropped)."""
    data = _merge(to_dict(ClusterConfig()), read_yaml(path) if path else {})
    plain = [o.removeprefix("cluster.") for o in overrides]
    cluster = from_dict(ClusterConfig, apply_overrides(data, plain))
    problems = [f"cluster.{key} holds a control character (newline, tab, NUL, ...): Slurm job scripts cannot carry "
                "it safely" for key in dict.fromkeys(_control_characters(to_dict(cluster)))]
    for kind in KINDS:
        r = cluster.resources(kind)
        if r.nodes < 1:
            problems.append(f"{kind}.nodes={r.nodes} must be at least 1")
        elif r.nodes > 1 and kind != "train":
            problems.append(f"{kind}.nodes={r.nodes}: only train spans several nodes; every other kind runs on one")
        if r.gpus_per_node < (0 if kind == "cpu" else 1):
            problems.append(f"{kind}.gpus_per_node={r.gpus_per_node} must be at least {0 if kind == 'cpu' else 1}: "
                            "every stage kind but cpu runs on GPUs")
        if r.array_limit is not None and r.array_limit < 1:
            problems.append(f"{kind}.array_limit={r.array_limit} must be at least 1 (or null)")
    if problems:
        raise ConfigError("invalid cluster configuration:\n  - " + "\n  - ".join(problems))
    return cluster


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(bolt config overrides, cluster overrides): the launchers take both on one command line."""
    cluster = [o for o in overrides if o.startswith("cluster.")]
    return [o for o in overrides if not o.startswith("cluster.")], cluster
