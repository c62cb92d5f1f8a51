"""Streaming corpus readers and the paper's index-based splits.

Corpora are read record by record (JSONL line by line, Parquet and Arrow batch by batch), never whole, so
a 6.7M-document FineMath dump and a 100-line test file go through the same code. Every record gets a
global index, its position in the ordered inputs, whether or not it parses: splits are defined on that
index (validation = index % 1000 == 0; training slices ``start:end:step``), so a bad record never shifts
which documents land in which split. Records that cannot be used are counted per reason in a ReadReport
(with the first few locations) and logged: never silently dropped, never fatal. Files that cannot be read
at all (a truncated Parquet or gzip file) raise CorpusError naming the file.

Formats: ``.jsonl`` / ``.jsonl.gz`` (``.json`` / ``.json.gz`` holding JSON lines are accepted too);
``.json`` arrays, parsed incrementally with one element in memory at a time (a malformed or over-long
element ends that file, since JSON cannot be resynchronised: it is counted once and logged; prefer JSONL
for big corpora); ``.parquet``; and ``datasets.save_to_disk`` directories (their ``*.arrow`` IPC streams,
read with pyarrow; no ``datasets`` import).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

log = logging.getLogger(__name__)

VALIDATION_MODULUS = 1000
DEFAULT_MAX_RECORD_BYTES = 10 * 2**20
EXAMPLES_PER_REASON = 5
REASONS = ("bad_json", "not_object", "missing_key", "not_string", "not_utf8", "empty", "too_long")
_READ_CHUNK = 1 << 20
_JSON_SPACE = re.compile(r"[ \t\r\n]*")
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class CorpusError(RuntimeError):
    """An input that cannot be read at all; the message names the file."""


class Document(NamedTuple):
    index: int
    text: str


@dataclass(frozen=True)
class Split:
    """Which document indices a run keeps: 'all', 'validation', or a training slice 'start:end:step'."""

    spec: str
    start: int = 0
    end: int = 1
    step: int = 1

    @classmethod
    def parse(cls, spec: str) -> Split:
        if spec in ("all", "validation"):
            return cls(spec)
        match = re.fullmatch(r"(\d+):(\d+):(\d+)", spec)
        if not match:
            raise ValueError(f"split {spec!r} is not 'all', 'validation' or 'start:end:step' (e.g. 0:1:20)")
        start, end, step = map(int, match.groups())
        if not 0 <= start < end <= step:
            raise ValueError(f"split {spec!r} needs 0 <= start < end <= step")
        return cls(spec, start, end, step)

    def contains(self, index: int) -> bool:
        is_validation = index % VALIDATION_MODULUS == 0
        if self.spec == "all":
            return True
        if self.spec == "validation":
            return is_validation
        return not is_validation and self.start <= index % self.step < self.end


@dataclass
class ReadReport:
    """What the readers saw: records indexed, usable documents, and every skip by reason."""

    records: int = 0
    documents: int = 0
    blank_lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < EXAMPLES_PER_REASON:
            seen.append(where)
            log.warning("skipping record %s: %s", where, reason)

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records, "documents": self.documents, "blank_lines": self.blank_lines,
                "skipped": {r: self.skipped[r] for r in REASONS if self.skipped[r]},
                "skip_examples": {r: self.examples[r] for r in REASONS if r in self.examples}}


class _Bad(NamedTuple):
    """A record the source itself could not turn into a mapping."""

    reason: str


# ---------------------------------------------------------------- input discovery


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file()


def _supported(path: Path) -> bool:
    return path.name.endswith(_SUFFIXES)


def _expand_one(pattern: str) -> list[Path]:
    if glob.has_magic(pattern):
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        found = [p for p in matches if _is_hf_dataset(p) or (p.is_file() and _supported(p))]
        if not found:
            raise CorpusError(f"input pattern {pattern!r} matches no readable file")
        return found
    path = Path(pattern)
    if _is_hf_dataset(path):
        return [path]
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if _is_hf_dataset(p))
            raise CorpusError(f"{path} is a DatasetDict: pass one split directory ({', '.join(splits)})")
        files = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p))
        if not files:
            raise CorpusError(f"input directory {path} holds no {'/'.join(_SUFFIXES)} file")
        return files
    if not path.is_file():
        raise CorpusError(f"input {path} does not exist")
    if not _supported(path):
        raise CorpusError(f"input {path}: unsupported format (use {', '.join(_SUFFIXES)} or a HF dataset)")
    return [path]


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files and HF dataset dirs, in the given order, each glob and directory sorted, duplicates dropped."""
    seen: dict[Path, None] = {}
    for pattern in patterns:
        for path in _expand_one(pattern):
            seen.setdefault(path.resolve(), None)
    if not seen:
        raise CorpusError("no input given")
    return list(seen)


