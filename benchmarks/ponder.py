"""Latent thoughts (PonderLM-2) at toy scale: the training cost multiplier and the paper's comparison, one run.

    .venv/bin/python benchmarks/ponder.py --preset cpu-tiny --out runs/ponder-cpu.json

Three arms train one after another in this process from ``examples/ponder_toy.yaml``, on the same token
stream for the same number of steps, through bolt's training path (``build_model``, ``wrap_ddp``,
``build_optimizer``, ``build_scheduler``, ``train_step``):

- ``standard``: the standard model (K = 0);
- ``ponder``: K = 1 latent thought per token, the same parameters, twice the standard model's inference
  compute per token (K + 1 slots); J ~ U{2, 3, 4} Jacobi passes per training micro-batch;
- ``standard-2x``: the standard model with twice the layers: about twice the parameters and the same
  inference compute per token as ``ponder`` (the paper's 1.4B-with-thoughts vs 2.8B comparison).

Data: arithmetic problems as characters, ``37*4+12=160;`` (a in 10..99, b in 2..9, c in 10..99, the result
zero-padded to 3 digits), packed into rows. One problem in ten (by a fixed hash) never appears in training;
the held-out rows are made of those. Reported: held-out loss per token over all tokens and over the result
digits (the part that needs computing); for ``ponder`` twice, with the eval Jacobi forward (J = 3, what
``bolt score`` computes) and with exact sequential decoding.

Costs are timed separately, ``standard`` and ``ponder`` built side by side and stepped alternately on the
same batch, so that load from other processes hits both alike. The training cost multiplier is the ratio of
the fastest step times (the least disturbed; medians are in the JSON) for the same tokens per step, with
``ponder``'s J fixed at the middle of its training range (a step's cost is linear in J, so this is the
expected cost), next to the FLOPs ratio of ``train.flops``; decoding cost is exact KV-cache decoding time
per token.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "ponder_toy.yaml"
ARMS = {
    "standard": ["model.latent_thoughts_per_token=0"],
    "ponder": [],
    "standard-2x": ["model.latent_thoughts_per_token=0", "model.num_layers=4"],
}
CHARS = "0123456789*+=;"
WARMUP_STEPS = 5


@dataclass(frozen=True)
class Preset:
    threads: int
    heldout_rows: int
    timed_steps: int
    decode_tokens: int


PRESETS = {"cpu-tiny": Preset(threads=2, heldout_rows=128, timed_steps=20, decode_tokens=32)}


def held_out(a: int, b: int, c: int) -> bool:
    return (a * 7919 + b * 104729 + c * 1299709) % 10 == 0


class ArithmeticRows:
    """Rows of ``seq_length`` tokens (+1 for labels) packing random problems; row i depends on (seed, i)."""

    def __init__(self, seq_length: int, seed: int, heldout: bool):
        self.seq_length, self.seed, self.heldout = seq_length, seed, heldout

    def _problem(self, gen: torch.Generator) -> str:
        while True:
            a, b, c = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((10, 100), (2, 10), (10, 100)))
            if held_out(a, b, c) == self.heldout:
                return f"{a}*{b}+{c}={a * b + c:03d};"

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        text = ""
        while len(text) < self.seq_length + 1:
            text += self._problem(gen)
        stream = torch.tensor([CHARS.index(ch) for ch in text[: self.seq_length + 1]])
        # result digits: the three labels after each '='
        result = torch.zeros(self.seq_length + 1)
        for at in (i for i, ch in enumerate(text[: self.seq_length + 1]) if ch == "="):
            result[at + 1: at + 4] = 1.0
        return {"tokens": stream[:-1], "labels": stream[1:], "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length), "result_mask": result[1:]}

    def batch(self, first_row: int, rows: int) -> dict[str, torch.Tensor]:
        items = [self[first_row + i] for i in range(rows)]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def heldout_losses(model, batch: dict[str, torch.Tensor], exact: bool) -> dict[str, float]:
    """Mean per-token loss over all labels and over result digits, eval forward or exact decoding."""
    from megatron_bolt.models.ponder_cache import PonderDecoder

    with torch.no_grad():
        if exact:
            ids = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)
            losses = -PonderDecoder(model).score(ids)
        else:
            losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["result_mask"]
    return {"all": losses.mean().item(), "result": ((losses * mask).sum() / mask.sum()).item()}


def decode_ms_per_token(model, rows: int, tokens: int) -> float:
    """Exact KV-cache decoding (K + 1 single-slot steps per token) of ``tokens`` tokens for ``rows`` rows."""
    from megatron_bolt.models.ponder_cache import PonderDecoder, SlotCache

    decoder, cache = PonderDecoder(model), SlotCache(model)
    ids = torch.zeros(rows, dtype=torch.long)
    with torch.no_grad():
        start = time.perf_counter()
        for position in range(tokens):
            decoder.step(cache, ids, position)
        return (time.perf_counter() - start) * 1e3 / tokens


class Trainer:
    """One arm's model, optimizer and schedule through bolt's training path."""

    def __init__(self, cfg):
        from megatron_bolt.models.gpt import build_model
        from megatron_bolt.train.setup import build_optimizer, build_scheduler, wrap_ddp

        self.cfg = cfg
        self.model = wrap_ddp(cfg, build_model(cfg))
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.model[0].train()

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(loss, seconds) of one optimizer step."""
        from megatron_bolt.train.step import train_step

        batch = {k: v for k, v in batch.items() if k != "result_mask"}
        start = time.perf_counter()
        loss = train_step(self.model, self.optimizer, self.scheduler, batch, self.cfg.train.micro_batch_size,
                          self.cfg.data.seq_length)["loss"]
        return loss, time.perf_counter() - start


