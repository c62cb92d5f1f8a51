"""Small file helpers shared by the data stages: input globbing, line-addressed JSONL reading, atomic writes.

Kept free of torch and megatron imports so that light stages (``bolt synthesize``) and worker processes
start fast.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterator
from pathlib import Path


def expand_paths(patterns: list[str], what: str) -> list[Path]:
    """Files named by ``patterns`` (files, directories = their ``*.jsonl``, or globs), in a stable order.

    The order is part of the output's identity (documents are written in input order), so directories and
    globs are sorted; duplicates are dropped. A pattern that matches nothing is an error naming ``what``.
    """
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(path.glob("*.jsonl"))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"{what}: {pattern!r} matches no file")
        found.extend(matches)
    return list(dict.fromkeys(found))


def iter_line_batches(paths: list[Path], batch_size: int) -> Iterator[tuple[str, int, list[bytes]]]:
    """Stripped lines in batches of ``batch_size``: (path, 1-based number of the first line, lines).

    Batches never cross files and blank lines stay in them (as ``b""``, for callers to skip), so line
    ``i`` of a batch is ``path:first + i`` in error messages.
    """
    for path in paths:
        with open(path, "rb") as f:
            batch: list[bytes] = []
            first = 1
            for number, line in enumerate(f, start=1):
                if not batch:
                    first = number
                batch.append(line.strip())
                if len(batch) == batch_size:
                    yield str(path), first, batch
                    batch = []
            if batch:
                yield str(path), first, batch


def hash_tree(path: str | Path) -> str:
    """SHA-256 over a file or a directory's files (relative names and contents), for provenance records."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist (a local file or directory is needed)")
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(root) if file != root else file.name).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
