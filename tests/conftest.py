"""Shared fixtures and optional-backend filtering.

Markers (pyproject.toml) name what a test needs: ``te``, ``trtllm``, ``gpu``, ``nemo``. Tests carrying one
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
