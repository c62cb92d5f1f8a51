"""Declarative weight mappings between Hugging Face and megatron-core (unsharded, TP=1 layout).

An architecture is a list of mapping objects; each knows how to build one Megatron tensor from HF tensors
and back. ``{layer}`` in a name expands over the decoder layers. Tensor parallel sharding is not handled
here: a TP=1 state dict is saved as a distributed checkpoint, and dist_checkpointing reshards it to any
TP/PP layout on load (including the [gate; up] interleave of SwiGLU's fc1 under TP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from megatron_bolt.config.schema import ModelConfig

Getter = Callable[[str], torch.Tensor]


class WeightMapping:
    megatron: str

    def hf_names(self) -> list[str]:
        raise NotImplementedError

    def to_megatron(self, get: Getter, cfg: ModelConfig, padded_vocab: int) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def for_layer(self, layer: int) -> WeightMapping:
        kwargs = {k: v.format(layer=layer) for k, v in vars(self).items()}
        return type(self)(**kwargs)


@dataclass(frozen=True)
class Direct(WeightMapping):
    """Same tensor under another name (norms, attention output, down projection)."""

    megatron: str
    hf: str

    def hf_names(self):
        return [self.hf]

    def to_megatron(self, get, cfg, padded_vocab):
        return get(self.hf)

    def to_hf(self, tensor, cfg):
        return {self.hf: tensor}


@dataclass(frozen=True)
class VocabRows(WeightMapping):
    """Embedding / output rows: zero rows pad the vocabulary to the TP-divisible size; trimmed on export."""

    megatron: str
    hf: str

    def hf_names(self):
        return [self.hf]

    def to_megatron(self, get, cfg, padded_vocab):
        w = get(self.hf)
        if w.shape[0] > padded_vocab:
            raise ValueError(f"{self.hf} has {w.shape[0]} rows, more than the padded vocabulary {padded_vocab}")
        pad = w.new_zeros(padded_vocab - w.shape[0], w.shape[1])
        return torch.cat([w, pad]) if pad.numel() else w

    def to_hf(self, tensor, cfg):
        return {self.hf: tensor[: cfg.vocab_size]}


@dataclass(frozen=True)
class GroupedQKV(WeightMapping):
    """Megatron fuses q, k, v per KV group: for each group g, its query heads, then k_g, then v_g."""

    megatron: str
    q: str
    k: str
    v: str

    def hf_names(self):
        return [self.q, self.k, self.v]

    def to_megatron(self, get, cfg, padded_vocab):
        g, d = cfg.num_query_groups, cfg.head_dim
        per = cfg.num_attention_heads // g
        q = get(self.q).view(g, per * d, -1)
        k = get(self.k).view(g, d, -1)
        v = get(self.v).view(g, d, -1)
        return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])

    def to_hf(self, tensor, cfg):
        g, d = cfg.num_query_groups, cfg.head_dim
        per = cfg.num_attention_heads // g
        fused = tensor.view(g, (per + 2) * d, -1)
        q, k, v = torch.split(fused, [per * d, d, d], dim=1)
        hidden = tensor.shape[-1]
        return {self.q: q.reshape(-1, hidden), self.k: k.reshape(-1, hidden), self.v: v.reshape(-1, hidden)}


@dataclass(frozen=True)
class GatedMLP(WeightMapping):
    """SwiGLU fc1 is [gate; up] stacked along the output dimension."""

    megatron: str
    gate: str
    up: str

    def hf_names(self):
        return [self.gate, self.up]

    def to_megatron(self, get, cfg, padded_vocab):
        return torch.cat([get(self.gate), get(self.up)], dim=0)

    def to_hf(self, tensor, cfg):
        gate, up = torch.chunk(tensor, 2, dim=0)
        return {self.gate: gate, self.up: up}


def expand(table: list[WeightMapping], num_layers: int) -> list[WeightMapping]:
    out = []
    for m in table:
        if "{layer}" in m.megatron:
            out.extend(m.for_layer(i) for i in range(num_layers))
        else:
            out.append(m)
    return out


def hf_to_megatron(table: list[WeightMapping], hf: Mapping[str, torch.Tensor], cfg: ModelConfig,
                   padded_vocab: int) -> dict[str, torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"HF checkpoint has no tensor {name!r}: not a {cfg.num_layers}-layer Llama checkpoint?")
        return hf[name]

    return {m.megatron: m.to_megatron(get, cfg, padded_vocab).contiguous() for m in expand(table, cfg.num_layers)}


def megatron_to_hf(
    table: list[WeightMapping], state: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for m in expand(table, cfg.num_layers):
        if m.megatron not in state:
            raise KeyError(f"Megatron state has no tensor {m.megatron!r}")
        out.update({k: v.contiguous() for k, v in m.to_hf(state[m.megatron], cfg).items()})
    return out
