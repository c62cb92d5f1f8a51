"""``bolt estep`` / ``bolt sample``: the E-step as three resumable stages over independent shards.

    bolt estep --ckpt runs/em/iter0/checkpoints --hf-dir runs/em/iter0/hf estep.documents=[runs/prep] \\
        estep.output_dir=runs/em/iter1/estep estep.num_shards=64            # every stage, every shard
    bolt estep --stage sample --shard 7 ...   # one array task (TensorRT-LLM or HF, one GPU or node)
    torchrun --nproc-per-node 8 -m megatron_bolt.cli estep --stage score --shard 7 ...   # Megatron, DP x TP
    bolt estep --stage merge ...              # checks every chunk is present exactly once, resamples

Output directory layout (``estep.output_dir``):

    params.json                  what the run was started with; a rerun with other settings is refused
    samples/shard-N.jsonl        per chunk: prompt size and K samples {token_ids, log_q, finish_reason}
    samples/shard-N.meta.json    sampling time and token counts (throughput)
    scores/shard-N.jsonl         per chunk: log p(Z, X_suffix | X_prefix) per sample (and Megatron log q)
    latents.jsonl                one resampled latent per chunk {doc_id, chunk_index, latent_token_ids}:
                                 the input of ``bolt build-dataset`` (ids used verbatim)
    diagnostics.jsonl            per chunk: log p, log q, log w, ESS, ELBO n = 1, 2, 4, lengths, choice
    estep.json                   totals and means, written last: its presence means the E-step is done

Resumption: a shard's samples are appended batch by batch (``sampling.batch_size`` chunks) to
``shard-N.jsonl.partial`` and flushed to disk; a rerun keeps the complete batches and redoes the rest, so
the batches, and with per-chunk seeds the samples, are exactly those of an uninterrupted run. Finished
shards are renamed into place and skipped. Scores are written per shard atomically; the merge only reads.

Validity: sampling stops at EOL or at any other control token (BOS, EOS, SOL, PRIOR, POSTERIOR). Only a
generation that ends with EOL is a latent; the others (cut at max_new_tokens, or stopped by a control
token) get log w = -inf and can never be chosen. A chunk with no valid sample gets no latent and stays raw
in the next dataset; it is counted, not dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_bolt.config.loader import config_hash
from megatron_bolt.config.schema import BoltConfig
from megatron_bolt.estep import weights
from megatron_bolt.estep.work import (
    EStepError,
    Item,
    all_keys,
    joint_sequence,
    posterior_prompt,
    shard_items,
    shard_name,
    stage_dir,
)
from megatron_bolt.utils.atomic import atomic_open, naming_write_errors, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "bolt-estep-v1"
STAGES = ("all", "sample", "score", "merge")


def chunk_seed(seed: int, doc_id: int, chunk_index: int) -> int:
    """The sampling seed of one chunk (63 bits: engines take a signed 64-bit seed)."""
    return weights.chunk_key("sample", seed, doc_id, chunk_index) >> 1


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=True) + "\n"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------ set-up


def _params(cfg: BoltConfig, ckpt_step: Path) -> dict[str, Any]:
    """What determines the E-step's output; the shard count and engine tuning knobs are part of it because
    they change batching (and so the floating-point path), while the micro-batch of scoring is not."""
    estep = asdict(cfg.estep)
    estep.pop("output_dir")
    return {"format": FORMAT, "checkpoint": str(ckpt_step.resolve()), "estep": estep}


def _claim(out: Path, params: dict[str, Any]) -> None:
    path = out / "params.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != params:
            diff = sorted(k for k in set(old["estep"]) | set(params["estep"])
                          if old["estep"].get(k) != params["estep"].get(k))
            if old.get("checkpoint") != params["checkpoint"]:
                diff.insert(0, "checkpoint")
            raise EStepError(f"{out} holds an E-step started with other settings (differing: {', '.join(diff)}); "
                             "use a new estep.output_dir or delete the old one")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(params, indent=1) + "\n")


def _sampling_params(cfg: BoltConfig, ids):
    from megatron_bolt.sample.interfaces import SamplingParams

    s = cfg.estep.sampling
    params = SamplingParams(n=s.num_samples, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            top_k=s.top_k,
                            stop_token_ids=tuple(sorted({ids.eol, ids.eos, ids.bos, ids.sol, ids.prior,
                                                         ids.posterior})))
    if not params.exact_proposal:
        raise EStepError("importance weights need the exact proposal: set estep.sampling.temperature=1, top_p=1, "
                         f"top_k=0 (got {s.temperature}, {s.top_p}, {s.top_k})")
    return params


def _backend_options(cfg: BoltConfig):
    from megatron_bolt.sample.interfaces import BackendOptions

    s = cfg.estep.sampling
    return BackendOptions(dtype=s.dtype, device=s.device, tensor_parallel_size=s.tensor_parallel_size,
                          kv_cache_free_gpu_memory_fraction=s.kv_cache_free_gpu_memory_fraction,
                          max_batch_size=s.max_batch_size, trtllm_runtime=s.trtllm_runtime, engine_dir=s.engine_dir)


def _tokenizer(ckpt: str):
    """(checkpoint step directory, its tokenizer)."""
    from megatron_bolt.convert.hf_io import find_tokenizer, load_checkpoint_config
    from megatron_bolt.data.tokenizer import BoltTokenizer

    step, root, saved = load_checkpoint_config(ckpt)
    tok_dir = find_tokenizer(root, saved)
    if tok_dir is None:
        raise EStepError(f"{root} has no tokenizer/ and data.tokenizer is unset: the E-step needs the tokenizer")
    return step, BoltTokenizer.from_pretrained(tok_dir)


def _hf_dir(ckpt: str, hf_dir: str | None, out: Path) -> str:
    """The HF export engines load: ``--hf-dir`` when given, else exported once into OUT/hf."""
    from megatron_bolt.convert.hf_io import ConversionError, export_hf
    from megatron_bolt.runtime.world import world_from_env

    if hf_dir:
        if not (Path(hf_dir) / "config.json").is_file():
            raise EStepError(f"--hf-dir {hf_dir} has no config.json: export the checkpoint with bolt export-hf")
        return hf_dir
    target = out / "hf"
    if not (target / "config.json").is_file():
        if world_from_env().world_size > 1:
            raise EStepError("several ranks cannot export the checkpoint at once: run bolt export-hf first and "
                             "pass --hf-dir")
        try:
            export_hf(ckpt, target)
        except ConversionError:
            if not (target / "config.json").is_file():  # another shard's export may have won the race
                raise
    return str(target)


# ------------------------------------------------------------------------------------------------ sample


def _resume_partial(path: Path, batch: int) -> int:
    """Keep the complete batches of a partial shard file (truncating the rest); returns items kept."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    ends = []
    start = 0
    while (nl := data.find(b"\n", start)) != -1:
        try:
            json.loads(data[start:nl])
        except json.JSONDecodeError:
            break
        ends.append(nl + 1)
        start = nl + 1
    keep = len(ends) // batch * batch
    with open(path, "r+b") as f:
        f.truncate(ends[keep - 1] if keep else 0)
    return keep


