"""``bolt eval``: greedy few-shot accuracy of a checkpoint, or raw perplexity of held-out text.

    bolt eval --ckpt runs/bolt/iter_1/ckpt eval.data_path=data/embedded/eval.jsonl
    bolt eval --ckpt hf/tinyllama-bolt eval.task=math eval.data_path=data/math500 eval.output_dir=runs/eval/math
    bolt eval --ckpt hf/raw-baseline eval.task=gsm8k eval.latent=false eval.data_path=data/gsm8k

``--ckpt`` is a Hugging Face directory or a Megatron checkpoint; a checkpoint is exported once (``export_hf``)
into ``OUTPUT_DIR/../hf_cache/`` and reused while it is unchanged. Prompts are built by ``prompts.py``,
decoded greedily in batches of ``eval.batch_size`` through ``load_backend(eval.backend)`` and graded by
``answers.py``. ``OUTPUT_DIR/predictions.jsonl`` holds one line per problem (prompt, completion text and
token ids, latent, extracted answer, gold, correct) and ``OUTPUT_DIR/summary.json`` the accuracy with its
95% Wilson interval, in the ``accuracy`` shape that ``report.json`` uses. Both are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_bolt.config.schema import BoltConfig, EvalConfig
from megatron_bolt.data.tokenizer import BoltTokenizer, TokenizerError
from megatron_bolt.eval.answers import grade
from megatron_bolt.eval.prompts import build_prompt, load_demos, read_completion, sampling_params
from megatron_bolt.eval.tasks import EvalDataError, load_items, load_texts
from megatron_bolt.sample.interfaces import GenerationBackend, Request, load_backend
from megatron_bolt.utils.atomic import atomic_open, write_text_atomic

log = logging.getLogger(__name__)

Z95 = 1.959963984540054
PREDICTIONS, SUMMARY, HF_CACHE = "predictions.jsonl", "summary.json", "hf_cache"


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval: unlike the normal approximation it stays inside [0, 1] at 0% and 100%."""
    if n <= 0:
        raise ValueError("the interval needs at least one problem")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def resolve_model(ckpt: str | Path, out_dir: Path) -> Path:
    """An HF directory as given; a Megatron checkpoint exported once into ``out_dir/../hf_cache``."""
    from megatron_bolt.convert import hf_io

    path = Path(ckpt)
    if (path / "config.json").is_file():
        return path
    try:
        step, root, _ = hf_io.load_checkpoint_config(path)
        stamp = f"{step.resolve()}:{step.stat().st_mtime_ns}"  # a checkpoint saved again here is a new dir
        digest = hashlib.sha256(stamp.encode()).hexdigest()[:10]
        cache = out_dir.resolve().parent / HF_CACHE / f"{root.name}-{step.name}-{digest}"
        if (cache / "config.json").is_file():
            log.info("reusing the HF export %s", cache)
            return cache
        log.info("exporting %s to %s", step, cache)
        return hf_io.export_hf(step, cache)
    except Exception as exc:
        # Reading a checkpoint has imported megatron-core by now; an HF directory never pays for it.
        from megatron_bolt.checkpoint.dist import CheckpointError

        if isinstance(exc, CheckpointError):
            raise hf_io.ConversionError(str(exc)) from exc
        raise


def _context_length(model_dir: Path) -> int | None:
    config = model_dir / "config.json"
    return json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None


