"""Wrap model chunks for data parallelism and build the Megatron optimizer and LR schedule.

Mirrors megatron/training/training.py: DDP per chunk (bucketing only on the first), the optimizer over all
chunks, and the schedule hooks (grad scaling, no_sync / grad_sync / param_sync, finalize_model_grads)
written into the TransformerConfig that the pipeline schedules read.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_bolt.config.schema import BoltConfig
from megatron_bolt.models.gpt import compute_dtype


def wrap_ddp(cfg: BoltConfig, chunks: list) -> list[DistributedDataParallel]:
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=compute_dtype(cfg) != torch.float32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(cfg: BoltConfig, model: list):
    t = cfg.train
    dtype = compute_dtype(cfg)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    _wire_schedule_hooks(cfg, model, optimizer)
    return optimizer


def _wire_schedule_hooks(cfg: BoltConfig, model: list, optimizer) -> None:
    config = model[0].module.config if hasattr(model[0], "module") else model[0].config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads

    def one_or_list(funcs):
        return funcs[0] if len(funcs) == 1 else funcs

    if cfg.parallel.overlap_grad_reduce:
        config.no_sync_func = one_or_list([m.no_sync for m in model])
    if cfg.parallel.overlap_param_gather:
        config.param_sync_func = one_or_list([m.start_param_sync for m in model])


def build_scheduler(cfg: BoltConfig, optimizer) -> OptimizerParamScheduler:
    """Warm-up then decay, counted in optimizer steps."""
    t = cfg.train
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.train_iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )
