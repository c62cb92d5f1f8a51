"""Scoring throughput: our Megatron scorer vs a plain HF forward + log_softmax, same weights, one run.

    .venv/bin/python benchmarks/score_throughput.py --preset cpu-tiny --out runs/score-cpu.json
    python3 benchmarks/score_throughput.py --preset tinyllama-h100 --out score.json

Teacher-forced scoring (``bolt score``, the E-step's log p) computes log p(x_i | x_<i) for every position of
every sequence. Two implementations score the same random token sequences, in the same process:

- ``bolt``: ``megatron_bolt.score.score_sequences`` on a random-init model from ``build_model`` (what
  ``score.loaded_model`` builds, minus the checkpoint load): right-padded micro-batches through
  ``get_forward_backward_func(forward_only=True)``, per-token -log p from the model's loss output (fp32
  cross-entropy over the vocabulary, padding columns masked), results as Python lists of floats;
- ``hf``: transformers ``LlamaForCausalLM`` (SDPA attention) in the same dtype, micro-batches of the same
  size, ``log_softmax(logits.float())`` gathered at the next tokens, results as the same lists.

The HF model gets the Megatron model's weights through the repository's converter (``convert.llama``
mapping table, the one ``bolt export-hf`` uses), so the two runs must agree: the maximum and mean absolute
difference of the log-probs are printed (fp32: within 1e-4; bf16: rounding differs between the two
implementations, the mean difference is checked against 0.02 nats). A weight-mapping bug shows up as
differences of the order of the log-probs' own spread.

Each sequence has ``seq + 1`` tokens, so every forward pass runs over exactly ``seq`` positions and yields
``seq`` scored tokens. After an untimed warm-up micro-batch each, the two implementations score all the
sequences alternately (bolt, hf, bolt, hf, ...; ``torch.cuda.synchronize`` around each pass) so that load
from other processes hits both alike. Load from other processes only ever adds time, so the headline
figures are each implementation's fastest pass (the least disturbed, as in ``benchmarks/ponder.py``):
tokens/s and the ratio bolt/hf; medians and the paired per-round ratios (each bolt pass against the hf pass
right after it) are printed beside them. On GPU, where passes vary by a few percent, the two agree; model
TFLOP/s and MFU count the forward third of ``train.flops`` against the bf16 dense peak.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from megatron_bolt.train import flops


@dataclass(frozen=True)
class Preset:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    sequences: int
    micro_batch: int
    dtype: str
    rounds: int = 5


PRESETS = {
    # The M-step's cpu-tiny shape (benchmarks/train_throughput.py).
    "cpu-tiny": Preset(layers=2, hidden=256, heads=4, kv_heads=2, ffn=704, vocab=32000, seq=256, sequences=16,
                       micro_batch=4, dtype="float32", rounds=8),
    # TinyLlama-1.1B; 32004 = Llama-2's 32000 plus four latent/special tokens (padded to 32128 in Megatron).
    "tinyllama-h100": Preset(layers=22, hidden=2048, heads=32, kv_heads=4, ffn=5632, vocab=32004, seq=2048,
                             sequences=64, micro_batch=8, dtype="bfloat16"),
}

# Agreement of the two implementations' log-probs (same weights): max |diff| in fp32, mean |diff| in bf16 (the bf16
# threshold is a first guess, not yet tried on a GPU; a mapping error moves log-probs by about their own spread).
FP32_MAX_ABS = 1e-4
BF16_MEAN_ABS = 0.02


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def make_sequences(p: Preset, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, p.vocab, (p.sequences, p.seq + 1), generator=gen).tolist()


def bolt_config(p: Preset):
    from megatron_bolt.config.schema import BoltConfig, DataConfig, ModelConfig, TrainConfig

    model = ModelConfig(num_layers=p.layers, hidden_size=p.hidden, num_attention_heads=p.heads,
                        num_query_groups=p.kv_heads, ffn_hidden_size=p.ffn, vocab_size=p.vocab,
                        max_position_embeddings=p.seq)
    # Scoring has no global batch (score._scoring_config sets it the same way for a world of one).
    train = TrainConfig(micro_batch_size=p.micro_batch, global_batch_size=p.micro_batch,
                        precision="bf16" if p.dtype == "bfloat16" else "fp32")
    return BoltConfig(model=model, train=train, data=DataConfig(seq_length=p.seq))


def build_bolt(cfg) -> list:
    from megatron_bolt.models.gpt import build_model

    model = build_model(cfg)
    for chunk in model:
        chunk.eval()
    return model


def build_hf(cfg, bolt_model: list, dtype: torch.dtype):
    """LlamaForCausalLM carrying the Megatron model's weights (vocabulary trimmed to the true size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bolt.convert import llama
    from megatron_bolt.convert.mapping import megatron_to_hf

    m = cfg.model
    fields = llama.hf_config_from_model(m)
    fields.pop("torch_dtype")
    hf_config = LlamaConfig(**fields, use_cache=False, attn_implementation="sdpa")
    with device():
        model = LlamaForCausalLM(hf_config)
    model = model.to(dtype).eval()
    [chunk] = bolt_model
    state = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    table = llama.mapping_table(m.transformer_impl, m.tie_word_embeddings)
    model.load_state_dict(megatron_to_hf(table, state, m), strict=True)
    return model