def _sample_record(item: Item, prompt: tuple[list[int], int] | None, gens, eol: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"doc_id": item.doc_id, "chunk_index": item.chunk_index}
    if prompt is None:
        return {**rec, "too_long": True, "samples": []}
    rec.update(prompt_tokens=len(prompt[0]), prefix_tokens=prompt[1])
    rec["samples"] = [{"token_ids": g.token_ids, "log_q": g.logprob_sum, "finish_reason": g.finish_reason,
                       "valid": g.finish_reason == "stop" and bool(g.token_ids) and g.token_ids[-1] == eol}
                      for g in gens]
    return rec


def sample_shard(cfg: BoltConfig, backend, tokenizer, shard: int, out: Path) -> dict[str, Any] | None:
    """Sample one shard (resuming a partial one); None when it was already complete."""
    from tqdm import tqdm

    from megatron_bolt.sample.interfaces import Request

    final = stage_dir(out, "samples") / f"{shard_name(shard)}.jsonl"
    if final.is_file():
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    e, s, ids = cfg.estep, cfg.estep.sampling, tokenizer.ids
    params = _sampling_params(cfg, ids)
    items = list(shard_items(e.documents, tokenizer, shard, e.num_shards, e.prefix_chunks, e.chunk_pattern))
    done = _resume_partial(partial, s.batch_size)
    if done:
        log.info("estep: %s resumes after %d of %d chunks", shard_name(shard), done, len(items))
    budget = e.context_length - s.max_new_tokens
    generated = prompts = 0
    start = time.perf_counter()
    bar = tqdm(total=len(items), initial=done, desc=f"sample {shard_name(shard)}", unit="chunk",
               disable=not sys.stderr.isatty())
    with naming_write_errors(partial), open(partial, "a", encoding="utf-8") as f:
        for first in range(done, len(items), s.batch_size):
            batch = items[first:first + s.batch_size]
            built = [posterior_prompt(item, ids, budget) for item in batch]
            todo = [(i, p) for i, p in enumerate(built) if p is not None]
            results = backend.generate(
                [Request(p[0], seed=chunk_seed(s.seed, batch[i].doc_id, batch[i].chunk_index)) for i, p in todo],
                params) if todo else []
            gens: list[Any] = [[] for _ in batch]
            for (i, _), r in zip(todo, results, strict=True):
                gens[i] = r
            f.write("".join(_dump(_sample_record(item, p, g, ids.eol)) for item, p, g in zip(batch, built, gens,
                                                                                              strict=True)))
            f.flush()
            os.fsync(f.fileno())
            prompts += len(todo)
            generated += sum(len(g.token_ids) for r in results for g in r)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - start, 1e-9):.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    meta = {"chunks": len(items), "resumed_chunks": done, "prompts": prompts, "generated_tokens": generated,
            "seconds": round(seconds, 3), "backend": backend.name}
    write_text_atomic(final.with_name(f"{shard_name(shard)}.meta.json"), json.dumps(meta, indent=1) + "\n")
    os.replace(partial, final)
    log.info("estep: sampled %s: %d prompts, %d tokens in %.1f s (%.1f prompts/s, %.0f generated tokens/s)",
             shard_name(shard), prompts, generated, seconds, prompts / max(seconds, 1e-9),
             generated / max(seconds, 1e-9))
    return meta


