"""Corpus readers: every format, exact malformed-record accounting, splits, streaming, clear file errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_bolt.data import corpus
from megatron_bolt.data.corpus import CorpusError, ReadReport, Split, expand_inputs, iter_documents


def read(paths, keys=("text",), max_bytes=10 * 2**20):
    report = ReadReport()
    docs = list(iter_documents([Path(p) for p in paths], list(keys), max_bytes, report))
    return docs, report


# Raw JSONL lines (bytes) and what each should become: a text or a skip reason.
MALFORMED_LINES = [
    (b'{"text": "Good one. Fine."}', "Good one. Fine."),
    (b'{"text": "broken', "bad_json"),
    (b'["text", "a list"]', "not_object"),
    (b'{"body": "no text key"}', "missing_key"),
    (b'{"text": 17}', "not_string"),
    (b'{"text": null}', "not_string"),
    (b'{"text": "caf\xe9 latin-1"}', "not_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}', "not_utf8"),
    (b'{"text": ""}', "empty"),
    (b'{"text": "  \\n "}', "empty"),
    (b'{"text": "' + b"x" * 300 + b'"}', "too_long"),
    (b'{"text": "CRLF line \xc3\xa9."}\r', "CRLF line \u00e9."),
]


def write_malformed(path: Path) -> None:
    lines = [raw for raw, _ in MALFORMED_LINES]
    lines.insert(3, b"   ")  # a blank line: counted, gets no index
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_jsonl_malformed_records_are_counted_per_reason_and_keep_their_index(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_malformed(path)
    docs, report = read([path], max_bytes=200)
    expected_docs = [(i, want) for i, (_, want) in enumerate(MALFORMED_LINES) if " " in want]
    assert [(d.index, d.text) for d in docs] == expected_docs
    assert dict(report.skipped) == {"bad_json": 1, "not_object": 1, "missing_key": 1, "not_string": 2,
                                    "not_utf8": 2, "empty": 2, "too_long": 1}
    assert (report.records, report.documents, report.blank_lines) == (len(MALFORMED_LINES), 2, 1)
    assert report.examples["bad_json"] == [f"{path}:2"]
    assert report.examples["too_long"] == [f"{path}:12"]  # line numbers count the blank line


def test_gzipped_jsonl_reads_the_same(tmp_path):
    write_malformed(tmp_path / "plain.jsonl")
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress((tmp_path / "plain.jsonl").read_bytes()))
    plain, plain_report = read([tmp_path / "plain.jsonl"], max_bytes=200)
    packed, packed_report = read([tmp_path / "packed.jsonl.gz"], max_bytes=200)
    assert plain == packed and plain_report.skipped == packed_report.skipped


def test_utf8_byte_order_mark_is_accepted_in_jsonl_and_json_arrays(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one."}\n{"text": "two."}\n')
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf [{"text": "one."}, {"text": "two."}]')
    for name in ("bom.jsonl", "bom.json"):
        docs, report = read([tmp_path / name])
        assert [d.text for d in docs] == ["one.", "two."] and not report.skipped


def test_over_long_line_is_skipped_without_losing_the_next_line(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "y" * 5000}) + "\n" + json.dumps({"text": "after"}) + "\n")
    docs, report = read([path], max_bytes=100)
    assert [(d.index, d.text) for d in docs] == [(1, "after")]
    assert report.skipped == {"too_long": 1}


def test_streaming_yields_before_a_truncated_gzip_fails_with_the_file_name(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    body = "".join(json.dumps({"text": f"Doc {i}."}) + "\n" for i in range(2000))
    path.write_bytes(gzip.compress(body.encode())[:-40])
    docs = iter_documents([path], ["text"])
    assert next(docs).text == "Doc 0."
    with pytest.raises(CorpusError, match="cut.jsonl.gz"):
        list(docs)


ARRAY = [{"text": "First, with ] and , inside."},
         {"text": "Second {nested}.", "meta": {"a": [1, 2, {"b": 3}]}},
         {"other": 1}, 12345678, {"text": "Ünïcödé ✓."}, {"text": "x" * 50}]


@pytest.mark.parametrize("chunk", [3, 7, 1 << 20])
def test_json_array_is_parsed_incrementally(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(corpus, "_READ_CHUNK", chunk)  # tiny buffers force refills inside elements
    path = tmp_path / "array.json"
    path.write_text(" \n" + json.dumps(ARRAY, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    docs, report = read([path])
    assert [(d.index, d.text) for d in docs] == [(0, ARRAY[0]["text"]), (1, ARRAY[1]["text"]),
                                                (4, ARRAY[4]["text"]), (5, ARRAY[5]["text"])]
    assert report.skipped == {"missing_key": 1, "not_object": 1}


def test_malformed_json_array_keeps_what_came_before_and_counts_the_rest_once(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_READ_CHUNK", 5)
    path = tmp_path / "bad.json"
    path.write_text('[{"text": "kept."}, {"text": "also kept."}, {"text": oops}, {"text": "lost."}]')
    docs, report = read([path])
    assert [d.text for d in docs] == ["kept.", "also kept."]
    assert report.skipped == {"bad_json": 1} and report.examples["bad_json"] == [f"{path}[2]"]


def test_json_array_element_over_the_limit_ends_the_file_as_too_long(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_READ_CHUNK", 16)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"text": "small."}, {"text": "z" * 5000}, {"text": "never read."}]))
    docs, report = read([path], max_bytes=200)
    assert [d.text for d in docs] == ["small."] and report.skipped == {"too_long": 1}


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"text": "one."}\n{"text": "two."}\n')
    assert [d.text for d in read([path])[0]] == ["one.", "two."]


def test_parquet_is_read_in_batches_with_nulls_and_missing_columns_counted(tmp_path):
    texts = [f"Row {i}." if i % 7 else None for i in range(3000)]
    table = pa.table({"text": texts, "id": list(range(3000))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=500)
    docs, report = read([tmp_path / "a.parquet"])
    assert [(d.index, d.text) for d in docs] == [(i, t) for i, t in enumerate(texts) if t is not None]
    assert report.skipped == {"not_string": 429}
    _, report = read([tmp_path / "a.parquet"], keys=("content",))
    assert report.skipped == {"missing_key": 3000}


def test_binary_parquet_column_is_decoded_and_invalid_utf8_counted(tmp_path):
    values = ["Fine bytes ✓.".encode(), b"\xff\xfe broken", None]
    pq.write_table(pa.table({"text": pa.array(values, pa.binary())}), tmp_path / "b.parquet")
    docs, report = read([tmp_path / "b.parquet"])
    assert [(d.index, d.text) for d in docs] == [(0, "Fine bytes ✓.")]
    assert report.skipped == {"not_utf8": 1, "not_string": 1}


def test_truncated_parquet_raises_an_error_naming_the_file(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["A.", "B."]}), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorpusError, match=r"cut\.parquet.*truncated or corrupt"):
        read([cut])


def write_hf_dataset(root: Path, shards: list[list[str]]) -> None:
    """The layout of datasets.Dataset.save_to_disk: Arrow IPC streams listed in state.json."""
    root.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, texts in zip(names, shards, strict=True):
        table = pa.table({"text": texts, "n": list(range(len(texts)))})
        with pa.ipc.new_stream(str(root / name), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=2):
                writer.write_batch(batch)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (root / "dataset_info.json").write_text("{}")


def test_hf_save_to_disk_directory_is_read_in_state_json_order(tmp_path):
    write_hf_dataset(tmp_path / "ds", [["a0.", "a1.", "a2."], ["b0.", "", "b2."]])
    docs, report = read(expand_inputs([str(tmp_path / "ds")]))
    assert [(d.index, d.text) for d in docs] == [(0, "a0."), (1, "a1."), (2, "a2."), (3, "b0."), (5, "b2.")]
    assert report.skipped == {"empty": 1}


def test_several_json_keys_are_joined_by_a_blank_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Q?", "answer": "A."}\n{"question": "Only Q?"}\n')
    docs, report = read([path], keys=("question", "answer"))
    assert [d.text for d in docs] == ["Q?\n\nA."] and report.skipped == {"missing_key": 1}


def test_inputs_expand_files_globs_and_directories_in_a_stable_order(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "sub/c.parquet", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["a.jsonl", "b.jsonl", "c.parquet"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")])] == [
        "a.jsonl", "b.jsonl"]
    with pytest.raises(CorpusError, match="unsupported"):
        expand_inputs([str(tmp_path / "notes.txt")])
    with pytest.raises(CorpusError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(CorpusError, match="matches no"):
        expand_inputs([str(tmp_path / "*.csv")])


def test_dataset_dict_directory_asks_for_a_split(tmp_path):
    write_hf_dataset(tmp_path / "dd" / "train", [["x."]])
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(CorpusError, match="DatasetDict.*train"):
        expand_inputs([str(tmp_path / "dd")])


def test_splits_follow_the_paper():
    validation, warm, boot = Split.parse("validation"), Split.parse("0:1:20"), Split.parse("13:17:20")
    indices = range(100_000)
    assert [i for i in indices if validation.contains(i)][:3] == [0, 1000, 2000]
    warm_ids = {i for i in indices if warm.contains(i)}
    boot_ids = {i for i in indices if boot.contains(i)}
    assert len(warm_ids) == 5000 - 100 and 0 not in warm_ids and 20 in warm_ids and 1000 not in warm_ids
    assert len(boot_ids) == 20_000 and {i % 20 for i in boot_ids} == {13, 14, 15, 16}
    assert not warm_ids & boot_ids
    assert all(Split.parse("all").contains(i) for i in (0, 1, 999))
    for bad in ("train", "1:1:20", "0:21:20", "a:b:c", "0:1"):
        with pytest.raises(ValueError):
            Split.parse(bad)
