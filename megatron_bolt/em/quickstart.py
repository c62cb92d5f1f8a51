"""``bolt quickstart``: the whole pipeline at tiny scale on this machine, with no network and no GPU.

    bolt quickstart                     # writes runs/quickstart
    bolt quickstart --out /tmp/qs train.train_iters=50

Stages (each skipped when its output is already complete, so a rerun resumes): generate the embedded
arithmetic corpus with teacher latents and its tokenizer; chunk it (``bolt prepare``); build the joint
latent+text dataset (``bolt build-dataset``); warm-start training of a tiny Llama on megatron-core
(``bolt train``). This is iteration 0 of BoLT's EM loop; the E-step/M-step iterations, evaluation and plots
join this command with the EM loop.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from megatron_bolt.config.schema import BoltConfig, PrepareConfig

log = logging.getLogger(__name__)

NUM_DOCS = 2000
NUM_EVAL = 200


def _stage(timings: dict, name: str, fn):
    start = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - start, 2)
    log.info("quickstart: %s done in %.1f s", name, timings[name])
    return result


def run(cfg: BoltConfig, out: Path) -> dict:
    from megatron_bolt.data.builder import build_joint_dataset
    from megatron_bolt.data.embedded import generate_embedded
    from megatron_bolt.data.jsonl import expand_paths
    from megatron_bolt.data.prepare import run_prepare
    from megatron_bolt.data.tokenizer import BoltTokenizer
    from megatron_bolt.train.loop import train

    timings: dict[str, float] = {}
    corpus_dir = out / "corpus"

    def corpus():
        if (corpus_dir / "manifest.json").is_file():
            return json.loads((corpus_dir / "manifest.json").read_text())
        generate_embedded(corpus_dir, NUM_DOCS, seed=cfg.data.seed, num_eval=NUM_EVAL)
        return json.loads((corpus_dir / "manifest.json").read_text())

    manifest = _stage(timings, "corpus", corpus)
    prepare_cfg = PrepareConfig(input=[str(corpus_dir / "corpus.jsonl")], output_prefix=str(out / "prepared" / "docs"),
                                chunk_lambda=0.0)
    _stage(timings, "prepare", lambda: run_prepare(prepare_cfg, progress=True))
    tokenizer_dir = str(corpus_dir / "tokenizer")
    data_prefix = out / "data" / "warmstart"
    meta = _stage(timings, "build-dataset", lambda: build_joint_dataset(
        expand_paths([str(out / "prepared")], "documents"), [corpus_dir / "latents.jsonl"], tokenizer_dir,
        data_prefix, seed=cfg.data.seed))

    cfg.data.tokenizer = tokenizer_dir
    cfg.data.data_prefix = [str(data_prefix)]
    cfg.model.vocab_size = BoltTokenizer.from_pretrained(tokenizer_dir).vocab_size
    cfg.train.checkpoint.save = str(out / "checkpoints" / "iter0")
    cfg.validate(1)
    history = _stage(timings, "train", lambda: train(cfg))

    report = {
        "iteration": 0,
        "corpus": manifest,
        "dataset": {"documents": meta["counts"]["documents"], "tokens": meta["tokens"]["total"]},
        "train": {"steps": len(history), "first_loss": history[0]["loss"] if history else None,
                  "final_loss": history[-1]["loss"] if history else None,
                  "tokens_trained": sum(h["tokens"] for h in history)},
        "seconds": timings,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(cfg: BoltConfig, args) -> int:
    out = Path(args.out or "runs/quickstart")
    out.mkdir(parents=True, exist_ok=True)
    report = run(cfg, out)
    t = report["train"]
    loss = f"loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}" if t["steps"] else "already trained"
    print(f"quickstart: warm start trained {t['steps']} steps ({loss}); "
          f"stage seconds {report['seconds']}; report: {out / 'report.json'}")
    return 0
