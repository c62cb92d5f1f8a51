"""``bolt prepare``: sharded output, worker-count invariance, resumption, reports, both entry points."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_bolt.cli import COMMANDS
from megatron_bolt.config.loader import load_config
from megatron_bolt.config.schema import ConfigError, PrepareConfig
from megatron_bolt.data import prepare
from megatron_bolt.data.embedded import generate_embedded
from megatron_bolt.data.prepare import read_prepared, report_path, run_prepare, shard_path

ROOT = Path(__file__).resolve().parents[2]


def paragraph(i: int) -> str:
    sentences = " ".join(f"Sentence {j} of document {i} says ½·x² = {i * j}." for j in range(i % 9 + 1))
    return f"Title {i}\n\n{sentences}\n\n```\ncode {i}.\n```\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], dict[int, str]]:
    """Two inputs: a JSONL with 3 malformed lines among 40 documents, then a Parquet of 25 rows."""
    root = tmp_path_factory.mktemp("corpus")
    texts: dict[int, str] = {}
    lines = []
    for i in range(43):
        if i in (5, 17, 30):
            lines.append('{"text": 1}' if i == 5 else '{"txt": "x"}' if i == 17 else "{oops")
        else:
            texts[i] = paragraph(i)
            lines.append(json.dumps({"text": texts[i]}, ensure_ascii=False))
    (root / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = [paragraph(100 + i) for i in range(25)]
    texts.update({43 + i: t for i, t in enumerate(rows)})
    pq.write_table(pa.table({"text": rows}), root / "b.parquet", row_group_size=7)
    return [str(root / "a.jsonl"), str(root / "b.parquet")], texts


def config(inputs, prefix, **kwargs) -> PrepareConfig:
    return PrepareConfig(input=inputs, output_prefix=str(prefix), docs_per_shard=6, **kwargs)


def shard_bytes(prefix: Path, report: dict) -> dict[str, bytes]:
    return {name: prefix.with_name(name).read_bytes() for name in report["shards"]}


def test_output_round_trips_and_report_counts_are_exact(corpus, tmp_path):
    inputs, texts = corpus
    result = run_prepare(config(inputs, tmp_path / "p"), progress=False)
    docs = list(read_prepared(tmp_path / "p"))
    assert [d["doc_id"] for d in docs] == sorted(texts)
    assert all("".join(d["chunks"]) == texts[d["doc_id"]] for d in docs)
    r = result.report
    assert (r["docs_read"], r["docs_valid"], r["docs_written"], r["docs_outside_split"]) == (68, 65, 65, 0)
    assert r["skipped"] == {"bad_json": 1, "missing_key": 1, "not_string": 1}
    assert r["chunks_written"] == sum(len(d["chunks"]) for d in docs)
    assert r["shards"] == [shard_path(tmp_path / "p", k).name for k in range(11)]
    assert json.loads(report_path(tmp_path / "p").read_text()) == r


def test_one_and_two_workers_write_byte_identical_output(corpus, tmp_path):
    inputs, _ = corpus
    one = run_prepare(config(inputs, tmp_path / "one" / "p", workers=1), progress=False)
    two = run_prepare(config(inputs, tmp_path / "two" / "p", workers=2), progress=False)
    assert shard_bytes(tmp_path / "one" / "p", one.report) == shard_bytes(tmp_path / "two" / "p", two.report)
    assert one.report == two.report


def test_split_keeps_only_its_slice(corpus, tmp_path):
    inputs, texts = corpus
    result = run_prepare(config(inputs, tmp_path / "p", split="1:3:4"), progress=False)
    ids = [d["doc_id"] for d in read_prepared(tmp_path / "p")]
    assert ids == [i for i in sorted(texts) if i % 4 in (1, 2)]
    assert result.report["docs_outside_split"] == 65 - len(ids)
    validation = run_prepare(config(inputs, tmp_path / "v", split="validation"), progress=False)
    assert [d["doc_id"] for d in read_prepared(tmp_path / "v")] == [0]
    assert validation.report["docs_written"] == 1


def test_resume_rewrites_only_missing_shards_and_ignores_leftover_temp_files(corpus, tmp_path):
    inputs, _ = corpus
    prefix = tmp_path / "p"
    first = run_prepare(config(inputs, prefix), progress=False)
    expected = shard_bytes(prefix, first.report)
    # Simulate a run killed while writing shard 3: no report, shard 3 missing, its temp file left behind.
    report_path(prefix).unlink()
    shard_path(prefix, 3).unlink()
    leftover = prefix.with_name(f".{shard_path(prefix, 3).name}.tmp-99999")
    leftover.write_text('{"doc_id": 0, "chunks": ["garbage"]}\n')
    untouched = shard_path(prefix, 0)
    os.utime(untouched, ns=(1, 1))
    second = run_prepare(config(inputs, prefix), progress=False)
    assert second.shards_resumed == len(expected) - 1
    assert shard_bytes(prefix, second.report) == expected
    assert second.report == first.report
    assert untouched.stat().st_mtime_ns == 1, "finished shards are not rewritten"
    third = run_prepare(config(inputs, prefix, workers=2), progress=False)  # report present: nothing to do
    assert third.report == first.report and untouched.stat().st_mtime_ns == 1


def test_rerun_with_other_settings_into_the_same_prefix_is_refused(corpus, tmp_path):
    inputs, _ = corpus
    run_prepare(config(inputs, tmp_path / "p"), progress=False)
    with pytest.raises(ConfigError, match="chunk_lambda"):
        run_prepare(config(inputs, tmp_path / "p", chunk_lambda=2.0), progress=False)


def test_embedded_corpus_latents_line_up_with_prepared_chunks(tmp_path):
    emb = generate_embedded(tmp_path / "emb", num_docs=30, seed=1, num_eval=5)
    run_prepare(config([str(emb.corpus)], tmp_path / "p", chunk_lambda=0.0), progress=False)
    docs = {d["doc_id"]: d["chunks"] for d in read_prepared(tmp_path / "p")}
    with open(emb.latents) as f:
        for entry in map(json.loads, f):
            answer = docs[entry["doc_id"]][entry["chunk_index"]]
            assert answer.startswith("A: ") and entry["latent"].endswith(answer[3:6])


def test_bolt_prepare_handler_reads_the_prepare_section(corpus, tmp_path, capsys):
    inputs, _ = corpus
    assert COMMANDS["prepare"].handler == "megatron_bolt.data.prepare:main"
    cfg = load_config(None, [f"prepare.input=[{inputs[0]}]", f"prepare.output_prefix={tmp_path / 'p'}",
                             "prepare.split=\"0:1:2\""])
    assert prepare.main(cfg, None) == 0
    assert "documents" in capsys.readouterr().out
    assert all(d["doc_id"] % 2 == 0 for d in read_prepared(tmp_path / "p"))
    missing = load_config(None, [f"prepare.output_prefix={tmp_path / 'q'}"])
    assert prepare.main(missing, None) == 2
    assert "prepare.input" in capsys.readouterr().err


def test_config_rejects_bad_values():
    # YAML 1.1 would read this as the base-60 integer 47840; the loader keeps it as written.
    assert load_config(None, ["prepare.split=13:17:20"]).prepare.split == "13:17:20"
    with pytest.raises(ConfigError, match="workers"):
        PrepareConfig(workers=0)
    with pytest.raises(ConfigError, match="split"):
        PrepareConfig(split="train")


def test_megatron_style_tool_matches_the_library_call(corpus, tmp_path):
    inputs, _ = corpus
    spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--input", *inputs, "--output-prefix", str(tmp_path / "tool" / "p"), "--docs-per-shard", "6",
            "--split", "0:1:3", "--chunk-lambda", "3"]
    assert tool.main(argv) == 0
    lib = run_prepare(config(inputs, tmp_path / "lib" / "p", split="0:1:3", chunk_lambda=3.0), progress=False)
    assert shard_bytes(tmp_path / "tool" / "p", lib.report) == shard_bytes(tmp_path / "lib" / "p", lib.report)


def test_megatron_style_tool_builds_an_indexed_dataset(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_bolt.data.tokenizer import train_embedded_tokenizer

    inputs, texts = corpus
    tok = train_embedded_tokenizer(texts.values(), tmp_path / "tok", vocab_size=300)
    spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    prefix = tmp_path / "out" / "p"
    argv = ["--input", *inputs, "--output-prefix", str(prefix), "--split", "all",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "tok")]
    assert tool.main(argv) == 0
    data = IndexedDataset(f"{prefix}_text_document")
    assert len(data) == len(texts)  # every good record, none of the 3 malformed ones
    ids = tok.ids
    for i, text in enumerate(texts[k] for k in sorted(texts)):
        tokens = data[i].tolist()  # chunks are tokenised one by one: compare the text they decode to
        assert tokens[0] == ids.bos and tokens[-1] == ids.eos and tok.decode(tokens[1:-1]) == text
