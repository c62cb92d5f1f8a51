"""A ``bolt train`` run killed with SIGKILL and rerun with the same command ends with exactly the weights of an
uninterrupted run: model and optimizer state, scheduler state and the step come back from the last published
checkpoint, and the data position follows the step.

Two interruptions, each rerun to completion: one between saves (``latest`` names step 4 or later, nothing is
being written) and one in the middle of a save (a ``.step_*.partial`` directory exists next to a published
checkpoint, so the rerun resumes from the older step and must clean the leftover). To hit those windows
reliably the interrupted run is first frozen with SIGSTOP, the state is re-checked, and only then SIGKILLed
(otherwise it is resumed with SIGCONT and the next window is awaited). The whole process group is killed so
no forked checkpoint writer can outlive its parent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.slow

CONFIG = "examples/tiny_cpu.yaml"
ITERS = 10
FINAL = f"step_{ITERS:08d}"
LAUNCHER = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS"}


def _overrides(save: Path) -> list[str]:
    return [f"train.train_iters={ITERS}", "train.checkpoint.save_interval=2", "train.checkpoint.keep_last=2",
            f"train.checkpoint.save={save}", "train.precision=fp32"]


def _command(save: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_bolt.cli", "train", "--config", CONFIG, *_overrides(save)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER and not k.startswith("MASTER_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _start(save: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(_command(save), cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"bolt train timed out:\n{log.read_text()[-5000:]}") from None
    text = log.read_text()
    assert rc == 0, f"bolt train failed ({rc}):\n{text[-5000:]}"
    return text


def _latest_step(root: Path) -> int | None:
    try:
        return int((root / "latest").read_text().strip().removeprefix("step_"))
    except (FileNotFoundError, ValueError):
        return None


def _partials(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(".step_*.partial"))


def _between_saves(root: Path) -> bool:
    """A checkpoint at step >= 4 is published, the run is not finished, and no save is under way."""
    step = _latest_step(root)
    return step is not None and 4 <= step < ITERS and not _partials(root)


def _mid_save(root: Path) -> bool:
    """A checkpoint is published and the next one is half written (not yet renamed into place)."""
    step = _latest_step(root)
    return step is not None and step < ITERS and bool(_partials(root))


def _interrupt(procs: dict[str, subprocess.Popen], roots: dict[str, Path], ready: dict, logs: dict[str, Path],
               timeout: float = 300) -> dict[str, dict]:
    """SIGKILL each run's process group at the first moment its ``ready(root)`` holds while it is frozen.
    All runs are watched together: each has only a few windows of some milliseconds."""
    kills: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(kills) < len(ready):
        if time.monotonic() > deadline:
            raise AssertionError(f"no interruption point within {timeout}s for {sorted(set(ready) - set(kills))}")
        for name, when in ready.items():
            if name in kills:
                continue
            proc, root = procs[name], roots[name]
            if proc.poll() is not None:
                raise AssertionError(f"{name}: the run ended ({proc.returncode}) before it could be interrupted:"
                                     f"\n{logs[name].read_text()[-5000:]}")
            if not when(root):
                continue
            os.killpg(proc.pid, signal.SIGSTOP)
            if when(root):  # still true now that nothing moves
                kills[name] = {"latest": _latest_step(root), "partials": _partials(root)}
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                assert proc.returncode == -signal.SIGKILL, proc.returncode
            else:
                os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.002)
    return kills


def _weights(dirs: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Each root's final checkpoint loaded in-process at world size 1."""
    from megatron_bolt.checkpoint import dist as ckpt
    from megatron_bolt.config import load_config
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed

    out = {}
    cfg = load_config(ROOT / CONFIG, _overrides(next(iter(dirs.values()))))
    with distributed(cfg):
        for name, root in dirs.items():
            path = ckpt.resolve(root)
            assert path == root / FINAL, f"{name}: latest is {path}"
            model = build_model(cfg)
            with torch.no_grad():  # make sure everything compared really comes from the checkpoint
                for p in model[0].parameters():
                    p.fill_(float("nan"))
            ckpt.load_model(path, model)
            out[name] = {k: v.detach().clone() for k, v in model[0].state_dict().items() if torch.is_tensor(v)}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    dirs = {name: tmp / name for name in ("uninterrupted", "between_saves", "mid_save")}
    ready = {"between_saves": _between_saves, "mid_save": _mid_save}
    logs = {name: tmp / f"{name}.log" for name in dirs}
    t0 = time.monotonic()
    # All three first runs at once (start-up is import-bound and single-threaded).
    procs = {name: _start(root, logs[name]) for name, root in dirs.items()}
    try:
        kills = _interrupt(procs, dirs, ready, logs)
        _finish(procs["uninterrupted"], logs["uninterrupted"])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    # The same command again, to completion.
    reruns = {name: _start(dirs[name], tmp / f"{name}.rerun.log") for name in ready}
    rerun_logs = {name: _finish(proc, tmp / f"{name}.rerun.log") for name, proc in reruns.items()}
    t1 = time.monotonic()
    weights = _weights(dirs)
    print(f"\nsubprocess runs {t1 - t0:.1f}s, in-process load {time.monotonic() - t1:.1f}s; killed at {kills}")
    return {"dirs": dirs, "kills": kills, "rerun_logs": rerun_logs, "weights": weights}


def _meta(root: Path) -> dict:
    return json.loads((root / FINAL / "bolt_meta.json").read_text())


@pytest.mark.parametrize("scenario", ["between_saves", "mid_save"])
def test_killed_and_rerun_matches_uninterrupted(runs, scenario):
    kill, root = runs["kills"][scenario], runs["dirs"][scenario]
    if scenario == "mid_save":
        assert kill["partials"], kill
    else:
        assert kill["latest"] >= 4 and not kill["partials"], kill
    # The rerun resumed from the checkpoint that was published when the first run died (a rerun that
    # started over would end with the same weights too: training is deterministic).
    resumed = [line for line in runs["rerun_logs"][scenario].splitlines() if "resuming from" in line]
    assert resumed and resumed[0].endswith(str(root / f"step_{kill['latest']:08d}")), resumed

    ref, got = runs["weights"]["uninterrupted"], runs["weights"][scenario]
    assert sorted(got) == sorted(ref)
    different = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not different, {k: (got[k] - ref[k]).abs().max().item() for k in different}

    meta, ref_meta = _meta(root), _meta(runs["dirs"]["uninterrupted"])
    assert meta["step"] == ITERS
    assert meta == ref_meta  # scheduler state included
    assert not _partials(root)
    assert (root / "latest").read_text().strip() == FINAL


def test_uninterrupted_run_published_cleanly(runs):
    root = runs["dirs"]["uninterrupted"]
    assert _meta(root)["step"] == ITERS
    assert not _partials(root)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000008", FINAL]  # keep_last=2
