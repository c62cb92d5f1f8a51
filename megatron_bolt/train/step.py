"""One optimizer step through megatron-core's pipeline schedules, with per-token loss averaging.

A batch is this data-parallel rank's share of a global batch (``data.dataset.rank_batches``): a dict of
[rows, seq] tensors ``tokens``, ``labels``, ``loss_mask`` (float), ``position_ids``. Every pipeline stage
receives the same micro-batches (first stage reads tokens, last stage labels and mask), which keeps data
loading identical on every rank of a model-parallel group.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_bolt.runtime.distributed import device

Batch = dict[str, torch.Tensor]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked per-token losses and the token count; megatron divides by the global count."""
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[Batch], model):
    batch = {k: v.to(device(), non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def collecting_forward_step(sink: list, data_iterator: Iterator[Batch], model):
    """``forward_step`` that also appends each micro-batch's per-token losses (-log p) to ``sink`` (on the
    last pipeline stage): teacher-forced scoring through the same schedule as training."""
    output, loss = forward_step(data_iterator, model)

    def collect(output_tensor):
        sink.append(output_tensor.detach().float().cpu())
        return loss(output_tensor)

    return output, collect


def split_microbatches(batch: Batch, micro_batch_size: int) -> list[Batch]:
    rows = batch["tokens"].shape[0]
    if rows % micro_batch_size:
        raise ValueError(f"{rows} rows do not split into micro-batches of {micro_batch_size}")
    return [{k: v[i : i + micro_batch_size] for k, v in batch.items()} for i in range(0, rows, micro_batch_size)]


def _iterators(micro: list[Batch], num_chunks: int):
    its = [iter(micro) for _ in range(num_chunks)]
    return its if num_chunks > 1 else its[0]


def reduce_losses(losses_reduced: list[dict]) -> tuple[float, int]:
    """(mean loss, tokens) over micro-batches and data-parallel ranks, known on every rank."""
    total = torch.zeros(2, dtype=torch.float64, device=device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses_reduced:
            total += item["lm loss"].to(total)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # Everyone else learns the value from the last pipeline stage.
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(total, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, tokens = total.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)


def run_microbatches(model: list, batch: Batch, micro_batch_size: int, seq_length: int,
                     forward_only: bool = False, step_fn=forward_step) -> tuple[float, int]:
    """Forward (and backward) of this data-parallel rank's rows of a global batch through the schedule."""
    micro = split_microbatches(batch, micro_batch_size)
    losses = get_forward_backward_func()(
        forward_step_func=step_fn,
        data_iterator=_iterators(micro, len(model)),
        model=model,
        num_microbatches=len(micro),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return reduce_losses(losses)


def train_step(model: list, optimizer, scheduler, batch: Batch, micro_batch_size: int, seq_length: int,
               on_nonfinite: str = "stop") -> dict:
    """Zero grads, forward/backward all micro-batches, finalize grads (inside the schedule), step.

    The loss is reduced before the update and is the same on every rank, so all ranks decide alike: a
    non-finite loss stops the run (``stop``) or skips the update and its batch (``skip``; the step still
    counts, as in Megatron-LM). A non-finite gradient norm with a finite loss stops in both modes: the
    optimizer has applied the update by the time it reports the norm.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss, tokens = run_microbatches(model, batch, micro_batch_size, seq_length)
    lr = optimizer.param_groups[0]["lr"]
    if not math.isfinite(loss):
        if on_nonfinite == "stop":
            raise FloatingPointError(f"non-finite loss {loss}; stopping before the update "
                                     "(train.on_nonfinite=skip skips such steps instead)")
        return {"loss": loss, "tokens": tokens, "grad_norm": None, "update_successful": False, "lr": lr,
                "skipped": True}
    ok, grad_norm, _ = optimizer.step()
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm {grad_norm} with finite loss {loss}; stopping")
    if ok:
        scheduler.step(increment=1)
    return {"loss": loss, "tokens": tokens, "grad_norm": grad_norm, "update_successful": ok, "lr": lr,
            "skipped": False}
