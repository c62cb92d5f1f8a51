"""Packed training rows over joint datasets: tokens, labels, span-aware loss masks, DP sharding, blends.

Packing follows the paper (and pretraining): the documents of a dataset are concatenated in a seeded
shuffled order and the stream is cut into rows of ``seq_length + 1`` tokens, consecutive rows sharing one
token as in megatron's GPTDataset (row i covers stream positions ``[i*S, i*S + S]``). Attention is plain
causal across packed documents and position ids run 0..S-1 in every row. Epoch ``e`` orders the documents
by a permutation seeded with ``(seed, e)`` and the stream runs on from epoch to epoch, so row ``i`` exists
for every ``i >= 0`` and depends only on (data, seed, seq_length, i): resuming at any sample index is just
reading from there.

GPTDataset cannot be used because its loss mask only knows EOD and padding; here the mask comes from the
per-token segment kinds written by the builder: every token is trained on (the paper) unless
``loss_on_raw=False``, which masks the labels that are text of chunks without a latent.

Random access: per epoch the document order and each document's start offset in the stream (the analogue
of GPTDataset's shuffle and sample indices) are computed with numpy, saved next to the data as ``.npy``
(memory only when that directory is read-only), and a row is found with one binary search.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from megatron_bolt.data.builder import KINDS_SUFFIX, Segment, read_sidecar
from megatron_bolt.utils.atomic import atomic_open

if TYPE_CHECKING:
    from megatron_bolt.config.schema import BoltConfig

log = logging.getLogger(__name__)

Row = dict[str, torch.Tensor]


class DatasetError(ValueError):
    """A joint dataset that cannot be trained on as configured; the message names the prefix."""


class RowSource(Protocol):
    def __getitem__(self, index: int) -> Row: ...


class JointDataset:
    """Rows of ``seq_length`` inputs (+1 for the shifted labels) from one joint dataset prefix."""

    def __init__(self, prefix: str | Path, seq_length: int, seed: int, loss_on_raw: bool = True,
                 cache_dir: str | Path | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        meta = read_sidecar(prefix)
        if meta is None:
            raise FileNotFoundError(f"{prefix}.json is missing: {prefix} is not a complete joint dataset "
                                    "(run `bolt build-dataset`)")
        self.prefix, self.seq_length, self.seed, self.loss_on_raw = str(prefix), seq_length, seed, loss_on_raw
        self.fingerprint = meta["fingerprint"]
        self.vocab_size = int(meta["tokenizer"]["vocab_size"])
        self._tokens = IndexedDataset(self.prefix)
        self._kinds = IndexedDataset(f"{self.prefix}{KINDS_SUFFIX}")
        self.doc_lengths = np.asarray(self._tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.doc_lengths, self._kinds.sequence_lengths):
            raise DatasetError(f"{prefix}: token and segment-kind datasets disagree on document lengths")
        self.tokens_per_epoch = int(self.doc_lengths.sum())
        if self.tokens_per_epoch == 0 or meta["counts"]["documents"] != len(self.doc_lengths):
            raise DatasetError(f"{prefix}: empty, or its sidecar does not describe these index files")
        self.cache_dir = Path(cache_dir) if cache_dir else Path(self.prefix).parent
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        """Rows whose inputs lie inside one pass over the data (later indices run on into later epochs)."""
        return self.tokens_per_epoch // self.seq_length

    def _cache_path(self, epoch: int) -> Path:
        name = Path(self.prefix).name
        return self.cache_dir / f"{name}.order-{self.fingerprint}-seed{self.seed}-epoch{epoch}.npy"

    def _build_epoch(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_lengths))
        starts = np.concatenate([[0], np.cumsum(self.doc_lengths[order])])
        return np.concatenate([order, starts]).astype(np.int64)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start offset of each ordered document) of one epoch; cached on disk."""
        if epoch not in self._epochs:
            path = self._cache_path(epoch)
            try:
                table = np.load(path, mmap_mode="r", allow_pickle=False)
            except (FileNotFoundError, ValueError):
                table = self._build_epoch(epoch)
                self._save(path, table)
            n = len(self.doc_lengths)
            if len(self._epochs) >= 2:  # rows only ever straddle two neighbouring epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (table[:n], table[n:])
        return self._epochs[epoch]

    @staticmethod
    def _save(path: Path, table: np.ndarray) -> None:
        try:
            # Concurrent ranks write identical bytes under per-process temp names; any winner is fine.
            with atomic_open(path, "wb") as f:
                np.save(f, table, allow_pickle=False)
        except OSError as exc:
            log.warning("cannot cache the epoch order at %s (%s); keeping it in memory", path, exc)

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, kinds) at stream positions ``[start, start + length)``, across documents and epochs."""
        tokens, kinds = [], []
        pos, end = start, start + length
        while pos < end:
            epoch, offset = divmod(pos, self.tokens_per_epoch)
            order, starts = self._epoch(epoch)
            k = int(np.searchsorted(starts, offset, side="right")) - 1
            doc, within = int(order[k]), offset - int(starts[k])
            n = min(int(self.doc_lengths[doc]) - within, end - pos)
            tokens.append(self._tokens.get(doc, within, n))
            kinds.append(self._kinds.get(doc, within, n))
            pos += n
        return np.concatenate(tokens).astype(np.int64), np.concatenate(kinds)

    def __getitem__(self, index: int) -> Row:
        if index < 0:
            raise IndexError(f"row index {index} is negative")
        tokens, kinds = self.read(index * self.seq_length, self.seq_length + 1)
        mask = np.ones(self.seq_length, dtype=np.float32)
        if not self.loss_on_raw:
            mask[kinds[1:] == Segment.RAW] = 0.0
        return {
            "tokens": torch.from_numpy(tokens[:-1].copy()),
            "labels": torch.from_numpy(tokens[1:].copy()),
            "loss_mask": torch.from_numpy(mask),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


class BlendedRows:
    """Rows from several datasets in proportion to weights, with megatron-core's blending index.

    ``build_blending_indices`` (the C++ helper behind megatron's BlendedDataset) assigns each of ``size``
    samples to the dataset whose share lags its weight most, so any prefix of the blend is as close to the
    weights as possible; each source dataset is read at its own consecutive row indices.
    """

    def __init__(self, datasets: list[JointDataset], weights: list[float], size: int):
        from megatron.core.datasets import helpers

        if len(datasets) != len(weights) or not datasets or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per dataset (got {weights} for {len(datasets)})")
        self.datasets, self.size = datasets, size
        normalized = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.dataset_index = np.zeros(size, dtype=np.int16)
        self.sample_index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(self.dataset_index, self.sample_index, normalized, len(datasets), size,
                                       False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Row:
        if not 0 <= index < self.size:
            raise IndexError(f"row {index} is outside the blend of {self.size} rows (train.train_iters * "
                             "train.global_batch_size)")
        return self.datasets[int(self.dataset_index[index])][int(self.sample_index[index])]


def parse_blend(entries: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's ``--data-path`` convention: ``[prefix]``, ``[p1, p2, ...]`` or ``[w1, p1, w2, p2, ...]``."""
    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    if len(entries) % 2 == 0 and all(number(e) is not None for e in entries[::2]):
        return list(entries[1::2]), [float(e) for e in entries[::2]]
    if any(number(e) is not None for e in entries):
        raise DatasetError(f"data.data_prefix={entries}: give prefixes only, or weight/prefix pairs")
    return list(entries), None


def rank_rows(global_batch_size: int, dp_rank: int, dp_size: int, step: int) -> range:
    """Row indices of ``step``'s global batch held by one data-parallel rank (a contiguous share)."""
    if global_batch_size % dp_size or not 0 <= dp_rank < dp_size:
        raise ValueError(f"global batch of {global_batch_size} rows does not split over {dp_size} ranks "
                         f"(rank {dp_rank})")
    share = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * share
    return range(first, first + share)


def rank_batches(dataset: RowSource, global_batch_size: int, dp_rank: int, dp_size: int,
                 start_step: int = 0) -> Iterator[Row]:
    """This rank's rows of every global batch from ``start_step`` on, stacked into [rows, seq] tensors.

    Rank r gets the r-th contiguous share of each global batch, so ranks are disjoint and together cover
    the batch, and each rank reads only its own rows.
    """
    for step in count(start_step):
        rows = [dataset[i] for i in rank_rows(global_batch_size, dp_rank, dp_size, step)]
        yield {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def build_train_dataset(cfg: BoltConfig) -> RowSource:
    """The training rows named by ``data.data_prefix`` (one prefix, or a weighted blend)."""
    d = cfg.data
    prefixes, weights = parse_blend(d.data_prefix)
    datasets = [JointDataset(p, d.seq_length, d.seed, d.loss_on_raw) for p in prefixes]
    for prefix, ds in zip(prefixes, datasets, strict=True):
        if ds.vocab_size > cfg.model.vocab_size:  # ids past the embedding: an index error deep in the model
            raise DatasetError(f"{prefix} was built with a tokenizer of {ds.vocab_size} tokens but model.vocab_size="
                               f"{cfg.model.vocab_size}: set model.vocab_size={ds.vocab_size} (or build the dataset "
                               "with this model's tokenizer)")
    if len(datasets) == 1:
        return datasets[0]
    weights = weights or [float(ds.tokens_per_epoch) for ds in datasets]
    return BlendedRows(datasets, weights, cfg.train.train_iters * cfg.train.global_batch_size)
