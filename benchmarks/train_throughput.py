"""M-step training throughput: megatron-bolt vs bare megatron-core vs plain PyTorch/HF, in one run.

    .venv/bin/python benchmarks/train_throughput.py --preset cpu-tiny --out runs/throughput-cpu.json
    python3 benchmarks/train_throughput.py --preset tinyllama-h100 --out throughput.json [--profile]
    python3 benchmarks/train_throughput.py --preset tinyllama-h100 --bolt-impl transformer_engine [--fp8] --out te.json

Three training loops run one after another in this process, on the same model shape, the same random
token batch and the same optimiser settings (AdamW, clip 1.0):

- ``bolt``: our path (``build_model`` + ``wrap_ddp`` + ``build_optimizer`` + ``build_scheduler`` +
  ``train_step``), local layer spec with SDPA attention; ``--bolt-impl transformer_engine`` builds it on the
  TE spec instead and ``--fp8`` adds ``train.precision=fp8`` (both need Transformer Engine; the other
  loops stay bf16, and MFU is still against the bf16 dense peak);
- ``bare``: a minimal loop written directly against megatron-core (GPTModel on megatron's own
  ``get_gpt_layer_local_spec``, Float16Module, DDP, ``get_megatron_optimizer``,
  ``get_forward_backward_func``); ``bare-te`` adds the Transformer Engine spec where TE is importable.
  Only the process-group setup comes from megatron_bolt;
- ``hf``: transformers ``LlamaForCausalLM`` (SDPA attention) with ``torch.optim.AdamW`` (fused on GPU).

Dtype policy, the same for all three: fp32 master weights and optimizer state, bf16 compute on GPU
(megatron: bf16 params + fp32 main params + fp32 grad accumulation; HF: fp32 params under bf16 autocast),
fp32 throughout on CPU. Every loop sees the padded vocabulary, so all three do identical arithmetic.
A loop that runs out of memory is reported as such and the others still run.

Figures: median step time over the timed steps (after warm-up, ``torch.cuda.synchronize`` around each
step), tokens/s, model TFLOP/s per GPU and MFU against bf16 dense peak (see ``flops_per_token``). Results
print as a table and are written as JSON to ``--out``. ``--profile`` adds one profiled step per loop:
GPU busy time vs wall time and device time split into matmul / attention / other kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_bolt.train import flops

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """A Llama decoder: RMSNorm, SwiGLU, RoPE, GQA, untied embeddings."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    vocab_multiple: int = 128  # megatron_bolt's ModelConfig.make_vocab_size_divisible_by default

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab // self.vocab_multiple) * self.vocab_multiple


@dataclass(frozen=True)
class Settings:
    shape: Shape
    micro_batch: int
    global_batch: int
    bf16: bool
    recompute: str = "none"
    transformer_impl: str = "local"  # bolt loop only
    fp8: bool = False  # bolt loop only: train.precision=fp8 (TE spec)
    warmup: int = 3
    steps: int = 10


PRESETS = {
    "cpu-tiny": Settings(Shape(layers=2, hidden=256, heads=4, kv_heads=2, ffn=704, vocab=32000, seq=256),
                         micro_batch=2, global_batch=4, bf16=False, warmup=1, steps=3),
    # TinyLlama-1.1B; 32004 = Llama-2's 32000 plus four latent/special tokens, padded to 32128.
    "tinyllama-h100": Settings(Shape(layers=22, hidden=2048, heads=32, kv_heads=4, ffn=5632, vocab=32004,
                                     seq=2048), micro_batch=4, global_batch=32, bf16=True),
}