def run_arm(name: str, overrides: list[str], preset: Preset, steps: int | None) -> dict:
    from megatron_bolt.config.loader import load_config
    from megatron_bolt.data.dataset import rank_batches
    from megatron_bolt.runtime.distributed import distributed

    cfg = load_config(RECIPE, overrides + ([f"train.train_iters={steps}"] if steps else []))
    t, seq = cfg.train, cfg.data.seq_length
    batches = rank_batches(ArithmeticRows(seq, cfg.data.seed, heldout=False), t.global_batch_size, 0, 1)
    heldout = ArithmeticRows(seq, cfg.data.seed + 1, heldout=True).batch(0, preset.heldout_rows)
    start = time.perf_counter()
    with distributed(cfg, seed=t.seed):
        trainer = Trainer(cfg)
        history = [trainer.step(next(batches))[0] for _ in range(t.train_iters)]
        model = trainer.model[0].module.eval()
        result = {"steps": t.train_iters, "layers": cfg.model.num_layers,
                  "thoughts": cfg.model.latent_thoughts_per_token,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "train_loss_first": history[0], "train_loss_last": statistics.mean(history[-10:]),
                  "heldout": heldout_losses(model, heldout, exact=False)}
        if result["thoughts"]:
            result["heldout_exact"] = heldout_losses(model, heldout, exact=True)
    result["wall_s"] = time.perf_counter() - start
    print(f"{name}: {t.train_iters} steps in {result['wall_s']:.0f} s, held-out loss {result['heldout']['all']:.4f}",
          flush=True)
    return result


