"""Distributed checkpoints through megatron-core's dist_checkpointing, published atomically.

Layout of a checkpoint root::

    ROOT/step_00000100/      one complete checkpoint (dist_checkpointing format + bolt_meta.json)
    ROOT/latest              text file naming the newest complete step directory

Every rank writes its shards into ``ROOT/.step_00000100.partial``; after a barrier, rank 0 writes
``bolt_meta.json``, renames the directory into place and then rewrites ``latest`` (via a temp file and
``os.replace``). A crash at any point leaves either the previous ``latest`` or the new one, never a pointer
to a half-written checkpoint; stale ``.partial`` directories are removed by the next save. A save that fails
(disk full, directory not writable) removes its ``.partial`` directory and raises ``CheckpointError`` naming
the step, the directory and the checkpoint that is still the latest.
Tensors are resharded on load, so a checkpoint saved at one TP/PP layout loads at another.

Loading is safe for checkpoints from elsewhere: tensors and random states are read with
``torch.load(weights_only=True)``, and the one file torch.distributed.checkpoint reads with plain
``pickle.load`` (``.metadata``) is first run through a restricted unpickler that only resolves checkpoint
metadata classes, so a crafted file is refused before it can run code.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_bolt.utils.atomic import write_text_atomic

STEP_RE = re.compile(r"^step_(\d{8})$")
META = "bolt_meta.json"
# Versioning flags for sharded state dicts, as Megatron-LM writes them. 'dp_reshardable' (Megatron-LM's
# default) saves and loads distributed-optimizer state fully in parallel with no gather; that state then
# reshards across data-parallel sizes only. Model weights reshard across any TP/PP/DP layout.
CONTENT_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def sharding_metadata() -> dict[str, Any]:
    """A fresh copy per call: megatron-core stores the current data-parallel group into the dict it is given,
    so a shared dict would carry one layout's group into the next."""
    from megatron.core import parallel_state

    return {**CONTENT_METADATA, "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


class CheckpointError(RuntimeError):
    pass


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def model_sharded_state_dict(model: list) -> dict[str, Any]:
    if len(model) == 1:
        return {"model": _unwrap(model[0]).sharded_state_dict(metadata=sharding_metadata())}
    return {f"model{i}": _unwrap(m).sharded_state_dict(metadata=sharding_metadata()) for i, m in enumerate(model)}


def training_sharded_state_dict(model: list, optimizer, is_loading: bool = False) -> dict[str, Any]:
    """Model and optimizer state, for resumable training checkpoints."""
    sd = model_sharded_state_dict(model)
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=sharding_metadata())
    return sd


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def rng_state() -> dict[str, Any]:
    """This rank's random state: Python, torch CPU (and CUDA), and megatron's model-parallel tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / "rng" / f"rank_{rank:05d}.pt"


def load_rng(ckpt: str | Path) -> bool:
    """Restore this rank's random state if the checkpoint has one for a world of this size; returns whether
    it did (a resume at another world size starts the generators from the seed instead)."""
    ckpt = Path(ckpt)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if read_meta(ckpt).get("world_size") != world or not _rng_file(ckpt, _rank()).is_file():
        return False
    set_rng_state(torch.load(_rng_file(ckpt, _rank()), weights_only=True))
    return True


def save(root: str | Path, step: int, sharded_state_dict: dict[str, Any], meta: dict[str, Any] | None = None,
         keep_last: int | None = None, save_rng: bool = False) -> Path:
    """Collective: every rank calls it with its own sharded state dict. Returns the published directory."""
    root = Path(root)
    final = step_dir(root, step)
    partial = root / f".{final.name}.partial"
    try:
        if _rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".step_*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir()
        _barrier()
        dist_checkpointing.save(sharded_state_dict, str(partial), content_metadata=dict(CONTENT_METADATA))
        if save_rng:
            _rng_file(partial, _rank()).parent.mkdir(exist_ok=True)
            torch.save(rng_state(), _rng_file(partial, _rank()))
        _barrier()
        if _rank() == 0:
            _publish(root, partial, final, step, meta, keep_last)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)  # frees what it held on a full disk
        raise CheckpointError(_save_failed(root, step, exc)) from exc
    _barrier()
    return final


def _publish(root: Path, partial: Path, final: Path, step: int, meta: dict[str, Any] | None,
             keep_last: int | None) -> None:
    """Rank 0, after every rank wrote its shards: metadata, rename into place, then ``latest``."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    meta = {"step": step, "world_size": world, **(meta or {})}
    write_text_atomic(partial / META, json.dumps(meta, indent=2, sort_keys=True))
    if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(partial, final)
    write_text_atomic(root / "latest", final.name + "\n")
    if keep_last:
        for old in list_steps(root)[:-keep_last]:
            shutil.rmtree(step_dir(root, old), ignore_errors=True)


