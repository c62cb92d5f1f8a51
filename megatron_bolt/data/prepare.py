"""``bolt prepare``: corpus -> one split -> sentence-chunked documents, as sharded JSONL.

    bolt prepare prepare.input=[data/finemath/*.parquet] prepare.output_prefix=runs/data/finemath_warm \\
        prepare.split=0:1:20 prepare.workers=8
    python tools/preprocess_data.py --input data/finemath --output-prefix runs/data/warm --split 0:1:20

Writes, for an output prefix P:

    P-00000.jsonl, ...  one line per document: {"doc_id": <record index>, "chunks": [str, ...]}
    P.params.json       the settings and input fingerprint the shards were made with (written first)
    P.report.json       counts: records read, documents written, skips per reason, shard list (written last)

Documents are grouped into shards of ``docs_per_shard`` in input order, so a shard's content depends only
on the inputs and settings: workers (a process pool, bounded so the corpus never sits in memory) write
whole shards, each atomically (temporary name, then ``os.replace``), and the output is byte-identical for
any worker count. A rerun skips shards that exist (resuming a killed run) and does nothing once the report
exists; rerunning with other settings or changed inputs into the same prefix is refused.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_bolt.config.schema import ConfigError, PrepareConfig
from megatron_bolt.data.chunking import chunk_text
from megatron_bolt.data.corpus import CorpusError, Document, ReadReport, Split, expand_inputs, iter_documents
from megatron_bolt.utils.atomic import atomic_open, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "bolt-prepare-v1"


@dataclass(frozen=True)
class ChunkParams:
    lam: float
    max_units: int
    seed: int


@dataclass
class PrepareResult:
    """The report written to disk plus what this particular run did (not part of the report)."""

    report: dict[str, Any]
    report_path: Path
    shards_resumed: int
    seconds: float

    def summary(self) -> str:
        r = self.report
        skipped = ", ".join(f"{k} {v}" for k, v in r["skipped"].items()) or "none"
        return (f"prepare: {r['docs_read']} records read, {r['docs_written']} documents "
                f"({r['chunks_written']} chunks) written in {len(r['shards'])} shards "
                f"({self.shards_resumed} resumed), "
                f"{r['docs_outside_split']} outside split {r['params']['split']!r}, skipped: {skipped}; "
                f"{self.seconds:.1f}s; report {self.report_path}")


def shard_path(prefix: str | Path, index: int) -> Path:
    return Path(f"{prefix}-{index:05d}.jsonl")


def report_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.report.json")


def params_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.params.json")


def _write_shard(path: Path, docs: list[Document], params: ChunkParams) -> int:
    """Chunk ``docs`` into ``path`` atomically (a crash leaves only a hidden temp file); returns #chunks."""
    chunks_written = 0
    with atomic_open(path) as f:
        for doc in docs:
            chunks = chunk_text(doc.text, params.lam, params.max_units, params.seed)
            f.write(json.dumps({"doc_id": doc.index, "chunks": chunks}, ensure_ascii=False) + "\n")
            chunks_written += len(chunks)
    return chunks_written


def _write_shard_task(task: tuple[Path, list[Document], ChunkParams]) -> int:
    return _write_shard(*task)


def _count_chunks(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(len(json.loads(line)["chunks"]) for line in f)


def read_prepared(prefix: str | Path) -> Iterator[dict[str, Any]]:
    """The documents of a finished ``prepare`` run, in order (shards as listed in its report)."""
    report = report_path(prefix)
    if not report.is_file():
        raise FileNotFoundError(f"{report} not found: run `bolt prepare` to completion first")
    for name in json.loads(report.read_text(encoding="utf-8"))["shards"]:
        with open(report.with_name(name), encoding="utf-8") as f:
            yield from map(json.loads, f)


def _fingerprint(cfg: PrepareConfig, paths: list[Path]) -> dict[str, Any]:
    """Everything that determines the shards' content; worker count deliberately excluded."""

    def stat(path: Path) -> dict[str, Any]:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return {"path": str(path), "bytes": sum(p.stat().st_size for p in files),
                "mtime_ns": max(p.stat().st_mtime_ns for p in files)}

    settings = asdict(cfg)
    for name in ("input", "output_prefix", "workers"):
        settings.pop(name)
    return {"format": FORMAT, **settings, "inputs": [stat(p) for p in paths]}


def _claim_prefix(prefix: str, params: dict[str, Any]) -> bool:
    """Record ``params`` for this prefix; True when a finished run with the same params exists."""
    path = params_path(prefix)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != params:
            changed = sorted(k for k in params.keys() | old.keys() if params.get(k) != old.get(k))
            raise ConfigError(
                f"prepare.output_prefix={prefix} holds output made with other settings or inputs (differs in "
                f"{', '.join(changed)}): choose another prefix or delete {prefix}-*.jsonl and {path.name}"
            )
        return report_path(prefix).is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(params, indent=1) + "\n")
    return False