def run_sample(cfg: BoltConfig, ckpt: str, hf_dir: str | None, shards: list[int], tokenizer) -> None:
    from megatron_bolt.sample.interfaces import BackendUnavailable, load_backend

    out = Path(cfg.estep.output_dir)
    pending = [s for s in shards if not (stage_dir(out, "samples") / f"{shard_name(s)}.jsonl").is_file()]
    if not pending:
        return
    model_dir = _hf_dir(ckpt, hf_dir, out)
    try:
        backend = load_backend(cfg.estep.sampling.backend, model_dir, _backend_options(cfg))
    except BackendUnavailable as exc:
        raise EStepError(str(exc)) from None
    try:
        for shard in pending:
            sample_shard(cfg, backend, tokenizer, shard, out)
    finally:
        backend.close()


# ------------------------------------------------------------------------------------------------- score


def _shard_items_checked(cfg: BoltConfig, tokenizer, shard: int, records: list[dict[str, Any]]) -> list[Item]:
    e = cfg.estep
    items = list(shard_items(e.documents, tokenizer, shard, e.num_shards, e.prefix_chunks, e.chunk_pattern))
    if [i.key for i in items] != [(r["doc_id"], r["chunk_index"]) for r in records]:
        raise EStepError(f"{shard_name(shard)}: the samples do not match estep.documents any more (documents "
                         "changed since sampling?): delete the shard's samples and rerun")
    return items


