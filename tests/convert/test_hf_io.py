"""``bolt import-hf`` / ``bolt export-hf`` round trip on a small random GQA Llama saved with save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_llama

from megatron_bolt import cli
from megatron_bolt.convert.hf_io import ConversionError, export_hf, import_hf, latent_row_init
from megatron_bolt.data.tokenizer import LATENT_TOKENS

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

TRAIN_VOCAB = 300


def make_tokenizer(path):
    """A byte-level BPE fast tokenizer *without* the latent tokens (as a base model would ship)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TRAIN_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["the cat sat on the mat, 1 + 2 = 3. " * 20, "a quick brown fox jumps"], trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
    hf.save_pretrained(str(path))
    return hf


def make_hf_model(path, vocab, seed=0, max_positions=64):
    model = random_llama(vocab, seed=seed, max_positions=max_positions, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tok = make_tokenizer(path)
    make_hf_model(path, len(tok))
    return path


@pytest.fixture(scope="module")
def base(hf_dir):
    """The base vocabulary (the trained BPE may stop short of TRAIN_VOCAB)."""
    return json.loads((hf_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def round_trip(hf_dir, tmp_path_factory):
    from megatron_bolt.config import BoltConfig

    tmp = tmp_path_factory.mktemp("rt")
    cfg = BoltConfig()
    step = import_hf(cfg, hf_dir, tmp / "ckpt", tp=2, pp=2)
    out = export_hf(tmp / "ckpt", tmp / "export", max_shard_bytes=200_000)  # force several shards
    return {"ckpt": tmp / "ckpt", "step": step, "export": out, "seed": cfg.train.seed}


def _read_all(directory):
    from megatron_bolt.convert.hf_io import SafetensorsWeights

    w = SafetensorsWeights(directory)
    return {k: w[k] for k in w}


def test_checkpoint_layout(round_trip, base):
    ckpt = round_trip["ckpt"]
    assert (ckpt / "config.yaml").is_file() and (ckpt / "tokenizer" / "tokenizer.json").is_file()
    assert (ckpt / "latest").read_text().strip() == round_trip["step"].name
    meta = json.loads((round_trip["step"] / "bolt_meta.json").read_text())
    assert meta["requested_layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    assert meta["new_vocab_rows"] == list(range(base, base + 4))
    from megatron_bolt.config.loader import load_config

    cfg = load_config(ckpt / "config.yaml")
    assert cfg.model.vocab_size == base + 4 and cfg.model.num_query_groups == 2
    assert cfg.parallel.tensor_model_parallel_size == 2


def test_export_is_bit_identical_on_original_tensors(hf_dir, round_trip, base):
    original, exported = _read_all(hf_dir), _read_all(round_trip["export"])
    assert set(original) == set(exported)
    assert (round_trip["export"] / "model.safetensors.index.json").is_file()
    for name, t in original.items():
        e = exported[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert e.shape == (base + 4, t.shape[1])
            e = e[:base]
        assert e.dtype == t.dtype and torch.equal(e, t), name


def test_latent_rows_are_seeded_and_clamped(round_trip, base):
    exported = _read_all(round_trip["export"])
    dim = 64
    std = dim**-0.5
    for offset, name in enumerate(("model.embed_tokens.weight", "lm_head.weight")):
        rows = exported[name][base:]
        assert rows.shape == (4, dim)
        assert rows.abs().max() <= 3 * std + 1e-7
        assert 0.5 * std < rows.std() < 1.5 * std
        torch.testing.assert_close(rows, latent_row_init(4, dim, round_trip["seed"] + offset), rtol=0, atol=0)
    assert not torch.equal(exported["model.embed_tokens.weight"][base:], exported["lm_head.weight"][base:])


def test_export_loads_in_transformers_with_same_logits(hf_dir, round_trip, base):
    original = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(round_trip["export"])).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(round_trip["export"]))
    assert all(t in tok.get_vocab() for t in LATENT_TOKENS) and len(tok) == base + 4
    config = json.loads((round_trip["export"] / "config.json").read_text())
    assert config["bos_token_id"] == tok.bos_token_id and config["eos_token_id"] == tok.eos_token_id
    assert (round_trip["export"] / "generation_config.json").is_file()
    tokens = torch.randint(0, base, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = original(tokens).logits
        b = exported(tokens).logits
    assert torch.equal(a, b[..., :base])


def test_reimport_of_export_adds_no_rows(round_trip, tmp_path):
    from megatron_bolt.config import BoltConfig

    step = import_hf(BoltConfig(), round_trip["export"], tmp_path / "again")
    assert json.loads((step / "bolt_meta.json").read_text())["new_vocab_rows"] == []


def test_refusals(hf_dir, round_trip, tmp_path):
    from megatron_bolt.config import BoltConfig

    cfg = BoltConfig()
    with pytest.raises(ConversionError, match="no config.json"):
        import_hf(cfg, tmp_path, tmp_path / "o1")
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConversionError, match="model_type 'gpt2' is not supported"):
        import_hf(cfg, bad, tmp_path / "o2")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ConversionError, match="no \\*.safetensors"):
        import_hf(cfg, noweights, tmp_path / "o3")
    with pytest.raises(ConversionError, match="does not fit this model"):
        import_hf(cfg, hf_dir, tmp_path / "o4", tp=3)
    with pytest.raises(ConversionError, match="not empty"):
        import_hf(cfg, hf_dir, round_trip["ckpt"])
    # a checkpoint without config.yaml
    import shutil

    naked = tmp_path / "naked"
    shutil.copytree(round_trip["ckpt"], naked)
    (naked / "config.yaml").unlink()
    with pytest.raises(ConversionError, match="config.yaml"):
        export_hf(naked, tmp_path / "o5")
    # CLI wiring: clear message, exit status 2
    assert cli.main(["export-hf", "--ckpt", str(naked), "--out", str(tmp_path / "o6")]) == 2
    assert cli.main(["import-hf", "--hf-dir", str(bad), "--out", str(tmp_path / "o7")]) == 2
