"""``bolt build-dataset``: prepared documents + latents -> a joint Megatron indexed dataset.

    bolt build-dataset --config run.yaml data.tokenizer=runs/tok build.documents=[runs/docs] \
        build.latents=[runs/latents.jsonl] build.output_prefix=runs/data/joint build.workers=8

Reads ``build.*``, ``data.tokenizer`` (token ids) and ``data.seed`` (the per-chunk layout coin). A rerun
with unchanged inputs and settings finds the finished dataset and does nothing. The layouts, output files
and sidecar are described in ``megatron_bolt.data.builder``; train on the result with
``data.data_prefix=[runs/data/joint]``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_bolt.config.schema import BoltConfig
from megatron_bolt.data.builder import BuildError, build_joint_dataset
from megatron_bolt.data.jsonl import expand_paths
from megatron_bolt.data.latents import LatentError
from megatron_bolt.data.tokenizer import TokenizerError


def main(cfg: BoltConfig, args: argparse.Namespace) -> int:
    b = cfg.build
    required = (("build.documents", b.documents), ("build.output_prefix", b.output_prefix),
                ("data.tokenizer", cfg.data.tokenizer))
    missing = [name for name, value in required if not value]
    if missing:
        print(f"bolt build-dataset: set {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        documents = expand_paths(b.documents, "build.documents")
        latents = expand_paths(b.latents, "build.latents") if b.latents else []
        meta = build_joint_dataset(documents, latents, cfg.data.tokenizer, b.output_prefix,
                                   seed=cfg.data.seed, max_latent_tokens=b.max_latent_tokens,
                                   long_latents=b.long_latents, workers=b.workers,
                                   docs_per_task=b.docs_per_task)
    except (FileNotFoundError, BuildError, LatentError, TokenizerError) as exc:
        print(f"bolt build-dataset: {exc}", file=sys.stderr)
        return 1
    c, t = meta["counts"], meta["tokens"]
    print(f"{b.output_prefix}: {c['documents']} documents, {t['total']} tokens; {c['chunks_with_latent']} of "
          f"{c['chunks']} chunks with latents (prior {c['prior']}, posterior {c['posterior']}); "
          f"{c['latents_too_long']} latents over max_latent_tokens; longest document "
          f"{meta['longest_document']['tokens']} tokens")
    return 0