# ---------------------------------------------------------------- sources: path -> (where, record)


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _jsonl_records(path: Path, max_bytes: int, report: ReadReport) -> Iterator[tuple[str, Any]]:
    """One record per non-blank line; over-long lines are skipped without being held in memory."""
    with _open_binary(path) as f:
        for lineno, line in enumerate(iter(lambda: f.readline(max_bytes + 1), b""), start=1):
            where = f"{path}:{lineno}"
            if len(line) > max_bytes and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = f.readline(_READ_CHUNK)
                yield where, _Bad("too_long")
                continue
            if not line.strip():
                report.blank_lines += 1
                continue
            try:
                yield where, json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except UnicodeDecodeError:
                yield where, _Bad("not_utf8")
            except json.JSONDecodeError:
                yield where, _Bad("bad_json")


def _first_char(path: Path) -> str:
    with _open_binary(path) as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return head[:1].decode("latin-1")


class _ElementTooLong(ValueError):
    """An array element larger than the byte limit: it cannot be skipped without being parsed."""


class _ArrayStream:
    """Incremental reader of one top-level JSON array: an element at a time, buffer grown on demand."""

    def __init__(self, f: IO[str], max_chars: int):
        self.f, self.buf, self.pos, self.eof, self.max_chars = f, "", 0, False, max_chars
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        if self.eof:
            return False
        more = self.f.read(max(_READ_CHUNK, len(self.buf) - self.pos))  # doubling: linear total parse cost
        self.eof = not more
        self.buf = self.buf[self.pos :] + more
        self.pos = 0
        return bool(more)

    def _peek(self) -> str:
        """Next non-whitespace character ('' at end of file), without consuming it."""
        while True:
            self.pos = _JSON_SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos : self.pos + 1]

    def _element(self) -> tuple[Any, int]:
        """Decode the next element; it counts only once the ',' or ']' after it is in the buffer."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                after = _JSON_SPACE.match(self.buf, end).end()
                if self.buf[after : after + 1] in (",", "]"):
                    return value, end
            except json.JSONDecodeError:
                pass
            if len(self.buf) - self.pos > self.max_chars:
                raise _ElementTooLong(f"element over {self.max_chars} characters (or malformed)")
            if not self._fill():
                raise ValueError(f"JSON syntax error near character {self.pos}")

    def elements(self) -> Iterator[tuple[Any, int]]:
        """(value, size in characters) per element; ValueError when the array is malformed."""
        if self._peek() != "[":
            raise ValueError("not a JSON array")
        self.pos += 1
        if self._peek() == "]":
            return
        while True:
            self._peek()  # skip the whitespace raw_decode would choke on
            value, end = self._element()
            size, self.pos = end - self.pos, end
            yield value, size
            sep = self._peek()
            self.pos += 1
            if sep == "]":
                return


def _json_array_records(path: Path, max_bytes: int, report: ReadReport) -> Iterator[tuple[str, Any]]:
    if _first_char(path) != "[":
        yield from _jsonl_records(path, max_bytes, report)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        count = 0
        try:
            for value, size in _ArrayStream(f, max_bytes).elements():
                yield f"{path}[{count}]", _Bad("too_long") if size > max_bytes else value
                count += 1
        except ValueError as exc:
            log.error("%s[%d]: %s; the rest of the array is skipped", path, count, exc)
            yield f"{path}[{count}]", _Bad("too_long" if isinstance(exc, _ElementTooLong) else "bad_json")


def _table_rows(batches: Iterable[Any], label: str, keys: list[str]) -> Iterator[tuple[str, Any]]:
    row = 0
    for batch in batches:
        present = [k for k in keys if k in batch.schema.names]
        for values in batch.select(present).to_pylist():
            yield f"{label}#{row}", values
            row += 1


def _parquet_records(path: Path, keys: list[str]) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=1024, columns=[k for k in keys if k in pf.schema_arrow.names])
        yield from _table_rows(batches, str(path), keys)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: cannot read Parquet file (truncated or corrupt?): {exc}") from exc


def _arrow_files(path: Path) -> list[Path]:
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    names = [entry["filename"] for entry in state.get("_data_files", [])]
    return [path / n for n in names] or sorted(path.glob("*.arrow"))


def _hf_records(path: Path, keys: list[str]) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa

    for file in _arrow_files(path):
        try:
            with pa.memory_map(str(file)) as source:
                yield from _table_rows(pa.ipc.open_stream(source), str(file), keys)
        except (pa.ArrowException, OSError) as exc:
            raise CorpusError(f"{file}: cannot read Arrow file (truncated or corrupt?): {exc}") from exc


def _records(path: Path, keys: list[str], max_bytes: int, report: ReadReport) -> Iterator[tuple[str, Any]]:
    """(location, record or _Bad) for every record of one input; unreadable files raise CorpusError."""
    if path.is_dir():
        yield from _hf_records(path, keys)
    elif path.name.endswith(".parquet"):
        yield from _parquet_records(path, keys)
    else:
        reader = _json_array_records if path.name.endswith((".json", ".json.gz")) else _jsonl_records
        try:
            yield from reader(path, max_bytes, report)
        except (EOFError, OSError, zlib.error) as exc:  # truncated or corrupt gzip, unreadable file
            raise CorpusError(f"{path}: cannot read ({exc})") from exc


# ---------------------------------------------------------------- records -> documents


def _field_text(value: Any) -> str | None:
    if isinstance(value, bytes):  # binary Arrow columns
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _text_of(record: Any, keys: list[str], max_bytes: int) -> str | _Bad:
    """The record's text (several keys joined by a blank line) or why there is none."""
    if isinstance(record, _Bad):
        return record
    if not isinstance(record, dict):
        return _Bad("not_object")
    parts = []
    for key in keys:
        if key not in record:
            return _Bad("missing_key")
        text = _field_text(record[key])
        if text is None:
            return _Bad("not_utf8" if isinstance(record[key], bytes) else "not_string")
        parts.append(text)
    text = "\n\n".join(parts)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates: "\ud800" escapes or undecodable bytes in a JSON array
        return _Bad("not_utf8")
    if size > max_bytes:
        return _Bad("too_long")
    return text if text.strip() else _Bad("empty")


def iter_documents(paths: Iterable[Path], json_keys: list[str],
                   max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                   report: ReadReport | None = None) -> Iterator[Document]:
    """Usable documents of the inputs in order, with their global record index; skips go to ``report``."""
    report = report if report is not None else ReadReport()
    index = 0
    for path in paths:
        for where, record in _records(Path(path), list(json_keys), max_record_bytes, report):
            report.records += 1
            text = _text_of(record, json_keys, max_record_bytes)
            if isinstance(text, _Bad):
                report.skip(text.reason, where)
            else:
                report.documents += 1
                yield Document(index, text)
            index += 1
