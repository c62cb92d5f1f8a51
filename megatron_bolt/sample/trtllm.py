"""TensorRT-LLM backend (production sampling), written against the TensorRT-LLM 1.x LLM API.

TensorRT-LLM pins its own torch and comes from NVIDIA's index, so it lives in its own environment or
container and is imported only here, lazily. Two runtimes:

- ``pytorch`` (the 1.x default): ``tensorrt_llm.LLM`` loads our Hugging Face export directly;
- ``tensorrt``: ``tensorrt_llm._tensorrt_engine.LLM`` compiles an engine. It is built once per checkpoint
  into ``engine_dir`` (default ``HF_DIR/trtllm-engine-tpN``) under a file lock, saved to a temporary
  directory and renamed into place; every other sampling shard finds it there and only loads it.

Log-probability convention: we request ``logprobs=1`` and read, at every generated position, the entry of
the token that was actually sampled; TensorRT-LLM reports the model's log-softmax before temperature and
top-k/top-p processing in the PyTorch runtime, and the E-step runs at T = 1 with neither, so the value is
exactly log q of that token. Stops are ours: EOS does not end generation by itself (``ignore_eos``), the
stop ids (EOL and the other control tokens) do, and ``include_stop_str_in_output`` keeps the stop token in
the output so that its log-probability is part of log q, as the interface requires. A stop that arrives
without its token fails loudly instead of returning a q that is missing a term.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from megatron_bolt.sample.interfaces import BackendOptions, Generation, Request, SamplingParams

log = logging.getLogger(__name__)


def _sampled_logprob(entry, token: int) -> float:
    """One position's log-probability of the sampled token: a float, or a {token_id: Logprob | float} dict."""
    if isinstance(entry, dict):
        value = entry[token]
        return float(getattr(value, "logprob", value))
    return float(entry)


def to_generation(output, stop_ids: set[int], stop_strings: bool = False) -> Generation:
    """Our Generation from a TensorRT-LLM (or vLLM) CompletionOutput (``stop_strings``: text stops were asked)."""
    tokens = list(output.token_ids)
    entries = output.logprobs or []
    if len(entries) != len(tokens):
        raise RuntimeError(f"engine returned {len(entries)} log-probabilities for {len(tokens)} tokens")
    logprobs = [_sampled_logprob(e, t) for e, t in zip(entries, tokens, strict=True)]
    reason = "length" if output.finish_reason == "length" else "stop"
    if reason == "stop" and not stop_strings and (not tokens or tokens[-1] not in stop_ids):
        raise RuntimeError(f"engine stopped ({output.finish_reason!r}) without returning the stop token: log q "
                           "would miss its term; check include_stop_str_in_output / ignore_eos support")
    return Generation(tokens, logprobs, reason)


class TRTLLMBackend:
    name = "trtllm"

    def __init__(self, model_dir: str, options: BackendOptions):
        import tensorrt_llm
        from tensorrt_llm.llmapi import KvCacheConfig

        self._sampling_cls = tensorrt_llm.SamplingParams
        kv = KvCacheConfig(free_gpu_memory_fraction=options.kv_cache_free_gpu_memory_fraction)
        common = dict(tensor_parallel_size=options.tensor_parallel_size, kv_cache_config=kv,
                      max_batch_size=options.max_batch_size)
        dtype = "auto" if options.dtype == "auto" else options.dtype
        if options.trtllm_runtime == "pytorch":
            self.llm = tensorrt_llm.LLM(model=model_dir, dtype=dtype, **common)
        else:
            engine = Path(options.engine_dir or Path(model_dir) / f"trtllm-engine-tp{options.tensor_parallel_size}")
            self._ensure_engine(model_dir, engine, dtype, common)
            from tensorrt_llm._tensorrt_engine import LLM as EngineLLM

            self.llm = EngineLLM(model=str(engine), **common)

    @staticmethod
    def _ensure_engine(model_dir: str, engine: Path, dtype: str, common: dict) -> None:
        """Build the TensorRT engine once per checkpoint; concurrent shards wait on the lock and reuse it."""
        if (engine / "config.json").is_file():
            return
        engine.parent.mkdir(parents=True, exist_ok=True)
        with open(engine.parent / f".{engine.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (engine / "config.json").is_file():
                return
            from tensorrt_llm._tensorrt_engine import LLM as EngineLLM

            tmp = engine.parent / f".{engine.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("trtllm: building the TensorRT engine for %s into %s (once per checkpoint)", model_dir, engine)
            builder = EngineLLM(model=model_dir, dtype=dtype, **common)
            builder.save(str(tmp))
            builder.shutdown()
            os.replace(tmp, engine)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.shutdown()
            self.llm = None

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Generation]]:
        stop_ids = set(params.stop_token_ids)
        greedy = params.temperature == 0  # the LLM API takes greedy as top_k = 1, not temperature 0
        per_request = [self._sampling_cls(
            n=params.n, max_tokens=params.max_tokens, temperature=None if greedy else params.temperature,
            top_p=params.top_p if params.top_p < 1 and not greedy else None,
            top_k=1 if greedy else params.top_k or None, seed=r.seed,
            stop_token_ids=sorted(stop_ids) or None, include_stop_str_in_output=True, ignore_eos=True,
            bad_token_ids=list(params.banned_token_ids) or None, stop=list(params.stop_strings) or None,
            logprobs=1, detokenize=bool(params.stop_strings),
        ) for r in requests]
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        outputs = self.llm.generate(prompts, per_request, use_tqdm=False)
        return [[to_generation(o, stop_ids, bool(params.stop_strings)) for o in result.outputs] for result in outputs]
