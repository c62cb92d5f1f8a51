"""Let megatron-core run on a machine without a GPU.

megatron-core has no CPU path: it creates tensors with ``device="cuda"``, asks ``torch.cuda`` for the
current device, RNG state, streams and events, and asserts CUDA tensor type strings. Everything else it
does (GPTModel, pipeline schedules, DDP, the optimizer, dist_checkpointing) is device-agnostic PyTorch.

Rather than patching the global ``torch.cuda`` (which would lie to user code and to PyTorch itself), this
module gives *megatron-core's own modules* a view of ``torch`` in which:

- factory functions (``zeros``, ``tensor``, ``empty`` ...) map a CUDA ``device=`` to the CPU;
- ``torch.cuda.current_device()`` is the CPU device, so ``.to(device=current_device())`` is a no-op;
- ``torch.cuda`` RNG calls act on the CPU generator (the model-parallel RNG tracker forks it);
- streams and events are inert, ``synchronize`` does nothing (CPU ops are synchronous).

Two places no view of ``torch`` can reach:

- ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` index
  ``torch.cuda.default_generators`` through names imported from ``torch.cuda`` at import time: they are
  replaced by their CPU-generator equivalents;
- ``clip_grad_by_total_norm_fp32`` and ``DistributedOptimizer._build_model_and_main_param_groups`` compare
  ``tensor.type()`` with CUDA type strings: they run unchanged, wrapped so that during the call
  ``Tensor.type()`` spells CPU tensors the CUDA way.

``enable()`` is called by the runtime only when ``torch.cuda.is_available()`` is False; it never runs on
a GPU machine, so the GPU path is megatron-core exactly as shipped.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import pkgutil
import sys
import types

import torch

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_ENABLED = False

# Factory functions megatron-core calls with a device argument.
_FACTORIES = (
    "arange", "as_tensor", "empty", "empty_like", "full", "full_like", "ones", "ones_like", "rand",
    "randint", "randn", "randperm", "tensor", "zeros", "zeros_like", "eye", "linspace",
)


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal in megatron-core
    return torch.device(device).type == "cuda"


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    """Stands in for torch.cuda.Event; elapsed_time is not measurable without CUDA timers."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _AnyIndex(dict):
    """``torch.cuda.default_generators[i]`` for any i is the CPU generator."""

    def __missing__(self, key):
        return torch.default_generator


def _make_cuda_view() -> types.ModuleType:
    real = torch.cuda
    view = types.ModuleType("torch.cuda", doc="CPU view of torch.cuda for megatron-core")
    view.__dict__.update({k: v for k, v in real.__dict__.items() if not k.startswith("__")})
    view.current_device = lambda: _CPU
    view.device_count = lambda: 1
    view.set_device = lambda device: None
    view.synchronize = lambda device=None: None
    view.empty_cache = lambda: None
    view.current_stream = lambda device=None: _NullStream()
    view.default_stream = lambda device=None: _NullStream()
    view.Stream = _NullStream
    view.Event = _NullEvent
    view.stream = lambda stream=None: contextlib.nullcontext()
    view.device = lambda device=None: contextlib.nullcontext()
    view.get_rng_state = lambda device=None: torch.get_rng_state()
    view.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    view.manual_seed = lambda seed: torch.manual_seed(seed)
    view.manual_seed_all = lambda seed: torch.manual_seed(seed)
    view.default_generators = _AnyIndex()
    view.memory_allocated = lambda device=None: 0
    view.max_memory_allocated = lambda device=None: 0
    view.reset_peak_memory_stats = lambda device=None: None
    random_view = types.ModuleType("torch.cuda.random")
    random_view.get_rng_state = view.get_rng_state
    random_view.set_rng_state = view.set_rng_state
    view.random = random_view
    nvtx = types.ModuleType("torch.cuda.nvtx")
    nvtx.range_push = lambda msg: None
    nvtx.range_pop = lambda: None
    nvtx.range = lambda msg, *a, **k: contextlib.nullcontext()
    view.nvtx = nvtx
    return view


def _make_torch_view() -> types.ModuleType:
    view = types.ModuleType("torch", doc="CPU view of torch for megatron-core")
    view.__dict__.update(torch.__dict__)
    for name in _FACTORIES:
        setattr(view, name, _cpu_factory(getattr(torch, name)))
    view.cuda = _make_cuda_view()
    return view


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _with_cuda_type_strings(fn):
    """Run ``fn`` with ``Tensor.type()`` spelling CPU tensors as their CUDA counterparts.

    megatron-core sorts parameters by comparing ``param.type()`` with 'torch.cuda.FloatTensor' (etc.);
    the patch is scoped to the wrapped call and affects only the no-argument form.
    """
    original = torch.Tensor.type

    def cuda_spelled_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch.Tensor.type = cuda_spelled_type
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    return wrapper


def _import_all_megatron_core() -> list[types.ModuleType]:
    """Import the megatron-core modules a training job touches, so each gets the CPU view."""
    import megatron.core as mcore

    skip = ("megatron.core.inference", "megatron.core.models.mimo", "megatron.core.post_training",
            "megatron.core.export", "megatron.core.ssm", "megatron.core.extensions",
            "megatron.core.distributed.fsdp", "megatron.core.resharding", "megatron.core.tokenizers")
    modules = []
    for info in pkgutil.walk_packages(mcore.__path__, prefix="megatron.core."):
        if info.name.startswith(skip) or ".tests" in info.name:
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception as exc:  # optional submodules needing TE/apex/etc.
            log.debug("cpu_compat: skipped %s (%s)", info.name, exc)
    return modules


def enable() -> None:
    """Give every imported megatron-core module the CPU view of torch. Idempotent; CPU only."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.enable() must not run on a machine with a GPU")
    _import_all_megatron_core()
    torch_view = _make_torch_view()
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.core") or module is None:
            continue
        if module.__dict__.get("torch") is torch:
            module.torch = torch_view
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    clip = _with_cuda_type_strings(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = optimizer.clip_grad_by_total_norm_fp32 = clip
    dist_opt = distrib_optimizer.DistributedOptimizer
    build_groups = dist_opt._build_model_and_main_param_groups.__func__
    dist_opt._build_model_and_main_param_groups = classmethod(_with_cuda_type_strings(build_groups))
    _ENABLED = True
    log.info("megatron-core CPU compatibility enabled")
