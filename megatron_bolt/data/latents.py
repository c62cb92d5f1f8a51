"""Join latents to document chunks by (doc_id, chunk_index) without holding latent text in memory.

A warm-start split has millions of latents of a few kilobytes each, so the join keeps only a sorted numpy
index of (doc_id, chunk_index, file, byte offset, byte length) per latent line; each worker memory-maps the
index and reads the lines of the document it is tokenising. Latent lines come in two forms:

- ``{"doc_id": int, "chunk_index": int, "latent": str}`` from a teacher (tokenised at build time);
- ``{"doc_id": int, "chunk_index": int, "latent_token_ids": [int, ...]}`` from our E-step: these ids are
  what the model sampled and are used exactly as they are, never decoded and re-tokenised.

Duplicate (doc_id, chunk_index) pairs are an error found when the index is built; latents that match no
document chunk are found by the builder (see ``unknown_documents``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

INDEX_DTYPE = np.dtype(
    [("doc_id", "<i8"), ("chunk_index", "<i8"), ("file", "<i4"), ("offset", "<i8"), ("length", "<i8")]
)


class LatentError(ValueError):
    """Malformed, duplicate or unmatched latents; the message carries counts and examples."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_latent(line: bytes | str, where: str) -> dict[str, Any]:
    """Decode and check one latent line; ``where`` (``path:line``) names it in errors."""
    try:
        obj = json.loads(line)
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise LatentError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or not _is_int(obj.get("doc_id")) or not _is_int(obj.get("chunk_index")):
        raise LatentError(f"{where}: a latent line needs integer doc_id and chunk_index")
    if obj["chunk_index"] < 0:
        raise LatentError(f"{where}: chunk_index {obj['chunk_index']} is negative")
    has_text, has_ids = "latent" in obj, "latent_token_ids" in obj
    if has_text == has_ids:
        raise LatentError(f"{where}: give exactly one of 'latent' (text) and 'latent_token_ids'")
    if has_text and not isinstance(obj["latent"], str):
        raise LatentError(f"{where}: 'latent' must be a string")
    ids = obj.get("latent_token_ids")
    if has_ids and not (isinstance(ids, list) and all(map(_is_int, ids))):
        raise LatentError(f"{where}: 'latent_token_ids' must be a list of integers")
    return obj


def scan_file(file_index: int, path: str) -> np.ndarray:
    """Index entries for every latent line of one file (each line is parsed and checked once here)."""
    rows = []
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                obj = parse_latent(line, f"{path}:{number}")
                rows.append((obj["doc_id"], obj["chunk_index"], file_index, offset, len(line)))
            offset += len(line)
    return np.array(rows, dtype=INDEX_DTYPE)


def _examples(entries: np.ndarray, files: list[str], limit: int = 3) -> str:
    shown = [f"doc_id={e['doc_id']} chunk_index={e['chunk_index']} ({files[e['file']]})"
             for e in entries[:limit]]
    return "; ".join(shown) + (" ..." if len(entries) > limit else "")


class LatentIndex:
    """Sorted (doc_id, chunk_index) -> line location table over a fixed list of latent files."""

    def __init__(self, entries: np.ndarray, files: list[str]):
        self.entries = entries
        self.files = files
        self._doc_ids = entries["doc_id"]
        self._handles: dict[int, Any] = {}

    @classmethod
    def build(cls, files: list[str], map_fn: Callable[..., Iterable[np.ndarray]] = map) -> LatentIndex:
        """Scan ``files`` (``map_fn`` may be a process pool's ``starmap``-like map) and sort by key."""
        parts = list(map_fn(scan_file, range(len(files)), files))
        entries = np.concatenate(parts) if parts else np.zeros(0, dtype=INDEX_DTYPE)
        entries = entries[np.lexsort((entries["chunk_index"], entries["doc_id"]))]
        same = (entries["doc_id"][1:] == entries["doc_id"][:-1]) & (
            entries["chunk_index"][1:] == entries["chunk_index"][:-1]
        )
        if same.any():
            dups = entries[1:][same]
            raise LatentError(f"{int(same.sum())} duplicate latents for the same (doc_id, chunk_index): "
                              f"{_examples(dups, files)}")
        return cls(entries, files)

    def save(self, path: Path) -> None:
        np.save(path, self.entries, allow_pickle=False)

    @classmethod
    def load(cls, path: str, files: list[str]) -> LatentIndex:
        return cls(np.load(path, mmap_mode="r", allow_pickle=False), files)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, doc_id: int) -> np.ndarray:
        """This document's entries, ordered by chunk_index."""
        lo = int(np.searchsorted(self._doc_ids, doc_id, side="left"))
        hi = int(np.searchsorted(self._doc_ids, doc_id, side="right"))
        return self.entries[lo:hi]

    def read(self, entry: np.void) -> dict[str, Any]:
        """The parsed latent line an entry points at."""
        file = int(entry["file"])
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = open(self.files[file], "rb")  # kept open: one per file per process
        handle.seek(int(entry["offset"]))
        return json.loads(handle.read(int(entry["length"])))

    def unknown_documents(self, doc_ids: np.ndarray) -> np.ndarray:
        """Entries whose doc_id is not among ``doc_ids`` (the documents that were built)."""
        return self.entries[~np.isin(self._doc_ids, doc_ids)]

    def describe(self, entries: np.ndarray) -> str:
        return _examples(entries, self.files)
