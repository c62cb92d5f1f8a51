"""The Transformer Engine seam: the only module that imports transformer_engine.

TE's torch extension only builds with CUDA and NCCL headers, so it is an optional extra (`pip install
megatron-bolt[te]` on a GPU machine, or an NGC PyTorch container). A half-installed TE raises RuntimeError
on import rather than ImportError; both are reported with what to install.
"""

from __future__ import annotations

import functools

INSTALL_HINT = (
    "Transformer Engine is required for model.transformer_impl=transformer_engine and train.precision=fp8: "
    "install the 'te' extra on a CUDA machine (uv sync --extra te, or pip install "
    "'transformer-engine[pytorch]') or use an NGC PyTorch container"
)


@functools.cache
def available() -> tuple[bool, str]:
    """(importable, reason). Cached: a failed import is not retried."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def require() -> None:
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"{INSTALL_HINT} ({reason})")


def layer_spec():
    """megatron-core's fused TE layer spec (RMSNorm fused into the QKV / FC1 linears)."""
    require()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()
