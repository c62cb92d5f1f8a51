"""The E-step's units of work: which chunks get latents, which shard owns them, and their token layouts.

A work item is one chunk of one prepared document. Documents are dealt to shards round-robin by their
position in the input (a document's chunks stay together, so its text is tokenised once), and each
shard lists its items in input order: the order, and so the batches, are the same on every run.

Layouts (token ids; special tokens placed by id, text tokenised chunk by chunk as the dataset builder does):
- posterior prompt: ``BOS prefix SOL EOL suffix SOL POSTERIOR`` (the model then writes Z and ``EOL``);
- joint sequence:   ``BOS prefix SOL PRIOR Z EOL suffix``; log p(Z, X_suffix | X_prefix) is the sum of the
  log-probabilities of every token after the prefix.
The prefix is the raw text of the previous ``prefix_chunks`` chunks. Over-long prompts lose prefix tokens
from the left; over-long joint sequences lose prefix tokens first, then suffix tokens from the end. A chunk
whose posterior prompt does not fit even with no prefix is skipped and counted (``too_long``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_bolt.data.jsonl import expand_paths
from megatron_bolt.data.tokenizer import BoltTokenizer


class EStepError(ValueError):
    """Bad E-step input or state; the message says what to fix."""


@dataclass(frozen=True)
class Item:
    doc_id: int
    chunk_index: int
    prefix: list[int]  # token ids of the raw prefix chunks (untruncated)
    suffix: list[int]  # token ids of the chunk itself

    @property
    def key(self) -> tuple[int, int]:
        return self.doc_id, self.chunk_index


def iter_documents(patterns: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(doc_id, chunks) of every prepared document, in input order; malformed lines fail with their place."""
    if not patterns:
        raise EStepError("estep.documents is empty: give the prepared documents (bolt prepare output)")
    try:
        paths = expand_paths(patterns, "estep.documents")
    except FileNotFoundError as exc:
        raise EStepError(str(exc)) from None
    for path in paths:
        if path.name.endswith((".report.json", ".params.json")):
            continue
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    doc_id, chunks = doc["doc_id"], doc["chunks"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EStepError(f"{path}:{lineno}: expected a prepared document "
                                     '{"doc_id": int, "chunks": [str, ...]}') from None
                if not isinstance(doc_id, int) or not isinstance(chunks, list) \
                        or not all(isinstance(c, str) for c in chunks):
                    raise EStepError(f"{path}:{lineno}: doc_id must be an integer and chunks a list of strings")
                yield doc_id, chunks


def _selected(chunks: list[str], pattern: re.Pattern | None) -> list[int]:
    """Indices of the chunks that get latents."""
    return [c for c, text in enumerate(chunks) if pattern is None or pattern.search(text)]


def shard_items(patterns: list[str], tokenizer: BoltTokenizer, shard: int, num_shards: int,
                prefix_chunks: int, chunk_pattern: str | None) -> Iterator[Item]:
    """The items of one shard, in order."""
    pattern = re.compile(chunk_pattern) if chunk_pattern else None
    for position, (doc_id, chunks) in enumerate(iter_documents(patterns)):
        if position % num_shards != shard:
            continue
        wanted = _selected(chunks, pattern)
        if not wanted:
            continue
        ids = [tokenizer.encode(text) for text in chunks]
        for c in wanted:
            prefix = [t for piece in ids[max(0, c - prefix_chunks):c] for t in piece]
            yield Item(doc_id, c, prefix, ids[c])


def all_keys(patterns: list[str], num_shards: int, chunk_pattern: str | None) -> list[list[tuple[int, int]]]:
    """Per shard, the (doc_id, chunk_index) keys it must cover (no tokenisation: the merge check)."""
    pattern = re.compile(chunk_pattern) if chunk_pattern else None
    keys: list[list[tuple[int, int]]] = [[] for _ in range(num_shards)]
    for position, (doc_id, chunks) in enumerate(iter_documents(patterns)):
        keys[position % num_shards].extend((doc_id, c) for c in _selected(chunks, pattern))
    return keys


def posterior_prompt(item: Item, ids, budget: int) -> tuple[list[int], int] | None:
    """(prompt, prefix tokens kept) within ``budget`` tokens, or None when even no prefix does not fit."""
    tail = [ids.sol, ids.eol, *item.suffix, ids.sol, ids.posterior]
    room = budget - 1 - len(tail)
    if room < 0:
        return None
    prefix = item.prefix[len(item.prefix) - room:] if room < len(item.prefix) else item.prefix
    return [ids.bos, *prefix, *tail], len(prefix)


def joint_sequence(item: Item, latent: list[int], ids, budget: int) -> tuple[list[int], int]:
    """(sequence, index of its first scored token) within ``budget`` tokens."""
    body = [ids.sol, ids.prior, *latent, ids.eol, *item.suffix]
    room = budget - 1 - len(body)
    if room >= len(item.prefix):
        prefix = item.prefix
    elif room > 0:
        prefix = item.prefix[-room:]
    else:
        prefix, body = [], body[:budget - 1]
    return [ids.bos, *prefix, *body], 1 + len(prefix)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def stage_dir(output_dir: str | Path, stage: str) -> Path:
    return Path(output_dir) / stage
