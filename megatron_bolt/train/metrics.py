"""Training metrics: console progress bar, log lines and TensorBoard, written by global rank 0 only.

Per step: loss, grad norm, learning rate, tokens/s, model TFLOP/s per GPU and MFU (against the device's
bf16 dense peak; not reported on CPUs or unknown devices). See ``train.flops`` for the FLOPs formula.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_bolt.config.schema import BoltConfig
from megatron_bolt.train.flops import model_flops_per_token, peak_tflops

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, cfg: BoltConfig, rank: int, world_size: int, start_step: int):
        self.enabled = rank == 0
        self.interval = cfg.train.log_interval
        self.world_size = world_size
        self.flops_per_token = model_flops_per_token(cfg)
        self.peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        self.writer = self.bar = None
        if not self.enabled:
            return
        tb_dir = cfg.train.tensorboard_dir or (
            str(Path(cfg.train.checkpoint.save) / "tensorboard") if cfg.train.checkpoint.save else None)
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tb_dir)
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.train.train_iters, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, leave=True)

    def step(self, metrics: dict) -> dict:
        """Add throughput figures to ``metrics`` (in place) and log them; returns ``metrics``."""
        tokens_per_s = metrics["tokens"] / max(metrics["seconds"], 1e-9)
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        metrics.update(tokens_per_s=tokens_per_s, tflops_per_gpu=tflops,
                       mfu=tflops / self.peak if self.peak else None)
        if not self.enabled:
            return metrics
        step = metrics["step"]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if self.writer:
            for key in ("loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_gpu", "mfu"):
                if metrics.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", float(metrics[key]), step)
        if step % self.interval == 0:
            mfu = f" mfu {metrics['mfu']:.1%}" if metrics["mfu"] is not None else ""
            log.info("step %d loss %.4f grad_norm %s lr %.2e tokens/s %.0f tflops/gpu %.2f%s%s", step,
                     metrics["loss"], _fmt(metrics["grad_norm"]), metrics["lr"], tokens_per_s, tflops, mfu,
                     " (skipped: non-finite loss)" if metrics.get("skipped") else "")
        return metrics

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.close()


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
