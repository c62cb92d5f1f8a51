"""Shared fixtures and optional-backend filtering.

Markers (pyproject.toml) name what a test needs: ``te``, ``trtllm``, ``vllm``, ``gpu``, ``nemo``. Tests carrying one
are skipped with the reason when that backend cannot be imported here; ``slow`` and ``distributed`` tests
always run (CI included).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _te_reason() -> str | None:
    from megatron_bolt.models import te

    ok, why = te.available()
    return None if ok else f"transformer-engine not importable ({why})"


def _module_reason(name: str, extra: str) -> str | None:
    return None if importlib.util.find_spec(name) else f"{name} not installed (extra '{extra}')"


def _gpu_reason() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA device"


_BACKENDS = {
    "te": _te_reason,
    "trtllm": lambda: _module_reason("tensorrt_llm", "trtllm environment"),
    "nemo": lambda: _module_reason("nemo_run", "nemo"),
    "vllm": lambda: _module_reason("vllm", "a CUDA machine: pip install vllm"),
    "gpu": _gpu_reason,
}


def pytest_collection_modifyitems(config, items):
    reasons: dict[str, str | None] = {}
    for item in items:
        for marker, probe in _BACKENDS.items():
            if marker in item.keywords:
                if marker not in reasons:
                    reasons[marker] = probe()
                if reasons[marker]:
                    item.add_marker(pytest.mark.skip(reason=reasons[marker]))


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def launch():
    """launch(script_args, nproc=1, timeout=600) -> CompletedProcess; nproc > 1 goes through torchrun (gloo)."""
    import subprocess

    def run(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
        launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"}
        env = {k: v for k, v in os.environ.items() if k not in launcher}
        env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                   f"--master-port={_free_port()}", *args]
        else:
            cmd = [sys.executable, *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-20000:]}")
        return proc

    return run


def random_llama(vocab: int = 100, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                 max_positions: int = 64, **config):
    """A small random HF LlamaForCausalLM (hidden 64, FFN 96, RoPE theta 5000, untied), in eval mode.

    HF initialises RMSNorm weights to 1; they are randomised so that mapping every tensor matters.
    """
    import torch
    import transformers

    settings = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                    rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model