def flops_per_token(shape: Shape, causal_halved: bool = False) -> float:
    """Model FLOPs per trained token (megatron_bolt.train.flops documents the formula)."""
    return flops.flops_per_token(layers=shape.layers, hidden=shape.hidden, heads=shape.heads,
                                 kv_heads=shape.kv_heads, head_dim=shape.head_dim, ffn=shape.ffn, seq=shape.seq,
                                 vocab=shape.padded_vocab, causal_halved=causal_halved)


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def make_batch(s: Settings, seed: int = 0) -> Batch:
    """One global batch of random tokens (from the unpadded vocabulary); labels are the next tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, s.shape.vocab, (s.global_batch, s.shape.seq + 1), generator=gen)
    batch = {
        "tokens": rows[:, :-1].contiguous(),
        "labels": rows[:, 1:].contiguous(),
        "loss_mask": torch.ones(s.global_batch, s.shape.seq),
        "position_ids": torch.arange(s.shape.seq).expand(s.global_batch, -1).contiguous(),
    }
    return {k: v.to(device()) for k, v in batch.items()}


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    rows = batch["tokens"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, rows, size)]


# ---------------------------------------------------------------------------------------------- bolt


def bolt_config(s: Settings):
    from megatron_bolt.config.schema import BoltConfig, DataConfig, ModelConfig, TrainConfig

    m = s.shape
    model = ModelConfig(num_layers=m.layers, hidden_size=m.hidden, num_attention_heads=m.heads,
                        num_query_groups=m.kv_heads, ffn_hidden_size=m.ffn, vocab_size=m.vocab,
                        make_vocab_size_divisible_by=m.vocab_multiple, max_position_embeddings=m.seq,
                        transformer_impl=s.transformer_impl)
    precision = "fp8" if s.fp8 else "bf16" if s.bf16 else "fp32"
    train = TrainConfig(micro_batch_size=s.micro_batch, global_batch_size=s.global_batch,
                        train_iters=s.warmup + s.steps + 1, lr=1e-4, min_lr=1e-5, lr_warmup_iters=0,
                        precision=precision, recompute=s.recompute)
    return BoltConfig(model=model, train=train, data=DataConfig(seq_length=m.seq))


def build_bolt(s: Settings, batch: Batch) -> Callable[[], float]:
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.train.setup import build_optimizer, build_scheduler, wrap_ddp
    from megatron_bolt.train.step import train_step

    cfg = bolt_config(s)
    model = wrap_ddp(cfg, build_model(cfg))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    for chunk in model:
        chunk.train()
    return lambda: train_step(model, optimizer, scheduler, batch, s.micro_batch, s.shape.seq)["loss"]


# ------------------------------------------------------------------------------- bare megatron-core


def bare_transformer_config(s: Settings):
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, dtype = s.shape, torch.bfloat16 if s.bf16 else torch.float32
    recompute = {} if s.recompute == "none" else {"recompute_granularity": s.recompute}
    if s.recompute == "full":
        recompute.update(recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=m.layers, hidden_size=m.hidden, num_attention_heads=m.heads, num_query_groups=m.kv_heads,
        ffn_hidden_size=m.ffn, kv_channels=m.head_dim, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=s.bf16, params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=not on_gpu(),
        calculate_per_token_loss=True, **recompute,
    )


def bare_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    loss_sum = (output.float() * loss_mask).sum()
    tokens = loss_mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.detach().float()])}


def bare_forward_step(data_iterator, model):
    mb = next(data_iterator)
    output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
    return output, partial(bare_loss, mb["loss_mask"])


def build_bare(s: Settings, batch: Batch, use_te: bool = False) -> Callable[[], float]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    config = bare_transformer_config(s)
    spec = (specs.get_gpt_layer_with_transformer_engine_spec() if use_te
            else specs.get_gpt_layer_local_spec(normalization="RMSNorm"))
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=s.shape.padded_vocab,
                     max_sequence_length=s.shape.seq, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    if on_gpu():
        model.cuda(torch.cuda.current_device())
    if s.bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=s.bf16, check_for_nan_in_grad=False))
    dtype = torch.bfloat16 if s.bf16 else torch.float32
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        clip_grad=1.0, bf16=s.bf16, params_dtype=dtype), [ddp])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    micro = micro_batches(batch, s.micro_batch)
    ddp.train()

    def step() -> float:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=bare_forward_step, data_iterator=iter(micro), model=[ddp],
            num_microbatches=len(micro), seq_length=s.shape.seq, micro_batch_size=s.micro_batch)
        optimizer.step()
        loss_sum, tokens = torch.stack([r["lm loss"] for r in reports]).sum(0).tolist()
        return loss_sum / tokens

    return step


# --------------------------------------------------------------------------------------- HF / PyTorch


def build_hf(s: Settings, batch: Batch) -> Callable[[], float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = s.shape
    hf_config = LlamaConfig(
        vocab_size=m.padded_vocab, hidden_size=m.hidden, intermediate_size=m.ffn, num_hidden_layers=m.layers,
        num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
        max_position_embeddings=m.seq, rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
        attn_implementation="sdpa",
    )
    with device():
        model = LlamaForCausalLM(hf_config)  # fp32 master weights
    if s.recompute == "full":
        model.gradient_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                                  fused=on_gpu())
    micro = micro_batches(batch, s.micro_batch)
    total = float(batch["loss_mask"].sum())
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if s.bf16 else contextlib.nullcontext

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device())
        for mb in micro:
            with autocast():
                logits = model(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
            losses = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(), reduction="none")
            loss = (losses * mb["loss_mask"].flatten()).sum()
            (loss / total).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=on_gpu())
        optimizer.step()
        return loss_sum.item() / total

    return step


# ----------------------------------------------------------------------------------------- measuring


def free_memory() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_tflops(override: float | None) -> float | None:
    """The bf16 dense peak of this GPU, or None (CPU, fp32, or a GPU not in the table) for MFU n/a."""
    if override or not on_gpu():
        return override
    return flops.peak_tflops(torch.cuda.get_device_name())


def kernel_kind(name: str) -> str:
    lower = name.lower()
    if any(key in lower for key in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(key in lower for key in ("gemm", "xmma", "nvjet", "cutlass", "matmul", "sm90_")):
        return "matmul"
    return "other"


def profile_step(step: Callable[[], float]) -> dict:
    """One extra step under torch.profiler: GPU busy vs wall time, kernel time by kind, top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    kernels = []
    for evt in prof.key_averages():
        if evt.device_type == DeviceType.CUDA:
            kinds[kernel_kind(evt.key)] += evt.self_device_time_total / 1e3
            kernels.append((evt.self_device_time_total / 1e3, evt.count, evt.key[:100]))
    kernels.sort(reverse=True)
    return {"wall_ms": wall_ms, "gpu_busy_ms": sum(kinds.values()), "kernel_ms_by_kind": kinds,
            "top_kernels": [{"ms": ms, "calls": n, "name": key} for ms, n, key in kernels[:10]]}


