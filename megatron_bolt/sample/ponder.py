"""``ponder`` backend: exact KV-cache sampling from a Megatron checkpoint with latent thoughts (docs/ponder.md).

    from megatron_bolt.sample.interfaces import BackendOptions, Request, SamplingParams, load_backend
    backend = load_backend("ponder", "runs/ponder/checkpoints", BackendOptions(extra={"prefill": "exact"}))
    [[gen]] = backend.generate([Request([1, 17, 42], seed=0)], SamplingParams(max_tokens=32))

HF exports cannot carry the latent recurrence, so this backend reads the Megatron checkpoint itself (a step
directory or a checkpoint root with ``config.yaml``) and decodes with ``models/ponder_cache.py``: every new
token is K + 1 single-slot steps on one KV cache, which is the exact recurrence. The prompt is prefilled
either the paper's way, ``prefill="jacobi"`` (default: the training forward with
``extra["jacobi_iters"]``, default the checkpoint's ``model.jacobi_iters_eval``, passes; exact once that is
at least K * (prompt length - 1)) or ``prefill="exact"`` (token by token). Sampling, seeding and
log-probabilities follow the HF backend (``hf.filter_logits``, ``hf.sample_seed``): log-probabilities are
the raw log_softmax at temperature 1, and a request's samples do not depend on what else is in the call.
Each request is decoded on its own (its ``n`` samples share the prefilled cache). Under torchrun
``options.tensor_parallel_size`` shards the model; every rank must make the same calls.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from megatron_bolt.sample.hf import choose_tokens, sample_seed
from megatron_bolt.sample.interfaces import BackendOptions, Generation, Request, SamplingParams

_PRECISION = {"auto": None, "float32": "fp32", "bfloat16": "bf16"}
PREFILL = ("jacobi", "exact")


class PonderBackend:
    """Loads the checkpoint ``model_dir`` into a process group of its own until ``close()``."""

    name = "ponder"

    def __init__(self, model_dir: str, options: BackendOptions):
        from megatron_bolt.checkpoint import dist as ckpt
        from megatron_bolt.convert.hf_io import load_checkpoint_config
        from megatron_bolt.models.gpt import build_model
        from megatron_bolt.models.ponder_cache import PonderDecoder
        from megatron_bolt.runtime import distributed
        from megatron_bolt.runtime.world import world_from_env

        if options.dtype not in _PRECISION:
            raise ValueError(f"dtype {options.dtype!r}: one of {', '.join(_PRECISION)}")
        self.prefill = options.extra.get("prefill", "jacobi")
        if self.prefill not in PREFILL:
            raise ValueError(f"extra['prefill']={self.prefill!r}: one of {', '.join(PREFILL)}")
        step, self._root, self._saved = load_checkpoint_config(model_dir)
        cfg = _inference_config(self._saved, options, world_from_env().world_size)
        self.jacobi_iters = int(options.extra.get("jacobi_iters", cfg.model.jacobi_iters_eval))
        self.vocab_size, self.max_positions = cfg.model.vocab_size, cfg.model.max_position_embeddings
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(distributed(cfg))
        try:
            [model] = build_model(cfg)
            ckpt.load_model(step, [model])
        except BaseException:
            self._stack.close()
            raise
        self.model = model.eval()
        self.decoder = PonderDecoder(self.model)
        self._tokenizer = None

    @property
    def tokenizer(self):
        """Loaded only when stop strings need decoding."""
        if self._tokenizer is None:
            from megatron_bolt.convert.hf_io import find_tokenizer
            from megatron_bolt.data.tokenizer import BoltTokenizer

            found = find_tokenizer(self._root, self._saved)
            if found is None:
                raise ValueError(f"stop strings need a tokenizer, and {self._root} has none")
            self._tokenizer = BoltTokenizer.from_pretrained(found)
        return self._tokenizer

    def close(self) -> None:
        self.model = self.decoder = None
        self._stack.close()

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Generation]]:
        with torch.no_grad():
            return [self._generate(r, params) for r in requests]

    def _generate(self, request: Request, params: SamplingParams) -> list[Generation]:
        from megatron_bolt.models.ponder_cache import SlotCache
        from megatron_bolt.runtime.distributed import device

        prompt = request.prompt_token_ids
        if not prompt:
            raise ValueError("empty prompt: at least one token (e.g. BOS) is needed")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) > self.max_positions:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_position_embeddings={self.max_positions}")
        dev = device()
        cache = SlotCache(self.model)
        ids = torch.tensor([prompt], device=dev)
        if self.prefill == "exact":
            hidden = self.decoder.prefill_exact(cache, ids)
        else:
            hidden = self.decoder.prefill_jacobi(cache, ids, self.jacobi_iters)
        n = params.n
        cache.select(torch.zeros(n, dtype=torch.long, device=dev))
        hidden = hidden.expand(n, -1)
        gens = [torch.Generator(device=dev).manual_seed(sample_seed(request.seed, j)) for j in range(n)]
        tokens: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        active = list(range(n))  # sample index of each batch row
        for position in range(len(prompt), len(prompt) + params.max_tokens):
            raw = self.decoder.logprobs(hidden)
            chosen = choose_tokens(raw, params, [gens[a] for a in active])
            picked = raw.gather(-1, chosen[:, None])[:, 0].tolist()
            keep = []
            for row, a in enumerate(active):
                token = int(chosen[row])
                tokens[a].append(token)
                logps[a].append(picked[row])
                tail = self.tokenizer.decode(tokens[a][-32:]) if params.stop_strings else ""
                if token in params.stop_token_ids or any(s in tail for s in params.stop_strings):
                    reasons[a] = "stop"
                else:
                    keep.append(row)
            if not keep or position + 1 - len(prompt) >= params.max_tokens or position >= self.max_positions:
                break  # all stopped, max_tokens reached, or no position left to feed another token
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=dev)
                cache.select(rows)
                chosen, active = chosen[rows], [active[r] for r in keep]
            hidden = self.decoder.step(cache, chosen, position)
        return [Generation(tokens[j], logps[j], reasons[j]) for j in range(n)]  # type: ignore[arg-type]


def _inference_config(saved, options: BackendOptions, world_size: int):
    """The checkpoint's config at ``options``' tensor-parallel size and precision, one row per step."""
    cfg = copy.deepcopy(saved)
    p = cfg.parallel
    p.tensor_model_parallel_size = options.tensor_parallel_size
    p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size = 1, None
    p.sequence_parallel = False
    precision = _PRECISION[options.dtype] or ("bf16" if cfg.train.precision == "fp8" else cfg.train.precision)
    cfg.train.precision = precision
    cfg.train.micro_batch_size = 1
    cfg.train.global_batch_size = max(1, world_size // options.tensor_parallel_size)
    cfg.train.recompute = "none"
    return cfg