def hf_scores(model, sequences: list[list[int]], micro_batch: int) -> list[list[float]]:
    """Per sequence, log p of tokens 1.. under ``model`` (the layout of ``score_sequences``)."""
    out: list[list[float]] = []
    with torch.no_grad():
        for i in range(0, len(sequences), micro_batch):
            ids = torch.tensor(sequences[i:i + micro_batch], device=device())
            logits = model(input_ids=ids[:, :-1]).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.extend(logp.cpu().tolist())
    return out


def timed(fn: Callable[[], list[list[float]]]) -> tuple[float, list[list[float]]]:
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - start, result


def agreement(bolt: list[list[float]], hf: list[list[float]], dtype: str) -> dict:
    a = torch.tensor(bolt, dtype=torch.float64)
    b = torch.tensor(hf, dtype=torch.float64)
    diff = (a - b).abs()
    result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
              "logprob_mean": a.mean().item(), "logprob_std": a.std().item(), "tokens": a.numel()}
    if dtype == "float32":
        result |= {"criterion": f"max |diff| <= {FP32_MAX_ABS:g}", "agree": result["max_abs_diff"] <= FP32_MAX_ABS}
    else:
        result |= {"criterion": f"mean |diff| <= {BF16_MEAN_ABS:g}", "agree": result["mean_abs_diff"] <= BF16_MEAN_ABS}
    return result