def summarize(s: Settings, times: list[float], losses: list[float], peak: float | None) -> dict:
    timed = times[s.warmup:]
    step_s = statistics.median(timed)
    tokens_per_s = s.global_batch * s.shape.seq / step_s
    tflops = flops_per_token(s.shape) * tokens_per_s / 1e12
    tflops_causal = flops_per_token(s.shape, causal_halved=True) * tokens_per_s / 1e12
    return {
        "step_ms_median": step_s * 1e3, "step_ms_min": min(timed) * 1e3, "step_ms_max": max(timed) * 1e3,
        "step_ms_all": [t * 1e3 for t in times], "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None, "mfu_causal_halved": tflops_causal / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu() else None,
        "loss_first": losses[0], "loss_last": losses[-1],
    }


def measure(build: Callable[[Settings, Batch], Callable[[], float]], s: Settings, batch: Batch,
            peak: float | None, profile: bool) -> dict:
    """Build one loop, run warm-up + timed steps, summarise; out-of-memory is reported, not raised."""
    step = None
    free_memory()
    try:
        start = time.perf_counter()
        step = build(s, batch)
        setup_s = time.perf_counter() - start
        times, losses = [], []
        for _ in range(s.warmup + s.steps):
            synchronize()
            start = time.perf_counter()
            losses.append(step())
            synchronize()
            times.append(time.perf_counter() - start)
        result = summarize(s, times, losses, peak) | {"setup_s": setup_s}
        if not all(math.isfinite(x) for x in losses):
            result["error"] = f"non-finite loss: {losses}"
        if profile:
            result["profile"] = profile_step(step)
        return result
    except torch.OutOfMemoryError as exc:
        return {"error": "out of memory: " + str(exc).splitlines()[0][:200]}
    finally:
        del step
        free_memory()