def _save_failed(root: Path, step: int, exc: BaseException) -> str:
    """The one-line error of a failed save: the cause, the free space, and what is still loadable."""
    cause = exc
    if isinstance(exc, CheckpointException) and exc.failures:  # the first rank's own error
        cause = next(iter(exc.failures.values()))[0]
    lines = str(cause).strip().splitlines()
    reason = f"{type(cause).__name__}: {lines[0].strip(chr(34)) if lines else repr(cause)}"
    try:
        reason += f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        pass
    try:
        latest = (root / "latest").read_text().strip()
    except OSError:
        latest = ""
    kept = (f"the latest complete checkpoint is still {root / latest}: free space or fix permissions and rerun the "
            "same command to resume from it" if latest else "there is no earlier complete checkpoint")
    return f"could not save the checkpoint of step {step} under {root} ({reason}); {kept}"


def list_steps(root: str | Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and (p / META).is_file())


def resolve(path: str | Path) -> Path | None:
    """A step directory as given, or the one a root's ``latest`` names; None for an empty/new root."""
    path = Path(path)
    if (path / META).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not (target / META).is_file():
            raise CheckpointError(f"{latest} names {target}, which is not a complete checkpoint")
        return target
    if path.is_dir():
        if (path / "metadata.json").is_file():
            raise CheckpointError(f"{path} is a dist_checkpointing directory without {META}: not saved by bolt")
        steps = list_steps(path)
        if steps:
            return step_dir(path, steps[-1])
        broken = sorted(p.name for p in path.iterdir() if STEP_RE.match(p.name))
        if broken:
            raise CheckpointError(f"{path} holds step directories without {META} ({', '.join(broken[:3])}): not a "
                                  "complete checkpoint; remove them to start over")
    # A new root, or one holding only what a run writes before its first save (config, metrics, logs).
    return None


# Globals a dist_checkpointing ``.metadata`` pickle needs besides dataclasses and enums of these modules.
_METADATA_MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                     ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A global that checkpoint metadata never references (the message names it)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only what checkpoint metadata is made of: DCP's dataclasses and enums, torch.Size, dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module.startswith(_METADATA_MODULES):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise _ForbiddenGlobal(f"{module}.{name}")


def verify_metadata(ckpt: str | Path) -> None:
    """Refuse a checkpoint whose ``.metadata`` pickle references anything but checkpoint metadata.

    torch.distributed.checkpoint reads that file with ``pickle.load``, which runs whatever a crafted file
    asks for; the same bytes go through ``_MetadataUnpickler`` first.
    """
    path = Path(ckpt) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no .metadata: not a complete distributed checkpoint")
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except _ForbiddenGlobal as exc:
        raise CheckpointError(f"{path} references {exc}, which checkpoint metadata never does: refusing to load "
                              "it (tampered with, or not written by torch.distributed.checkpoint)") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse means: not loadable metadata
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from None


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / META).read_text())


def check_compatible(ckpt: Path, sharded_state_dict: dict[str, Any]) -> None:
    """Fail with the tensors named when a checkpoint was saved from a different architecture."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    problems = []
    for t in nested_values(sharded_state_dict):
        if not isinstance(t, ShardedTensor) or t.key.startswith("optimizer."):
            continue
        if t.key not in saved:
            problems.append(f"{t.key} is missing from the checkpoint")
            continue
        have, want = tuple(saved[t.key].global_shape), tuple(t.global_shape)
        # Vocabulary tensors may differ in padded rows only.
        if (have[1:] != want[1:]) if t.allow_shape_mismatch else (have != want):
            problems.append(f"{t.key} is {have} in the checkpoint but {want} in this model")
    if problems:
        listed = "\n  - ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(
            f"{ckpt} does not fit this model (different architecture? compare its config.yaml with model.*):"
            f"\n  - {listed}"
        )


def load(ckpt: str | Path, sharded_state_dict: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """Collective load into the given sharded state dict's layout (resharding as needed)."""
    ckpt = Path(ckpt)
    if not (ckpt / META).is_file():
        raise CheckpointError(f"{ckpt} is not a complete bolt checkpoint (missing {META})")
    verify_metadata(ckpt)
    check_compatible(ckpt, sharded_state_dict)
    from megatron.core.dist_checkpointing.validation import StrictHandling

    handling = StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_UNEXPECTED
    return dist_checkpointing.load(sharded_state_dict, str(ckpt), strict=handling)


def save_model(root: str | Path, step: int, model: list, meta: dict[str, Any] | None = None) -> Path:
    return save(root, step, model_sharded_state_dict(model), meta)


def load_model(ckpt: str | Path, model: list) -> dict[str, Any]:
    """Load model weights only (for scoring, export, fine-tuning from a checkpoint)."""
    sd = model_sharded_state_dict(model)
    loaded = load(ckpt, sd, strict=False)
    for i, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    return read_meta(ckpt)