def environment() -> dict:
    import transformers

    gpu = torch.cuda.get_device_name() if on_gpu() else None
    return {
        "device": gpu or f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "cuda": torch.version.cuda if gpu else None, "python": platform.python_version(),
        "megatron_core": importlib.metadata.version("megatron-core"), "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def summarize(p: Preset, seconds: list[float], fwd_flops: float, peak: float | None) -> dict:
    best, median = min(seconds), statistics.median(seconds)
    tokens_per_s = p.sequences * p.seq / best
    tflops = fwd_flops * tokens_per_s / 1e12
    return {"seconds_best": best, "seconds_median": median, "seconds_all": seconds,
            "sequences_per_s": p.sequences / best, "tokens_per_s": tokens_per_s,
            "tokens_per_s_median": p.sequences * p.seq / median, "tflops_per_gpu": tflops,
            "mfu": tflops / peak if peak else None}


def run(p: Preset, peak: float | None) -> dict:
    from megatron_bolt.runtime.distributed import distributed
    from megatron_bolt.score.scorer import score_sequences

    dtype = getattr(torch, p.dtype)
    cfg = bolt_config(p)
    sequences = make_sequences(p)
    shape = dict(layers=p.layers, hidden=p.hidden, heads=p.heads, kv_heads=p.kv_heads, head_dim=p.hidden // p.heads,
                 ffn=p.ffn, seq=p.seq, vocab=cfg.model.padded_vocab_size)
    fwd_flops = flops.flops_per_token(**shape) / 3  # forward only: one third of forward + backward
    with distributed(cfg, seed=0):
        bolt_model = build_bolt(cfg)
        hf_model = build_hf(cfg, bolt_model, dtype)
        impls = {"bolt": lambda: score_sequences(cfg, bolt_model, sequences),
                 "hf": lambda: hf_scores(hf_model, sequences, p.micro_batch)}
        warm = sequences[:p.micro_batch]
        score_sequences(cfg, bolt_model, warm)  # warm-up: allocator, kernels, compiled SwiGLU on GPU
        hf_scores(hf_model, warm, p.micro_batch)
        seconds: dict[str, list[float]] = {name: [] for name in impls}
        outputs: dict[str, list[list[float]]] = {}
        for r in range(p.rounds):
            for name, fn in impls.items():
                print(f"round {r + 1}/{p.rounds}: {name} ...", flush=True)
                s, outputs[name] = timed(fn)
                seconds[name].append(s)
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if on_gpu() else None
    results = {name: summarize(p, secs, fwd_flops, peak) for name, secs in seconds.items()}
    per_round = [h / b for b, h in zip(seconds["bolt"], seconds["hf"], strict=True)]
    return {
        "impls": results, "ratio": results["bolt"]["tokens_per_s"] / results["hf"]["tokens_per_s"],
        "ratio_paired_median": statistics.median(per_round), "ratio_per_round": per_round,
        "agreement": agreement(outputs["bolt"], outputs["hf"], p.dtype),
        "flops_per_token_forward": fwd_flops, "peak_tflops": peak, "peak_mem_gib": peak_mem,
    }


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(report: dict) -> None:
    p, env = report["settings"], report["environment"]
    print(f"\ndevice: {env['device']} | torch {env['torch']} | megatron-core {env['megatron_core']} | "
          f"transformers {env['transformers']}")
    print(f"shape: {p['layers']} layers, hidden {p['hidden']}, heads {p['heads']}/{p['kv_heads']}, ffn {p['ffn']}, "
          f"vocab {p['vocab']} | {p['sequences']} sequences x {p['seq']} scored tokens, micro-batch "
          f"{p['micro_batch']}, {p['dtype']}, {p['rounds']} timed rounds (alternating)")
    print(f"\n{'impl':6} {'best s':>8} {'median s':>9} {'seqs/s':>8} {'tokens/s':>10} {'median':>8} "
          f"{'TFLOP/s':>8} {'MFU':>6}")
    for name, r in report["impls"].items():
        print(f"{name:6} {r['seconds_best']:8.3f} {r['seconds_median']:9.3f} {r['sequences_per_s']:8.2f} "
              f"{r['tokens_per_s']:10.0f} {r['tokens_per_s_median']:8.0f} {r['tflops_per_gpu']:8.3f} "
              f"{fmt(r['mfu'], '6.1%')}")
    rounds = report["ratio_per_round"]
    print(f"bolt/hf scoring throughput: {report['ratio']:.3f} (fastest passes; paired rounds: median "
          f"{report['ratio_paired_median']:.3f}, range {min(rounds):.3f}-{max(rounds):.3f})")
    a = report["agreement"]
    print(f"agreement (same weights, {a['tokens']} log-probs, mean {a['logprob_mean']:.3f}, std "
          f"{a['logprob_std']:.3f}): max |diff| {a['max_abs_diff']:.2e}, mean |diff| {a['mean_abs_diff']:.2e} -> "
          f"{'agree' if a['agree'] else 'DISAGREE'} ({a['criterion']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    parser.add_argument("--micro-batch", type=int, help="Override the preset's micro-batch size (both impls).")
    parser.add_argument("--sequences", type=int, help="Override the preset's number of sequences.")
    parser.add_argument("--rounds", type=int, help="Override the preset's timed rounds per implementation.")
    parser.add_argument("--peak-tflops", type=float, help="Peak for MFU (default: bf16 dense of a known GPU).")
    args = parser.parse_args()
    overrides = {"micro_batch": args.micro_batch, "sequences": args.sequences, "rounds": args.rounds}
    p = replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    if p.dtype != "float32" and not on_gpu():
        raise SystemExit(f"--preset {args.preset} scores in {p.dtype} and needs a GPU")
    peak = args.peak_tflops or (flops.peak_tflops(torch.cuda.get_device_name())
                                if on_gpu() and p.dtype == "bfloat16" else None)
    report = {"preset": args.preset, "settings": asdict(p), "environment": environment(), **run(p, peak)}
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