# ----------------------------------------------------------------------------------------- reporting


def te_status() -> str:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        return f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return "importable"


def environment() -> dict:
    import transformers

    gpu = torch.cuda.get_device_name() if on_gpu() else None
    return {
        "device": gpu or f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "cuda": torch.version.cuda if gpu else None, "python": platform.python_version(),
        "megatron_core": importlib.metadata.version("megatron-core"), "transformers": transformers.__version__,
        "transformer_engine": te_status(), "date": time.strftime("%Y-%m-%d"),
    }


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(report: dict) -> None:
    s, env = report["settings"], report["environment"]
    cuda = f" (CUDA {env['cuda']})" if env["cuda"] else ""
    print(f"\ndevice: {env['device']} | torch {env['torch']}{cuda} | megatron-core "
          f"{env['megatron_core']} | transformers {env['transformers']} | TE {env['transformer_engine']}")
    print(f"shape: {s['shape']} | micro-batch {s['micro_batch']}, global batch {s['global_batch']}, "
          f"{'bf16' if s['bf16'] else 'fp32'}, recompute {s['recompute']}, bolt on {s['transformer_impl']}"
          f"{' in fp8' if s['fp8'] else ''}, {s['warmup']} warm-up + "
          f"{s['steps']} timed steps")
    fl = report["flops_per_token"]
    print(f"model FLOPs/token: {fl['full'] / 1e9:.3f} G (causal attention in full), "
          f"{fl['causal_halved'] / 1e9:.3f} G (halved); peak {fmt(report['peak_tflops'], '.0f')} TFLOP/s")
    print(f"\n{'loop':8} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFU½':>6} "
          f"{'mem GiB':>8} {'loss first->last':>17}")
    for name, r in report["loops"].items():
        if "step_ms_median" not in r:
            print(f"{name:8} {r['error']}")
            continue
        print(f"{name:8} {r['step_ms_median']:9.1f} {r['tokens_per_s']:10.0f} {r['tflops_per_gpu']:8.2f} "
              f"{fmt(r['mfu'], '6.1%')} {fmt(r['mfu_causal_halved'], '6.1%')} {fmt(r['peak_mem_gib'], '8.1f')} "
              f"{r['loss_first']:8.3f}->{r['loss_last']:.3f}{'  ' + r['error'] if 'error' in r else ''}")
    for name, ratio in report["ratios"].items():
        print(f"{name} throughput: {ratio:.3f} ({(ratio - 1) * 100:+.1f}% for bolt)")
    for name, r in report["loops"].items():
        if "profile" in r:
            print_profile(name, r["profile"])


def print_profile(name: str, p: dict) -> None:
    kinds = ", ".join(f"{k} {v:.0f}" for k, v in p["kernel_ms_by_kind"].items())
    print(f"\nprofile {name}: wall {p['wall_ms']:.0f} ms, GPU busy {p['gpu_busy_ms']:.0f} ms ({kinds} ms)")
    for k in p["top_kernels"]:
        print(f"  {k['ms']:8.1f} ms {k['calls']:6d}x  {k['name']}")