def evaluate(cfg: EvalConfig, model_dir: str | Path, out_dir: str | Path,
             backend: GenerationBackend | None = None) -> dict[str, Any]:
    """Run ``cfg.task`` against the HF directory ``model_dir``; returns the summary written to ``out_dir``.

    ``backend`` replaces ``load_backend(cfg.backend, model_dir)`` (the EM loop reuses one; tests fake one).
    """
    if cfg.task == "perplexity":
        raise ValueError("eval.task=perplexity has no answers to grade: call evaluate_perplexity")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    started = time.monotonic()
    tokenizer = BoltTokenizer.from_pretrained(model_dir)
    items = load_items(cfg.task, cfg.data_path, cfg.split, cfg.limit)
    demos = load_demos(cfg.task, cfg.fewshot_path, cfg.num_shots)
    prompts = [build_prompt(cfg.task, item.problem, demos, cfg.latent, tokenizer) for item in items]
    context = _context_length(model_dir)
    own = backend is None
    backend = backend or load_backend(cfg.backend, str(model_dir))
    generations = []
    try:
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start:start + cfg.batch_size]
            budget = cfg.max_new_tokens
            if context is not None:
                budget = min(budget, context - max(len(p.token_ids) for p in batch))
                if budget < 1:
                    raise EvalDataError(f"a prompt of problems {start}..{start + len(batch) - 1} fills the model's "
                                        f"{context}-token context: use fewer eval.num_shots or shorter demos")
            params = sampling_params(cfg.task, tokenizer, cfg.latent, budget)
            requests = [Request(p.token_ids, seed=start + i) for i, p in enumerate(batch)]
            generations += [gens[0] for gens in backend.generate(requests, params)]
            log.info("eval %s: %d/%d problems", cfg.task, len(generations), len(prompts))
    finally:
        if own:
            backend.close()

    records = []
    for item, prompt, gen in zip(items, prompts, generations, strict=True):
        completion = read_completion(cfg.task, gen.token_ids, tokenizer, cfg.latent)
        extracted, correct = grade(cfg.task, completion.answer, item.gold)
        records.append({"index": item.index, "problem": item.problem, "gold": item.gold, "prompt": prompt.text,
                        "completion": tokenizer.decode(gen.token_ids), "completion_token_ids": gen.token_ids,
                        "finish_reason": gen.finish_reason, "latent": completion.latent,
                        "answer_text": completion.answer, "extracted": extracted, "correct": correct})
    n, correct = len(records), sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, n)
    summary = {
        "task": cfg.task, "model": str(model_dir), "backend": getattr(backend, "name", cfg.backend),
        "latent": cfg.latent, "num_shots": len(demos), "max_new_tokens": cfg.max_new_tokens,
        "accuracy": {"value": correct / n, "ci_low": low, "ci_high": high, "n": n, "task": cfg.task},
        "correct": correct, "no_answer": sum(r["extracted"] is None for r in records),
        "finish_reasons": dict(Counter(r["finish_reason"] for r in records)),
        "seconds": round(time.monotonic() - started, 3), "predictions": PREDICTIONS,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / PREDICTIONS) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    write_text_atomic(out_dir / SUMMARY, json.dumps(summary, indent=1) + "\n")
    return summary


def evaluate_perplexity(cfg: EvalConfig, model_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    from megatron_bolt.eval.perplexity import text_perplexity

    started = time.monotonic()
    texts = load_texts(cfg.data_path, cfg.split, cfg.limit)
    summary = {"task": "perplexity", "model": str(model_dir), **text_perplexity(model_dir, texts),
               "seconds": round(time.monotonic() - started, 3)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out_dir) / SUMMARY, json.dumps(summary, indent=1) + "\n")
    return summary


def main(cfg: BoltConfig, args) -> int:
    from megatron_bolt.convert.hf_io import ConversionError
    from megatron_bolt.sample.interfaces import BackendUnavailable

    ev = cfg.eval
    out_dir = Path(ev.output_dir or f"runs/eval/{ev.task}")
    try:
        model_dir = resolve_model(args.ckpt, out_dir)
        if ev.task == "perplexity":
            summary = evaluate_perplexity(ev, model_dir, out_dir)
            log.info("perplexity %.3f over %d tokens -> %s", summary["perplexity"], summary["tokens"], out_dir)
            return 0
        summary = evaluate(ev, model_dir, out_dir)
    except (EvalDataError, ConversionError, BackendUnavailable, TokenizerError) as exc:
        print(f"bolt eval: {exc}", file=sys.stderr)
        return 2
    acc = summary["accuracy"]
    log.info("%s accuracy %.1f%% (95%% CI %.1f-%.1f%%, n=%d) -> %s", ev.task, 100 * acc["value"],
             100 * acc["ci_low"], 100 * acc["ci_high"], acc["n"], out_dir)
    return 0
