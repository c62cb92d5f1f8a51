"""The joint sequence builder: exact layouts, segment kinds, the join's error handling, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_bolt.cli import main as bolt
from megatron_bolt.data.builder import (
    KINDS_SUFFIX,
    BuildError,
    Segment,
    build_joint_dataset,
    prior_layout,
    read_sidecar,
)
from megatron_bolt.data.latents import LatentError
from megatron_bolt.data.tokenizer import train_embedded_tokenizer

TEXTS = ["Q: 12+30=? A: 42.", "The cat sat on the mat. ", "think: 12+30 is 42 because 2+0=2 and 1+3=4"] * 20
SEED = 7


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_embedded_tokenizer(TEXTS, out, vocab_size=300), str(out)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus(tmp_path: Path, n_docs: int = 12) -> tuple[list[dict], list[dict]]:
    """Documents of 3 chunks: chunk 0 gets a text latent, chunk 1 token ids (even docs only), chunk 2 none."""
    docs = [{"doc_id": 100 + i, "chunks": [f"Doc {i} part {j}. " for j in range(3)]} for i in range(n_docs)]
    latents = [{"doc_id": 100 + i, "chunk_index": 0, "latent": f"think: {i}+{i}={2 * i}"}
               for i in range(n_docs)]
    latents += [{"doc_id": 100 + i, "chunk_index": 1, "latent_token_ids": [40 + i, 7, 250, 33]}
                for i in range(0, n_docs, 2)]
    return docs, latents


def expected_document(doc: dict, latents: dict[tuple[int, int], list[int]], tok) -> tuple[list, list]:
    """The spec written out: BOS, per chunk `SOL PRIOR Z EOL X` / `SOL EOL X SOL POSTERIOR Z EOL` / X, EOS."""
    ids = tok.ids
    R, T, L, S, B = Segment.RAW, Segment.TEXT, Segment.LATENT, Segment.SPECIAL, Segment.BOUNDARY
    tokens, kinds = [ids.bos], [B]
    for c, text in enumerate(doc["chunks"]):
        x = tok.encode(text)
        z = latents.get((doc["doc_id"], c))
        if z is None:
            pieces = [(x, R)]
        elif prior_layout(SEED, doc["doc_id"], c):
            pieces = [([ids.sol, ids.prior], S), (z, L), ([ids.eol], S), (x, T)]
        else:
            pieces = [([ids.sol, ids.eol], S), (x, T), ([ids.sol, ids.posterior], S), (z, L), ([ids.eol], S)]
        for piece, kind in pieces:
            tokens += piece
            kinds += [kind] * len(piece)
    return tokens + [ids.eos], kinds + [B]


def latent_ids(latents: list[dict], tok) -> dict[tuple[int, int], list[int]]:
    return {(r["doc_id"], r["chunk_index"]): r.get("latent_token_ids") or tok.encode(r["latent"])
            for r in latents}


def read_back(prefix: Path) -> tuple[list[list[int]], list[list[int]]]:
    tokens, kinds = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}{KINDS_SUFFIX}")
    return [t.tolist() for t in tokens[0:len(tokens)]], [k.tolist() for k in kinds[0:len(kinds)]]


def test_coin_is_a_fair_pure_function_of_its_key():
    flips = [prior_layout(SEED, d, c) for d in range(200) for c in range(10)]
    assert 0.45 < np.mean(flips) < 0.55
    assert flips == [prior_layout(SEED, d, c) for d in range(200) for c in range(10)]
    assert flips != [prior_layout(SEED + 1, d, c) for d in range(200) for c in range(10)]


def test_build_dataset_command_writes_the_spec_layouts_token_for_token(tmp_path, tok):
    hf, tok_dir = tok
    docs, latents = corpus(tmp_path)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    write_jsonl(tmp_path / "latents.jsonl", latents)
    prefix = tmp_path / "out" / "joint"
    args = [f"data.tokenizer={tok_dir}", f"data.seed={SEED}", f"build.output_prefix={prefix}",
            f"build.documents=[{tmp_path / 'docs.jsonl'}]", f"build.latents=[{tmp_path / 'latents.jsonl'}]"]
    assert bolt(["build-dataset", *args]) == 0
    tokens, kinds = read_back(prefix)
    table = latent_ids(latents, hf)
    for doc, got_tokens, got_kinds in zip(docs, tokens, kinds, strict=True):
        want_tokens, want_kinds = expected_document(doc, table, hf)
        assert got_tokens == want_tokens and got_kinds == want_kinds
    meta = read_sidecar(prefix)
    counts = meta["counts"]
    assert counts["documents"] == 12 and counts["chunks"] == 36 and counts["chunks_with_latent"] == 18
    assert counts["prior"] > 0 and counts["posterior"] > 0 and counts["prior"] + counts["posterior"] == 18
    assert counts["raw_chunks"] == 18 and counts["latents_in_files"] == 18
    assert meta["tokens"]["total"] == sum(map(len, tokens))
    assert meta["tokens"]["latent"] == sum(k.count(Segment.LATENT) for k in kinds)
    assert meta["longest_document"]["tokens"] == max(map(len, tokens))
    assert meta["seed"] == SEED and meta["tokenizer"]["vocab_size"] == hf.vocab_size


def test_token_id_latents_are_used_verbatim(tmp_path, tok):
    hf, tok_dir = tok
    ids = [hf.ids.sol, 250, 250, 9, hf.ids.eos]  # never what re-tokenising the decoded text would give
    docs = [{"doc_id": 5, "chunks": ["Only chunk."]}]
    write_jsonl(tmp_path / "d.jsonl", docs)
    write_jsonl(tmp_path / "l.jsonl", [{"doc_id": 5, "chunk_index": 0, "latent_token_ids": ids}])
    build_joint_dataset([tmp_path / "d.jsonl"], [tmp_path / "l.jsonl"], tok_dir, tmp_path / "j", seed=SEED,
                        show_progress=False)
    (tokens,), _ = read_back(tmp_path / "j")
    assert tokens == expected_document(docs[0], {(5, 0): ids}, hf)[0]


@pytest.mark.parametrize("policy", ["truncate", "drop", "error"])
def test_long_latents_are_counted_and_handled_per_policy(tmp_path, tok, policy):
    hf, tok_dir = tok
    docs = [{"doc_id": 1, "chunks": ["a. ", "b. "]}]
    latents = [{"doc_id": 1, "chunk_index": 0, "latent_token_ids": [20, 21, 22, 23, 24]},
               {"doc_id": 1, "chunk_index": 1, "latent_token_ids": [30, 31]}]
    write_jsonl(tmp_path / "d.jsonl", docs)
    write_jsonl(tmp_path / "l.jsonl", latents)
    args = ([tmp_path / "d.jsonl"], [tmp_path / "l.jsonl"], tok_dir, tmp_path / "j")
    options = dict(seed=SEED, max_latent_tokens=3, long_latents=policy, show_progress=False)
    if policy == "error":
        with pytest.raises(BuildError, match="1 latents exceed max_latent_tokens=3"):
            build_joint_dataset(*args, **options)
        assert not Path(f"{tmp_path / 'j'}.json").exists()
        return
    meta = build_joint_dataset(*args, **options)
    (tokens,), _ = read_back(tmp_path / "j")
    kept = {(1, 0): [20, 21, 22], (1, 1): [30, 31]} if policy == "truncate" else {(1, 1): [30, 31]}
    assert tokens == expected_document(docs[0], kept, hf)[0]
    assert meta["counts"]["latents_too_long"] == 1
    assert meta["counts"][f"latents_{'truncated' if policy == 'truncate' else 'dropped'}"] == 1


def test_unknown_and_duplicate_latents_are_errors_with_counts(tmp_path, tok):
    _, tok_dir = tok
    docs, latents = corpus(tmp_path, n_docs=4)
    write_jsonl(tmp_path / "d.jsonl", docs)
    bad = latents + [{"doc_id": 999, "chunk_index": 0, "latent": "x"},
                     {"doc_id": 998, "chunk_index": 0, "latent": "y"},
                     {"doc_id": 100, "chunk_index": 3, "latent": "past the last chunk"}]
    write_jsonl(tmp_path / "bad.jsonl", bad)
    docs_file, out = tmp_path / "d.jsonl", tmp_path / "j"
    options = dict(seed=SEED, show_progress=False)
    with pytest.raises(BuildError) as err:
        build_joint_dataset([docs_file], [tmp_path / "bad.jsonl"], tok_dir, out, **options)
    assert "2 latents name a doc_id that is in no document file" in str(err.value)
    assert "1 latents name a chunk_index past the end" in str(err.value)
    write_jsonl(tmp_path / "dup.jsonl", latents + latents[:2])
    with pytest.raises(LatentError, match="2 duplicate latents"):
        build_joint_dataset([docs_file], [tmp_path / "dup.jsonl"], tok_dir, out, **options)
    write_jsonl(tmp_path / "dupdoc.jsonl", docs + docs[:1])
    with pytest.raises(BuildError, match="1 doc_ids occur in more than one document line"):
        build_joint_dataset([tmp_path / "dupdoc.jsonl"], [], tok_dir, out, **options)
    assert not list(tmp_path.glob("j*")) and not list(tmp_path.glob(".j*"))


def test_output_is_identical_for_any_worker_count_and_reruns_are_no_ops(tmp_path, tok):
    _, tok_dir = tok
    docs, latents = corpus(tmp_path, n_docs=30)
    shards = [write_jsonl(tmp_path / f"d{k}.jsonl", docs[k::3]) for k in range(3)]
    lat = [write_jsonl(tmp_path / f"l{k}.jsonl", latents[k::2]) for k in range(2)]
    outputs = {}
    for workers in (1, 3):
        prefix = tmp_path / f"w{workers}" / "joint"
        build_joint_dataset(shards, lat, tok_dir, prefix, seed=SEED, workers=workers, docs_per_task=4,
                            show_progress=False)
        suffixes = (".bin", ".idx", "_kinds.bin", "_kinds.idx", ".json")
        outputs[workers] = [Path(f"{prefix}{s}").read_bytes() for s in suffixes]
    assert outputs[1] == outputs[3]
    prefix = tmp_path / "w1" / "joint"
    stamp = Path(f"{prefix}.bin").stat().st_mtime_ns
    build_joint_dataset(shards, lat, tok_dir, prefix, seed=SEED, show_progress=False)
    assert Path(f"{prefix}.bin").stat().st_mtime_ns == stamp  # up to date: untouched
    meta = build_joint_dataset(shards, lat, tok_dir, prefix, seed=SEED + 1, show_progress=False)
    assert meta["seed"] == SEED + 1 and Path(f"{prefix}.bin").read_bytes() != outputs[1][0]
