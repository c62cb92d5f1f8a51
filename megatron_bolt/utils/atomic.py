"""Atomic file writes: readers (and a rerun after a crash) see the old file or the complete new one.

Everything is written to a hidden temporary sibling (same directory, so ``os.replace`` is a rename on one
file system), flushed and fsynced, then renamed over the target. On an exception the temporary file is
removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(p) as f: f.write(...)``; text modes write UTF-8 with '\\n' newlines."""
    path = Path(path)
    tmp = temp_sibling(path)
    text = "b" not in mode
    f = open(tmp, mode, encoding="utf-8" if text else None, newline="\n" if text else None)
    try:
        with f:
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
