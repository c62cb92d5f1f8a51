"""The EM loop as one stage DAG: every launcher (local runner, Slurm driver, nemo-run) runs this plan.

Each stage is a ``bolt`` command line over files in the run directory R, so stages hand off through disk
and any launcher can run them anywhere, in any process:

    iter0:  build -> train -> export -> eval (and heldout)          warm start on the teacher latents
    iter i: sample[shards] -> score[shards] -> merge -> build -> train -> export -> eval (and heldout)

``sample`` of iteration i reads the checkpoint and HF export of iteration i - 1. Array stages carry the
literal ``{shard}`` in their argv; the launcher puts the shard index (a Slurm array task id) there. No torch
import here: launchers import this on login nodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from megatron_bolt.config.loader import dump_yaml, parse_override, read_yaml, to_dict
from megatron_bolt.config.schema import BoltConfig, ConfigError
from megatron_bolt.utils.atomic import write_text_atomic

SHARD = "{shard}"
Kind = Literal["cpu", "sample", "score", "train", "eval"]


@dataclass(frozen=True)
class Stage:
    name: str  # "iter0/train", "iter2/sample", ...
    iteration: int
    kind: Kind  # resource class (and container) on a cluster
    argv: tuple[str, ...]  # `bolt` argv without "bolt"; array stages contain the literal "{shard}"
    after: tuple[str, ...]  # stages that must finish successfully first (Slurm afterok)
    array: int = 0  # > 0: this many independent tasks, one per shard
    distributed: bool = False  # launched with torchrun across the allocation's GPUs
    outputs: tuple[str, ...] = ()  # paths the stage writes last; all present means it finished

    def finished(self, base: str | Path = ".") -> bool:
        """All outputs exist (relative paths resolved against ``base``, the jobs' working directory)."""
        return bool(self.outputs) and all((Path(base) / p).exists() for p in self.outputs)

    def shard_argv(self, shard: int) -> tuple[str, ...]:
        """The argv of array task ``shard``."""
        return tuple(a.replace(SHARD, str(shard)) for a in self.argv)


def _yaml_string(value: str, in_list: bool) -> str:
    """A string as YAML that reads back as exactly that string: plain where it round-trips, else JSON-quoted
    (JSON strings are valid YAML). Plain would misread a path named 'null' or '1e5', or one holding ', '."""
    text = f"k=[{value}]" if in_list else f"k={value}"
    try:
        plain = parse_override(text)[1] == ([value] if in_list else value)
    except ConfigError:
        plain = False
    return value if plain else json.dumps(value)


def override(key: str, value: str | int | bool | list[str] | None) -> str:
    """One ``key=value`` override; lists as YAML flow lists. Never joined into a shell string, so no shell quoting."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, int):
        return f"{key}={value}"
    if isinstance(value, list):
        return f"{key}=[{','.join(_yaml_string(v, in_list=True) for v in value)}]"
    return f"{key}={_yaml_string(value, in_list=False)}"


def _check(cfg: BoltConfig, run_dir: str, config_path: str) -> None:
    em = cfg.em
    problems = []
    if not run_dir:
        problems.append("the run directory (em.run_dir) is empty")
    if not config_path:
        problems.append("the resolved config path is empty")
    if em.iterations < 0:
        problems.append(f"em.iterations={em.iterations} must be >= 0 (0: warm start only)")
    if not em.warm_documents:
        problems.append("em.warm_documents is empty: list the prepared warm-start documents (bolt prepare output)")
    if not em.warm_latents:
        problems.append("em.warm_latents is empty: the warm start trains on teacher latents (bolt synthesize output)")
    if em.iterations > 0 and not em.bootstrap_documents:
        problems.append(f"em.bootstrap_documents is empty, but em.iterations={em.iterations}: list the prepared "
                        "documents the E-step samples latents for")
    if cfg.estep.num_shards < 1:
        problems.append(f"estep.num_shards={cfg.estep.num_shards} must be at least 1")
    if not cfg.data.tokenizer:
        problems.append("data.tokenizer is not set: build-dataset tokenizes the documents and latents with it")
    if problems:
        raise ConfigError("cannot plan the EM loop:\n  - " + "\n  - ".join(problems))


def build_plan(cfg: BoltConfig, run_dir: str, config_path: str) -> list[Stage]:
    """Every stage of warm start + ``em.iterations`` bootstrap iterations, in topological order."""
    _check(cfg, run_dir, config_path)
    em, root = cfg.em, PurePosixPath(run_dir)
    stages: list[Stage] = []

    def path(i: int, *parts: str) -> str:
        return str(root / f"iter{i}" / PurePosixPath(*parts))

    def add(name: str, i: int, kind: Kind, command: str, flags: list[str], overrides: list[str], after: list[str],
            outputs: list[str], array: int = 0, distributed: bool = False) -> str:
        full = f"iter{i}/{name}"
        argv = (command, "--config", config_path, *flags, *overrides)
        stages.append(Stage(full, i, kind, argv, tuple(after), array, distributed, tuple(outputs)))
        return full

    def estep(i: int, name: str, stage: str, model: int, docs: list[str], out: str, after: str, kind: Kind,
              array: int = 0, distributed: bool = False, extra: tuple[str, ...] = ()) -> str:
        """An ``estep`` stage with iteration ``model``'s weights; ``array`` tasks get ``--shard {shard}``."""
        flags = ["--stage", stage, *(("--shard", SHARD) if array else ()),
                 "--ckpt", path(model, "checkpoints"), "--hf-dir", path(model, "hf")]
        if stage in ("sample", "score"):  # every shard's file, named as megatron_bolt.estep.work.shard_name does
            outputs = [f"{out}/{stage}s/shard-{k:05d}.jsonl" for k in range(array)]
        else:
            outputs = [f"{out}/estep.json"]  # written last
        return add(name, i, kind, "estep", flags,
                   [override("estep.documents", docs), override("estep.output_dir", out), *extra],
                   [after], outputs, array, distributed)

    def m_step(i: int, documents: list[str], latents: list[str], after: str | None) -> None:
        """build -> train -> export -> eval (-> heldout) of iteration i."""
        prefix = path(i, "data", "joint")
        build = add("build", i, "cpu", "build-dataset", [],
                    [override("build.documents", documents), override("build.latents", latents),
                     override("build.output_prefix", prefix)], [after] if after else [], [f"{prefix}.json"])
        if i == 0 or em.restart_from_base:
            load = em.base_checkpoint
        else:
            load = path(i - 1, "checkpoints")
        # Done means the final checkpoint (checkpoint.dist.step_dir, renamed into place when complete):
        # `latest` already exists after the first intermediate save.
        final = path(i, "checkpoints", f"step_{cfg.train.train_iters:08d}")
        train = add("train", i, "train", "train", [],
                    [override("data.data_prefix", [prefix]), override("train.checkpoint.save", path(i, "checkpoints")),
                     override("train.checkpoint.load", load), override("train.checkpoint.finetune", load is not None)],
                    [build], [final], distributed=True)
        export = add("export", i, "cpu", "export-hf", ["--ckpt", path(i, "checkpoints"), "--out", path(i, "hf")], [],
                     [train], [path(i, "hf", "config.json")])
        add("eval", i, "eval", "eval", ["--ckpt", path(i, "hf")], [override("eval.output_dir", path(i, "eval"))],
            [export], [path(i, "eval", "summary.json")])
        if em.heldout_documents:
            estep(i, "heldout", "all", i, em.heldout_documents, path(i, "heldout"), export, "sample",
                  extra=(override("estep.num_shards", 1),))

    m_step(0, em.warm_documents + (em.bootstrap_documents if em.warm_raw_bootstrap else []), em.warm_latents, None)
    for i in range(1, em.iterations + 1):
        out, shards = path(i, "estep"), cfg.estep.num_shards
        docs = em.bootstrap_documents
        sample = estep(i, "sample", "sample", i - 1, docs, out, f"iter{i - 1}/export", "sample", array=shards)
        score = estep(i, "score", "score", i - 1, docs, out, sample, "score", array=shards, distributed=True)
        merge = estep(i, "merge", "merge", i - 1, docs, out, score, "cpu")
        documents, latents = list(docs), [f"{out}/latents.jsonl"]
        if em.keep_warm_latents:
            documents, latents = documents + em.warm_documents, latents + em.warm_latents
        m_step(i, documents, latents, merge)
    return stages


def write_config(cfg: BoltConfig, run_dir: str) -> str:
    """Write the resolved config every stage reads to RUN_DIR/config.yaml and return its path.

    A different config already there is refused, since the stages already run in that directory were made
    with it; only ``em.iterations`` may change (extending a finished run by more iterations).
    """
    path = Path(run_dir) / "config.yaml"
    text = dump_yaml(cfg)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return str(path)
    if path.is_file():
        old, new = read_yaml(path), to_dict(cfg)
        for data in (old, new):
            data.get("em", {}).pop("iterations", None)
        if old != new:
            raise ConfigError(f"{path} holds a different config: resume with `--config {path}` (em.iterations may "
                              "change), or start a new em.run_dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return str(path)
