"""Process group, megatron-core parallel state and seeds: the one place parallelism is set up.

Launch with ``torchrun`` (single node or multi-node: it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or Slurm's ``srun`` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are read when torchrun's
variables are absent). A plain ``python`` process runs as a world of one.
NCCL on GPU, gloo on CPU; on CPU the megatron-core compatibility view is enabled first.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import random

import numpy as np
import torch

from megatron_bolt.config.schema import BoltConfig
from megatron_bolt.runtime.world import WorldInfo, world_from_env

log = logging.getLogger(__name__)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs, plus megatron's model-parallel RNG tracker (TP ranks differ)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def initialize(cfg: BoltConfig, seed: int | None = None, timeout_minutes: int = 30) -> WorldInfo:
    """Validate, start the process group and megatron-core parallel state, seed. Returns this rank's info."""
    world = world_from_env()
    cfg.validate(world.world_size)  # bad layouts fail here, before any process group exists
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        from megatron_bolt.runtime import cpu_compat

        cpu_compat.enable()
    else:
        torch.cuda.set_device(world.local_rank)
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        backend = "nccl" if on_gpu else "gloo"
        if world.world_size == 1:
            # A world of one needs no rendezvous: an in-memory store opens no port and sets no env vars
            # (which child processes would otherwise inherit and collide on).
            torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(), rank=0,
                                                 world_size=1, timeout=timeout)
        else:
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set: launch multi-process runs with torchrun "
                                   "or srun (with MASTER_ADDR/MASTER_PORT exported)")
            torch.distributed.init_process_group(backend=backend, rank=world.rank, world_size=world.world_size,
                                                 timeout=timeout)
        atexit.register(_destroy_process_group)
    from megatron.core import parallel_state

    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
    )
    seed_everything(cfg.train.seed if seed is None else seed)
    log.info(
        "rank %d/%d: tp=%d pp=%d dp=%d on %s", world.rank, world.world_size, p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size, parallel_state.get_data_parallel_world_size(),
        "cuda" if on_gpu else "cpu",
    )
    return world


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shutdown() -> None:
    """Tear down megatron-core's parallel state; the process group itself lives until exit.

    Re-creating a process group inside one torchrun worker is unsafe: workers share the elastic agent's
    TCPStore, which keeps the first group's keys, so a second init can read stale rendezvous state and
    ranks run past each other. Phases of one process (train, then evaluate) therefore share one group.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def distributed(cfg: BoltConfig, seed: int | None = None):
    """``with distributed(cfg) as world: ...`` initialises on entry and tears down on exit."""
    world = initialize(cfg, seed)
    try:
        yield world
    finally:
        shutdown()
