"""The joint sequence builder: prepared documents + latents -> Megatron indexed datasets.

Per document: ``BOS``, then per chunk X with latent Z one of two layouts, picked by a fair coin seeded by
(seed, doc_id, chunk_index), so the choice never depends on processing order or worker count:

    prior      SOL PRIOR_PREFIX Z EOL X          (teaches the joint p(Z, X))
    posterior  SOL EOL X SOL POSTERIOR_PREFIX Z EOL   (teaches the latent generator q(Z | X))

A chunk without a latent is X alone; then ``EOS``. Every token also gets a segment kind (``Segment``), so
loss masks are derived at read time (``data.loss_on_raw``) without rebuilding. Outputs, for a prefix P:

    P.bin / P.idx              token ids, one sequence per document (megatron-core IndexedDataset)
    P_kinds.bin / P_kinds.idx  uint8 segment kinds, same sequence lengths
    P.json                     sidecar: format, tokenizer hash, seed, counts; written last (the done marker)

Everything is written under temporary names and moved into place with ``os.replace``; a rerun with the same
inputs and settings finds the sidecar fingerprint and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from megatron_bolt.data.jsonl import hash_tree, iter_line_batches
from megatron_bolt.data.latents import LatentError, LatentIndex
from megatron_bolt.utils.atomic import naming_write_errors, write_text_atomic

if TYPE_CHECKING:
    from megatron_bolt.data.tokenizer import LatentTokenIds

log = logging.getLogger(__name__)

FORMAT = "megatron-bolt-joint/1"
KINDS_SUFFIX = "_kinds"
LongLatents = Literal["truncate", "drop", "error"]


class Segment(IntEnum):
    """Per-token segment kind, stored as uint8 next to the tokens."""

    RAW = 0  # text of a chunk that has no latent
    TEXT = 1  # text of a chunk that has a latent
    LATENT = 2  # latent thought tokens
    SPECIAL = 3  # SOL, EOL, PRIOR_PREFIX, POSTERIOR_PREFIX
    BOUNDARY = 4  # BOS, EOS


class BuildError(RuntimeError):
    """Inputs that cannot be joined as they are; the message lists every problem with counts."""


def prior_layout(seed: int, doc_id: int, chunk_index: int) -> bool:
    """The per-chunk fair coin: True for the prior layout. A hash, so it is a pure function of its key."""
    digest = hashlib.blake2b(f"{seed}/{doc_id}/{chunk_index}".encode(), digest_size=8).digest()
    return digest[0] & 1 == 0


def layout_document(chunks: list[list[int]], latents: list[list[int] | None], prior: list[bool],
                    ids: LatentTokenIds) -> tuple[list[int], list[int], int]:
    """(tokens, segment kinds, longest chunk unit) of one document in the BoLT layouts."""
    tokens, kinds = [ids.bos], [Segment.BOUNDARY]

    def put(piece: list[int], kind: Segment) -> None:
        tokens.extend(piece)
        kinds.extend([kind] * len(piece))

    longest = 0
    for x, z, use_prior in zip(chunks, latents, prior, strict=True):
        start = len(tokens)
        if z is None:
            put(x, Segment.RAW)
        elif use_prior:
            put([ids.sol, ids.prior], Segment.SPECIAL)
            put(z, Segment.LATENT)
            put([ids.eol], Segment.SPECIAL)
            put(x, Segment.TEXT)
        else:
            put([ids.sol, ids.eol], Segment.SPECIAL)
            put(x, Segment.TEXT)
            put([ids.sol, ids.posterior], Segment.SPECIAL)
            put(z, Segment.LATENT)
            put([ids.eol], Segment.SPECIAL)
        longest = max(longest, len(tokens) - start)
    put([ids.eos], Segment.BOUNDARY)
    return tokens, kinds, longest


@dataclass(frozen=True)
class BuildSpec:
    """What a worker needs to tokenise documents; hashable, so each process loads its state once."""

    tokenizer: str
    latent_index: str | None
    latent_files: tuple[str, ...]
    seed: int
    max_latent_tokens: int | None
    long_latents: LongLatents


def _empty(dtype: type[np.number]) -> Any:
    return field(default_factory=lambda: np.zeros(0, dtype=dtype))


@dataclass
class BatchResult:
    """One batch of documents, tokenised; concatenated arrays plus per-document lengths."""

    tokens: np.ndarray = _empty(np.int64)
    kinds: np.ndarray = _empty(np.uint8)
    lengths: np.ndarray = _empty(np.int64)
    doc_ids: np.ndarray = _empty(np.int64)
    input_bytes: int = 0
    counts: Counter = field(default_factory=Counter)
    longest_unit: int = 0
    unknown_chunks: list[tuple[int, int]] = field(default_factory=list)


_WORKER: dict[str, Any] = {}


def _worker_state(spec: BuildSpec) -> tuple[Any, LatentIndex | None]:
    if _WORKER.get("spec") != spec:
        from megatron_bolt.data.tokenizer import BoltTokenizer

        index = LatentIndex.load(spec.latent_index, list(spec.latent_files)) if spec.latent_index else None
        _WORKER.update(spec=spec, tokenizer=BoltTokenizer.from_pretrained(spec.tokenizer), index=index)
    return _WORKER["tokenizer"], _WORKER["index"]


def _latent_ids(obj: dict[str, Any], tokenizer: Any, spec: BuildSpec, counts: Counter) -> list[int] | None:
    """Token ids of one latent after the length policy (None: the chunk stays raw)."""
    if "latent_token_ids" in obj:
        z = obj["latent_token_ids"]
        if any(t < 0 or t >= tokenizer.vocab_size for t in z):
            raise LatentError(f"latent for doc_id={obj['doc_id']} chunk_index={obj['chunk_index']} has "
                              f"token ids outside the vocabulary of {tokenizer.vocab_size}")
    else:
        z = tokenizer.encode(obj["latent"])
    if spec.max_latent_tokens is not None and len(z) > spec.max_latent_tokens:
        counts["latents_too_long"] += 1
        if spec.long_latents == "truncate":
            counts["latents_truncated"] += 1
            return z[: spec.max_latent_tokens]
        if spec.long_latents == "drop":
            counts["latents_dropped"] += 1
            return None
    return z


def _parse_document(line: bytes, where: str) -> tuple[int, list[str]]:
    try:
        obj = json.loads(line)
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise BuildError(f"{where}: not valid JSON ({exc})") from None
    obj = obj if isinstance(obj, dict) else {}
    doc_id, chunks = obj.get("doc_id"), obj.get("chunks")
    if (not isinstance(doc_id, int) or isinstance(doc_id, bool) or not isinstance(chunks, list)
            or not all(isinstance(c, str) for c in chunks)):
        raise BuildError(f"{where}: a document line needs an integer doc_id and a list of string chunks")
    return doc_id, chunks


def _document(doc_id: int, chunks: list[str], spec: BuildSpec,
              result: BatchResult) -> tuple[list[int], list[int]]:
    tokenizer, index = _worker_state(spec)
    latents: list[list[int] | None] = [None] * len(chunks)
    for entry in index.lookup(doc_id) if index is not None else ():
        chunk = int(entry["chunk_index"])
        if chunk >= len(chunks):
            result.unknown_chunks.append((doc_id, chunk))
        else:
            latents[chunk] = _latent_ids(index.read(entry), tokenizer, spec, result.counts)
    prior = [prior_layout(spec.seed, doc_id, i) for i in range(len(chunks))]
    text = [tokenizer.encode(c) for c in chunks]
    tokens, kinds, longest = layout_document(text, latents, prior, tokenizer.ids)
    with_latent = sum(z is not None for z in latents)
    n_prior = sum(p for p, z in zip(prior, latents, strict=True) if z is not None)
    result.counts.update(documents=1, chunks=len(chunks), chunks_with_latent=with_latent, prior=n_prior,
                         posterior=with_latent - n_prior)
    result.longest_unit = max(result.longest_unit, longest)
    return tokens, kinds


def tokenize_batch(spec: BuildSpec, path: str, first_line: int, lines: list[bytes]) -> BatchResult:
    """Worker task: one batch of document lines -> tokens, kinds and counts (pure given its inputs)."""
    result = BatchResult()
    tokens: list[int] = []
    kinds: list[int] = []
    lengths, doc_ids = [], []
    for i, line in enumerate(lines):
        if not line:
            continue
        doc_id, chunks = _parse_document(line, f"{path}:{first_line + i}")
        doc_tokens, doc_kinds = _document(doc_id, chunks, spec, result)
        tokens.extend(doc_tokens)
        kinds.extend(doc_kinds)
        lengths.append(len(doc_tokens))
        doc_ids.append(doc_id)
    result.tokens = np.asarray(tokens, dtype=np.int64)
    result.kinds = np.asarray(kinds, dtype=np.uint8)
    result.lengths = np.asarray(lengths, dtype=np.int64)
    result.doc_ids = np.asarray(doc_ids, dtype=np.int64)
    result.input_bytes = sum(len(line) + 1 for line in lines)
    return result


@contextmanager
def _executor(workers: int) -> Iterator[Any]:
    """A forked pool, or None to work in this process.

    Fork, as megatron's preprocess_data does: a spawned worker would re-import transformers and torch (about
    10 s each here) to run code that only touches numpy and the tokenizers library, both fork-safe.
    """
    if workers <= 1:
        yield None
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool


def _ordered(pool: Any, fn: Callable[..., Any], tasks: Iterable[tuple], window: int) -> Iterator[Any]:
    """Results of ``fn(*task)`` in task order, with at most ``window`` tasks in flight (bounded memory)."""
    if pool is None:
        yield from (fn(*task) for task in tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, task))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _starmap(pool: Any) -> Callable[..., Iterable[Any]]:
    return map if pool is None else (lambda fn, *its: pool.starmap(fn, zip(*its, strict=True)))


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 while every id fits (as megatron's preprocess_data does), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


@dataclass
class Totals:
    """Running totals of the main process over all batches."""

    counts: Counter = field(default_factory=Counter)
    kind_tokens: np.ndarray = field(default_factory=lambda: np.zeros(len(Segment), dtype=np.int64))
    doc_ids: list[np.ndarray] = field(default_factory=list)
    unknown_chunks: list[tuple[int, int]] = field(default_factory=list)
    longest_unit: int = 0
    longest_document: tuple[int, int] = (-1, 0)  # (doc_id, tokens)

    def add(self, batch: BatchResult) -> None:
        self.counts.update(batch.counts)
        self.kind_tokens += np.bincount(batch.kinds, minlength=len(Segment))
        self.doc_ids.append(batch.doc_ids)
        self.unknown_chunks.extend(batch.unknown_chunks)
        self.longest_unit = max(self.longest_unit, batch.longest_unit)
        if len(batch.lengths) and batch.lengths.max() > self.longest_document[1]:
            k = int(batch.lengths.argmax())
            self.longest_document = (int(batch.doc_ids[k]), int(batch.lengths[k]))


def _write_datasets(batches: Iterable[BatchResult], prefix: str, dtype: type[np.number],
                    progress: Any) -> Totals:
    """Stream batches into the token and kind IndexedDatasets at ``prefix`` (temporary names)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    totals = Totals()
    tokens_out = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    kinds_out = IndexedDatasetBuilder(f"{prefix}{KINDS_SUFFIX}.bin", dtype=np.uint8)
    with naming_write_errors(f"{prefix}.bin"):  # a full disk: name the file (the builders' writes do not)
        for batch in batches:
            bounds = np.concatenate([[0], np.cumsum(batch.lengths)])
            for k, n in enumerate(batch.lengths.tolist()):
                tokens_out.add_document(batch.tokens[bounds[k]: bounds[k + 1]], [n])
                kinds_out.add_document(batch.kinds[bounds[k]: bounds[k + 1]], [n])
            totals.add(batch)
            progress.update(batch.input_bytes)
        tokens_out.finalize(f"{prefix}.idx")
        kinds_out.finalize(f"{prefix}{KINDS_SUFFIX}.idx")
    return totals