def score_shard(cfg: BoltConfig, run: BoltConfig, model, tokenizer, shard: int, out: Path, rank: int) -> None:
    """Joint log p of every valid sample of one shard (and Megatron log q when asked); collective."""
    import torch

    from megatron_bolt.score.scorer import score_distributed

    samples_path = stage_dir(out, "samples") / f"{shard_name(shard)}.jsonl"
    if not samples_path.is_file():
        raise EStepError(f"{samples_path} is missing: run `bolt estep --stage sample --shard {shard}` first")
    records = _read_jsonl(samples_path)
    items = _shard_items_checked(cfg, tokenizer, shard, records)
    ids = tokenizer.ids
    e = cfg.estep
    budget = min(e.context_length, run.model.max_position_embeddings)
    seqs: list[list[int]] = []
    spans: list[tuple[int, int, int, str]] = []  # (record, sample, first scored token, what)
    for r, (item, rec) in enumerate(zip(items, records, strict=True)):
        for k, sample in enumerate(rec["samples"]):
            if not sample["valid"]:
                continue
            seq, first = joint_sequence(item, sample["token_ids"][:-1], ids, budget)
            seqs.append(seq)
            spans.append((r, k, first, "log_p"))
            if e.rescore_q:
                prompt, _ = posterior_prompt(item, ids, e.context_length - e.sampling.max_new_tokens)
                seqs.append(prompt + sample["token_ids"])
                spans.append((r, k, len(prompt), "log_q_megatron"))
    start = time.perf_counter()
    scores = score_distributed(run, model, seqs)
    if rank == 0:
        rows = [{"doc_id": rec["doc_id"], "chunk_index": rec["chunk_index"],
                 "log_p": [None] * len(rec["samples"]),
                 **({"log_q_megatron": [None] * len(rec["samples"])} if e.rescore_q else {})} for rec in records]
        for (r, k, first, what), lp in zip(spans, scores, strict=True):
            rows[r][what][k] = float(sum(lp[first - 1:]))
        path = stage_dir(out, "scores") / f"{shard_name(shard)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            f.write("".join(map(_dump, rows)))
        seconds = time.perf_counter() - start
        log.info("estep: scored %s: %d sequences, %d tokens in %.1f s", shard_name(shard), len(seqs),
                 sum(map(len, seqs)), seconds)
    torch.distributed.barrier()


def run_score(cfg: BoltConfig, ckpt: str, shards: list[int], tokenizer) -> None:
    import torch

    from megatron_bolt.score.scorer import loaded_model

    out = Path(cfg.estep.output_dir)
    with loaded_model(cfg, ckpt) as (run, model, world, _, _):
        torch.distributed.barrier()  # every rank's sampling (stage all) has finished
        pending = [s for s in shards if not (stage_dir(out, "scores") / f"{shard_name(s)}.jsonl").is_file()]
        for shard in pending:
            score_shard(cfg, run, model, tokenizer, shard, out, world.rank)


# ------------------------------------------------------------------------------------------------- merge


