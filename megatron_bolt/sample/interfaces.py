"""One generation interface for every backend: token ids in, token ids and raw log-probabilities out.

Backends are sibling modules (``hf.py`` for Hugging Face transformers, ``trtllm.py`` for TensorRT-LLM,
``vllm.py`` for vLLM), each importing its engine lazily; ``load_backend`` is the one seam that picks one and
fails with what to install when it is missing. Nothing here re-tokenises generated text: prompts and outputs
are token ids end to end.

Log-probability convention (shared by every backend; the E-step depends on it): ``logprobs[i]`` is the
natural-log probability of ``token_ids[i]`` under the model's *raw* next-token distribution
(``log_softmax(logits)`` at temperature 1, before top-k/top-p filtering and before banned tokens are
masked). With ``temperature=1, top_p=1, top_k=0`` and no banned tokens that is exactly the proposal q the
token was drawn from, which is what importance weights need. A generation that ends on a stop token
includes that token (and its log-probability) as its last element, ``finish_reason == "stop"``; one cut at
``max_tokens`` has ``finish_reason == "length"``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]


class BackendUnavailable(RuntimeError):
    """The requested backend is not importable here; the message says what to install."""


@dataclass(frozen=True)
class SamplingParams:
    """What to draw. ``temperature == 0`` means greedy; ``top_k == 0`` disables top-k (never 50 by default)."""

    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # also stop once the decoded output contains one of these
    banned_token_ids: tuple[int, ...] = ()  # never generated (e.g. latent tokens for a raw model)

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"n={self.n} and max_tokens={self.max_tokens} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling settings: temperature={self.temperature} (>= 0), "
                             f"top_p={self.top_p} (in (0, 1]), top_k={self.top_k} (>= 0)")

    @property
    def exact_proposal(self) -> bool:
        """True when the returned log-probabilities are the density the tokens were drawn from."""
        return (self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0 and not self.banned_token_ids)


@dataclass(frozen=True)
class Request:
    """One prompt; ``seed`` makes its samples reproducible whatever else shares the batch (where supported)."""

    prompt_token_ids: list[int]
    seed: int = 0


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class BackendOptions:
    """Engine settings that only some backends read (see SamplingConfig for their meaning)."""

    dtype: str = "auto"
    tensor_parallel_size: int = 1
    kv_cache_free_gpu_memory_fraction: float = 0.85
    max_batch_size: int = 64
    trtllm_runtime: Literal["pytorch", "tensorrt"] = "pytorch"
    engine_dir: str | None = None
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


class GenerationBackend(Protocol):
    """Implemented by ``hf.HFBackend``, ``trtllm.TRTLLMBackend`` and ``vllm.VLLMBackend``."""

    name: str

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` generations per request, in request order."""
        ...

    def close(self) -> None: ...


# name -> (module, class, importable module that proves the engine is installed, how to install it)
BACKENDS = {
    "hf": ("megatron_bolt.sample.hf", "HFBackend", "transformers",
           "pip install transformers (part of megatron-bolt's own install)"),
    "trtllm": ("megatron_bolt.sample.trtllm", "TRTLLMBackend", "tensorrt_llm",
               "TensorRT-LLM 1.x in its own environment: pip install tensorrt_llm "
               "--extra-index-url https://pypi.nvidia.com (or an NGC TensorRT-LLM container); see docs/install.md"),
    "vllm": ("megatron_bolt.sample.vllm", "VLLMBackend", "vllm", "pip install vllm (on a CUDA machine)"),
    "ponder": ("megatron_bolt.sample.ponder", "PonderBackend", "megatron.core", "megatron-bolt's own install"),
}


def backend_available(name: str) -> tuple[bool, str]:
    if name not in BACKENDS:
        return False, f"unknown backend {name!r}; one of {', '.join(BACKENDS)}"
    _, _, probe, install = BACKENDS[name]
    if importlib.util.find_spec(probe) is None:
        return False, f"backend {name!r} needs the {probe!r} package, which is not installed: {install}"
    return True, ""


def load_backend(name: str, model_dir: str, options: BackendOptions | None = None) -> GenerationBackend:
    """The backend ``name`` serving the Hugging Face directory ``model_dir`` (an export of our checkpoint)."""
    ok, why = backend_available(name)
    if not ok:
        raise BackendUnavailable(why)
    module, cls, _, _ = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(model_dir, options or BackendOptions())
