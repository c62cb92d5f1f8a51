"""Recipes: plain functions returning config overrides (nested dicts), named after model and scale.

``bolt quickstart`` starts from ``tiny_cpu_quickstart()`` unless ``--config`` is given; ``key=value``
overrides apply on top either way.
"""

from __future__ import annotations

from typing import Any


def tiny_cpu_quickstart() -> dict[str, Any]:
    """A 2-layer, 128-wide Llama on the embedded arithmetic corpus: minutes on a 2-core CPU.

    The vocabulary is set from the embedded tokenizer at run time; documents of the embedded corpus are
    at most ~240 tokens with their latents, so a 256-token row holds one whole document.
    """
    return {
        "model": {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2,
                  "ffn_hidden_size": 352, "max_position_embeddings": 256},
        "data": {"seq_length": 256},
        "train": {"micro_batch_size": 8, "global_batch_size": 8, "train_iters": 150, "lr": 3e-3,
                  "min_lr": 3e-4, "lr_warmup_iters": 10, "precision": "fp32", "log_interval": 10},
    }
