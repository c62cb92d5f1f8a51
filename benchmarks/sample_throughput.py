"""E-step sampling throughput: generated tokens/s per generation backend available here, in one run.

    .venv/bin/python benchmarks/sample_throughput.py --preset cpu-tiny
    python3 benchmarks/sample_throughput.py --preset tinyllama-h100 --out sample.json

A random-weight Llama of the preset's shape is written as a Hugging Face directory (random weights decode
as fast as trained ones; stop tokens are disabled so every sequence runs to ``max_tokens``). Every backend
that imports here (hf always; trtllm and vllm where installed) samples the same prompts with K samples per
prompt at T = 1, top-p 1, no top-k, through our generation interface (``megatron_bolt.sample``). Printed:
prompts/s, generated tokens/s and the ratio to the HF backend measured in the same run; ``--out`` writes
JSON. The first call per backend is a warm-up (engine build, CUDA graphs, allocator) and is not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Preset:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    prompts: int
    prompt_len: int
    samples: int
    max_tokens: int
    dtype: str


PRESETS = {
    "cpu-tiny": Preset(layers=4, hidden=256, heads=4, kv_heads=2, ffn=704, vocab=512, prompts=8, prompt_len=64,
                       samples=4, max_tokens=64, dtype="float32"),
    # TinyLlama-1.1B shape, the paper's E-step: K = 4, prompts of ~3 chunks + suffix.
    "tinyllama-h100": Preset(layers=22, hidden=2048, heads=32, kv_heads=4, ffn=5632, vocab=32004, prompts=64,
                             prompt_len=512, samples=4, max_tokens=256, dtype="bfloat16"),
}


def write_model(p: Preset, out: str) -> None:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.ffn,
                                   num_hidden_layers=p.layers, num_attention_heads=p.heads,
                                   num_key_value_heads=p.kv_heads, max_position_embeddings=4096,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, p.dtype))
    model.save_pretrained(out)


def measure(name: str, model_dir: str, p: Preset, batch: int) -> dict:
    from megatron_bolt.sample.interfaces import BackendOptions, Request, SamplingParams, load_backend

    backend = load_backend(name, model_dir, BackendOptions(dtype=p.dtype, max_batch_size=batch))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, p.vocab, (p.prompt_len,), generator=gen).tolist() for _ in range(p.prompts)]
    params = SamplingParams(n=p.samples, max_tokens=p.max_tokens)
    try:
        backend.generate([Request(prompts[0])], SamplingParams(n=1, max_tokens=8))  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = backend.generate([Request(q, seed=i) for i, q in enumerate(prompts)], params)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        backend.close()
    tokens = sum(len(g.token_ids) for gens in out for g in gens)
    return {"backend": name, "seconds": round(seconds, 3), "generated_tokens": tokens,
            "prompts_per_s": p.prompts / seconds, "generated_tokens_per_s": tokens / seconds}


def main() -> None:
    from megatron_bolt.sample.interfaces import BACKENDS, backend_available

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-tiny")
    parser.add_argument("--batch", type=int, default=256, help="Sequences per HF generation call / engine batch.")
    parser.add_argument("--out", help="Write the results as JSON here.")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    results, skipped, failed = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        write_model(p, tmp)
        for name in (n for n in BACKENDS if n in ("hf", "trtllm", "vllm")):
            ok, why = backend_available(name)
            if not ok:
                print(f"{name:7s} skipped: {why}")
                skipped[name] = why
                continue
            try:
                results.append(measure(name, tmp, p, args.batch))
            except Exception as exc:  # report and go on: one broken engine must not hide the others
                print(f"{name:7s} failed: {type(exc).__name__}: {exc}")
                failed[name] = f"{type(exc).__name__}: {exc}"
    base = next((r for r in results if r["backend"] == "hf"), None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"\npreset {args.preset} on {device}: {p.prompts} prompts x K={p.samples}, prompt {p.prompt_len} "
          f"tokens, {p.max_tokens} new tokens, {p.dtype}")
    print(f"{'backend':8s} {'seconds':>8s} {'prompts/s':>10s} {'gen tok/s':>10s} {'vs hf':>6s}")
    for r in results:
        ratio = r["generated_tokens_per_s"] / base["generated_tokens_per_s"] if base else float("nan")
        r["ratio_vs_hf"] = ratio
        print(f"{r['backend']:8s} {r['seconds']:8.2f} {r['prompts_per_s']:10.2f} {r['generated_tokens_per_s']:10.0f} "
              f"{ratio:6.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "shape": asdict(p), "device": device, "batch": args.batch,
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": results,
                       "skipped": skipped, "failed": failed}, f, indent=1)


if __name__ == "__main__":
    main()
