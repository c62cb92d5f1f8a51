"""The typed configuration tree: the single source of truth for every stage.

Each section is a dataclass whose fields carry their help text (``opt(default, "help")``); the CLI renders
``--help`` from it, YAML files and ``key=value`` overrides are checked against it, and ``validate()``
rejects layouts that cannot work before any process group starts, naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration that cannot work. The message names the field and what to change."""


def opt(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def section(cls, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases, untied embeddings by default)."""

    num_layers: int = opt(4, "Transformer layers.")
    hidden_size: int = opt(128, "Model width.")
    num_attention_heads: int = opt(4, "Query heads.")
    num_query_groups: int = opt(2, "Key/value heads (GQA groups); equal to heads for plain multi-head attention.")
    ffn_hidden_size: int = opt(352, "SwiGLU intermediate size (per branch).")
    kv_channels: int | None = opt(None, "Per-head dimension; default hidden_size / num_attention_heads.")
    vocab_size: int = opt(128, "Tokenizer vocabulary size, latent tokens included (padded up internally).")
    make_vocab_size_divisible_by: int = opt(
        128, "Pad embedding rows to a multiple of this (independent of TP, so checkpoints reshard across TP)."
    )
    max_position_embeddings: int = opt(256, "Longest sequence the model is built for (RoPE table size).")
    rotary_base: float = opt(10000.0, "RoPE theta.")
    rope_scaling: dict[str, Any] | None = opt(
        None, "HF-style rope scaling dict (Llama 3.x: rope_type=llama3, factor, ...); None for plain RoPE."
    )
    norm_epsilon: float = opt(1e-5, "RMSNorm epsilon.")
    init_method_std: float = opt(0.02, "Std of the normal weight initialisation.")
    tie_word_embeddings: bool = opt(False, "Share input embedding and output layer (BoLT unties them).")
    transformer_impl: Literal["local", "transformer_engine"] = opt(
        "local", "Layer implementation: 'local' (pure PyTorch) or 'transformer_engine' (fused, FP8-capable)."
    )
    attention_backend: Literal["sdpa", "unfused"] = opt(
        "sdpa",
        "Core attention for the local spec: 'sdpa' (torch scaled_dot_product_attention, flash kernels on "
        "GPU) or 'unfused' (megatron-core's reference DotProductAttention).",
    )
    latent_thoughts_per_token: int = opt(
        0, "Continuous latent thoughts per token (PonderLM-2, docs/ponder.md); 0 is the standard model. K > 0 also "
        "scales token embeddings by sqrt(2.5 h) and uses the paper's truncated-normal init (not init_method_std).",
    )
    jacobi_iters_train: list[int] = opt(
        [2, 4], "Latent thoughts: Jacobi passes per training micro-batch, drawn uniformly from [low, high].",
    )
    jacobi_iters_eval: int = opt(
        3, "Latent thoughts: Jacobi passes in eval mode (scoring, evaluation, Jacobi prefill of generation).",
    )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is split; data parallel size is whatever the world size leaves over."""

    tensor_model_parallel_size: int = opt(1, "Tensor parallel ranks (split heads, FFN and vocab).")
    pipeline_model_parallel_size: int = opt(1, "Pipeline stages (split layers).")
    virtual_pipeline_model_parallel_size: int | None = opt(
        None, "Model chunks per pipeline rank (interleaved 1F1B); None for plain 1F1B."
    )
    sequence_parallel: bool = opt(False, "Shard activations along the sequence in TP regions (needs TP > 1).")
    use_distributed_optimizer: bool = opt(False, "Shard optimizer state across data-parallel ranks (ZeRO-1).")
    overlap_grad_reduce: bool = opt(False, "Overlap the data-parallel gradient reduce with backward.")
    overlap_param_gather: bool = opt(False, "Overlap the distributed optimizer's param all-gather with forward.")


@dataclass(kw_only=True)
class DataConfig:
    """Where training sequences come from and how they are shaped."""

    data_prefix: list[str] = opt([], "Megatron indexed dataset prefixes (path without .bin/.idx).")
    tokenizer: str | None = opt(None, "Tokenizer directory (HF format, latent tokens included).")
    seq_length: int = opt(128, "Tokens per training row.")
    max_unit_tokens: int | None = opt(
        None, "Longest latent+text unit in the data, if known; checked against seq_length."
    )
    truncate_long_units: bool = opt(False, "Truncate units longer than seq_length instead of failing.")
    loss_on_raw: bool = opt(True, "Train on raw-only spans too (the paper trains on every token).")
    seed: int = opt(1234, "Shuffling and layout-coin seed.")
    num_workers: int = opt(0, "DataLoader worker processes per rank.")


@dataclass(kw_only=True)
class CheckpointConfig:
    save: str | None = opt(None, "Directory for distributed checkpoints (None: do not save).")
    load: str | None = opt(None, "Checkpoint to start from (a step directory or a run's checkpoint root).")
    save_interval: int = opt(0, "Save every N steps (0: only at the end).")
    keep_last: int = opt(2, "Checkpoints to keep; older ones are deleted after a newer save completes.")
    finetune: bool = opt(False, "Load weights only (fresh optimizer, scheduler and step count).")


@dataclass(kw_only=True)
class TrainConfig:
    """The M-step optimisation."""

    micro_batch_size: int = opt(4, "Rows per micro-batch per data-parallel rank.")
    global_batch_size: int = opt(8, "Rows per optimizer step across all data-parallel ranks.")
    train_iters: int = opt(20, "Optimizer steps.")
    lr: float = opt(1e-3, "Peak learning rate.")
    min_lr: float = opt(1e-4, "Final learning rate of the cosine decay.")
    lr_warmup_iters: int = opt(2, "Linear warm-up steps.")
    lr_decay_style: Literal["cosine", "linear", "constant"] = opt("cosine", "Learning-rate decay after warm-up.")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.95, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    clip_grad: float = opt(1.0, "Gradient norm clip (0 disables).")
    precision: Literal["fp32", "bf16", "fp8"] = opt(
        "bf16", "Compute precision; CPUs always train in fp32. fp8 needs Transformer Engine on Hopper or newer."
    )
    fp8_format: Literal["hybrid", "e4m3"] = opt("hybrid", "FP8 format (hybrid: e4m3 forward, e5m2 backward).")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = opt("delayed", "FP8 scaling recipe.")
    fp8_amax_history_len: int = opt(1024, "Delayed scaling: amax history length.")
    fp8_amax_compute_algo: Literal["max", "most_recent"] = opt("max", "Delayed scaling: amax reduction.")
    fp8_bf16_first_last_layers: int = opt(0, "Keep this many first and last layers in bf16 under FP8.")
    recompute: Literal["none", "selective", "full"] = opt("none", "Activation recomputation.")
    seed: int = opt(1234, "Weight-init and dropout seed.")
    log_interval: int = opt(1, "Log every N steps.")
    tensorboard_dir: str | None = opt(None, "TensorBoard event directory (None: next to the checkpoints).")
    on_nonfinite: Literal["stop", "skip"] = opt("stop", "On a NaN/Inf loss or grad norm: stop, or skip the step.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Saving and loading.")


@dataclass(kw_only=True)
class SamplingConfig:
    """How latents are drawn; T = 1, top-p 1 and no top-k keep log q exact (bolt-method.md)."""

    backend: Literal["hf", "trtllm", "vllm"] = opt(
        "hf", "Generation backend: 'trtllm' (TensorRT-LLM, production), 'hf' (transformers, CPU/GPU reference), 'vllm'."
    )
    num_samples: int = opt(4, "Latents drawn per chunk (K).")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling mass.")
    top_k: int = opt(0, "Top-k (0 disables; anything else distorts q).")
    max_new_tokens: int = opt(1024, "Longest latent generated.")
    seed: int = opt(0, "Sampling seed (each chunk's samples are seeded from it, its doc_id and chunk_index).")
    batch_size: int = opt(16, "Chunks per generation call (x num_samples sequences); the unit of in-shard resume.")
    dtype: str = opt("auto", "Engine weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    device: str = opt("auto", "hf backend device: auto (cuda if available), cpu or cuda.")
    tensor_parallel_size: int = opt(1, "trtllm/vllm: GPUs one engine spans.")
    kv_cache_free_gpu_memory_fraction: float = opt(0.85, "trtllm/vllm: share of free GPU memory for the KV cache.")
    max_batch_size: int = opt(256, "trtllm/vllm: sequences in flight per engine.")
    trtllm_runtime: Literal["pytorch", "tensorrt"] = opt(
        "pytorch", "trtllm: the PyTorch runtime (loads the HF export) or a TensorRT engine built once per checkpoint."
    )
    engine_dir: str | None = opt(
        None, "trtllm tensorrt runtime: where the engine is built/reused (default: HF_DIR/trtllm-engine-tpN)."
    )


@dataclass(kw_only=True)
class EStepConfig:
    """Sampling, joint scoring and importance resampling of latents."""

    documents: list[str] = opt([], "Prepared document JSONL (files, directories or globs) to sample latents for.")
    output_dir: str | None = opt(None, "E-step directory: samples/, scores/, latents.jsonl, estep.json.")
    prefix_chunks: int = opt(3, "Raw chunks before the current one used as context.")
    context_length: int = opt(2048, "Longest prompt + generation / scored sequence.")
    num_shards: int = opt(1, "Independent shards the chunks are split into (one GPU, node or array task each).")
    resample_seed: int = opt(0, "Seed of the importance-resampling draw.")
    chunk_pattern: str | None = opt(
        None, "Regex: only chunks whose text matches get latents (None: every chunk). The embedded corpus: '^A:'."
    )
    rescore_q: bool = opt(False, "Also recompute log q with the Megatron model (diagnostic: engine vs trainer).")
    sampling: SamplingConfig = section(SamplingConfig, "Latent generation.")


@dataclass(kw_only=True)
class EMConfig:
    """The outer loop: warm start (iteration 0), then bootstrap iterations (bolt-method.md)."""

    iterations: int = opt(2, "Bootstrap EM iterations after the warm start.")
    restart_from_base: bool = opt(True, "Each M-step starts from the base weights (the paper), not the last iterate.")
    run_dir: str = opt("runs/bolt", "Directory holding every stage's artifacts and manifests.")
    base_checkpoint: str | None = opt(
        None, "Megatron checkpoint of the base model (e.g. from bolt import-hf); None: random initialisation."
    )
    warm_documents: list[str] = opt([], "Prepared documents of the warm-start split (bolt prepare output).")
    warm_latents: list[str] = opt([], "Teacher latents for the warm-start split (bolt synthesize output).")
    bootstrap_documents: list[str] = opt([], "Prepared documents the E-step samples latents for.")
    keep_warm_latents: bool = opt(
        False, "Also train every bootstrap M-step on the warm-start split with its teacher latents."
    )
    warm_raw_bootstrap: bool = opt(
        False, "Also train the warm start on the bootstrap documents as raw text (no latents): a model trained "
        "from scratch has then seen all the raw data, as the paper's pretrained base has.",
    )
    heldout_documents: list[str] = opt(
        [], "Prepared held-out documents for ELBO diagnostics after every iteration (empty: skip)."
    )


@dataclass(kw_only=True)
class EvalConfig:
    """`bolt eval`: greedy few-shot accuracy (or raw perplexity) of a checkpoint or HF directory."""

    task: Literal["embedded", "math", "gsm8k", "perplexity"] = opt(
        "embedded", "Benchmark; 'perplexity' scores plain held-out text ({text} records) instead."
    )
    data_path: str | None = opt(None, "Local JSONL/Parquet/HF-datasets directory with the problems.")
    split: str = opt("test", "Split to read from a DatasetDict directory or a directory of per-split files.")
    num_shots: int | None = opt(None, "Demonstrations (default: MATH 4, GSM8K 8; the embedded task is zero-shot).")
    fewshot_path: str | None = opt(
        None, "JSON/JSONL demonstrations {problem, latent, answer} replacing the bundled ones."
    )
    latent: bool = opt(
        True, "Prompt the model to think first (SOL PRIOR_PREFIX) and read the answer after EOL; false prompts "
        "directly with the latent tokens banned (raw models)."
    )
    backend: Literal["hf", "trtllm", "vllm"] = opt("hf", "Generation backend.")
    batch_size: int = opt(16, "Prompts per generate call.")
    max_new_tokens: int = opt(512, "Generation budget per problem.")
    limit: int | None = opt(None, "Evaluate only the first N problems.")
    output_dir: str | None = opt(
        None, "Where predictions.jsonl and summary.json go (default: runs/eval/TASK); a Megatron checkpoint is "
        "exported once to OUTPUT_DIR/../hf_cache/."
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit={self.limit} must be at least 1 (or null for every problem)")
        if self.num_shots is not None and self.num_shots < 0:
            raise ConfigError(f"eval.num_shots={self.num_shots} must be >= 0")
        if self.task == "embedded" and self.num_shots:
            raise ConfigError("eval.num_shots applies to math and gsm8k: the embedded task is zero-shot")


@dataclass(kw_only=True)
class PrepareConfig:
    """`bolt prepare`: read a corpus, keep one split, chunk every document by sentences."""

    input: list[str] = opt([], "Input files, globs or dirs: JSONL(.gz), JSON arrays, Parquet, HF datasets.")
    json_keys: list[str] = opt(["text"], "Record fields holding the text; several are joined by blank lines.")
    output_prefix: str | None = opt(None, "Output prefix: shards PREFIX-00000.jsonl ..., PREFIX.report.json.")
    split: str = opt(
        "all", "Documents kept, by record index: 'all', 'validation' (index % 1000 == 0) or "
        "'start:end:step' (index % step in [start, end), validation excluded; the paper's warm start is "
        "0:1:20, its bootstrap 13:17:20).",
    )
    workers: int = opt(1, "Chunking processes (the output is identical for any number).")
    docs_per_shard: int = opt(10000, "Documents per output shard: the unit of parallel work and resumption.")
    chunk_lambda: float = opt(7.0, "Sentence units per chunk ~ 1 + Poisson(chunk_lambda); 0: one per chunk.")
    max_chunk_units: int = opt(20, "Most sentence units in one chunk.")
    chunk_seed: int = opt(42, "Added to the document-text hash that seeds the chunk lengths.")
    max_record_bytes: int = opt(10 * 2**20, "Records longer than this are skipped (counted as too_long).")

    def __post_init__(self) -> None:
        from megatron_bolt.data.corpus import Split

        try:
            Split.parse(self.split)
        except ValueError as exc:
            raise ConfigError(f"prepare.split: {exc}") from None
        for name in ("workers", "docs_per_shard", "max_chunk_units", "max_record_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prepare.{name}={getattr(self, name)} must be at least 1")
        if self.chunk_lambda < 0:
            raise ConfigError(f"prepare.chunk_lambda={self.chunk_lambda} must be >= 0")


@dataclass(kw_only=True)
class BuildDatasetConfig:
    """`bolt build-dataset`: prepared documents + latents -> joint Megatron indexed dataset.

    The tokenizer is data.tokenizer and the layout coin is seeded by data.seed.
    """

    documents: list[str] = opt([], "Prepared document JSONL: files, directories (their *.jsonl) or globs.")
    latents: list[str] = opt(
        [], "Latent JSONL ({doc_id, chunk_index, latent | latent_token_ids}); none builds a raw-only dataset."
    )
    output_prefix: str | None = opt(
        None, "Output prefix: PREFIX.bin/.idx (tokens), PREFIX_kinds.bin/.idx (segment kinds), PREFIX.json."
    )
    max_latent_tokens: int | None = opt(None, "Longest latent kept, in tokens (None: no limit).")
    long_latents: Literal["truncate", "drop", "error"] = opt(
        "drop", "A latent over max_latent_tokens is cut, dropped (its chunk stays raw) or fails the build."
    )
    workers: int = opt(1, "Tokenizer processes (the output is identical for any number).")
    docs_per_task: int = opt(256, "Documents per unit of work handed to a worker process.")


@dataclass(kw_only=True)
class SynthesizeConfig:
    """`bolt synthesize`: warm-start latents from a teacher (the paper: GPT-4o-mini, T 0.7, one per chunk)."""

    backend: Literal["openai", "local"] = opt(
        "openai", "'openai': any OpenAI-compatible chat-completions endpoint; 'local': our own generation."
    )
    documents: list[str] = opt([], "Prepared document JSONL: files, directories (their *.jsonl) or globs.")
    output: str | None = opt(None, "Latent JSONL to write, one {doc_id, chunk_index, latent} line per chunk.")
    cache: str | None = opt(
        None, "Append-only response cache (default: OUTPUT.cache.jsonl): reruns never pay twice."
    )
    base_url: str = opt("https://api.openai.com/v1", "Endpoint base URL (…/chat/completions is appended).")
    model: str = opt("gpt-4o-mini-2024-07-18", "Teacher model name sent to the endpoint.")
    api_key_env: str = opt(
        "OPENAI_API_KEY", "NAME of the environment variable with the API key ('' sends none); never the key."
    )
    temperature: float = opt(0.7, "Sampling temperature (the paper: 0.7).")
    max_tokens: int = opt(6000, "Completion token limit per chunk.")
    concurrency: int = opt(16, "Requests in flight.")
    max_retries: int = opt(8, "Retries per chunk on 429, 5xx, timeouts and dropped connections.")
    timeout_s: float = opt(120.0, "Per-request timeout in seconds.")
    backoff_s: float = opt(1.0, "First retry delay cap in seconds; doubles per attempt (full jitter).")
    max_backoff_s: float = opt(60.0, "Largest retry delay in seconds (a longer Retry-After is honoured).")
    limit_documents: int | None = opt(None, "Only the first N documents (dry runs and cost estimates).")
    input_usd_per_mtok: float = opt(0.15, "Prompt price per million tokens, for the cost estimate.")
    output_usd_per_mtok: float = opt(0.60, "Completion price per million tokens, for the cost estimate.")


@dataclass(kw_only=True)
class BoltConfig:
    """Everything one `bolt` command needs."""

    model: ModelConfig = section(ModelConfig, "Model architecture.")
    parallel: ParallelConfig = section(ParallelConfig, "Model and data parallel layout.")
    data: DataConfig = section(DataConfig, "Training data.")
    train: TrainConfig = section(TrainConfig, "M-step optimisation.")
    estep: EStepConfig = section(EStepConfig, "E-step.")
    em: EMConfig = section(EMConfig, "EM loop.")
    eval: EvalConfig = section(EvalConfig, "Evaluation.")
    build: BuildDatasetConfig = section(BuildDatasetConfig, "Joint dataset building (bolt build-dataset).")
    synthesize: SynthesizeConfig = section(SynthesizeConfig, "Teacher warm-start latents (bolt synthesize).")
    prepare: PrepareConfig = section(PrepareConfig, "Corpus reading and sentence chunking (bolt prepare).")

    def validate(self, world_size: int | None = None) -> BoltConfig:
        """Raise ConfigError for any layout that cannot work; returns self for chaining."""
        from megatron_bolt.config.validate import validate

        validate(self, world_size)
        return self