def _batched(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def _execute(tasks: Iterator[tuple[Path, list[Document], ChunkParams]], workers: int) -> Iterator[int]:
    """Chunk counts of the written shards, in order; at most 2 shards per worker are in flight."""
    if workers == 1:
        yield from map(_write_shard_task, tasks)
        return
    # spawn: workers must not inherit the parent's threads (tqdm, tokenizers, arrow pools) through fork.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_write_shard_task, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _prepare_shards(cfg: PrepareConfig, paths: list[Path], progress: bool) -> tuple[dict[str, Any], int]:
    """Read, split and chunk into shards; returns the report's counts and the number of resumed shards."""
    split, read = Split.parse(cfg.split), ReadReport()
    params = ChunkParams(cfg.chunk_lambda, cfg.max_chunk_units, cfg.chunk_seed)
    counts: Counter = Counter()
    shards: list[str] = []
    bar = tqdm(unit="doc", desc="prepare", disable=None if progress else True)  # None: only on a terminal

    def tasks() -> Iterator[tuple[Path, list[Document], ChunkParams]]:
        docs = iter_documents(paths, cfg.json_keys, cfg.max_record_bytes, read)
        docs = (d for d in docs if split.contains(d.index))
        for number, shard in enumerate(_batched(docs, cfg.docs_per_shard)):
            path = shard_path(cfg.output_prefix, number)
            shards.append(path.name)
            counts["docs_written"] += len(shard)
            bar.update(len(shard))
            if path.is_file():
                counts["resumed"] += 1
                counts["chunks_written"] += _count_chunks(path)
            else:
                yield path, shard, params

    with bar:
        for n_chunks in _execute(tasks(), cfg.workers):
            counts["chunks_written"] += n_chunks
    report = {"docs_read": read.records, "docs_valid": read.documents,
              "docs_outside_split": read.documents - counts["docs_written"],
              "docs_written": counts["docs_written"], "chunks_written": counts["chunks_written"],
              **{k: v for k, v in read.to_dict().items() if k not in ("records", "documents")},
              "shards": shards}
    return report, counts["resumed"]


def _refuse_unusable(cfg: PrepareConfig, counts: dict[str, Any]) -> None:
    """Every record was skipped: almost always the wrong prepare.json_keys or format, so say so instead of
    writing an empty output (and forget the claimed settings, so that a corrected rerun is not refused)."""
    params_path(cfg.output_prefix).unlink(missing_ok=True)
    reasons = ", ".join(f"{k} {v}" for k, v in counts["skipped"].items())
    where = next(iter(counts["skip_examples"].values()), [""])[0]
    raise CorpusError(f"none of the {counts['docs_read']} records has usable text ({reasons}; first at {where}): "
                      f"check prepare.json_keys={cfg.json_keys} and the input format")


def run_prepare(cfg: PrepareConfig, progress: bool = True) -> PrepareResult:
    """The library entry behind ``bolt prepare`` and tools/preprocess_data.py."""
    if not cfg.input:
        raise ConfigError("prepare.input is empty: give corpus files, globs or directories")
    if not cfg.output_prefix:
        raise ConfigError("prepare.output_prefix is not set (e.g. runs/data/finemath)")
    start = time.perf_counter()
    paths = expand_inputs(cfg.input)
    params = _fingerprint(cfg, paths)
    done = report_path(cfg.output_prefix)
    if _claim_prefix(cfg.output_prefix, params):
        log.info("%s exists with the same settings: nothing to do", done)
        report = json.loads(done.read_text(encoding="utf-8"))
        return PrepareResult(report, done, len(report["shards"]), time.perf_counter() - start)
    counts, resumed = _prepare_shards(cfg, paths, progress)
    if counts["docs_read"] and not counts["docs_valid"]:
        _refuse_unusable(cfg, counts)
    report = {"format": FORMAT, "params": {k: v for k, v in params.items() if k not in ("format", "inputs")},
              "inputs": [p["path"] for p in params["inputs"]], **counts}
    if not report["shards"]:
        log.warning("no document of %s falls in split %r", cfg.input, cfg.split)
    write_text_atomic(done, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return PrepareResult(report, done, resumed, time.perf_counter() - start)


def main(cfg: Any, args: Any) -> int:
    """``bolt prepare`` handler: reads ``cfg.prepare``; prints a one-line summary."""
    try:
        result = run_prepare(cfg.prepare)
    except (ConfigError, CorpusError) as exc:
        print(f"bolt prepare: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0