def measure_costs(preset: Preset) -> dict:
    """``standard`` and ``ponder`` side by side: alternating train steps on one batch, then decoding."""
    from megatron_bolt.config.loader import load_config
    from megatron_bolt.runtime.distributed import distributed
    from megatron_bolt.train.flops import model_flops_per_token

    cfgs = {name: load_config(RECIPE, ARMS[name]) for name in ("standard", "ponder")}
    low, high = cfgs["ponder"].model.jacobi_iters_train
    cfgs["ponder"].model.jacobi_iters_train = [(low + high) // 2] * 2
    base = cfgs["standard"]
    batch = ArithmeticRows(base.data.seq_length, base.data.seed, heldout=False).batch(0, base.train.global_batch_size)
    seconds: dict[str, list[float]] = {name: [] for name in cfgs}
    with distributed(base, seed=base.train.seed):
        trainers = {name: Trainer(cfg) for name, cfg in cfgs.items()}
        for i in range(WARMUP_STEPS + preset.timed_steps):
            for name, trainer in trainers.items():
                elapsed = trainer.step(batch)[1]
                if i >= WARMUP_STEPS:
                    seconds[name].append(elapsed)
        decode = {name: [] for name in cfgs}
        for _ in range(3):
            for name, trainer in trainers.items():
                decode[name].append(decode_ms_per_token(trainer.model[0].module.eval(), preset.heldout_rows,
                                                        preset.decode_tokens))
    step_ms = {name: min(s) * 1e3 for name, s in seconds.items()}
    flops = {name: model_flops_per_token(cfg) for name, cfg in cfgs.items()}
    return {"train_step_ms": step_ms, "train_multiplier": step_ms["ponder"] / step_ms["standard"],
            "train_step_ms_median": {name: statistics.median(s) * 1e3 for name, s in seconds.items()},
            "jacobi_iters": cfgs["ponder"].model.jacobi_iters_train[0],
            "flops_multiplier": flops["ponder"] / flops["standard"],
            "decode_ms_per_token": {name: min(d) for name, d in decode.items()},
            "tokens_per_step": base.train.global_batch_size * base.data.seq_length}


def print_report(report: dict) -> None:
    costs, arms = report["costs"], report["arms"]
    print(f"\n{report['environment']} | recipe {report['recipe']} | {report['steps']} steps per arm")
    ms, dec = costs["train_step_ms"], costs["decode_ms_per_token"]
    print(f"\ntraining step ({costs['tokens_per_step']} tokens, fastest of {PRESETS[report['preset']].timed_steps}): "
          f"standard {ms['standard']:.1f} ms, ponder (K = 1, J = {costs['jacobi_iters']}) {ms['ponder']:.1f} ms")
    print(f"training cost multiplier (time per token, K = 1 vs K = 0): {costs['train_multiplier']:.2f}x "
          f"(model FLOPs: {costs['flops_multiplier']:.2f}x)")
    print(f"exact decoding, ms per token ({PRESETS[report['preset']].heldout_rows} rows): standard "
          f"{dec['standard']:.2f}, ponder {dec['ponder']:.2f} ({dec['ponder'] / dec['standard']:.2f}x)")
    print(f"\n{'arm':22} {'params':>7} {'K':>2} {'train loss':>10} {'held-out loss':>13} {'result digits':>13}")
    for name, r in arms.items():
        rows = [(name, r["heldout"])]
        if "heldout_exact" in r:
            rows = [(f"{name} (Jacobi J=3)", r["heldout"]), (f"{name} (exact)", r["heldout_exact"])]
        for label, held in rows:
            print(f"{label:22} {r['parameters']:7d} {r['thoughts']:2d} {r['train_loss_last']:10.4f} "
                  f"{held['all']:13.4f} {held['result']:13.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--steps", type=int, help="Training steps per arm (default: the recipe's train_iters).")
    p.add_argument("--out", type=Path, help="Also write the results as JSON here.")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    torch.set_num_threads(preset.threads)
    costs = measure_costs(preset)
    arms = {name: run_arm(name, overrides, preset, args.steps) for name, overrides in ARMS.items()}
    report = {
        "preset": args.preset, "recipe": str(RECIPE.relative_to(ROOT)), "steps": arms["standard"]["steps"],
        "environment": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                       f"{time.strftime('%Y-%m-%d')}",
        "costs": costs, "arms": arms,
    }
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
