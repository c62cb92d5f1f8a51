"""``bolt score``: teacher-forced per-token log-probabilities with the Megatron model.

    bolt score --ckpt CKPT --input in.jsonl --output out.jsonl
    torchrun --nproc-per-node 4 -m megatron_bolt.cli score --ckpt CKPT --input in.jsonl --output out.jsonl \
        parallel.tensor_model_parallel_size=2 train.micro_batch_size=8

Each input line holds ``token_ids`` (a list of ints) or ``text`` (tokenised with the checkpoint's tokenizer,
BOS prepended). Each output line repeats the input's other fields and adds ``token_ids`` and ``logprobs``,
where ``logprobs[i] = log p(token_ids[i] | token_ids[:i])`` for i >= 1 and ``logprobs[0]`` is null.

The model section comes from the checkpoint's config.yaml; ``parallel.*`` and ``train.micro_batch_size``
come from the command line, so a checkpoint saved at one layout scores at any other. Lines are dealt to
data-parallel ranks round-robin; each rank sorts its share by length and runs micro-batches of right-padded
sequences through ``get_forward_backward_func`` (forward only, so pipeline parallelism works). Padded
positions are dropped: with a causal mask they cannot influence earlier positions. The model's per-token
loss output is -log p over the full (TP-sharded) vocabulary with vocabulary padding masked. Rank 0 gathers
the results and writes them in input order to a temporary file renamed into place.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megatron_bolt.config.schema import BoltConfig, ConfigError
from megatron_bolt.utils.atomic import atomic_open

log = logging.getLogger(__name__)

# Micro-batches per get_forward_backward_func call: bounds the logits kept alive at once.
MICROBATCHES_PER_CALL = 16


class ScoreError(ValueError):
    """Bad input for scoring; the message names the line."""


def read_requests(path: str | Path, tokenizer_loader, max_positions: int, vocab_size: int
                  ) -> list[tuple[dict[str, Any], list[int]]]:
    """(record without token_ids/text/logprobs, token ids) per input line, validated."""
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"--input {path} does not exist")
    requests = []
    tokenizer = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScoreError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise ScoreError(f"{path}:{lineno}: expected a JSON object")
            if "token_ids" in rec:
                ids = rec["token_ids"]
                if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in ids):
                    raise ScoreError(f"{path}:{lineno}: token_ids must be a list of integers")
            elif "text" in rec:
                if not isinstance(rec["text"], str):
                    raise ScoreError(f"{path}:{lineno}: text must be a string")
                if tokenizer is None:
                    tokenizer = tokenizer_loader()
                ids = [tokenizer.ids.bos, *tokenizer.encode(rec["text"])]
            else:
                raise ScoreError(f"{path}:{lineno}: line has neither 'token_ids' nor 'text'")
            if not ids:
                raise ScoreError(f"{path}:{lineno}: empty token sequence")
            if len(ids) > max_positions:
                raise ScoreError(f"{path}:{lineno}: {len(ids)} tokens exceed the model's max_position_embeddings="
                                 f"{max_positions}; shorten or split the line")
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ScoreError(f"{path}:{lineno}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
            rest = {k: v for k, v in rec.items() if k not in ("token_ids", "logprobs")}
            requests.append((rest, list(ids)))
    return requests


def _pad_multiple(cfg: BoltConfig) -> int:
    return cfg.parallel.tensor_model_parallel_size if cfg.parallel.sequence_parallel else 1


def score_sequences(cfg: BoltConfig, model: list, sequences: list[list[int]]) -> list[list[float]]:
    """-> per sequence the log-probs of tokens 1.. (len - 1 values); collective over the model-parallel group.

    Every rank of one model replica (TP x PP) must pass the same sequences. Results are valid on the last
    pipeline stage; other stages return empty lists.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bolt.train.step import collecting_forward_step

    mbs = cfg.train.micro_batch_size
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = len(model) > 1
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[list[float]] = [[] for _ in sequences]
    todo = [i for i in order if len(sequences[i]) > 1]
    per_call = mbs * MICROBATCHES_PER_CALL
    for start in range(0, len(todo), per_call):
        group = todo[start:start + per_call]
        n_micro = -(-len(group) // mbs)
        if vpp and n_micro % pp:
            n_micro += pp - n_micro % pp  # interleaved schedules need a multiple of PP micro-batches
        seq = max(len(sequences[i]) for i in group) - 1
        mult = _pad_multiple(cfg)
        seq = -(-seq // mult) * mult
        rows = n_micro * mbs
        tokens = torch.zeros(rows, seq, dtype=torch.long)
        labels = torch.zeros(rows, seq, dtype=torch.long)
        mask = torch.zeros(rows, seq, dtype=torch.float)
        for r, i in enumerate(group):
            ids = torch.tensor(sequences[i], dtype=torch.long)
            n = len(ids) - 1
            tokens[r, :n], labels[r, :n], mask[r, :n] = ids[:-1], ids[1:], 1.0
        position_ids = torch.arange(seq).expand(rows, seq).contiguous()
        micro = [{"tokens": tokens[j:j + mbs], "labels": labels[j:j + mbs], "loss_mask": mask[j:j + mbs],
                  "position_ids": position_ids[j:j + mbs]} for j in range(0, rows, mbs)]
        sink: list[torch.Tensor] = []
        iterators = [iter(micro) for _ in model]
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=partial(collecting_forward_step, sink),
                data_iterator=iterators if vpp else iterators[0],
                model=model, num_microbatches=n_micro, seq_length=seq, micro_batch_size=mbs, forward_only=True,
            )
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            losses = torch.cat(sink)
            for r, i in enumerate(group):
                results[i] = (-losses[r, : len(sequences[i]) - 1]).tolist()
    return results


def _scoring_config(cfg: BoltConfig, saved: BoltConfig, world_size: int) -> BoltConfig:
    """The checkpoint's model section with this run's parallel layout and micro-batch size."""
    run = copy.deepcopy(cfg)
    run.model = copy.deepcopy(saved.model)
    run.data.seq_length = min(run.data.seq_length, run.model.max_position_embeddings)
    if run.train.precision == "fp8":
        run.train.precision = "bf16"
    # Scoring has no global batch: make the training-only batch arithmetic trivially valid.
    p = run.parallel
    dp = max(1, world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size))
    run.train.global_batch_size = run.train.micro_batch_size * dp * p.pipeline_model_parallel_size
    return run


@contextmanager
def loaded_model(cfg: BoltConfig, ckpt_path: str | Path):
    """(run config, model chunks, world, checkpoint root, saved config) of a checkpoint, in eval mode.

    The model section comes from the checkpoint; parallel layout and micro-batch size from ``cfg``. The
    process group and parallel state live as long as the context.
    """
    from megatron_bolt.checkpoint import dist as ckpt
    from megatron_bolt.convert.hf_io import load_checkpoint_config
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed
    from megatron_bolt.runtime.world import world_from_env

    step, root, saved = load_checkpoint_config(ckpt_path)
    world_size = world_from_env().world_size
    run = _scoring_config(cfg, saved, world_size)
    try:
        run.validate(world_size)
    except ConfigError as exc:
        raise ScoreError(f"layout does not fit the checkpoint's model: {exc}") from None
    with distributed(run) as world:
        model = build_model(run)
        ckpt.load_model(step, model)
        for chunk in model:
            chunk.eval()
        yield run, model, world, root, saved


def score_distributed(run: BoltConfig, model: list, sequences: list[list[int]]) -> list[list[float]] | None:
    """Score ``sequences`` (the same list on every rank) split across data-parallel ranks.

    Collective over the world; rank 0 gets every sequence's log-probs (``score_sequences`` layout), other
    ranks get None.
    """
    from megatron.core import parallel_state

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(sequences), dp))
    scores = score_sequences(run, model, [sequences[i] for i in mine])
    holder = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
              and parallel_state.get_tensor_model_parallel_rank() == 0)
    payload = list(zip(mine, scores, strict=True)) if holder else []
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, payload)
    if torch.distributed.get_rank() != 0:
        return None
    merged: dict[int, list[float]] = {}
    for part in gathered:
        merged.update(dict(part))
    if len(merged) != len(sequences):
        raise RuntimeError(f"scored {len(merged)} of {len(sequences)} sequences: ranks disagree")
    return [merged[i] for i in range(len(sequences))]


def score_file(cfg: BoltConfig, ckpt_path: str | Path, input_path: str | Path, output_path: str | Path) -> int:
    """Score every line of ``input_path`` into ``output_path``; returns the number of lines (collective)."""
    from megatron_bolt.convert.hf_io import find_tokenizer
    from megatron_bolt.data.tokenizer import BoltTokenizer

    with loaded_model(cfg, ckpt_path) as (run, model, world, root, saved):
        def tokenizer_loader():
            tok_dir = find_tokenizer(root, saved)
            if tok_dir is None:
                raise ScoreError(f"input has 'text' lines but {root} has no tokenizer/ (and data.tokenizer is unset)")
            return BoltTokenizer.from_pretrained(tok_dir)

        requests = read_requests(input_path, tokenizer_loader, run.model.max_position_embeddings,
                                 run.model.vocab_size)
        scores = score_distributed(run, model, [ids for _, ids in requests])
        if world.rank == 0:
            _write_atomic(Path(output_path), (
                {**rest, "token_ids": ids, "logprobs": [None, *lp]}
                for (rest, ids), lp in zip(requests, scores, strict=True)
            ))
        torch.distributed.barrier()
    return len(requests)


def _write_atomic(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(cfg: BoltConfig, args) -> int:
    import sys

    from megatron_bolt.checkpoint.dist import CheckpointError
    from megatron_bolt.convert.hf_io import ConversionError
    from megatron_bolt.data.tokenizer import TokenizerError

    try:
        n = score_file(cfg, args.ckpt, args.input, args.output)
    except (ScoreError, ConversionError, CheckpointError, TokenizerError) as exc:
        print(f"bolt score: {exc}", file=sys.stderr)
        return 2
    log.info("scored %d lines -> %s", n, args.output)
    return 0