def _check_cover(shard: int, expected: list[tuple[int, int]], records: list[dict[str, Any]], what: str) -> None:
    got = [(r["doc_id"], r["chunk_index"]) for r in records]
    if got != expected:
        missing = len(set(expected) - set(got))
        extra = len(set(got) - set(expected))
        dup = len(got) - len(set(got))
        raise EStepError(f"{shard_name(shard)} {what}: {len(got)} chunks where {len(expected)} are expected "
                         f"({missing} missing, {extra} unexpected, {dup} duplicated): rerun that shard")


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def run_merge(cfg: BoltConfig, tokenizer) -> dict[str, Any]:
    """Check coverage, resample one latent per chunk, write latents, diagnostics and estep.json."""
    e = cfg.estep
    out = Path(e.output_dir)
    expected = all_keys(e.documents, e.num_shards, e.chunk_pattern)
    flat = [k for keys in expected for k in keys]
    if len(flat) != len(set(flat)):
        raise EStepError("estep.documents repeat a (doc_id, chunk_index): give each prepared split once")
    missing = [s for s in range(e.num_shards) for stage in ("samples", "scores")
               if not (stage_dir(out, stage) / f"{shard_name(s)}.jsonl").is_file()]
    if missing:
        raise EStepError(f"shards not finished: {sorted(set(missing))[:10]} ({len(set(missing))} of "
                         f"{e.num_shards}); run the sample and score stages for them first")
    totals = {"chunks": 0, "too_long": 0, "with_latent": 0, "no_valid_sample": 0, "samples": 0, "invalid_samples": 0,
              "unfinished_samples": 0}
    ess, chosen_len, sample_len, rescore = [], [], [], []
    elbos: dict[str, list[float]] = {str(n): [] for n in weights.ELBO_NS if n <= e.sampling.num_samples}
    sampling = {"prompts": 0, "generated_tokens": 0, "seconds": 0.0}
    with atomic_open(out / "latents.jsonl") as lat, atomic_open(out / "diagnostics.jsonl") as diag:
        for shard in range(e.num_shards):
            name = shard_name(shard)
            samples = _read_jsonl(stage_dir(out, "samples") / f"{name}.jsonl")
            scores = _read_jsonl(stage_dir(out, "scores") / f"{name}.jsonl")
            _check_cover(shard, expected[shard], samples, "samples")
            _check_cover(shard, expected[shard], scores, "scores")
            meta = json.loads((stage_dir(out, "samples") / f"{name}.meta.json").read_text(encoding="utf-8"))
            for key in sampling:
                sampling[key] += meta[key]
            for rec, sc in zip(samples, scores, strict=True):
                totals["chunks"] += 1
                if rec.get("too_long"):
                    totals["too_long"] += 1
                    continue
                smp = rec["samples"]
                log_q = [s["log_q"] if s["valid"] else None for s in smp]
                log_w = weights.log_weights(sc["log_p"], log_q)
                k = weights.resample(log_w, weights.chunk_rng(e.resample_seed, rec["doc_id"], rec["chunk_index"]))
                totals["samples"] += len(smp)
                totals["invalid_samples"] += sum(not s["valid"] for s in smp)
                totals["unfinished_samples"] += sum(s["finish_reason"] == "length" for s in smp)
                sample_len.extend(len(s["token_ids"]) for s in smp)
                chunk_elbo = weights.elbo_estimates(log_w)
                for n, v in chunk_elbo.items():
                    elbos[n].append(v)
                if "log_q_megatron" in sc:
                    rescore.extend(abs(a - b) for a, b in zip(sc["log_q_megatron"], log_q, strict=True)
                                   if a is not None and b is not None)
                if k is None:
                    totals["no_valid_sample"] += 1
                else:
                    totals["with_latent"] += 1
                    latent = smp[k]["token_ids"][:-1]
                    chosen_len.append(len(latent))
                    ess.append(weights.effective_sample_size(log_w))
                    lat.write(_dump({"doc_id": rec["doc_id"], "chunk_index": rec["chunk_index"],
                                     "latent_token_ids": latent}))
                diag.write(_dump({
                    "doc_id": rec["doc_id"], "chunk_index": rec["chunk_index"], "chosen": k,
                    "log_p": sc["log_p"], "log_q": log_q, "log_w": log_w,
                    "ess": weights.effective_sample_size(log_w), "elbo": chunk_elbo,
                    "latent_tokens": [len(s["token_ids"]) - (1 if s["valid"] else 0) for s in smp],
                    "finish_reasons": [s["finish_reason"] for s in smp],
                    "latent": tokenizer.decode(smp[k]["token_ids"][:-1]) if k is not None else None,
                }))
    secs = max(sampling["seconds"], 1e-9)
    summary = {
        "format": FORMAT, "params_hash": config_hash(json.loads((out / "params.json").read_text())),
        **totals,
        "mean_ess": _mean(ess), "num_samples": e.sampling.num_samples,
        "elbo": {n: _mean(v) for n, v in elbos.items()},
        "elbo_chunks": {n: sum(math.isfinite(x) for x in v) for n, v in elbos.items()},
        "mean_latent_tokens": _mean([float(x) for x in chosen_len]),
        "mean_sample_tokens": _mean([float(x) for x in sample_len]),
        "sampling": {**sampling, "prompts_per_s": sampling["prompts"] / secs,
                     "generated_tokens_per_s": sampling["generated_tokens"] / secs},
    }
    if e.rescore_q:
        summary["rescore_q_abs_diff"] = {"max": max(rescore, default=None), "mean": _mean(rescore)}
    write_text_atomic(out / "estep.json", json.dumps(summary, indent=1) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------- the command


def run_estep(cfg: BoltConfig, ckpt: str, hf_dir: str | None = None, stage: str = "all",
              shard: int | None = None) -> dict[str, Any] | None:
    """Run ``stage`` for ``shard`` (None: every shard); returns the summary after a merge on rank 0."""
    from megatron_bolt.runtime.world import world_from_env

    e = cfg.estep
    if not e.output_dir:
        raise EStepError("estep.output_dir is not set")
    if stage not in STAGES:
        raise EStepError(f"--stage {stage!r}: one of {', '.join(STAGES)}")
    if shard is not None and not 0 <= shard < e.num_shards:
        raise EStepError(f"--shard {shard} is outside [0, estep.num_shards={e.num_shards})")
    out = Path(e.output_dir)
    step, tokenizer = _tokenizer(ckpt)
    if (out / "estep.json").is_file() and stage in ("all", "merge"):
        _claim(out, _params(cfg, step))
        return json.loads((out / "estep.json").read_text(encoding="utf-8"))
    if stage in ("all", "sample"):
        _sampling_params(cfg, tokenizer.ids)  # refuse a proposal whose log q is not exact before any work
    _claim(out, _params(cfg, step))
    world = world_from_env()
    shards = [shard] if shard is not None else list(range(e.num_shards))
    if stage in ("all", "sample"):
        run_sample(cfg, ckpt, hf_dir, shards if shard is not None else shards[world.rank::world.world_size],
                   tokenizer)
    if stage in ("all", "score"):
        run_score(cfg, ckpt, shards, tokenizer)
    if stage in ("all", "merge") and world.rank == 0:
        summary = run_merge(cfg, tokenizer)
        log.info("estep: %d chunks, %d with a latent, %d without a valid sample, %d too long; mean ESS %s; "
                 "ELBO %s", summary["chunks"], summary["with_latent"], summary["no_valid_sample"],
                 summary["too_long"], summary["mean_ess"], summary["elbo"])
        return summary
    return None


def main(cfg: BoltConfig, args) -> int:
    from megatron_bolt.checkpoint.dist import CheckpointError
    from megatron_bolt.convert.hf_io import ConversionError
    from megatron_bolt.data.tokenizer import TokenizerError
    from megatron_bolt.score.scorer import ScoreError

    stage = getattr(args, "stage", None) or "all"
    try:
        run_estep(cfg, args.ckpt, args.hf_dir, stage, args.shard)
    except (EStepError, ScoreError, ConversionError, CheckpointError, FileNotFoundError, TokenizerError) as exc:
        print(f"bolt {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def sample_main(cfg: BoltConfig, args) -> int:
    """``bolt sample``: the sample stage alone."""
    args.stage = "sample"
    return main(cfg, args)
