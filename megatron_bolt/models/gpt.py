"""Build a Llama-style megatron-core GPTModel from a BoltConfig.

This is the one place that decides the layer implementation (local PyTorch with SDPA attention, or
Transformer Engine) and the precision, and that splits the model into pipeline / virtual-pipeline chunks.
Call it after ``runtime.initialize`` (parallel_state must exist).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_bolt.config.schema import BoltConfig, ConfigError
from megatron_bolt.models import te
from megatron_bolt.models.attention import SdpaAttention
from megatron_bolt.models.norm import RMSNorm


def compute_dtype(cfg: BoltConfig) -> torch.dtype:
    """bf16/fp8 train with bf16 params on GPU; CPUs always compute in fp32."""
    if not torch.cuda.is_available() or cfg.train.precision == "fp32":
        return torch.float32
    return torch.bfloat16


def _rope_scaling(cfg: BoltConfig) -> tuple[bool, float]:
    """Map an HF rope_scaling dict onto megatron-core's Llama-3.1 scaling (its only built-in kind)."""
    rs = cfg.model.rope_scaling
    if not rs:
        return False, 8.0
    kind = rs.get("rope_type", rs.get("type"))
    expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind != "llama3" or any(float(rs.get(k, v)) != float(v) for k, v in expected.items()):
        raise ConfigError(
            f"model.rope_scaling={rs} is not supported: megatron-core implements Llama-3.1 scaling "
            f"(rope_type=llama3 with {expected}) only"
        )
    return True, float(rs.get("factor", 8.0))


def transformer_config(cfg: BoltConfig) -> TransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = compute_dtype(cfg)
    on_gpu = torch.cuda.is_available()
    recompute = {} if t.recompute == "none" else {
        "recompute_granularity": t.recompute,
        **({"recompute_method": "uniform", "recompute_num_layers": 1} if t.recompute == "full" else {}),
    }
    fp8 = {}
    if t.precision == "fp8":
        fp8 = dict(fp8=t.fp8_format, fp8_recipe=t.fp8_recipe, fp8_amax_history_len=t.fp8_amax_history_len,
                   fp8_amax_compute_algo=t.fp8_amax_compute_algo,
                   num_layers_at_start_in_bf16=t.fp8_bf16_first_last_layers,
                   num_layers_at_end_in_bf16=t.fp8_bf16_first_last_layers,
                   first_last_layers_bf16=t.fp8_bf16_first_last_layers > 0)
    init = {}
    if m.latent_thoughts_per_token:
        from megatron_bolt.models.ponder import paper_init_methods

        init = paper_init_methods(m)
    # Interleaved pipelining overlaps p2p (Megatron-LM's default): batched p2p would pair several sends and
    # receives between the same two ranks in one batch when PP = 2, which mismatches tensors.
    interleaved = p.virtual_pipeline_model_parallel_size is not None
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        # Fused SwiGLU is megatron-core's own torch.compile'd kernel (no apex/TE): 5-7% faster steps at 1.1B,
        # micro-batch 4-8 on an H100 (docs/benchmarks.md). Other fusions need apex/TE; local runs PyTorch's.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        calculate_per_token_loss=True,
        **recompute,
        **fp8,
        **init,
    )


def layer_spec(cfg: BoltConfig) -> ModuleSpec:
    if cfg.model.transformer_impl == "transformer_engine":
        return te.layer_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if cfg.model.attention_backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SdpaAttention
    return spec


def block_spec(cfg: BoltConfig, tconf: TransformerConfig, vp_stage: int | None):
    """The layers this pipeline stage builds; the local spec's final norm is ours too (SP-capable)."""
    spec = layer_spec(cfg)
    if cfg.model.transformer_impl == "transformer_engine":
        return spec
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    num_layers = get_num_layers_to_build(tconf, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=RMSNorm)


class BoltGPTModel(GPTModel):
    """GPTModel whose distribution covers the tokenizer's vocabulary only.

    Embedding rows are padded (``make_vocab_size_divisible_by``) for TP-even sharding; megatron-core would
    let the padding rows take part in the softmax, so the trained model and its HF export (which trims
    them) would assign different probabilities. BoLT compares log-probabilities across the two (log p from
    the Megatron scorer, log q from the exported sampler), so padding logits are set to -inf, shard-aware.
    """

    def __init__(self, *args, true_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.true_vocab_size = true_vocab_size

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with the vocabulary (possibly a TP shard of it) as the last dimension.

        Fills only the padding columns, in place: no pass over the whole [s, b, V] tensor. Autograd allows it
        (the output layer's backward needs its input, not its output); masked entries get zero gradient.
        """
        local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        first_pad = max(self.true_vocab_size - start, 0)
        if first_pad < local:
            logits[..., first_pad:].fill_(float("-inf"))
        return logits

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return super().compute_language_model_loss(labels, self._mask_padding(logits))

    def forward(self, *args, labels=None, **kwargs):
        out = super().forward(*args, labels=labels, **kwargs)
        if labels is None and self.post_process:
            out = self._mask_padding(out)
        return out


def build_model(cfg: BoltConfig) -> list[GPTModel]:
    """One GPTModel chunk per virtual pipeline stage on this rank (a list of one without VPP); with
    ``model.latent_thoughts_per_token > 0`` the PonderLM-2 model (models/ponder.py), same parameters."""
    tconf = transformer_config(cfg)
    scaling, factor = _rope_scaling(cfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    model_cls, extra = BoltGPTModel, {}
    if cfg.model.latent_thoughts_per_token:
        from megatron_bolt.models.ponder import PonderGPTModel, ponder_kwargs

        model_cls, extra = PonderGPTModel, ponder_kwargs(cfg)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = model_cls(
            **extra,
            true_vocab_size=cfg.model.vocab_size,
            config=tconf,
            transformer_layer_spec=block_spec(cfg, tconf, stage),
            vocab_size=cfg.model.padded_vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=not vpp, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=not vpp, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rotary_base),
            rope_scaling=scaling,
            rope_scaling_factor=factor,
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
