"""Exact latent-thought decoding with a KV cache, through megatron-core's own layers (docs/ponder.md).

A token costs K + 1 single-slot steps on one cache: its embedding, then each slot's final-norm output fed
back as the next slot's input, all at the token's RoPE position; the last step's output gives the next
token's logits. ``SlotCache.extend`` runs new slots through ``model.decoder`` with every layer's core
attention swapped, for that call only, for one that appends the new (already rotated) keys and values to
the cache and attends over everything cached. Norms, projections, RoPE, MLP and the final norm are
megatron-core's modules, so the arithmetic is the training forward's, and tensor parallelism works as there.
Works for the standard model too (K = 0: plain incremental decoding).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from megatron_bolt.models.gpt import BoltGPTModel
from megatron_bolt.models.ponder import PonderGPTModel


class _CachedCoreAttention(torch.nn.Module):
    """Core attention over [s, b, heads, d] tensors whose keys and values accumulate across calls."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        self.key = key if self.key is None else torch.cat([self.key, key])
        self.value = value if self.value is None else torch.cat([self.value, value])
        new, total = query.shape[0], self.key.shape[0]
        # New slot i sits at cache index total - new + i and sees every index up to its own.
        mask = None if new == 1 else torch.ones(new, total, dtype=torch.bool, device=query.device).tril(total - new)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


class SlotCache:
    """Keys and values of every slot run so far, for a batch of sequences that advance together."""

    def __init__(self, model: BoltGPTModel):
        self.model = model
        config = model.config
        scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.layers = [_CachedCoreAttention(scale) for _ in model.decoder.layers]
        self.rope = model.rotary_pos_emb(model.max_sequence_length)

    @property
    def slots(self) -> int:
        first = self.layers[0].key
        return 0 if first is None else first.shape[0]

    @contextlib.contextmanager
    def _attached(self):
        attentions = [layer.self_attention for layer in self.model.decoder.layers]
        originals = [a.core_attention for a in attentions]
        try:
            for a, cached in zip(attentions, self.layers, strict=True):
                a.core_attention = cached
            yield
        finally:
            for a, original in zip(attentions, originals, strict=True):
                a.core_attention = original

    def extend(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run new slots ([n, b, h] inputs at token positions [n]) after the cached ones; their final-norm
        outputs, [n, b, h]."""
        if int(positions.max()) >= self.rope.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond the model's max_position_embeddings="
                             f"{self.rope.shape[0]}")
        with self._attached():
            return self.model.decoder(hidden_states=inputs, attention_mask=None,
                                      rotary_pos_emb=self.rope[positions.to(self.rope.device)])

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) batch rows ``rows`` of every cached sequence."""
        for layer in self.layers:
            layer.key, layer.value = layer.key.index_select(1, rows), layer.value.index_select(1, rows)


class PonderDecoder:
    """KV-cache inference for a model from ``build_model``: exact token steps, exact or Jacobi prefill.

    Hidden states are [b, h] (the last slot of the latest token); ``logprobs`` turns them into raw
    next-token log-probabilities over the tokenizer's vocabulary (gathered across tensor-parallel ranks).
    """

    def __init__(self, model: BoltGPTModel):
        self.model = model
        self.thoughts = model.thoughts if isinstance(model, PonderGPTModel) else 0

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, PonderGPTModel):
            return self.model.token_embeddings(ids)
        return self.model.embedding(input_ids=ids, position_ids=None)

    def step(self, cache: SlotCache, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Exact: token ids [b] at ``position`` through K + 1 single-slot steps -> [b, h]."""
        x = self._embed(ids[:, None])
        where = torch.tensor([position])
        for _ in range(self.thoughts + 1):
            x = cache.extend(x, where)
        return x[0]

    def prefill_exact(self, cache: SlotCache, ids: torch.Tensor) -> torch.Tensor:
        """The prompt [b, n] one token at a time (the exact recurrence) -> [b, h] of its last token."""
        start = cache.slots // (self.thoughts + 1)
        for i in range(ids.shape[1]):
            hidden = self.step(cache, ids[:, i], start + i)
        return hidden

    def prefill_jacobi(self, cache: SlotCache, ids: torch.Tensor, iterations: int) -> torch.Tensor:
        """The training forward on an empty cache: Jacobi latents for the whole prompt [b, n], then the final
        pass run through the cache (keeping its keys and values) -> [b, h] of the last token."""
        if cache.slots:
            raise ValueError("Jacobi prefill needs an empty cache")
        tokens = self._embed(ids)
        latents = self.model.solve_latents(tokens, iterations) if self.thoughts else []
        slots = torch.stack([tokens, *latents], dim=1)
        length, width, batch, hidden = slots.shape
        positions = torch.arange(length).repeat_interleave(width)
        out = cache.extend(slots.reshape(length * width, batch, hidden), positions)
        return out[-1]

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, h] -> [b, vocab] float32 log_softmax of the raw logits (vocabulary padding excluded)."""
        model = self.model
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden[None], weight=weight, runtime_gather_output=True)
        return torch.log_softmax(logits[0, :, : model.true_vocab_size].float(), dim=-1)

    def score(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact teacher-forced log p(ids[:, i] | ids[:, :i]) for i >= 1 -> [b, n - 1] (no Jacobi error)."""
        cache = SlotCache(self.model)
        out = []
        for position in range(ids.shape[1] - 1):
            hidden = self.step(cache, ids[:, position], position)
            out.append(self.logprobs(hidden).gather(-1, ids[:, position + 1, None])[:, 0])
        return torch.stack(out, dim=1)
