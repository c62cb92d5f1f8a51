"""Hugging Face transformers backend: batched sampling from an exported checkpoint, CPU or GPU.

The reference backend, and the one our CPU machines use. It runs its own decoding loop over the model's
KV cache instead of ``model.generate`` so that the log-probabilities are the raw ``log_softmax`` of the
logits (``generate`` defaults to top-k 50 and returns processed scores; either would distort q), and so
that each sequence draws from its own ``torch.Generator`` seeded from ``Request.seed`` and the sample index:
a sequence's tokens then depend on its own prompt and seed, not on the order work arrives in. Prompts are
left-padded; finished sequences leave the batch (and the cache) as soon as they stop.
"""

from __future__ import annotations

import logging

import torch

from megatron_bolt.sample.interfaces import BackendOptions, Generation, Request, SamplingParams

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a request (mixed so nearby seeds do not share streams)."""
    return (seed * 1_000_003 + index * 7_919 + 0x5DEECE66D) % (2**63 - 1)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution's logits: temperature, top-k, top-p and banned tokens applied."""
    out = logits / params.temperature if params.temperature not in (0.0, 1.0) else logits.clone()
    if params.banned_token_ids:
        out[:, list(params.banned_token_ids)] = float("-inf")
    if params.top_k:
        kth = torch.topk(out, min(params.top_k, out.shape[-1]), dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def choose_tokens(logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]) -> torch.Tensor:
    """Next token per row (argmax when greedy), row b drawn with its own generator ``gens[b]``.

    ``logits`` may be raw log-probabilities: softmax and argmax are invariant to the per-row shift.
    """
    filtered = filter_logits(logits, params)
    if params.temperature == 0:
        return filtered.argmax(-1)
    probs = torch.softmax(filtered, dim=-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(gens)])


class HFBackend:
    """Samples with ``AutoModelForCausalLM`` from ``model_dir`` (see the module docstring)."""

    name = "hf"

    def __init__(self, model_dir: str, options: BackendOptions):
        from transformers import AutoModelForCausalLM

        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if options.dtype == "auto":
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
        elif options.dtype in _DTYPES:
            dtype = _DTYPES[options.dtype]
        else:
            raise ValueError(f"dtype {options.dtype!r}: one of auto, {', '.join(_DTYPES)}")
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.vocab_size = self.model.config.vocab_size
        self.max_batch_size = options.max_batch_size
        self._tokenizer = None
        self._model_dir = model_dir

    @property
    def tokenizer(self):
        """Loaded only when stop strings need decoding."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
        return self._tokenizer

    def close(self) -> None:
        self.model = None

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Generation]]:
        rows = [(r, j) for r in range(len(requests)) for j in range(params.n)]
        out: list[list[Generation | None]] = [[None] * params.n for _ in requests]
        for start in range(0, len(rows), self.max_batch_size):
            batch = rows[start:start + self.max_batch_size]
            for (r, j), gen in zip(batch, self._generate_batch(
                    [requests[r].prompt_token_ids for r, _ in batch],
                    [sample_seed(requests[r].seed, j) for r, j in batch], params), strict=True):
                out[r][j] = gen
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams
                        ) -> list[Generation]:
        for p in prompts:
            if not p:
                raise ValueError("empty prompt: at least one token (e.g. BOS) is needed")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        n, width = len(prompts), max(len(p) for p in prompts)
        dev = self.device
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=dev)
        tokens: list[list[int]] = [[] for _ in prompts]
        logps: list[list[float]] = [[] for _ in prompts]
        reasons: list[str] = ["length"] * n
        active = list(range(n))  # original row of each batch row

        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, last_pos = out.past_key_values, positions[:, -1]
        logits = out.logits[:, -1].float()
        for _ in range(params.max_tokens):
            raw = torch.log_softmax(logits, dim=-1)
            chosen = choose_tokens(logits, params, [gens[a] for a in active])
            picked = raw.gather(-1, chosen[:, None])[:, 0].tolist()
            stopped = torch.isin(chosen, stop_ids).tolist()
            keep = []
            for b, a in enumerate(active):
                tokens[a].append(int(chosen[b]))
                logps[a].append(picked[b])
                if stopped[b] or (params.stop_strings and self._hit_stop_string(tokens[a], params.stop_strings)):
                    reasons[a] = "stop"
                else:
                    keep.append(b)
            if not keep or len(tokens[active[keep[0]]]) >= params.max_tokens:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=dev)
                cache.batch_select_indices(index)
                mask, last_pos, chosen = mask[index], last_pos[index], chosen[index]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype, device=dev)], dim=1)
            last_pos = last_pos + 1
            out = self.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        return [Generation(tokens[i], logps[i], reasons[i]) for i in range(n)]  # type: ignore[arg-type]

    def _hit_stop_string(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        tail = self.tokenizer.decode(tokens[-32:], skip_special_tokens=False)
        return any(s in tail for s in stops)
