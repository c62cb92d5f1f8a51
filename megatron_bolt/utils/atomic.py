"""Atomic file writes: readers (and a rerun after a crash) see the old file or the complete new one.

Everything is written to a hidden temporary sibling (same directory, so ``os.replace`` is a rename on one
file system), flushed and fsynced, then renamed over the target. On an exception the temporary file is
removed and the target is left as it was.

A write that fails because the disk is full, a file size limit is hit or the file system is read-only raises
an OSError that names no file; ``naming_write_errors`` attaches the path, so ``bolt`` can print one line
that says what failed where (``describe_os_error``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# Errors of a write (not of an open or a read): the ones a full disk or a read-only mount gives.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})
# Errors where the fix is outside the program (space, permissions) and rerunning the same command resumes.
_STORAGE_ERRNOS = WRITE_ERRNOS | {errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def naming_write_errors(path: str | Path) -> Iterator[None]:
    """Re-raise a write error that names no file (``f.write`` on a full disk) with ``path`` as its file name."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno in WRITE_ERRNOS:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def describe_os_error(exc: OSError) -> str:
    """One line for the user: what failed, on which path, and (for space or permission errors) what to do."""
    where = f": {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "") if exc.filename else ""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    text = f"{exc.strerror or exc}{where}" + (f" [{code}]" if code else "")
    if exc.errno in _STORAGE_ERRNOS:
        text += ("; outputs completed before are kept: free space or fix permissions, then rerun the same command "
                 "to resume")
    return text


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(p) as f: f.write(...)``; text modes write UTF-8 with '\\n' newlines."""
    path = Path(path)
    tmp = temp_sibling(path)
    text = "b" not in mode
    try:
        f = open(tmp, mode, encoding="utf-8" if text else None, newline="\n" if text else None)
    except OSError as exc:  # e.g. a read-only directory: name the file being written, not its temporary twin
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with naming_write_errors(path), f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)
