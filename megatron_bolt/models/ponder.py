"""PonderLM-2 continuous latent thoughts on megatron-core's GPTModel (docs/ponder.md).

With K = ``model.latent_thoughts_per_token`` the model reads, instead of x_1 x_2 ..., the interleaved
sequence x_1 z_1^1 .. z_1^K x_2 z_2^1 .. (slot s of token t at index t * (K + 1) + s):

- slot 0 of token t holds the token embedding times sqrt(2.5 h); slot s > 0 holds the final-norm hidden state
  of slot s - 1 (the vector the output layer reads), used as an input embedding as it is;
- every slot of token t gets RoPE position t, and attention is plain causal over all slots;
- the next-token loss is read at slot K only.

Slot s + 1 depends on the output of slot s, so the exact computation is sequential across positions.
Training and scoring solve for the latents in parallel by Jacobi iteration, each step one pass of the
decoder over the whole interleaved sequence, with gradients through every pass:

1. K initial passes, pass k over the first k slots of every token, each estimating latents 1..k;
2. J Jacobi passes over all K + 1 slots, each replacing every latent by its predecessor slot's output;
3. a final pass, whose slot-K outputs give the logits.

The first latent not yet exact becomes exact in each pass, so J >= K * (L - 1) reproduces the sequential
recurrence over L tokens exactly; fewer passes approximate it (J from ``model.jacobi_iters_train`` in train
mode, ``model.jacobi_iters_eval`` in eval mode). ``models/ponder_cache.py`` decodes exactly with a KV cache.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from megatron_bolt.config.schema import BoltConfig, ModelConfig
from megatron_bolt.models.gpt import BoltGPTModel


def _truncated_normal(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return functools.partial(torch.nn.init.trunc_normal_, mean=0.0, std=std, a=-3 * std, b=3 * std)


def paper_init_methods(m: ModelConfig) -> dict[str, Callable]:
    """TransformerConfig init overrides after the reference (GPT-NeoX) code: every weight matrix and the
    embedding from a normal of std sqrt(2 / (5 h)) truncated at 3 std (unit-scale inputs once embeddings are
    multiplied by sqrt(2.5 h)); attention and MLP output projections divided by sqrt(2 * layers * (K + 1)),
    the usual depth scaling with each of a token's K + 1 slots counted as a pass through the residual stream."""
    std = math.sqrt(2.0 / (5 * m.hidden_size))
    out_std = std / math.sqrt(2.0 * m.num_layers * (m.latent_thoughts_per_token + 1))
    return {"init_method": _truncated_normal(std), "embedding_init_method": _truncated_normal(std),
            "output_layer_init_method": _truncated_normal(out_std)}


def ponder_kwargs(cfg: BoltConfig) -> dict:
    m = cfg.model
    return {"thoughts": m.latent_thoughts_per_token, "jacobi_train": tuple(m.jacobi_iters_train),
            "jacobi_eval": m.jacobi_iters_eval, "jacobi_seed": cfg.train.seed}


class PonderGPTModel(BoltGPTModel):
    """BoltGPTModel with K latent thoughts per token: same parameters (so the same checkpoints), same forward
    contract (tokens [b, s] in; per-token loss [b, s] with labels, else logits [b, s, V] over the original
    tokens). ``position_ids`` are unused, as in megatron-core's RoPE GPTModel: RoPE positions are 0..s-1.
    With K = 0 it computes exactly what BoltGPTModel does (``build_model`` builds the latter then)."""

    def __init__(self, *args, thoughts: int, jacobi_train: tuple[int, int], jacobi_eval: int, jacobi_seed: int,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not (self.pre_process and self.post_process):
            raise ValueError("latent thoughts need the whole model on one pipeline stage "
                             "(parallel.pipeline_model_parallel_size=1)")
        self.thoughts = thoughts
        self.jacobi_train, self.jacobi_eval, self.jacobi_seed = jacobi_train, jacobi_eval, jacobi_seed
        self.embed_scale = math.sqrt(2.5 * self.config.hidden_size) if thoughts else 1.0

    def jacobi_iterations(self, input_ids: torch.Tensor) -> int:
        """J for this micro-batch: fixed in eval mode, uniform over ``jacobi_train`` in train mode.

        The draw is seeded by the micro-batch's tokens: tensor-parallel ranks (which see the same tokens) run
        the same number of passes with no communication, and a resumed run, or one at another TP/DP layout
        with the same micro-batches, draws what the original run drew.
        """
        if not self.training:
            return self.jacobi_eval
        low, high = self.jacobi_train
        if low == high:
            return low
        ids = input_ids.reshape(-1).long()
        weights = torch.arange(1, ids.numel() + 1, device=ids.device)
        key = int(((ids + 1) * weights).sum())
        gen = torch.Generator().manual_seed((key * 1_000_003 + self.jacobi_seed) % (2**63 - 1))
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] ids -> [s, b, h] slot-0 inputs."""
        emb = self.embedding(input_ids=input_ids, position_ids=None)
        return emb * self.embed_scale if self.thoughts else emb

    def slot_pass(self, tokens: torch.Tensor, latents: list[torch.Tensor]) -> torch.Tensor:
        """One decoder pass over every token's slot-0 input followed by ``latents`` (each [s, b, h]):
        the final-norm outputs, [s, 1 + len(latents), b, h]."""
        slots = torch.stack([tokens, *latents], dim=1)
        length, width, batch, hidden = slots.shape
        rope = self.rotary_pos_emb(length).repeat_interleave(width, dim=0)
        out = self.decoder(hidden_states=slots.reshape(length * width, batch, hidden), attention_mask=None,
                           rotary_pos_emb=rope)
        return out.reshape(length, width, batch, hidden)

    def solve_latents(self, tokens: torch.Tensor, iterations: int) -> list[torch.Tensor]:
        """The K latents ([s, b, h] each) after the initial and ``iterations`` Jacobi passes: the inputs of
        the final pass."""
        latents: list[torch.Tensor] = []
        for _ in range(self.thoughts):
            latents = list(self.slot_pass(tokens, latents).unbind(1))
        for _ in range(iterations if self.thoughts else 0):
            latents = list(self.slot_pass(tokens, latents)[:, :-1].unbind(1))
        return latents

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                jacobi_iters: int | None = None) -> torch.Tensor:
        """``jacobi_iters`` overrides the mode's J (tests, exact scoring with J >= K * (s - 1))."""
        if attention_mask is not None:
            raise ValueError("latent thoughts use plain causal attention: pass attention_mask=None")
        iterations = self.jacobi_iterations(input_ids) if jacobi_iters is None else jacobi_iters
        tokens = self.token_embeddings(input_ids)
        hidden = self.slot_pass(tokens, self.solve_latents(tokens, iterations))[:, -1]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        if labels is None:
            return self._mask_padding(logits).transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)
