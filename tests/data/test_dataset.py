"""Packed rows over joint datasets: exact rows and masks, shuffled epochs, DP sharding, resumption, blends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_bolt.data.builder import Segment, build_joint_dataset, prior_layout
from megatron_bolt.data.dataset import BlendedRows, JointDataset, parse_blend, rank_batches, rank_rows
from megatron_bolt.data.tokenizer import train_embedded_tokenizer

SEED = 11


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = ["Sentence number 12 is here. ", "A latent: 3*4=12 so twelve. "] * 20
    return train_embedded_tokenizer(texts, out, vocab_size=300), str(out)


def build(directory: Path, tok_dir: str, docs: list[dict], latents: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "l.jsonl").write_text("".join(json.dumps(x) + "\n" for x in latents))
    build_joint_dataset([directory / "d.jsonl"], [directory / "l.jsonl"], tok_dir, directory / "joint",
                        seed=SEED, show_progress=False)
    return directory / "joint"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok):
    """40 documents of 1-4 chunks, every other chunk with a latent."""
    docs = [{"doc_id": i, "chunks": [f"Doc {i} sentence {j}. " * (1 + (i + j) % 3) for j in range(1 + i % 4)]}
            for i in range(40)]
    latents = [{"doc_id": d["doc_id"], "chunk_index": j, "latent": f"because {d['doc_id']}*{j}"}
               for d in docs for j in range(len(d["chunks"])) if (d["doc_id"] + j) % 2 == 0]
    return build(tmp_path_factory.mktemp("corpus"), tok[1], docs, latents), docs


def documents(tokens: np.ndarray, bos: int) -> list[tuple[int, ...]]:
    starts = np.flatnonzero(tokens == bos).tolist() + [len(tokens)]
    return [tuple(tokens[a:b].tolist()) for a, b in zip(starts, starts[1:], strict=False)]


def test_one_document_row_matches_the_hand_built_sequence_and_masks(tmp_path, tok):
    hf, tok_dir = tok
    doc = {"doc_id": 3, "chunks": ["Raw first. ", "With latent. ", "Raw last."]}
    prefix = build(tmp_path, tok_dir, [doc], [{"doc_id": 3, "chunk_index": 1, "latent_token_ids": [40, 41]}])
    ids, (x0, x1, x2) = hf.ids, (hf.encode(c) for c in doc["chunks"])
    if prior_layout(SEED, 3, 1):
        unit = [ids.sol, ids.prior, 40, 41, ids.eol, *x1]
    else:
        unit = [ids.sol, ids.eol, *x1, ids.sol, ids.posterior, 40, 41, ids.eol]
    sequence = [ids.bos, *x0, *unit, *x2, ids.eos]
    raw = [False, *[True] * len(x0), *[False] * len(unit), *[True] * len(x2), False]
    n = len(sequence) - 1
    for loss_on_raw in (True, False):
        row = JointDataset(prefix, n, seed=0, loss_on_raw=loss_on_raw)[0]
        assert row["tokens"].tolist() == sequence[:-1] and row["labels"].tolist() == sequence[1:]
        want = [1.0] * n if loss_on_raw else [0.0 if r else 1.0 for r in raw[1:]]
        assert row["loss_mask"].tolist() == want
        assert row["position_ids"].tolist() == list(range(n))
        dtypes = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                  "position_ids": torch.int64}
        assert {k: v.dtype for k, v in row.items()} == dtypes


def test_rows_pack_a_shuffled_stream_that_reshuffles_every_epoch(corpus, tok):
    prefix, docs = corpus
    bos = tok[0].ids.bos
    ds = JointDataset(prefix, 32, seed=5, loss_on_raw=False)
    total = ds.tokens_per_epoch
    for i in (0, 1, len(ds) - 1, len(ds), 3 * len(ds) + 2):  # also rows straddling and past epoch ends
        tokens, kinds = ds.read(i * 32, 33)
        row = ds[i]
        assert row["tokens"].tolist() == tokens[:-1].tolist()
        assert row["labels"].tolist() == tokens[1:].tolist()
        assert row["loss_mask"].tolist() == (kinds[1:] != Segment.RAW).astype(np.float32).tolist()
    epoch0, epoch1 = ds.read(0, total)[0], ds.read(total, total)[0]
    in_file_order = [tuple(t.tolist()) for t in ds._tokens[0:len(docs)]]
    assert sorted(documents(epoch0, bos)) == sorted(in_file_order) == sorted(documents(epoch1, bos))
    assert documents(epoch0, bos) != in_file_order and documents(epoch0, bos) != documents(epoch1, bos)
    other_seed = JointDataset(prefix, 32, seed=6, cache_dir=ds.cache_dir)
    assert documents(other_seed.read(0, total)[0], bos) != documents(epoch0, bos)


def test_dp_ranks_get_disjoint_rows_that_cover_each_global_batch_and_the_epoch(corpus):
    ds = JointDataset(corpus[0], 16, seed=1)
    global_batch, steps = 4, math.ceil(len(ds) / 4)
    whole = rank_batches(ds, global_batch, 0, 1)
    ranks = [rank_batches(ds, global_batch, r, 2) for r in range(2)]
    seen: list[int] = []
    for step in range(steps):
        parts = [next(it) for it in ranks]
        full = next(whole)
        for key in full:
            assert torch.equal(torch.cat([p[key] for p in parts]), full[key])
        rows = [list(rank_rows(global_batch, r, 2, step)) for r in range(2)]
        assert not set(rows[0]) & set(rows[1])
        seen += rows[0] + rows[1]
    assert sorted(seen) == list(range(steps * global_batch)) and steps * global_batch >= len(ds)
    with pytest.raises(ValueError, match="does not split"):
        next(rank_batches(ds, 5, 0, 2))


def test_resuming_at_any_step_or_sample_gives_the_uninterrupted_rows(corpus, tmp_path):
    ds = JointDataset(corpus[0], 16, seed=2)
    run = rank_batches(ds, 6, 1, 3)
    uninterrupted = [next(run) for _ in range(9)]
    fresh = JointDataset(corpus[0], 16, seed=2, cache_dir=tmp_path)  # recomputes the epoch orders
    resumed = rank_batches(fresh, 6, 1, 3, start_step=7)
    for want in uninterrupted[7:]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert list(tmp_path.glob("joint.order-*-seed2-epoch0.npy"))
    for i in (0, 17, 2 * len(ds) + 1):
        assert torch.equal(fresh[i]["tokens"], ds[i]["tokens"])


def test_blend_follows_the_weights_and_reads_each_source_in_order(corpus, tok, tmp_path):
    docs = [{"doc_id": i, "chunks": [f"Other corpus {i}. " * 3]} for i in range(10)]
    second = JointDataset(build(tmp_path, tok[1], docs, []), 16, seed=1)
    first = JointDataset(corpus[0], 16, seed=1)
    blend = BlendedRows([first, second], [1.0, 3.0], size=16)
    assert np.bincount(blend.dataset_index).tolist() == [4, 12]
    for i in range(16):
        source = (first, second)[blend.dataset_index[i]]
        assert torch.equal(blend[i]["tokens"], source[int(blend.sample_index[i])]["tokens"])
    assert sorted(blend.sample_index[blend.dataset_index == 1].tolist()) == list(range(12))
    with pytest.raises(IndexError):
        blend[16]


def test_parse_blend_and_incomplete_datasets(tmp_path):
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        parse_blend(["0.3", "a", "b"])
    with pytest.raises(FileNotFoundError, match="not a complete joint dataset"):
        JointDataset(tmp_path / "missing", 16, seed=0)
