"""A deterministic synthetic row source for smoke runs and parallelism tests (no files needed).

Each row is a random prefix followed by its copy, so a model can only lower the loss on the second half
by attending back: a quick, unambiguous signal that attention and training work. Row ``i`` depends only
on (seed, i), so any rank, restarted at any step, reads exactly the same data; it plugs into
``data.dataset.rank_batches`` like the real packed dataset.
"""

from __future__ import annotations

import torch


class CopyTaskRows:
    """Symbols come from a small alphabet (ids 4 .. 4 + alphabet) so a tiny model shows learning within
    a few dozen steps: first the alphabet, then the copying."""

    def __init__(self, seq_length: int, vocab_size: int, seed: int, alphabet: int = 16):
        self.seq_length, self.seed = seq_length, seed
        self.high = min(vocab_size, 4 + alphabet)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        half = (self.seq_length + 1) // 2 + 1
        prefix = torch.randint(4, self.high, (half,), generator=gen)
        stream = torch.cat([prefix, prefix])[: self.seq_length + 1]
        loss_mask = torch.zeros(self.seq_length)
        loss_mask[half - 1 :] = 1.0  # only copied tokens are predictable
        return {"tokens": stream[:-1], "labels": stream[1:], "loss_mask": loss_mask,
                "position_ids": torch.arange(self.seq_length)}

    def batch(self, first_row: int, rows: int) -> dict[str, torch.Tensor]:
        items = [self[first_row + i] for i in range(rows)]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}
