"""Up-front checks of a BoltConfig. Every message names the field(s) and says what would work."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from megatron_bolt.config.schema import ConfigError

if TYPE_CHECKING:
    from megatron_bolt.config.schema import BoltConfig


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _positive(errors: list[str], name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        errors.append(f"{name}={value} must be positive")


def _model(cfg: BoltConfig, errors: list[str]) -> None:
    m = cfg.model
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by"):
        _positive(errors, f"model.{name}", getattr(m, name))
    if errors:
        return
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        errors.append(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}: set model.kv_channels or pick heads from {_divisors(m.hidden_size)}"
        )
    if m.num_attention_heads % m.num_query_groups:
        errors.append(
            f"model.num_query_groups={m.num_query_groups} must divide model.num_attention_heads="
            f"{m.num_attention_heads}: choose one of {_divisors(m.num_attention_heads)}"
        )
    if m.head_dim % 2:
        errors.append(f"head dimension {m.head_dim} must be even for RoPE (model.kv_channels / hidden_size)")


def _parallel(cfg: BoltConfig, errors: list[str], world_size: int | None) -> None:
    m, p = cfg.model, cfg.parallel
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    _positive(errors, "parallel.tensor_model_parallel_size", tp)
    _positive(errors, "parallel.pipeline_model_parallel_size", pp)
    _positive(errors, "parallel.virtual_pipeline_model_parallel_size", vpp)
    if tp <= 0 or pp <= 0 or (vpp is not None and vpp <= 0):
        return
    for name, value in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", m.num_query_groups),
                        ("ffn_hidden_size", m.ffn_hidden_size)):
        if value > 0 and value % tp:
            errors.append(
                f"parallel.tensor_model_parallel_size={tp} must divide model.{name}={value}: "
                f"choose one of {_divisors(value)}"
            )
    if m.make_vocab_size_divisible_by > 0 and m.padded_vocab_size % tp:
        errors.append(
            f"parallel.tensor_model_parallel_size={tp} must divide the padded vocabulary {m.padded_vocab_size}: "
            f"set model.make_vocab_size_divisible_by to a multiple of {tp}"
        )
    stages = pp * (vpp or 1)
    if m.num_layers > 0 and m.num_layers % stages:
        what = "pipeline_model_parallel_size" + (" * virtual_pipeline_model_parallel_size" if vpp else "")
        errors.append(f"parallel.{what}={stages} must divide model.num_layers={m.num_layers}")
    if vpp is not None and pp < 2:
        errors.append("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2")
    if p.sequence_parallel and tp == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        errors.append("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")
    if world_size is not None:
        if world_size % (tp * pp):
            errors.append(
                f"world size {world_size} is not divisible by tensor_model_parallel_size * "
                f"pipeline_model_parallel_size = {tp * pp}: launch a multiple of {tp * pp} processes"
            )
        else:
            dp = world_size // (tp * pp)
            t = cfg.train
            if t.micro_batch_size > 0 and t.global_batch_size % (t.micro_batch_size * dp):
                errors.append(
                    f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size"
                    f" * data-parallel size = {t.micro_batch_size} * {dp}"
                )
            elif vpp and t.micro_batch_size > 0 and t.global_batch_size // (t.micro_batch_size * dp) < pp:
                errors.append(
                    f"interleaved pipelining needs at least pipeline_model_parallel_size={pp} micro-batches per "
                    f"step, but train.global_batch_size / (micro_batch_size * dp) = "
                    f"{t.global_batch_size // (t.micro_batch_size * dp)}: raise the global batch"
                )


def _latent_thoughts(cfg: BoltConfig, errors: list[str]) -> None:
    """PonderLM-2 (docs/ponder.md): each micro-batch makes K + J + 1 passes through the whole model, which
    pipeline schedules cannot express, and feeding a slot's output to the next slot needs the whole sequence
    on every rank (no sequence-parallel sharding)."""
    m, p = cfg.model, cfg.parallel
    k, train_iters = m.latent_thoughts_per_token, m.jacobi_iters_train
    if k < 0:
        errors.append(f"model.latent_thoughts_per_token={k} must be >= 0 (0: the standard model)")
    if len(train_iters) != 2 or not 0 <= train_iters[0] <= train_iters[1]:
        errors.append(f"model.jacobi_iters_train={train_iters} must be [low, high] with 0 <= low <= high")
    if m.jacobi_iters_eval < 0:
        errors.append(f"model.jacobi_iters_eval={m.jacobi_iters_eval} must be >= 0")
    if k <= 0:
        return
    if p.pipeline_model_parallel_size > 1 or p.virtual_pipeline_model_parallel_size is not None:
        errors.append(f"model.latent_thoughts_per_token={k} needs parallel.pipeline_model_parallel_size=1 (and no "
                      "virtual pipeline): use tensor/data parallelism plus train.recompute instead")
    if p.sequence_parallel:
        errors.append(f"model.latent_thoughts_per_token={k} does not support parallel.sequence_parallel=true")


def _data_and_train(cfg: BoltConfig, errors: list[str]) -> None:
    d, t, m = cfg.data, cfg.train, cfg.model
    if d.seq_length < 2:
        errors.append(f"data.seq_length={d.seq_length} must be at least 2 (inputs and shifted labels)")
    if d.seq_length > m.max_position_embeddings:
        errors.append(
            f"data.seq_length={d.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}:"
            " raise max_position_embeddings or shorten the sequence"
        )
    if d.max_unit_tokens is not None and d.max_unit_tokens > d.seq_length and not d.truncate_long_units:
        errors.append(
            f"data.seq_length={d.seq_length} cannot hold the longest latent+text unit (data.max_unit_tokens="
            f"{d.max_unit_tokens}): raise data.seq_length or set data.truncate_long_units=true"
        )
    for name in ("micro_batch_size", "global_batch_size", "train_iters"):
        _positive(errors, f"train.{name}", getattr(t, name))
    if t.lr_warmup_iters < 0 or (t.train_iters > 0 and t.lr_warmup_iters >= t.train_iters):
        errors.append(
            f"train.lr_warmup_iters={t.lr_warmup_iters} must lie in [0, train.train_iters={t.train_iters}): "
            "warm-up has to end before the decay does"
        )
    if t.min_lr > t.lr:
        errors.append(f"train.min_lr={t.min_lr} must not exceed train.lr={t.lr}")
    if t.precision == "fp8" and m.transformer_impl != "transformer_engine":
        errors.append("train.precision=fp8 needs model.transformer_impl=transformer_engine (install the 'te' extra)")
    if t.checkpoint.keep_last < 1:
        errors.append(f"train.checkpoint.keep_last={t.checkpoint.keep_last} must be at least 1")


def _estep(cfg: BoltConfig, errors: list[str]) -> None:
    e, s = cfg.estep, cfg.estep.sampling
    _positive(errors, "estep.sampling.num_samples", s.num_samples)
    _positive(errors, "estep.num_shards", e.num_shards)
    if s.max_new_tokens >= e.context_length:
        errors.append(
            f"estep.sampling.max_new_tokens={s.max_new_tokens} leaves no room for the prompt in "
            f"estep.context_length={e.context_length}"
        )
    if not 0 < s.top_p <= 1:
        errors.append(f"estep.sampling.top_p={s.top_p} must lie in (0, 1]")
    if s.temperature <= 0:
        errors.append(f"estep.sampling.temperature={s.temperature} must be positive (sampling, not greedy)")


def _build_and_synthesize(cfg: BoltConfig, errors: list[str]) -> None:
    b, y = cfg.build, cfg.synthesize
    for name in ("workers", "docs_per_task", "max_latent_tokens"):
        _positive(errors, f"build.{name}", getattr(b, name))
    for name in ("concurrency", "max_tokens", "timeout_s", "limit_documents"):
        _positive(errors, f"synthesize.{name}", getattr(y, name))
    for name in ("max_retries", "temperature", "backoff_s", "max_backoff_s", "input_usd_per_mtok",
                 "output_usd_per_mtok"):
        if getattr(y, name) < 0:
            errors.append(f"synthesize.{name}={getattr(y, name)} must not be negative")
    if not y.base_url.startswith(("http://", "https://")):
        errors.append(f"synthesize.base_url={y.base_url!r} must start with http:// or https://")
    if y.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", y.api_key_env):
        # Never echo the value: someone may have pasted the key itself here.
        errors.append("synthesize.api_key_env must be the NAME of an environment variable (letters, digits, "
                      "_), never the key itself")


def validate(cfg: BoltConfig, world_size: int | None = None) -> None:
    errors: list[str] = []
    _model(cfg, errors)
    _parallel(cfg, errors, world_size)
    _latent_thoughts(cfg, errors)
    _data_and_train(cfg, errors)
    _estep(cfg, errors)
    _build_and_synthesize(cfg, errors)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