def ratios(loops: dict) -> dict:
    ok = {name: r["tokens_per_s"] for name, r in loops.items() if "tokens_per_s" in r}
    if "bolt" not in ok:
        return {}
    return {f"bolt/{name}": ok["bolt"] / rate for name, rate in ok.items() if name != "bolt"}


# ------------------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON file for the results.")
    p.add_argument("--loops", nargs="+", choices=["bolt", "bare", "hf"], default=["bolt", "bare", "hf"],
                   help="Loops to run, in this order (bare adds bare-te where TE is importable).")
    p.add_argument("--micro-batch", type=int, help="Override the preset's micro-batch size.")
    p.add_argument("--global-batch", type=int, help="Override the preset's global batch size.")
    p.add_argument("--recompute", choices=["none", "selective", "full"],
                   help="Activation recompute of the megatron loops; HF checkpoints layers for 'full' only.")
    p.add_argument("--bolt-impl", choices=["local", "transformer_engine"],
                   help="Layer implementation of the bolt loop (default local; transformer_engine needs TE).")
    p.add_argument("--fp8", action="store_true", help="bolt loop in FP8 (train.precision=fp8; needs TE, Hopper).")
    p.add_argument("--warmup", type=int, help="Untimed steps per loop.")
    p.add_argument("--steps", type=int, help="Timed steps per loop.")
    p.add_argument("--peak-tflops", type=float, help="Peak for MFU (default: bf16 dense of a known GPU).")
    p.add_argument("--profile", action="store_true", help="Profile one extra step of each loop (GPU).")
    return p.parse_args()


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {"micro_batch": args.micro_batch, "global_batch": args.global_batch,
                 "recompute": args.recompute, "warmup": args.warmup, "steps": args.steps,
                 "transformer_impl": "transformer_engine" if args.fp8 else args.bolt_impl, "fp8": args.fp8 or None}
    s = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    if s.bf16 and not on_gpu():
        raise SystemExit(f"--preset {args.preset} trains in bf16 and needs a GPU")
    if (s.fp8 or s.transformer_impl != "local") and te_status() != "importable":
        raise SystemExit(f"--bolt-impl transformer_engine / --fp8 need Transformer Engine, which is {te_status()}")
    if s.fp8 and not s.bf16:
        raise SystemExit("--fp8 needs a bf16 preset on a GPU")
    if args.profile and not on_gpu():
        raise SystemExit("--profile sorts GPU kernel time and needs a GPU")
    if s.global_batch % s.micro_batch:
        raise SystemExit(f"global batch {s.global_batch} is not a multiple of micro-batch {s.micro_batch}")
    return s


def run_loops(args: argparse.Namespace, s: Settings, peak: float | None) -> dict:
    builders = {"bolt": build_bolt, "bare": build_bare, "hf": build_hf}
    if "bare" in args.loops and te_status() == "importable":
        builders["bare-te"] = partial(build_bare, use_te=True)
        args.loops.insert(args.loops.index("bare") + 1, "bare-te")
    batch = make_batch(s)
    loops = {}
    with contextlib.ExitStack() as stack:
        if {"bolt", "bare"} & set(args.loops):
            from megatron_bolt.runtime.distributed import distributed

            stack.enter_context(distributed(bolt_config(s), seed=0))  # the process group, for both
        for name in args.loops:
            print(f"running {name} ...", flush=True)
            loops[name] = measure(builders[name], s, batch, peak, args.profile)
    return loops


def main() -> None:
    args = parse_args()
    s = settings_from(args)
    peak = peak_tflops(args.peak_tflops) if s.bf16 or args.peak_tflops else None
    loops = run_loops(args, s, peak)
    report = {
        "preset": args.preset, "settings": dataclasses.asdict(s), "environment": environment(),
        "flops_per_token": {"full": flops_per_token(s.shape),
                            "causal_halved": flops_per_token(s.shape, causal_halved=True)},
        "peak_tflops": peak, "loops": loops, "ratios": ratios(loops),
    }
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
