"""Megatron-style entry to ``bolt prepare``: read a corpus, keep a split, chunk documents by sentences.

    python tools/preprocess_data.py --input data/finemath/*.parquet --output-prefix runs/data/warm \\
        --split 0:1:20 --workers 8

Same library call as ``bolt prepare`` (megatron_bolt.data.prepare.run_prepare), with Megatron's flag names.
Unlike Megatron's tool it does not tokenize: the output is text chunks, and tokens are made later by
``bolt build-dataset``, once the latents exist; so there are no tokenizer flags.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_bolt.config.schema import ConfigError, PrepareConfig
from megatron_bolt.data.corpus import CorpusError
from megatron_bolt.data.prepare import run_prepare


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
    except (ConfigError, CorpusError) as exc:
        print(f"preprocess_data: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
