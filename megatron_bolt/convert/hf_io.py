"""``bolt import-hf`` / ``bolt export-hf``: Hugging Face Llama directories <-> bolt distributed checkpoints.

    bolt import-hf --hf-dir TinyLlama-1.1B --out ckpt/base [--tp 2 --pp 1]
    bolt export-hf --ckpt ckpt/base --out hf/base

Import reads ``config.json`` and ``*.safetensors`` (a single file or a sharded index) with safetensors only
(no network), translates the config (``llama.model_config_from_hf``), adds the four latent tokens to the
tokenizer when missing and gives them fresh embedding and output rows (N(0, hidden^-0.5) clamped at 3 sigma,
drawn from a generator seeded by ``train.seed``; existing rows are copied bit for bit), maps the weights
into a TP=1 model (built by ``build_model`` in a world of one) and saves it with ``checkpoint.dist``.
The checkpoint root then holds::

    OUT/config.yaml        the resolved BoltConfig (model section from the HF config)
    OUT/tokenizer/         the tokenizer, latent tokens included
    OUT/step_00000000/     the distributed checkpoint (bolt_meta.json records the source and --tp/--pp)
    OUT/latest

``--tp``/``--pp`` are validated against the model (heads, query groups, padded vocabulary, layers) and
recorded in config.yaml, but the tensors are saved unsharded: dist_checkpointing reshards on load, so the
checkpoint loads at any TP/PP layout, not only the one named here.

Export loads a checkpoint saved at any TP/PP into a TP=1 model (world of one), maps it back with
``megatron_to_hf``, trims the vocabulary padding and writes ``model.safetensors`` (sharded with an index
above ``max_shard_bytes``), ``config.json``, ``generation_config.json`` and the tokenizer into a temporary
sibling directory that is renamed into place when complete. Weights are written in the dtype recorded at
import (``hf_torch_dtype`` in bolt_meta.json), else float32.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_bolt.config.schema import BoltConfig, ConfigError

log = logging.getLogger(__name__)

CONFIG_YAML = "config.yaml"
TOKENIZER_DIR = "tokenizer"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")


class ConversionError(RuntimeError):
    """An input that cannot be converted; the message says what is missing or unsupported."""


# ----------------------------------------------------------------------------------------------- HF reading


class SafetensorsWeights(Mapping):
    """Lazy name -> tensor view over a directory's safetensors files (one file or a sharded index)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            extra = " (found PyTorch .bin weights: re-save them with safe_serialization=True)" if any(
                self.dir.glob("*.bin")) else ""
            raise ConversionError(f"{self.dir} holds no *.safetensors weights{extra}")
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise ConversionError(f"{index} names missing weight files: {', '.join(missing)}")
        from safetensors import safe_open

        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._where = weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def dtype(self) -> torch.dtype | None:
        for name in self._where:
            if "embed_tokens" in name:
                return self[name].dtype
        return None


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"--hf-dir {hf_dir} is not a directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ConversionError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    if hf.get("model_type") not in ("llama", "mistral"):
        raise ConversionError(
            f"{path}: model_type {hf.get('model_type')!r} is not supported; import-hf converts Llama-family "
            "models (model_type llama/mistral, e.g. Llama 2/3, TinyLlama)"
        )
    return hf


def latent_row_init(num_rows: int, dim: int, seed: int) -> torch.Tensor:
    """Rows N(0, dim^-0.5) clamped at 3 sigma, float32, deterministic in ``seed`` (bolt-method.md)."""
    std = dim**-0.5
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_rows, dim, generator=gen, dtype=torch.float32) * std
    return rows.clamp_(-3 * std, 3 * std)


def _with_new_rows(weight: torch.Tensor, vocab: int, new_ids: list[int], seed: int) -> torch.Tensor:
    """``weight`` grown to ``vocab`` rows; ``new_ids`` get fresh rows, every other existing row is kept."""
    out = torch.zeros(vocab, weight.shape[1], dtype=torch.float32)
    out[: weight.shape[0]] = weight.float()
    if new_ids:
        out[new_ids] = latent_row_init(len(new_ids), weight.shape[1], seed)
    return out


class _Grown(Mapping):
    """The HF weights with the vocabulary tensors replaced by their grown versions."""

    def __init__(self, base: Mapping, replaced: dict[str, torch.Tensor]):
        self.base, self.replaced = base, replaced

    def __getitem__(self, name):
        return self.replaced[name] if name in self.replaced else self.base[name]

    def __contains__(self, name):
        return name in self.replaced or name in self.base

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)


def _conversion_config(cfg: BoltConfig) -> BoltConfig:
    """A world-of-one, fp32 copy of ``cfg`` for building the model that carries tensors in and out."""
    conv = copy.deepcopy(cfg)
    conv.parallel = type(cfg.parallel)()
    conv.train.precision = "fp32"
    conv.data.seq_length = min(conv.data.seq_length, conv.model.max_position_embeddings)
    return conv


def _megatron_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


