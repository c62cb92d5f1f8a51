"""Problem files: JSONL, JSON, Parquet, Arrow and HF datasets directories; clear errors for bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_bolt.eval.tasks import EvalDataError, EvalItem, load_items, load_texts

GSM = [{"question": "Ann has 2 cats and gets 3 more. How many?", "answer": "2 + 3 = 5\n#### 5"},
       {"question": "A box holds 1,000 nails; 1 is used.", "answer": "999 remain.\n#### 999"}]
MATH = [{"problem": "What is $1/2 + 1/4$?", "solution": "Adding, $\\boxed{\\frac{3}{4}}$."},
        {"problem": "Solve $x+1=0$.", "solution": "irrelevant", "answer": "-1"}]


def write_arrow_stream(path, records):
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def save_to_disk_layout(root, records):
    """What datasets.Dataset.save_to_disk writes: Arrow stream shards listed in state.json."""
    root.mkdir(parents=True)
    write_arrow_stream(root / "data-00000-of-00001.arrow", records)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (root / "dataset_info.json").write_text("{}")


def test_jsonl_json_and_parquet(tmp_path):
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM))
    (tmp_path / "g.json").write_text(json.dumps(GSM))
    pq.write_table(pa.Table.from_pylist(GSM), tmp_path / "g.parquet")
    expected = [EvalItem(0, GSM[0]["question"], "5"), EvalItem(1, GSM[1]["question"], "999")]
    for name in ("g.jsonl", "g.json", "g.parquet"):
        assert load_items("gsm8k", str(tmp_path / name)) == expected
    assert load_items("gsm8k", str(tmp_path / "g.jsonl"), limit=1) == expected[:1]


def test_math_gold_is_the_answer_field_or_the_boxed_solution(tmp_path):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATH))
    assert [i.gold for i in load_items("math", str(tmp_path / "m.jsonl"))] == ["\\frac{3}{4}", "-1"]


def test_hf_datasets_directories(tmp_path):
    save_to_disk_layout(tmp_path / "single", GSM)
    assert [i.gold for i in load_items("gsm8k", str(tmp_path / "single"))] == ["5", "999"]

    dd = tmp_path / "dict"
    save_to_disk_layout(dd / "train", GSM[:1])
    save_to_disk_layout(dd / "test", GSM[1:])
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [i.gold for i in load_items("gsm8k", str(dd))] == ["999"]
    assert [i.gold for i in load_items("gsm8k", str(dd), split="train")] == ["5"]
    with pytest.raises(EvalDataError, match=r"has splits \['train', 'test'\], not eval.split='validation'"):
        load_items("gsm8k", str(dd), split="validation")

    hub = tmp_path / "hub" / "main"  # a hub snapshot: one Parquet file per split
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM[:1]), hub / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(GSM[1:]), hub / "test-00000-of-00001.parquet")
    assert [i.gold for i in load_items("gsm8k", str(tmp_path / "hub"))] == ["999"]


def test_clear_errors(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        load_items("math", str(tmp_path / "missing.jsonl"))
    with pytest.raises(EvalDataError, match="set eval.data_path.*eval.jsonl"):
        load_items("embedded", None)
    (tmp_path / "m.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(EvalDataError, match=r"record 0 does not fit the math task, which needs 'problem' and "
                                            r"'answer' .*found keys \['answer', 'question'\]"):
        load_items("math", str(tmp_path / "m.jsonl"))
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(EvalDataError, match="ending in '#### NUMBER'"):
        load_items("gsm8k", str(tmp_path / "g.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(EvalDataError, match="neither JSON lines nor a JSON array"):
        load_items("gsm8k", str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="holds no"):
        load_items("gsm8k", str(tmp_path / "empty"))


def test_perplexity_texts(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"txt": "c"}) + "\n")
    assert load_texts(str(tmp_path / "t.jsonl"), limit=1) == ["a b"]
    with pytest.raises(EvalDataError, match=r"record 1 has no string 'text' \(found keys \['txt'\]\)"):
        load_texts(str(tmp_path / "t.jsonl"))
