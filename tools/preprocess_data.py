"""Megatron-style entry to ``bolt prepare``: read a corpus, keep a split, chunk documents by sentences.

    python tools/preprocess_data.py --input data/finemath/*.parquet --output-prefix runs/data/warm \\
        --split 0:1:20 --workers 8

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix runs/data/raw --workers 2 \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model TOKENIZER_DIR [--latents latents.jsonl]

Same library calls as ``bolt prepare`` and ``bolt build-dataset``, with Megatron's flag names. Without a
tokenizer the output is text chunks (PREFIX-00000.jsonl ...), ready for latents; with ``--tokenizer-model``
the tool goes on, like Megatron's, to a Megatron indexed dataset PREFIX_text_document.bin/.idx (raw text,
or joint latent+text when ``--latents`` are given; the tokenizer gets the latent tokens if it lacks them).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_bolt.config.schema import ConfigError, PrepareConfig
from megatron_bolt.data.builder import BuildError, build_joint_dataset
from megatron_bolt.data.corpus import CorpusError
from megatron_bolt.data.latents import LatentError
from megatron_bolt.data.prepare import run_prepare
from megatron_bolt.data.tokenizer import TokenizerError


def build_parser() -> argparse.ArgumentParser:
    defaults = PrepareConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="Files, globs or directories.")
    p.add_argument("--json-keys", nargs="+", default=defaults.json_keys, help="Text fields of each record.")
    p.add_argument("--output-prefix", required=True, help="Writes PREFIX-00000.jsonl, PREFIX.report.json.")
    p.add_argument("--split", default=defaults.split, help="'all', 'validation' or 'start:end:step'.")
    p.add_argument("--workers", type=int, default=defaults.workers, help="Chunking processes.")
    p.add_argument("--docs-per-shard", type=int, default=defaults.docs_per_shard, help="Documents per shard.")
    p.add_argument("--chunk-lambda", type=float, default=defaults.chunk_lambda,
                   help="Units per chunk ~ 1 + Poisson(lambda); 0 gives one sentence per chunk.")
    p.add_argument("--max-chunk-units", type=int, default=defaults.max_chunk_units, help="Cap per chunk.")
    p.add_argument("--chunk-seed", type=int, default=defaults.chunk_seed, help="Chunk-length seed offset.")
    p.add_argument("--max-record-bytes", type=int, default=defaults.max_record_bytes,
                   help="Longer records are skipped and counted.")
    p.add_argument("--tokenizer-type", choices=["HuggingFaceTokenizer"], default="HuggingFaceTokenizer",
                   help="Only Hugging Face tokenizers (a local directory) are supported.")
    p.add_argument("--tokenizer-model", help="Tokenizer directory: also build PREFIX_text_document.bin/.idx.")
    p.add_argument("--latents", nargs="*", default=[], help="Latent JSONL files for a joint dataset.")
    p.add_argument("--seed", type=int, default=1234, help="Seed of the prior/posterior layout coin.")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = PrepareConfig(input=args.input, json_keys=args.json_keys, output_prefix=args.output_prefix,
                            split=args.split, workers=args.workers, docs_per_shard=args.docs_per_shard,
                            chunk_lambda=args.chunk_lambda, max_chunk_units=args.max_chunk_units,
                            chunk_seed=args.chunk_seed, max_record_bytes=args.max_record_bytes)
        result = run_prepare(cfg)
        print(result.summary())
        if args.tokenizer_model:
            _build(args, result)
    except (ConfigError, CorpusError, BuildError, LatentError, FileNotFoundError, TokenizerError) as exc:
        print(f"preprocess_data: {exc}", file=sys.stderr)
        return 2
    return 0


def _build(args, result) -> None:
    shards = [result.report_path.with_name(name) for name in result.report["shards"]]
    out = f"{args.output_prefix}_text_document"
    meta = build_joint_dataset(shards, [Path(p) for p in args.latents], args.tokenizer_model, out, seed=args.seed,
                               workers=args.workers)
    print(f"{out}.bin/.idx: {meta['counts']['documents']} documents, {meta['tokens']['total']} tokens")


if __name__ == "__main__":
    sys.exit(main())
