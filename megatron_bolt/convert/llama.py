"""Llama family (Llama 2/3, TinyLlama, Mistral-style GQA): mapping table and config translation."""

from __future__ import annotations

from typing import Any

from megatron_bolt.config.schema import ModelConfig
from megatron_bolt.convert.mapping import Direct, GatedMLP, GroupedQKV, VocabRows, WeightMapping

_LAYER = "decoder.layers.{layer}"
_HF = "model.layers.{layer}"


def mapping_table(transformer_impl: str = "local", tied: bool = False) -> list[WeightMapping]:
    """Megatron names differ by layer spec only in where the pre-attention / pre-MLP norms live."""
    if transformer_impl == "transformer_engine":
        attn_norm = f"{_LAYER}.self_attention.linear_qkv.layer_norm_weight"
        mlp_norm = f"{_LAYER}.mlp.linear_fc1.layer_norm_weight"
    else:
        attn_norm = f"{_LAYER}.input_layernorm.weight"
        mlp_norm = f"{_LAYER}.pre_mlp_layernorm.weight"
    table: list[WeightMapping] = [
        VocabRows("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Direct(attn_norm, f"{_HF}.input_layernorm.weight"),
        GroupedQKV(f"{_LAYER}.self_attention.linear_qkv.weight", f"{_HF}.self_attn.q_proj.weight",
                   f"{_HF}.self_attn.k_proj.weight", f"{_HF}.self_attn.v_proj.weight"),
        Direct(f"{_LAYER}.self_attention.linear_proj.weight", f"{_HF}.self_attn.o_proj.weight"),
        Direct(mlp_norm, f"{_HF}.post_attention_layernorm.weight"),
        GatedMLP(f"{_LAYER}.mlp.linear_fc1.weight", f"{_HF}.mlp.gate_proj.weight", f"{_HF}.mlp.up_proj.weight"),
        Direct(f"{_LAYER}.mlp.linear_fc2.weight", f"{_HF}.mlp.down_proj.weight"),
        Direct("decoder.final_layernorm.weight", "model.norm.weight"),
    ]
    if not tied:
        table.append(VocabRows("output_layer.weight", "lm_head.weight"))
    return table


def model_config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Translate a transformers LlamaConfig dict; refuses features the Megatron model does not have."""
    if hf.get("model_type") not in ("llama", "mistral"):
        raise ValueError(f"unsupported model_type {hf.get('model_type')!r}: expected a Llama-family checkpoint")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"HF config sets {flag}=true; the Llama mapping has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not SwiGLU (silu)")
    heads = hf["num_attention_heads"]
    fields = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rotary_base=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        rope_scaling=hf.get("rope_scaling"),
        norm_epsilon=hf.get("rms_norm_eps", 1e-5),
        init_method_std=hf.get("initializer_range", 0.02),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_model(m: ModelConfig, torch_dtype: str = "float32", **extra) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.head_dim,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings,
        "rope_theta": m.rotary_base,
        "rope_scaling": m.rope_scaling,
        "rms_norm_eps": m.norm_epsilon,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": m.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
        **extra,
    }
