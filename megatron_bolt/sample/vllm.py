"""vLLM backend, through the same interface (GPU machines with vLLM installed).

vLLM's default ``logprobs_mode`` returns raw log-probabilities (before temperature and top-k/top-p), and
``logprobs=0`` returns exactly the sampled token's; stop ids are ours (``ignore_eos`` plus EOS among the
stop ids) and the stop token stays in ``token_ids``. Conversion and its checks are shared with the
TensorRT-LLM backend (``trtllm.to_generation``).
"""

from __future__ import annotations

from megatron_bolt.sample.interfaces import BackendOptions, Generation, Request, SamplingParams
from megatron_bolt.sample.trtllm import to_generation


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_dir: str, options: BackendOptions):
        import vllm

        self._vllm = vllm
        self.llm = vllm.LLM(model=model_dir, tensor_parallel_size=options.tensor_parallel_size,
                            gpu_memory_utilization=options.kv_cache_free_gpu_memory_fraction,
                            dtype=options.dtype, max_num_seqs=options.max_batch_size)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def close(self) -> None:
        self.llm = None

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Generation]]:
        stop_ids = set(params.stop_token_ids)
        banned = set(params.banned_token_ids)
        allowed = [t for t in range(self.vocab_size) if t not in banned] if banned else None
        per_request = [self._vllm.SamplingParams(
            n=params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k or -1, seed=r.seed, stop_token_ids=sorted(stop_ids), ignore_eos=True,
            stop=list(params.stop_strings) or None, include_stop_str_in_output=True, logprobs=0,
            allowed_token_ids=allowed, detokenize=bool(params.stop_strings),
        ) for r in requests]
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        outputs = self.llm.generate(prompts, per_request, use_tqdm=False)
        return [[to_generation(o, stop_ids, bool(params.stop_strings)) for o in result.outputs] for result in outputs]
