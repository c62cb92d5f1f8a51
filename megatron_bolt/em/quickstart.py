"""``bolt quickstart``: the whole BoLT EM loop at tiny scale on this machine, with no network and no GPU.

    bolt quickstart                     # writes runs/quickstart
    bolt quickstart --out /tmp/qs em.iterations=3 estep.sampling.num_samples=4

1. generate the embedded arithmetic corpus (documents, teacher latents for answer chunks, held-out
   questions, a byte-level tokenizer with the latent tokens);
2. chunk it into three disjoint splits (``bolt prepare``): a warm-start slice with teacher latents, the
   bootstrap documents the E-step labels, and a few held-out documents for ELBO diagnostics;
3. run the EM plan (``bolt em``): warm start, then ``em.iterations`` rounds of E-step (sample K latents
   per answer chunk with the previous model, score, importance-resample) and M-step (build, train from
   scratch, export), each evaluated on the held-out questions;
4. write OUT/report.json, OUT/report.md and PNG plots (accuracy and ELBO by iteration, loss curves).
Every step resumes: rerunning the same command after a crash continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from megatron_bolt.config.schema import BoltConfig, PrepareConfig
from megatron_bolt.utils.atomic import atomic_open

log = logging.getLogger(__name__)


def prepare_corpus(cfg: BoltConfig, out: Path) -> dict:
    """Corpus and the three prepared splits under OUT/corpus and OUT/prepared (each skipped when done)."""
    from megatron_bolt.data.embedded import generate_embedded
    from megatron_bolt.data.prepare import read_prepared, run_prepare
    from megatron_bolt.recipes import QUICKSTART_CORPUS as Q

    corpus = out / "corpus"
    if not (corpus / "manifest.json").is_file():
        generate_embedded(corpus, Q["documents"], seed=cfg.data.seed, num_eval=Q["eval_questions"])
    for name, split in Q["splits"].items():
        prefix = out / "prepared" / name / "docs"
        run_prepare(PrepareConfig(input=[str(corpus / "corpus.jsonl")], output_prefix=str(prefix), split=split,
                                  chunk_lambda=0.0), progress=False)
    warm_latents = corpus / "warm_latents.jsonl"
    if not warm_latents.is_file():  # the teacher's latents for the warm-start documents only (as synthesize writes)
        warm = {doc["doc_id"] for doc in read_prepared(out / "prepared" / "warm" / "docs")}
        with open(corpus / "latents.jsonl", encoding="utf-8") as src, atomic_open(warm_latents) as dst:
            dst.writelines(line for line in src if json.loads(line)["doc_id"] in warm)
    return json.loads((corpus / "manifest.json").read_text(encoding="utf-8"))


def configure(cfg: BoltConfig, out: Path) -> BoltConfig:
    """Point the EM, data and eval sections at the generated files (explicit user overrides of paths win)."""
    from megatron_bolt.data.tokenizer import BoltTokenizer

    corpus, prepared = out / "corpus", out / "prepared"
    cfg.data.tokenizer = cfg.data.tokenizer or str(corpus / "tokenizer")
    cfg.model.vocab_size = BoltTokenizer.from_pretrained(cfg.data.tokenizer).vocab_size
    em = cfg.em
    em.run_dir = str(out / "em")
    em.warm_documents = em.warm_documents or [str(prepared / "warm")]
    em.warm_latents = em.warm_latents or [str(corpus / "warm_latents.jsonl")]
    em.bootstrap_documents = em.bootstrap_documents or [str(prepared / "bootstrap")]
    em.heldout_documents = em.heldout_documents or [str(prepared / "heldout")]
    cfg.eval.data_path = cfg.eval.data_path or str(corpus / "eval.jsonl")
    cfg.validate(1)
    return cfg


def main(cfg: BoltConfig, args) -> int:
    import shutil

    from megatron_bolt.em.runner import run_plan, summary_table, write_report

    out = Path(args.out or "runs/quickstart")
    out.mkdir(parents=True, exist_ok=True)
    prepare_corpus(cfg, out)
    configure(cfg, out)
    run_dir, _, seconds = run_plan(cfg)
    report = write_report(cfg, run_dir, seconds, name="quickstart")
    for name in ("report.json", "report.md", *(p.name for p in run_dir.glob("*.png"))):
        shutil.copy2(run_dir / name, out / name)
    print(summary_table(report))
    print(f"quickstart: done. Report: {out / 'report.md'} (plots and report.json beside it; every stage's "
          f"outputs under {run_dir})")
    return 0
