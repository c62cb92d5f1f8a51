"""``bolt train``: the M-step training loop, top to bottom.

    bolt train --config examples/tiny_cpu.yaml
    torchrun --nproc-per-node 2 -m megatron_bolt.cli train --config examples/tiny_cpu.yaml \
        parallel.tensor_model_parallel_size=2
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from megatron.core import parallel_state

from megatron_bolt.checkpoint import dist as ckpt
from megatron_bolt.config.loader import dump_yaml
from megatron_bolt.config.schema import BoltConfig
from megatron_bolt.data.dataset import build_train_dataset, rank_batches
from megatron_bolt.data.synthetic import CopyTaskRows
from megatron_bolt.models.gpt import build_model
from megatron_bolt.runtime import distributed
from megatron_bolt.train.metrics import MetricsLogger
from megatron_bolt.train.setup import build_optimizer, build_scheduler, wrap_ddp
from megatron_bolt.train.step import train_step
from megatron_bolt.utils.atomic import naming_write_errors, write_text_atomic

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"  # per-step metrics appended by rank 0 next to the checkpoints


def _batches(cfg: BoltConfig, start_step: int):
    """This data-parallel rank's rows of each global batch from ``start_step`` on (the data position is the
    step: rows are addressed by index, so a resumed run reads exactly what an uninterrupted one would)."""
    if cfg.data.data_prefix:
        source = build_train_dataset(cfg)
    else:
        log.warning("data.data_prefix is empty: training on the synthetic copy task")
        source = CopyTaskRows(cfg.data.seq_length, cfg.model.vocab_size, cfg.data.seed)
    return rank_batches(source, cfg.train.global_batch_size, parallel_state.get_data_parallel_rank(),
                        parallel_state.get_data_parallel_world_size(), start_step)


def train(cfg: BoltConfig) -> list[dict]:
    """Train and return the per-step metrics (identical on every rank)."""
    history: list[dict] = []
    with distributed(cfg) as world:
        model = wrap_ddp(cfg, build_model(cfg))
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer)
        t, c = cfg.train, cfg.train.checkpoint
        step = _restore(cfg, model, optimizer, scheduler)
        if world.rank == 0 and c.save:
            Path(c.save).mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(c.save) / "config.yaml", dump_yaml(cfg))  # fails here if SAVE is read-only
        batches = _batches(cfg, step)
        metrics_log = MetricsLogger(cfg, world.rank, world.world_size, step)
        record = _open_record(Path(c.save) / METRICS) if world.rank == 0 and c.save else None
        for chunk in model:
            chunk.train()
        try:
            while step < t.train_iters:
                start = time.perf_counter()
                metrics = train_step(model, optimizer, scheduler, next(batches), t.micro_batch_size,
                                     cfg.data.seq_length, t.on_nonfinite)
                step += 1
                metrics.update(step=step, seconds=time.perf_counter() - start)
                history.append(metrics_log.step(metrics))
                if record:
                    with naming_write_errors(record.name):
                        record.write(json.dumps({k: v for k, v in metrics.items()
                                                 if isinstance(v, (int, float, bool)) or v is None}) + "\n")
                        record.flush()
                if c.save and (step == t.train_iters or (c.save_interval and step % c.save_interval == 0)):
                    sd = ckpt.training_sharded_state_dict(model, optimizer)
                    ckpt.save(c.save, step, sd, {"scheduler": scheduler.state_dict()}, keep_last=c.keep_last,
                              save_rng=True)
        finally:
            metrics_log.close()
            if record:
                with contextlib.suppress(OSError):  # a write that failed already raised; its retry must not mask it
                    record.close()
    return history


def _open_record(path: Path):
    """SAVE/metrics.jsonl for appending. A last line cut short (a write that failed on a full disk) is ended
    first: otherwise the next record would be glued to it and lost to ``read_metrics``."""
    cut = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    record = open(path, "a", encoding="utf-8")
    if cut:
        record.write("\n")
    return record


def read_metrics(save_dir: str | Path) -> list[dict]:
    """The per-step metrics a run appended to SAVE/metrics.jsonl, one per step (a step redone after a resume
    keeps its last record)."""
    path = Path(save_dir) / METRICS
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def _restore(cfg: BoltConfig, model, optimizer, scheduler) -> int:
    """Resume from our own save directory if it holds a checkpoint, else start from train.checkpoint.load."""
    c = cfg.train.checkpoint
    own = ckpt.resolve(c.save) if c.save else None
    if own is not None:
        log.info("resuming from %s", own)
        return _load(own, model, optimizer, scheduler, weights_only=False)
    if c.load:
        source = ckpt.resolve(c.load)
        if source is None:
            raise ckpt.CheckpointError(f"train.checkpoint.load={c.load} holds no checkpoint")
        log.info("loading %s from %s", "weights" if c.finetune else "full state", source)
        return _load(source, model, optimizer, scheduler, weights_only=c.finetune)
    return 0


def _load(path: Path, model, optimizer, scheduler, weights_only: bool) -> int:
    if weights_only:
        ckpt.load_model(path, model)
        return 0
    sd = ckpt.training_sharded_state_dict(model, optimizer, is_loading=True)
    loaded = ckpt.load(path, sd)
    for i, chunk in enumerate(model):
        chunk.module.load_state_dict(loaded["model" if len(model) == 1 else f"model{i}"])
    optimizer.load_state_dict(loaded["optimizer"])
    meta = ckpt.read_meta(path)
    scheduler.load_state_dict(meta["scheduler"])
    if not ckpt.load_rng(path):
        log.warning("%s has no random state for this world size: generators restart from the seed", path)
    return int(meta["step"])


def main(cfg: BoltConfig, args) -> int:
    """``bolt train`` handler: bad data or an incompatible checkpoint is a one-line error, not a traceback."""
    import sys

    from megatron_bolt.config.schema import ConfigError
    from megatron_bolt.data.dataset import DatasetError

    try:
        train(cfg)
    except (ckpt.CheckpointError, DatasetError, ConfigError, FileNotFoundError) as exc:
        print(f"bolt train: {exc}", file=sys.stderr)
        return 2
    return 0
