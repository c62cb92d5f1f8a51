"""Model FLOPs of a Llama decoder and the peak they are measured against (MFU).

Only matrix products count, at 2 FLOPs per multiply-add, times 3 for forward + backward (the backward
does a data-gradient and a weight-gradient product for each forward one). Per layer, forward, per token
(h hidden, n query heads, g KV heads, d head dim, f SwiGLU width, s sequence, V padded vocabulary):

    QKV projection  2 * h * (n*d + 2*g*d)      output projection  2 * n*d * h
    QK^T and PV     2 * 2 * s * n*d            SwiGLU MLP         2 * 3 * h * f
    logits (once, not per layer)               2 * h * V

With d = h / n this is Megatron's 12*L*h^2 * (1 + g/n + s/h + 1.5*f/h) + 6*h*V per token. Causal attention
is counted in full (every query against all s keys), as Narayanan et al. 2021 do and as our MFU targets are
stated; Megatron-LM core_r0.19.0 halves that term for the causal mask, which ``causal_halved=True`` gives.
Norms, RoPE, softmax and the loss are not counted; recomputed forwards are not counted (MFU, not HFU).
"""

from __future__ import annotations

from megatron_bolt.config.schema import BoltConfig

# Dense bf16 peak per GPU, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def flops_per_token(*, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, seq: int,
                    vocab: int, causal_halved: bool = False) -> float:
    projections = 2 * hidden * (heads * head_dim + 2 * kv_heads * head_dim) + 2 * heads * head_dim * hidden
    core_attention = 2 * 2 * seq * heads * head_dim * (0.5 if causal_halved else 1.0)
    mlp = 2 * 3 * hidden * ffn
    logits = 2 * hidden * vocab
    return 3 * (layers * (projections + core_attention + mlp) + logits)


def model_flops_per_token(cfg: BoltConfig, causal_halved: bool = False) -> float:
    """Per trained token. With K latent thoughts per token (models/ponder.py) a step makes K initial passes
    over 1..K slots per token and J + 1 passes over K + 1 slots (J the mean of model.jacobi_iters_train),
    each a sequence of slots * seq_length, all with backward; the output layer runs once."""
    m = cfg.model
    shape = dict(layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads, kv_heads=m.num_query_groups,
                 head_dim=m.head_dim, ffn=m.ffn_hidden_size, causal_halved=causal_halved)
    seq, thoughts = cfg.data.seq_length, m.latent_thoughts_per_token
    if not thoughts:
        return flops_per_token(**shape, seq=seq, vocab=m.padded_vocab_size)

    def slot_pass(slots: int) -> float:
        return slots * flops_per_token(**shape, seq=slots * seq, vocab=0)

    jacobi = sum(m.jacobi_iters_train) / 2
    passes = sum(slot_pass(k) for k in range(1, thoughts + 1)) + (jacobi + 1) * slot_pass(thoughts + 1)
    return passes + flops_per_token(**{**shape, "layers": 0}, seq=seq, vocab=m.padded_vocab_size)


def peak_tflops(device_name: str) -> float | None:
    """bf16 dense peak of a known GPU, None for CPUs and unknown devices (MFU is then not reported)."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)