def _problems(totals: Totals, index: LatentIndex | None, doc_ids: np.ndarray, spec: BuildSpec) -> list[str]:
    """Everything that makes the join untrustworthy, each with a count and examples."""
    problems = []
    unique, counts = np.unique(doc_ids, return_counts=True)
    if (counts > 1).any():
        problems.append(f"{int((counts > 1).sum())} doc_ids occur in more than one document line (e.g. "
                        f"{unique[counts > 1][:3].tolist()}); latents could not be joined unambiguously")
    if totals.unknown_chunks:
        problems.append(f"{len(totals.unknown_chunks)} latents name a chunk_index past the end of their "
                        f"document (e.g. (doc_id, chunk_index) {totals.unknown_chunks[:3]})")
    if index is not None:
        orphans = index.unknown_documents(doc_ids)
        if len(orphans):
            problems.append(f"{len(orphans)} latents name a doc_id that is in no document file: "
                            f"{index.describe(orphans)}")
    if spec.long_latents == "error" and totals.counts["latents_too_long"]:
        problems.append(f"{totals.counts['latents_too_long']} latents exceed max_latent_tokens="
                        f"{spec.max_latent_tokens} (set build.long_latents to truncate or drop)")
    return problems


def _fingerprint(documents: list[Path], latents: list[Path], tokenizer_hash: str, spec: BuildSpec) -> str:
    """Identity of a build: inputs (path, size, mtime), tokenizer contents and every setting of the output."""
    def stamp(path: Path) -> list:
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]

    blob = json.dumps({"format": FORMAT, "documents": [stamp(p) for p in documents],
                       "latents": [stamp(p) for p in latents], "tokenizer": tokenizer_hash, "seed": spec.seed,
                       "max_latent_tokens": spec.max_latent_tokens, "long_latents": spec.long_latents},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _outputs(prefix: Path | str) -> list[str]:
    return [f"{prefix}{s}" for s in (".bin", ".idx", f"{KINDS_SUFFIX}.bin", f"{KINDS_SUFFIX}.idx")]


def read_sidecar(prefix: str | Path) -> dict[str, Any] | None:
    """The sidecar of a complete build at ``prefix``, or None when there is none."""
    path = Path(f"{prefix}.json")
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _sidecar(totals: Totals, spec: BuildSpec, tokenizer: Any, tokenizer_hash: str, key: str,
             inputs: dict[str, list[str]], latents_in_files: int) -> dict[str, Any]:
    c = totals.counts
    names = ("documents", "chunks", "chunks_with_latent", "prior", "posterior", "latents_too_long",
             "latents_truncated", "latents_dropped")
    counts = {name: int(c[name]) for name in names}
    counts["raw_chunks"] = counts["chunks"] - counts["chunks_with_latent"]
    counts["latents_in_files"] = latents_in_files
    tokens = {s.name.lower(): int(totals.kind_tokens[s]) for s in Segment}
    tokens["total"] = int(totals.kind_tokens.sum())
    return {
        "format": FORMAT,
        "fingerprint": key,
        "kinds_suffix": KINDS_SUFFIX,
        "segment_kinds": {s.name.lower(): int(s) for s in Segment},
        "layouts": {"prior": "SOL PRIOR_PREFIX Z EOL X", "posterior": "SOL EOL X SOL POSTERIOR_PREFIX Z EOL",
                    "no_latent": "X", "document": "BOS chunks... EOS"},
        "token_dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
        "tokenizer": {"path": spec.tokenizer, "sha256": tokenizer_hash, "vocab_size": tokenizer.vocab_size,
                      "special_ids": asdict(tokenizer.ids)},
        "seed": spec.seed,
        "max_latent_tokens": spec.max_latent_tokens,
        "long_latents": spec.long_latents,
        "inputs": inputs,
        "counts": counts,
        "tokens": tokens,
        "longest_document": {"doc_id": totals.longest_document[0], "tokens": totals.longest_document[1]},
        "longest_unit_tokens": totals.longest_unit,
    }


def _publish(tmp: Path, out: Path, meta: dict[str, Any]) -> None:
    """Move the finished files into place; the sidecar goes last, so its presence means complete."""
    Path(f"{out}.json").unlink(missing_ok=True)
    for src, dst in zip(_outputs(tmp), _outputs(out), strict=True):
        os.replace(src, dst)
    write_text_atomic(Path(f"{out}.json"), json.dumps(meta, indent=2) + "\n")


def _remove_partial(tmp: Path) -> None:
    for path in [*_outputs(tmp), f"{tmp}.latents.npy"]:
        Path(path).unlink(missing_ok=True)


def _build(documents: list[Path], spec: BuildSpec, tmp: Path, workers: int, docs_per_task: int,
           show_progress: bool) -> tuple[Totals, LatentIndex | None, Any]:
    """Index the latents, tokenise every document and write the datasets under the temporary prefix."""
    from tqdm import tqdm

    from megatron_bolt.data.tokenizer import BoltTokenizer

    tokenizer = BoltTokenizer.from_pretrained(spec.tokenizer)  # loaded before forking: workers inherit it
    index = None
    with _executor(workers) as pool:
        if spec.latent_files:
            index = LatentIndex.build(list(spec.latent_files), _starmap(pool))
            index.save(Path(f"{tmp}.latents.npy"))
            spec = BuildSpec(**{**asdict(spec), "latent_index": f"{tmp}.latents.npy"})
            log.info("indexed %d latents from %d files", len(index), len(spec.latent_files))
        tasks = ((spec, *batch) for batch in iter_line_batches(documents, docs_per_task))
        with tqdm(total=sum(p.stat().st_size for p in documents), unit="B", unit_scale=True,
                  desc="build-dataset", disable=not show_progress) as bar:
            results = _ordered(pool, tokenize_batch, tasks, window=2 * max(workers, 1) + 2)
            totals = _write_datasets(results, str(tmp), token_dtype(tokenizer.vocab_size), bar)
    doc_ids = np.concatenate(totals.doc_ids) if totals.doc_ids else np.zeros(0, dtype=np.int64)
    problems = _problems(totals, index, doc_ids, spec)
    if problems:
        raise BuildError("cannot build the joint dataset:\n  - " + "\n  - ".join(problems))
    return totals, index, tokenizer


def build_joint_dataset(documents: list[Path], latents: list[Path], tokenizer: str, output_prefix: str | Path,
                        *, seed: int, max_latent_tokens: int | None = None,
                        long_latents: LongLatents = "drop", workers: int = 1, docs_per_task: int = 256,
                        show_progress: bool = True) -> dict[str, Any]:
    """Build (or find up to date) the joint dataset at ``output_prefix``; returns its sidecar."""
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_hash = hash_tree(tokenizer)
    spec = BuildSpec(str(tokenizer), None, tuple(map(str, latents)), seed, max_latent_tokens, long_latents)
    key = _fingerprint(documents, latents, tokenizer_hash, spec)
    existing = read_sidecar(out)
    if existing and existing.get("fingerprint") == key and all(map(os.path.exists, _outputs(out))):
        log.info("%s is up to date (fingerprint %s); nothing to do", out, key)
        return existing
    tmp = out.with_name(f".{out.name}.partial")
    _remove_partial(tmp)
    try:
        totals, index, tok = _build(documents, spec, tmp, workers, docs_per_task, show_progress)
        inputs = {"documents": list(map(str, documents)), "latents": list(map(str, latents))}
        n_latents = len(index) if index is not None else 0
        meta = _sidecar(totals, spec, tok, tokenizer_hash, key, inputs, n_latents)
        _publish(tmp, out, meta)
    finally:
        _remove_partial(tmp)  # whatever is left: a failed build's files, the latent index
        _WORKER.clear()  # in-process builds: drop the cached tokenizer and index of this build
    c = meta["counts"]
    log.info("wrote %s: %d documents, %d tokens, %d/%d chunks with latents (prior %d, posterior %d)", out,
             c["documents"], meta["tokens"]["total"], c["chunks_with_latent"], c["chunks"], c["prior"],
             c["posterior"])
    return meta
