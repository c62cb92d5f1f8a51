"""`bolt estep` end to end on the embedded corpus with the HF backend and a briefly trained tiny model.

One uninterrupted run (world of one) is the reference. A second run is SIGKILLed while sampling and then
finished by a torchrun launch of 2 ranks (shards split across ranks, scoring data-parallel): its samples and
resampled latents must be identical and its scores agree to 1e-5. Log q from the HF engine is recomputed by
the Megatron scorer (`estep.rescore_q`, the `bolt score` path) and must agree to 1e-4 nats per sequence.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_bolt.config.loader import dump_yaml, load_config
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

ESTEP = ["estep.num_shards=2", "estep.sampling.num_samples=2", "estep.sampling.max_new_tokens=32",
         "estep.sampling.batch_size=4", "estep.context_length=256", 'estep.chunk_pattern="^A:"',
         "estep.rescore_q=true", "train.micro_batch_size=4"]


def _env():
    launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    return {**{k: v for k, v in os.environ.items() if k not in launcher}, "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}


def _bolt(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "megatron_bolt.cli", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        raise AssertionError(proc.stderr[-5000:])
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron_bolt.config.schema import PrepareConfig
    from megatron_bolt.data.builder import build_joint_dataset
    from megatron_bolt.data.embedded import generate_embedded
    from megatron_bolt.data.jsonl import expand_paths
    from megatron_bolt.data.prepare import run_prepare
    from megatron_bolt.data.tokenizer import BoltTokenizer
    from megatron_bolt.recipes import tiny_cpu_quickstart

    tmp = tmp_path_factory.mktemp("estep")
    corpus = generate_embedded(tmp / "corpus", 120, seed=0, num_eval=0)
    run_prepare(PrepareConfig(input=[str(corpus.corpus)], output_prefix=str(tmp / "prep" / "docs"), chunk_lambda=0),
                progress=False)
    build_joint_dataset(expand_paths([str(tmp / "prep")], "documents"), [corpus.latents], str(corpus.tokenizer),
                        tmp / "data" / "joint", seed=0)
    cfg = load_config(None, [], base=tiny_cpu_quickstart())
    cfg.data.tokenizer, cfg.data.data_prefix = str(corpus.tokenizer), [str(tmp / "data" / "joint")]
    cfg.model.vocab_size = BoltTokenizer.from_pretrained(corpus.tokenizer).vocab_size
    cfg.train.train_iters, cfg.train.micro_batch_size, cfg.train.global_batch_size = 40, 4, 4
    cfg.train.checkpoint.save = str(tmp / "ckpt")
    (tmp / "train.yaml").write_text(dump_yaml(cfg))
    _bolt("train", "--config", str(tmp / "train.yaml"))
    # Ten documents are enough for the E-step: keep the first shard file's first ten lines.
    docs = sorted((tmp / "prep").glob("docs-*.jsonl"))[0].read_text().splitlines()[:10]
    (tmp / "bootstrap").mkdir()
    (tmp / "bootstrap" / "docs.jsonl").write_text("\n".join(docs) + "\n")
    return tmp


def _args(tmp: Path, out: Path, *extra):
    return ["estep", "--ckpt", str(tmp / "ckpt"), f"estep.documents=[{tmp / 'bootstrap'}]",
            f"estep.output_dir={out}", *ESTEP, *extra]


def _lines(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_estep_end_to_end_kill_and_resume(trained, launch):
    ref = trained / "ref"
    _bolt(*_args(trained, ref))
    summary = json.loads((ref / "estep.json").read_text())
    docs = _lines(trained / "bootstrap" / "docs.jsonl")
    keys = [(d["doc_id"], c) for d in docs for c in range(1, len(d["chunks"]), 2)]
    assert summary["chunks"] == len(keys) and summary["samples"] == 2 * len(keys)
    diag = _lines(ref / "diagnostics.jsonl")
    assert sorted((d["doc_id"], d["chunk_index"]) for d in diag) == sorted(keys)
    latents = _lines(ref / "latents.jsonl")
    assert len(latents) == summary["with_latent"] == sum(d["chosen"] is not None for d in diag) > 0
    assert summary["with_latent"] + summary["no_valid_sample"] + summary["too_long"] == len(keys)
    samples = {(r["doc_id"], r["chunk_index"]): r for f in sorted((ref / "samples").glob("*.jsonl"))
               for r in _lines(f)}
    for lat, d in zip(latents, [d for d in diag if d["chosen"] is not None], strict=True):
        chosen = samples[(lat["doc_id"], lat["chunk_index"])]["samples"][d["chosen"]]
        assert chosen["token_ids"][:-1] == lat["latent_token_ids"] and chosen["valid"]
    assert summary["rescore_q_abs_diff"]["max"] < 1e-4  # HF engine log q == Megatron (bolt score) log q
    assert summary["sampling"]["generated_tokens"] == sum(len(s["token_ids"]) for r in samples.values()
                                                          for s in r["samples"])

    # Killed while sampling, then finished by two ranks.
    out = trained / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_bolt.cli", *_args(trained, out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / "samples" / "shard-00000.jsonl.partial"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if partial.is_file() and partial.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "estep.json").exists() and partial.is_file(), "the kill must land mid-shard"
    launch(["-m", "megatron_bolt.cli", *_args(trained, out)], nproc=2)
    for name in ("shard-00000.jsonl", "shard-00001.jsonl"):
        assert (out / "samples" / name).read_bytes() == (ref / "samples" / name).read_bytes()
        for a, b in zip(_lines(out / "scores" / name), _lines(ref / "scores" / name), strict=True):
            assert a["log_p"] == pytest.approx(b["log_p"], abs=1e-5)
    assert (out / "latents.jsonl").read_bytes() == (ref / "latents.jsonl").read_bytes()

    # The latents feed bolt build-dataset as they are.
    from megatron_bolt.data.builder import build_joint_dataset

    meta = build_joint_dataset([trained / "bootstrap" / "docs.jsonl"], [ref / "latents.jsonl"],
                               str(trained / "corpus" / "tokenizer"), trained / "next" / "joint", seed=0)
    assert meta["counts"]["chunks_with_latent"] == len(latents)


def test_merge_refuses_missing_or_duplicated_chunks_and_changed_settings(trained, tmp_path):
    import shutil

    from megatron_bolt.estep.run import run_estep
    from megatron_bolt.estep.work import EStepError

    ref = trained / "ref"
    if not (ref / "estep.json").exists():
        pytest.skip("needs the end-to-end test's reference run")
    broken = tmp_path / "broken"
    shutil.copytree(ref, broken)
    (broken / "estep.json").unlink()
    ckpt = str(trained / "ckpt")

    def cfg(out, *extra):
        return load_config(None, [f"estep.documents=[{trained / 'bootstrap'}]", f"estep.output_dir={out}", *ESTEP,
                                  *extra])

    scores = broken / "scores" / "shard-00001.jsonl"
    lines = scores.read_text().splitlines(keepends=True)
    scores.write_text("".join(lines[:-1]))
    with pytest.raises(EStepError, match="1 missing"):
        run_estep(cfg(broken), ckpt, stage="merge")
    scores.write_text("".join(lines + lines[-1:]))
    with pytest.raises(EStepError, match="1 duplicated"):
        run_estep(cfg(broken), ckpt, stage="merge")
    scores.write_text("".join(lines))
    assert run_estep(cfg(broken), ckpt, stage="merge") == json.loads((ref / "estep.json").read_text())
    with pytest.raises(EStepError, match=r"other settings \(differing: sampling\)"):
        run_estep(cfg(broken, "estep.sampling.seed=5"), ckpt, stage="merge")
    with pytest.raises(EStepError, match="exact proposal"):
        run_estep(cfg(tmp_path / "t", "estep.sampling.temperature=0.7"), ckpt, stage="sample")
