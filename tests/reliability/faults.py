"""Fault injection for ``bolt`` commands: kill a run at a seeded moment, rerun it, compare what it wrote.

Importable without pytest; tests/reliability/campaign.py defines the pipeline stages on top of it, and
tests/reliability/test_faults.py and benchmarks/reliability.py run them::

    from tests.reliability.faults import after_marker, bolt, run
    done = run(bolt("prepare", ...), log, marker=lambda: params.is_file())    # reference, timed
    cut = run(bolt("prepare", ...), log2, trigger=after_marker(started, 0.4))  # SIGKILLed 0.4 CPU s into its work
    again = run(bolt("prepare", ...), log3)                                   # the same command, to the end

Every command runs in its own session, so the kill (``os.killpg``) takes its whole process group: worker
pools, forked checkpoint writers and torchrun children die with it, as on a node that loses power. A trigger
is polled every few milliseconds; when it fires the group is first frozen with SIGSTOP and the trigger is
asked again (a checkpoint save lasts milliseconds: the state seen must be the state killed), then SIGKILLed.
Timed kills count the command's CPU seconds (its main process, from /proc), not wall seconds: on a shared
machine the same work takes a varying wall time, and a point drawn over the reference's wall time may come
after a less loaded rerun has already finished.

Failure modes besides SIGKILL, with ``Limits``:

- disk full: ``RLIMIT_FSIZE`` in the child (no root, no tmpfs needed). A write past the limit fails with
  EFBIG ("File too large") where a full disk gives ENOSPC; the program sees the same short write and OSError
  (Python ignores SIGXFSZ, so the signal does not kill it first).
- read-only output: the directory is chmod 0o555. Root ignores permission bits, so when run as root the child
  drops CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from its bounding set before exec (prctl; needs
  CAP_SETPCAP, which a container's root has). ``read_only_enforced`` says whether that works here.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_LAUNCHER = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "SLURM_PROCID", "SLURM_NTASKS"}

Trigger = Callable[[float], bool]  # CPU seconds the command has used so far -> kill now?


def bolt(*args: str) -> list[str]:
    """The argv of ``bolt ARGS`` with this interpreter (the venv's, under pytest and the benchmark)."""
    return [sys.executable, "-m", "megatron_bolt.cli", *map(str, args)]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return env


# ------------------------------------------------------------------------------------------------ limits


@dataclass(frozen=True)
class Limits:
    fsize: int | None = None  # RLIMIT_FSIZE in bytes: the disk-full stand-in
    read_only: bool = False  # drop root's permission-override capabilities so 0o555 directories hold


_PR_CAPBSET_DROP = 24
_OVERRIDE_CAPS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


def _preexec(limits: Limits | None) -> Callable[[], None] | None:
    if limits is None:
        return None

    def apply() -> None:
        if limits.fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.fsize, limits.fsize))
        if limits.read_only and os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in _OVERRIDE_CAPS:
                libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # failure shows up in read_only_enforced

    return apply


