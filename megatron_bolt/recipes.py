"""Recipes: plain functions returning config overrides (nested dicts), named after model and scale.

``bolt quickstart`` starts from ``tiny_cpu_quickstart()`` unless ``--config`` is given; ``key=value``
overrides apply on top either way.
"""

from __future__ import annotations

from typing import Any

# The quickstart's embedded corpus and its disjoint splits (prepare.split syntax, by document index): a quarter
# of the documents get teacher latents for the warm start, an eighth are labelled by the E-step, a fortieth
# are held out for ELBO diagnostics. Sizes keep the whole EM loop within minutes on a 2-core CPU.
QUICKSTART_CORPUS: dict[str, Any] = {
    "documents": 1200,
    "eval_questions": 200,
    "splits": {"warm": "0:1:4", "bootstrap": "1:2:8", "heldout": "3:4:40"},
}


def tiny_cpu_quickstart() -> dict[str, Any]:
    """A 2-layer, 128-wide Llama on the embedded arithmetic corpus, warm start + 2 EM iterations with K = 2.

    The vocabulary is set from the embedded tokenizer at run time; documents of the embedded corpus are
    at most ~240 tokens with their latents, so a 256-token row holds one whole document. Teacher latents are
    ~23 tokens, so 40 new tokens bound a latent; the teacher writes them for answer chunks only (``^A:``).
    Every M-step keeps the warm-start slice with its teacher latents (toy-evidence.md: it helps at this size).
    """
    return {
        "model": {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2,
                  "ffn_hidden_size": 352, "max_position_embeddings": 256},
        "data": {"seq_length": 256},
        "train": {"micro_batch_size": 8, "global_batch_size": 8, "train_iters": 100, "lr": 3e-3,
                  "min_lr": 3e-4, "lr_warmup_iters": 10, "precision": "fp32", "log_interval": 10},
        "estep": {"context_length": 256, "num_shards": 2, "chunk_pattern": "^A:",
                  "sampling": {"backend": "hf", "device": "cpu", "num_samples": 2, "max_new_tokens": 40,
                               "batch_size": 32}},
        "em": {"iterations": 2, "keep_warm_latents": True},
        "eval": {"task": "embedded", "latent": True, "backend": "hf", "batch_size": 50, "max_new_tokens": 48},
    }


def tinyllama_finemath_bolt() -> dict[str, Any]:
    """BoLT at paper scale: TinyLlama-1.1B v1.1 continued pretraining on FineMath-4+ (bolt-method.md).

    Warm start on the 0:1:20 split (~480M raw tokens) with GPT-4o-mini latents, then 3 bootstrap EM
    iterations on the 13:17:20 split (~1.92B raw tokens), each M-step restarting from the base weights.
    Paths are relative to the checkout; docs/recipes.md has the commands that create them and the expected
    GPU-hours. ``train.train_iters`` is the bootstrap M-step's 13B tokens (33,061 steps of 192 x 2048); the
    schema has no separate warm-start length yet, so iteration 0 trains as long (the paper: 4,069 steps).
    """
    data = "data/finemath"
    base = "checkpoints/tinyllama-1.1b-v1.1-bolt"  # bolt import-hf of TinyLlama v1.1 (+4 latent tokens)
    return {
        "model": {"num_layers": 22, "hidden_size": 2048, "num_attention_heads": 32, "num_query_groups": 4,
                  "ffn_hidden_size": 5632, "vocab_size": 32004, "max_position_embeddings": 2048,
                  "rotary_base": 10000.0, "norm_epsilon": 1e-5, "tie_word_embeddings": False},
        "parallel": {"use_distributed_optimizer": True, "overlap_grad_reduce": True},
        "data": {"tokenizer": f"{base}/tokenizer", "seq_length": 2048, "truncate_long_units": True,
                 "num_workers": 2},
        "train": {"micro_batch_size": 4, "global_batch_size": 192, "train_iters": 33061, "lr": 1e-4,
                  "min_lr": 1e-5, "lr_warmup_iters": 1000, "lr_decay_style": "cosine", "weight_decay": 0.01,
                  "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "clip_grad": 1.0,
                  "precision": "bf16", "log_interval": 10,
                  "checkpoint": {"save_interval": 1000, "keep_last": 2}},
        "estep": {"prefix_chunks": 3, "context_length": 2048, "num_shards": 64,
                  "sampling": {"backend": "trtllm", "num_samples": 4, "temperature": 1.0, "top_p": 1.0,
                               "top_k": 0, "max_new_tokens": 1024, "batch_size": 64}},
        "em": {"iterations": 3, "restart_from_base": True, "run_dir": "runs/tinyllama-finemath-bolt",
               "base_checkpoint": base, "warm_documents": [f"{data}/warm"],
               "warm_latents": [f"{data}/warm-latents.jsonl"], "bootstrap_documents": [f"{data}/bootstrap"],
               "heldout_documents": [f"{data}/validation"]},
        "eval": {"task": "math", "data_path": "data/math/test", "max_new_tokens": 512, "batch_size": 64},
        "build": {"workers": 32, "max_latent_tokens": 1024},
        "synthesize": {"documents": [f"{data}/warm"], "output": f"{data}/warm-latents.jsonl", "concurrency": 64},
        "prepare": {"input": ["data/raw/finemath-4plus"], "workers": 16},
    }
