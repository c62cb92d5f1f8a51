"""RMSNorm for the local layer spec that also works under sequence parallelism.

Without apex, megatron-core's local spec falls back to ``WrappedTorchNorm``, which refuses sequence
parallelism. The only thing SP needs from a norm is that its weight be marked ``sequence_parallel``: each TP
rank then sees a different slice of the sequence, and ``finalize_model_grads`` all-reduces the weight's
gradient across the TP group. The arithmetic is ``torch.nn.functional.rms_norm`` (same as torch.nn.RMSNorm
and HF's LlamaRMSNorm in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        device = None if torch.cuda.is_available() and not config.use_cpu_initialization else "cpu"
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