def read_only_enforced(tmp: Path) -> bool:
    """Whether a child started with ``Limits(read_only=True)`` is refused writes into a 0o555 directory."""
    probe = tmp / "read-only-probe"
    probe.mkdir(parents=True, exist_ok=True)
    with read_only(probe):
        proc = subprocess.run([sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"], capture_output=True,
                              preexec_fn=_preexec(Limits(read_only=True)))
    return proc.returncode != 0 and b"PermissionError" in proc.stderr


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """chmod 0o555 ``path`` for the duration (its files keep their modes: only creating, renaming and
    deleting entries is refused, as on a directory whose owner lost write access)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(mode)


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    """One subprocess run: exit status (None when we killed it), timings relative to its start."""

    argv: list[str]
    log: Path
    rc: int | None
    seconds: float
    marker_at: float | None = None  # when ``marker`` first held (the run started writing outputs)
    killed_at: float | None = None
    cpu_at_marker: float | None = None  # CPU seconds of the main process then ...
    cpu: float = 0.0  # ... and at the end (the last reading before it exited)

    @property
    def killed(self) -> bool:
        return self.killed_at is not None

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def tail(self, chars: int = 4000) -> str:
        return self.text()[-chars:]


def start(argv: list[str], log: Path, limits: Limits | None = None) -> tuple[subprocess.Popen, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_preexec(limits))
    return proc, time.monotonic()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its reaped children (/proc; None when gone or not Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return sum(int(x) for x in fields[11:15]) / _TICK  # utime, stime, cutime, cstime


def supervise(proc: subprocess.Popen, started: float, argv: list[str], log: Path, trigger: Trigger | None = None,
              marker: Callable[[], bool] | None = None, timeout: float = 900, poll: float = 0.004) -> Outcome:
    """Wait for ``proc``; SIGKILL its group the first time ``trigger`` holds (checked again while frozen)."""
    marker_at = cpu_at_marker = None
    cpu = 0.0
    while proc.poll() is None:
        now = time.monotonic() - started
        cpu = cpu_seconds(proc.pid) or cpu
        if now > timeout:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{' '.join(argv)} ran past {timeout:.0f}s:\n{log.read_text()[-4000:]}")
        if marker_at is None and marker is not None and marker():
            marker_at, cpu_at_marker = now, cpu
        if trigger is not None and trigger(cpu):
            _kill_group(proc, signal.SIGSTOP)
            if proc.poll() is None and trigger(cpu):  # still true now that nothing moves
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
                return Outcome(argv, log, None, time.monotonic() - started, marker_at, now, cpu_at_marker, cpu)
            _kill_group(proc, signal.SIGCONT)
        time.sleep(poll)
    _kill_group(proc, signal.SIGKILL)  # anything the command left running in its group
    return Outcome(argv, log, proc.returncode, time.monotonic() - started, marker_at, None, cpu_at_marker, cpu)


def run(argv: list[str], log: Path, trigger: Trigger | None = None, marker: Callable[[], bool] | None = None,
        limits: Limits | None = None, timeout: float = 900) -> Outcome:
    """Run ``argv`` to its end, or until ``trigger`` fires (then the whole process group is SIGKILLed)."""
    proc, started = start(argv, log, limits)
    return supervise(proc, started, argv, log, trigger, marker, timeout)


def after_marker(marker: Callable[[], bool], delay: float) -> Trigger:
    """Fires once the command has used ``delay`` CPU seconds after ``marker`` first held: a moment inside its
    own work, not its interpreter start-up, so a seeded fraction of the reference's work lands where it says."""
    seen: list[float] = []

    def trigger(cpu: float) -> bool:
        if not seen and marker():
            seen.append(cpu)
        return bool(seen) and cpu >= seen[0] + delay

    return trigger


def when(predicate: Callable[[], bool]) -> Trigger:
    """Fires as soon as ``predicate`` holds (a file appears, a partial output reaches a size, ...)."""
    return lambda cpu: predicate()


# ------------------------------------------------------------------------------------------------ errors


def clear_error(outcome: Outcome, command: str) -> tuple[bool, str]:
    """(clear, message): a non-zero exit, no traceback, and one line ``bolt COMMAND: ...`` saying why."""
    text = outcome.text()
    lines = [line for line in text.splitlines() if line.startswith(f"bolt {command}:")]
    message = lines[-1] if lines else (text.strip().splitlines() or ["(no output)"])[-1]
    ok = outcome.rc not in (None, 0) and outcome.rc > 0 and "Traceback" not in text and bool(lines)
    return ok, message


# ------------------------------------------------------------------------------------------------ comparing


@dataclass
class Diff:
    """A rerun's artifacts against the reference: identical or not, and records lost or duplicated."""

    compared: int = 0  # artifacts compared
    identical: bool = True
    lost: int = 0
    duplicated: int = 0
    notes: list[str] = field(default_factory=list)

    def differ(self, note: str) -> None:
        self.identical = False
        self.notes.append(note)

    def add(self, other: Diff) -> Diff:
        self.compared += other.compared
        self.identical &= other.identical
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.notes += other.notes
        return self


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(root: Path, names: Iterable[str]) -> dict[str, str | None]:
    return {name: digest(root / name) if (root / name).is_file() else None for name in names}


def compare_bytes(ref: Path, got: Path, names: Iterable[str]) -> Diff:
    """Byte equality of ``names`` (relative paths) under both roots."""
    d = Diff()
    for name in names:
        d.compared += 1
        if not (got / name).is_file():
            d.differ(f"{name}: missing")
        elif (ref / name).read_bytes() != (got / name).read_bytes():
            d.differ(f"{name}: bytes differ")
    return d


def compare_keys(ref: Iterable[Any], got: Iterable[Any], what: str) -> Diff:
    """Records (by key) missing from ``got`` or present more often than in ``ref``."""
    want, have = Counter(ref), Counter(got)
    d = Diff(lost=sum((want - have).values()), duplicated=sum((have - want).values()))
    if d.lost or d.duplicated:
        d.differ(f"{what}: {d.lost} missing, {d.duplicated} extra or duplicated")
    return d


def compare_json(ref: Path, got: Path, drop: Callable[[Any], Any] = lambda x: x) -> Diff:
    """Equality of two JSON files after ``drop`` (which removes wall times and other run-specific fields)."""
    d = Diff(compared=1)
    if not got.is_file():
        d.differ(f"{got.name}: missing")
    elif drop(json.loads(ref.read_text())) != drop(json.loads(got.read_text())):
        d.differ(f"{got.name}: content differs")
    return d


def jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def idx_sequences(path: Path) -> int:
    """Sequence count of a Megatron .idx file (header: magic, version, dtype code, sequence count)."""
    with open(path, "rb") as f:
        header = f.read(9 + 8 + 1 + 8)
    return int.from_bytes(header[18:26], "little")


def _equal(a: Any, b: Any) -> bool:
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def compare_checkpoint(ref: Path, got: Path) -> Diff:
    """A published step directory, loaded: every tensor of the torch.distributed.checkpoint state (model and
    optimizer) bit for bit, plus bolt_meta.json (step, scheduler) and the per-rank random states.
    DCP's ``.metadata`` holds a save id and the temporary path, so it is compared through what it loads."""
    import torch
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    d = Diff(compared=1)
    if not (got / "bolt_meta.json").is_file():
        d.differ(f"{got}: no complete checkpoint")
        return d
    with warnings.catch_warnings():  # "no process group": loading in one process is the point here
        warnings.simplefilter("ignore")
        a, b = (_load_state_dict_from_keys(checkpoint_id=str(p)) for p in (ref, got))
    if a.keys() != b.keys():
        d.differ(f"{got.name}: tensor names differ ({len(a.keys() ^ b.keys())})")
    worst = 0.0
    for key in sorted(a.keys() & b.keys()):
        if not _equal(a[key], b[key]):
            if torch.is_tensor(a[key]) and torch.is_tensor(b[key]) and a[key].shape == b[key].shape:
                worst = max(worst, (a[key].double() - b[key].double()).abs().max().item())
            d.differ(f"{got.name}/{key}: differs")
    if worst:
        d.notes.append(f"largest tensor difference {worst:.3g}")
    d.add(compare_json(ref / "bolt_meta.json", got / "bolt_meta.json"))
    for rng in sorted((ref / "rng").glob("*.pt")):
        other = got / "rng" / rng.name
        if not other.is_file() or not _equal(torch.load(rng, weights_only=True),
                                             torch.load(other, weights_only=True)):
            d.differ(f"{got.name}/rng/{rng.name}: differs")
    d.add(compare_bytes(ref, got, ["metadata.json"]))
    return d


def leftovers(root: Path) -> list[str]:
    """Hidden temporary files or partial directories a killed run left behind (relative paths)."""
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp-" in p.name or
                  p.name.endswith(".partial"))
