"""E-step layouts token for token (bolt-method.md), truncation rules, sharding and document parsing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from megatron_bolt.estep.work import EStepError, Item, all_keys, joint_sequence, posterior_prompt, shard_items

IDS = SimpleNamespace(bos=1, eos=2, sol=3, eol=4, prior=5, posterior=6)


def test_posterior_prompt_layout_and_left_truncation():
    item = Item(7, 3, prefix=[10, 11, 12, 13], suffix=[20, 21])
    assert posterior_prompt(item, IDS, 100) == ([1, 10, 11, 12, 13, 3, 4, 20, 21, 3, 6], 4)
    # 9 tokens: BOS + 6 of the tail leave 2 prefix tokens, taken from the right (nearest the chunk).
    assert posterior_prompt(item, IDS, 9) == ([1, 12, 13, 3, 4, 20, 21, 3, 6], 2)
    assert posterior_prompt(item, IDS, 7) == ([1, 3, 4, 20, 21, 3, 6], 0)
    assert posterior_prompt(item, IDS, 6) is None


def test_joint_sequence_layout_and_truncation_order():
    item = Item(7, 3, prefix=[10, 11, 12], suffix=[20, 21, 22])
    z = [30, 31]
    seq, first = joint_sequence(item, z, IDS, 100)
    assert seq == [1, 10, 11, 12, 3, 5, 30, 31, 4, 20, 21, 22] and first == 4 and seq[first] == IDS.sol
    seq, first = joint_sequence(item, z, IDS, 10)  # prefix goes first ...
    assert seq == [1, 12, 3, 5, 30, 31, 4, 20, 21, 22] and first == 2
    seq, first = joint_sequence(item, z, IDS, 7)  # ... then the end of the suffix
    assert seq == [1, 3, 5, 30, 31, 4, 20] and first == 1


class CharTokenizer:
    ids = IDS

    def encode(self, text):
        return [100 + ord(c) % 50 for c in text]


def _docs(tmp_path, docs):
    path = tmp_path / "docs-00000.jsonl"
    path.write_text("".join(json.dumps({"doc_id": d, "chunks": c}) + "\n" for d, c in docs))
    (tmp_path / "docs.report.json").write_text("{}")  # prepare's side files are not documents
    return [str(tmp_path)]


def test_shards_partition_items_with_raw_prefixes(tmp_path):
    docs = [(0, ["Q: a", "A: b", "Q: c", "A: d"]), (5, ["A: e"]), (9, ["Q: f", "A: g"])]
    paths = _docs(tmp_path, docs)
    tok = CharTokenizer()
    shards = [list(shard_items(paths, tok, s, 2, prefix_chunks=2, chunk_pattern="^A:")) for s in range(2)]
    assert [i.key for i in shards[0]] == [(0, 1), (0, 3), (9, 1)]
    assert [i.key for i in shards[1]] == [(5, 0)]
    item = shards[0][1]
    assert item.prefix == tok.encode("A: b") + tok.encode("Q: c") and item.suffix == tok.encode("A: d")
    assert all_keys(paths, 2, "^A:") == [[i.key for i in s] for s in shards]
    every = list(shard_items(paths, tok, 0, 1, prefix_chunks=3, chunk_pattern=None))
    assert len(every) == 7 and every[0].prefix == []


def test_malformed_documents_fail_with_their_place(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"doc_id": 1, "chunks": ["x"]}\n{"doc_id": "two", "chunks": []}\n')
    with pytest.raises(EStepError, match="bad.jsonl:2"):
        list(shard_items([str(tmp_path / "bad.jsonl")], CharTokenizer(), 0, 1, 3, None))
    (tmp_path / "bad.jsonl").write_text('{"text": "not prepared"}\n')
    with pytest.raises(EStepError, match="expected a prepared document"):
        all_keys([str(tmp_path / "bad.jsonl")], 1, None)
    with pytest.raises(EStepError, match="matches no file"):
        all_keys([str(tmp_path / "missing*.jsonl")], 1, None)
    with pytest.raises(EStepError, match="estep.documents is empty"):
        all_keys([], 1, None)
