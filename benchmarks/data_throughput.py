"""Throughput of ``bolt prepare`` (read, split, sentence-chunk, write) and ``bolt build-dataset``
(tokenise, lay out latents, write Megatron .bin/.idx) on the embedded corpus with its teacher latents.

    .venv/bin/python benchmarks/data_throughput.py --docs 100000 --workers 1 2

Prints documents/s per stage and worker count (end to end, pool start-up included), the CPU seconds spent
(this process and its workers: on a shared machine the wall time depends on the load, the CPU time much
less), the speed-up over the first count, and whether every worker count wrote byte-identical outputs.
"""

from __future__ import annotations

import argparse
import filecmp
import resource
import tempfile
import time
from pathlib import Path

from megatron_bolt.config.schema import PrepareConfig
from megatron_bolt.data.builder import build_joint_dataset
from megatron_bolt.data.embedded import generate_embedded
from megatron_bolt.data.prepare import run_prepare


def _cpu_seconds() -> float:
    """User + system time of this process and its finished children (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _warm_up(tokenizer_dir: Path) -> None:
    """Pay one-time imports (transformers, megatron-core's indexed dataset) before anything is timed."""
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    from megatron_bolt.data.tokenizer import BoltTokenizer

    BoltTokenizer.from_pretrained(tokenizer_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000, help="Embedded-corpus documents.")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to time.")
    p.add_argument("--docs-per-shard", type=int, default=5000)
    p.add_argument("--chunk-lambda", type=float, default=0.0, help="0: the embedded corpus' own chunking.")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = generate_embedded(Path(tmp) / "embedded", args.docs, seed=0, num_eval=10)
        size_mb = corpus.corpus.stat().st_size / 2**20
        print(f"corpus: {args.docs} documents, {corpus.num_chunks} chunks, {size_mb:.1f} MiB")
        _warm_up(corpus.tokenizer)
        rates, outputs = {}, {}
        for workers in args.workers:
            prefix = Path(tmp) / f"w{workers}" / "prepared"
            cfg = PrepareConfig(input=[str(corpus.corpus)], output_prefix=str(prefix), workers=workers,
                                docs_per_shard=args.docs_per_shard, chunk_lambda=args.chunk_lambda)
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            result = run_prepare(cfg, progress=False)
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
            docs = result.report["docs_written"]
            rates["prepare", workers] = docs / seconds
            shards = [prefix.with_name(n) for n in result.report["shards"]]
            print(f"prepare       workers={workers}: {docs / seconds:,.0f} docs/s ({seconds:.2f} s wall, "
                  f"{cpu:.2f} s CPU, {result.report['chunks_written'] / seconds:,.0f} chunks/s)")
            data = Path(tmp) / f"w{workers}" / "joint"
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            meta = build_joint_dataset(shards, [corpus.latents], str(corpus.tokenizer), data, seed=0,
                                       workers=workers, show_progress=False)
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
            rates["build-dataset", workers] = docs / seconds
            print(f"build-dataset workers={workers}: {docs / seconds:,.0f} docs/s ({seconds:.2f} s wall, "
                  f"{cpu:.2f} s CPU, {meta['tokens']['total'] / seconds:,.0f} tokens/s)")
            outputs[workers] = [*shards, data.with_suffix(".bin"), data.with_suffix(".idx")]
        base = args.workers[0]
        for workers in args.workers[1:]:
            pairs = zip(outputs[base], outputs[workers], strict=True)
            same = all(filecmp.cmp(a, b, shallow=False) for a, b in pairs)
            ratios = ", ".join(f"{stage} {rates[stage, workers] / rates[stage, base]:.2f}x"
                               for stage in ("prepare", "build-dataset"))
            print(f"speed-up {workers} vs {base} workers: {ratios}; identical output: {same}")

if __name__ == "__main__":
    main()