# ------------------------------------------------------------------------------------------------- import


def import_hf(cfg: BoltConfig, hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Convert ``hf_dir`` into a bolt checkpoint root ``out``; returns the published step directory."""
    from transformers import AutoTokenizer

    from megatron_bolt.checkpoint import dist as ckpt
    from megatron_bolt.config.loader import dump_yaml
    from megatron_bolt.convert import llama
    from megatron_bolt.convert.mapping import hf_to_megatron
    from megatron_bolt.data.tokenizer import LATENT_TOKENS, add_latent_tokens
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed

    hf_dir, out = Path(hf_dir), Path(out)
    hf_config = read_hf_config(hf_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} exists and is not empty: choose a new checkpoint directory")
    weights = SafetensorsWeights(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer.model").is_file():
        raise ConversionError(f"{hf_dir} has no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as exc:  # noqa: BLE001 - surface the transformers error with the directory named
        raise ConversionError(f"cannot load the tokenizer in {hf_dir}: {exc}") from exc

    base_vocab = int(hf_config["vocab_size"])
    vocab = hf_tok.get_vocab()
    present = {t: vocab[t] for t in LATENT_TOKENS if t in vocab}
    tokenizer = add_latent_tokens(hf_tok)
    new_ids = sorted({getattr(tokenizer.ids, f) for f in ("sol", "eol", "prior", "posterior")} - set(present.values()))
    new_vocab = max(base_vocab, tokenizer.vocab_size)
    new_ids = sorted(set(new_ids) | set(range(base_vocab, new_vocab)))
    if any(i < base_vocab for i in new_ids):
        log.warning("latent token ids %s fall inside the HF embedding (%d rows): those rows are re-initialised",
                    [i for i in new_ids if i < base_vocab], base_vocab)

    model_cfg = llama.model_config_from_hf(
        hf_config, vocab_size=new_vocab, transformer_impl=cfg.model.transformer_impl,
        attention_backend=cfg.model.attention_backend,
        make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
    )
    cfg = copy.deepcopy(cfg)
    cfg.model = model_cfg
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.data.seq_length = min(cfg.data.seq_length, model_cfg.max_position_embeddings)
    cfg.data.tokenizer = str((out / TOKENIZER_DIR).resolve())
    try:
        cfg.validate(tp * pp)
    except ConfigError as exc:
        raise ConversionError(f"--tp {tp} --pp {pp} does not fit this model: {exc}") from None

    replaced = {}
    for name, seed_offset in (("model.embed_tokens.weight", 0), ("lm_head.weight", 1)):
        if name in weights and (new_ids or weights[name].shape[0] != new_vocab):
            replaced[name] = _with_new_rows(weights[name], new_vocab, new_ids, cfg.train.seed + seed_offset)
    if "model.embed_tokens.weight" not in weights:
        raise ConversionError(f"{hf_dir} has no model.embed_tokens.weight: not a Llama checkpoint")
    source = _Grown(weights, replaced)

    conv = _conversion_config(cfg)
    with distributed(conv):
        [model] = build_model(conv)
        table = llama.mapping_table(model_cfg.transformer_impl, model_cfg.tie_word_embeddings)
        try:
            state = hf_to_megatron(table, source, model_cfg, model_cfg.padded_vocab_size)
        except KeyError as exc:
            raise ConversionError(f"{hf_dir}: {exc.args[0]}") from None
        unexpected = sorted(set(weights) - set(_used_names(table, model_cfg)) - {"lm_head.weight"})
        unexpected = [n for n in unexpected if "rotary_emb" not in n]
        if unexpected:
            raise ConversionError(f"{hf_dir} has tensors the Llama mapping does not know: {unexpected[:5]}")
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ConversionError(f"mapped state does not fit the model: missing {missing[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]}")
        if torch.distributed.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save(out / TOKENIZER_DIR)
            (out / CONFIG_YAML).write_text(dump_yaml(cfg))
        dtype = weights.dtype()
        meta = {
            "source": {"kind": "hf", "path": str(hf_dir.resolve()), "model_type": hf_config.get("model_type")},
            "hf_torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else "float32",
            "saved_layout": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1},
            "requested_layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
            "new_vocab_rows": new_ids, "init_seed": cfg.train.seed,
        }
        step = ckpt.save_model(out, 0, [model], meta)
    log.info("imported %s -> %s (vocab %d -> %d, %d new rows)", hf_dir, step, base_vocab, new_vocab, len(new_ids))
    return step


def _used_names(table, model_cfg) -> list[str]:
    from megatron_bolt.convert.mapping import expand

    return [n for m in expand(table, model_cfg.num_layers) for n in m.hf_names()]


# ------------------------------------------------------------------------------------------------- export


def checkpoint_root(step: Path) -> Path:
    """The directory holding config.yaml for a resolved step directory (the step itself or its parent)."""
    for cand in (step, step.parent):
        if (cand / CONFIG_YAML).is_file():
            return cand
    raise ConversionError(
        f"{step} has no {CONFIG_YAML} (nor has {step.parent}): the model architecture is unknown. Checkpoints "
        "written by `bolt train` and `bolt import-hf` carry one in the checkpoint root"
    )


def load_checkpoint_config(ckpt_path: str | Path) -> tuple[Path, Path, BoltConfig]:
    """(step directory, checkpoint root, its BoltConfig) for a step directory or a checkpoint root."""
    from megatron_bolt.checkpoint import dist as ckpt
    from megatron_bolt.config.loader import load_config

    path = Path(ckpt_path)
    if not path.exists():
        raise ConversionError(f"checkpoint {path} does not exist")
    step = ckpt.resolve(path)
    if step is None:
        raise ConversionError(f"{path} holds no checkpoint")
    root = checkpoint_root(step)
    return step, root, load_config(root / CONFIG_YAML)


def find_tokenizer(root: Path, cfg: BoltConfig) -> Path | None:
    if (root / TOKENIZER_DIR).is_dir():
        return root / TOKENIZER_DIR
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).is_dir():
        return Path(cfg.data.tokenizer)
    return None


def save_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when above ``max_shard_bytes``."""
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in state.values())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def export_hf(ckpt_path: str | Path, out: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              dtype: str | None = None) -> Path:
    from megatron_bolt.checkpoint import dist as ckpt
    from megatron_bolt.convert import llama
    from megatron_bolt.convert.mapping import megatron_to_hf
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed

    out = Path(out)
    step, root, cfg = load_checkpoint_config(ckpt_path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} exists and is not empty: choose a new directory")
    tok_dir = find_tokenizer(root, cfg)
    if tok_dir is None:
        raise ConversionError(f"{root} has no {TOKENIZER_DIR}/ and config data.tokenizer is unset or missing")
    meta = ckpt.read_meta(step)
    dtype = dtype or meta.get("hf_torch_dtype", "float32")
    if dtype not in _DTYPES:
        raise ConversionError(f"unsupported export dtype {dtype!r}; one of {', '.join(_DTYPES)}")
    m = cfg.model
    if m.latent_thoughts_per_token:
        raise ConversionError(f"{step} is a continuous-latent-thought model (model.latent_thoughts_per_token="
                              f"{m.latent_thoughts_per_token}): a Llama export would drop its thought slots; serve it "
                              "with the 'ponder' generation backend instead")

    conv = _conversion_config(cfg)
    with distributed(conv):
        [model] = build_model(conv)
        ckpt.load_model(step, [model])
        table = llama.mapping_table(m.transformer_impl, m.tie_word_embeddings)
        hf_state = megatron_to_hf(table, _megatron_state(model), m)
        is_rank0 = torch.distributed.get_rank() == 0
    if not is_rank0:
        return out
    hf_state = {k: v.detach().to("cpu", _DTYPES[dtype]).contiguous() for k, v in hf_state.items()}

    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if len(hf_tok) != m.vocab_size:
        log.warning("tokenizer has %d tokens but model.vocab_size is %d", len(hf_tok), m.vocab_size)
    ids = {"bos_token_id": hf_tok.bos_token_id, "eos_token_id": hf_tok.eos_token_id}
    if hf_tok.pad_token_id is not None:
        ids["pad_token_id"] = hf_tok.pad_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_safetensors(hf_state, tmp, max_shard_bytes)
        config = llama.hf_config_from_model(m, torch_dtype=dtype, **ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"_from_model_config": True, **ids}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for f in tok_dir.iterdir():
            if f.is_file() and (f.name in _TOKENIZER_FILES or f.name.startswith("tokenizer")):
                shutil.copy2(f, tmp / f.name)
        (tmp / "bolt_export.json").write_text(json.dumps(
            {"checkpoint": str(step.resolve()), "step": meta.get("step"), "dtype": dtype}, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (%s, %.1f MB)", step, out, dtype,
             sum(t.numel() * t.element_size() for t in hf_state.values()) / 2**20)
    return out


# ----------------------------------------------------------------------------------------------- handlers


def _fail(cmd: str, exc: Exception) -> int:
    import sys

    print(f"bolt {cmd}: {exc}", file=sys.stderr)
    return 2


def import_main(cfg: BoltConfig, args) -> int:
    from megatron_bolt.checkpoint.dist import CheckpointError

    try:
        import_hf(cfg, args.hf_dir, args.out, tp=args.tp, pp=args.pp)
    except (ConversionError, CheckpointError, ConfigError, ValueError) as exc:
        return _fail("import-hf", exc)
    return 0


def export_main(cfg: BoltConfig, args) -> int:
    from megatron_bolt.checkpoint.dist import CheckpointError

    try:
        export_hf(args.ckpt, args.out)
    except (ConversionError, CheckpointError, ConfigError) as exc:
        return _fail("export-hf", exc)
    return 0


__all__ = ["ConversionError", "SafetensorsWeights", "export_hf", "import_hf", "latent_row_init"]
