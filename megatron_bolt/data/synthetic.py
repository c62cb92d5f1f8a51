"""A deterministic synthetic token stream for smoke runs and parallelism tests (no files needed).

Each row is a random prefix followed by its copy, so a model can only lower the loss on the second half
by attending back: a quick, unambiguous signal that attention and training work. Batch ``i`` depends only
on (seed, i), so any rank, restarted at any step, sees exactly the same data.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_bolt.train.step import Batch


def copy_task_batch(step: int, rows: int, seq_length: int, vocab_size: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    half = (seq_length + 1) // 2 + 1
    prefix = torch.randint(4, vocab_size, (rows, half), generator=gen)
    stream = torch.cat([prefix, prefix], dim=1)[:, : seq_length + 1]
    loss_mask = torch.zeros(rows, seq_length)
    loss_mask[:, half - 1 :] = 1.0  # only copied tokens are predictable
    return {
        "tokens": stream[:, :-1].contiguous(),
        "labels": stream[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq_length).expand(rows, seq_length).contiguous(),
    }


def copy_task_batches(start_step: int, rows: int, seq_length: int, vocab_size: int, seed: int) -> Iterator[Batch]:
    step = start_step
    while True:
        yield copy_task_batch(step, rows, seq_length, vocab_size, seed)
        step += 1
