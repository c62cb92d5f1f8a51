"""Worker for the distributed tests: runs a plan of phases in one process (one import, one process group).

    python worker.py PLAN.json OUT.json                          # world size 1
    torchrun --nproc-per-node 2 worker.py PLAN.json OUT.json     # gloo, 2 ranks

PLAN.json is a list of phases ``{"name", "overrides": [...], "init": DIR?, "save": DIR?, "mode"}`` where mode is
``make-init`` (build the model, save its initial weights to ``save``), ``train`` (the real ``bolt train``
loop from ``init``'s weights, saving to ``save``, then evaluating what it saved), ``eval`` (per-token
losses of checkpoint ``init``) or ``generate`` (the ``ponder`` backend's samples from checkpoint ``init`` at
the phase's tensor-parallel size). OUT.json maps each name to {"losses", "grad_norms", "eval"} or
{"generate"} (rank 0 writes).
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch

EVAL_ROWS = 4


def evaluate(cfg, ckpt_dir) -> list[list[float]]:
    """Per-token losses of a fixed batch, known on every rank."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bolt.checkpoint import dist as ckpt
    from megatron_bolt.data.synthetic import CopyTaskRows
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed
    from megatron_bolt.train.step import collecting_forward_step, split_microbatches

    with distributed(cfg):
        model = build_model(cfg)
        ckpt.load_model(ckpt.resolve(ckpt_dir), model)
        for m in model:
            m.eval()
        batch = CopyTaskRows(cfg.data.seq_length, cfg.model.vocab_size, seed=99).batch(10_000, EVAL_ROWS)
        sink: list[torch.Tensor] = []
        micro = split_microbatches(batch, EVAL_ROWS // 2)  # interleaved PP needs >= PP micro-batches
        iterators = [iter(micro) for _ in model]
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=partial(collecting_forward_step, sink),
                data_iterator=iterators if len(model) > 1 else iterators[0], model=model,
                num_microbatches=len(micro), seq_length=cfg.data.seq_length, micro_batch_size=EVAL_ROWS // 2,
                forward_only=True,
            )
        last = parallel_state.is_pipeline_last_stage()
        result = torch.cat(sink) if last else torch.zeros(EVAL_ROWS, cfg.data.seq_length)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        return result.tolist()


def generate(cfg, ckpt_dir) -> list[list]:
    """[token ids, log-probs] of seeded samples from fixed prompts, known on every rank."""
    from megatron_bolt.sample.interfaces import BackendOptions, Request, SamplingParams, load_backend

    options = BackendOptions(tensor_parallel_size=cfg.parallel.tensor_model_parallel_size)
    backend = load_backend("ponder", ckpt_dir, options)
    try:
        out = backend.generate([Request([5, 6, 7, 8, 9], seed=1), Request([11, 4], seed=2)],
                               SamplingParams(n=2, max_tokens=5))
    finally:
        backend.close()
    return [[g.token_ids, g.logprobs] for gens in out for g in gens]


def run_phase(phase: dict) -> dict:
    from megatron_bolt.checkpoint import dist as ckpt
    from megatron_bolt.config.loader import load_config
    from megatron_bolt.models.gpt import build_model
    from megatron_bolt.runtime import distributed
    from megatron_bolt.train.loop import train

    cfg = load_config(None, phase.get("overrides", []))
    mode = phase["mode"]
    print(f"worker: phase {phase['name']} ({mode})", file=sys.stderr, flush=True)
    if mode == "make-init":
        with distributed(cfg):
            ckpt.save_model(phase["save"], 0, build_model(cfg))
        return {}
    if mode == "eval":
        return {"eval": evaluate(cfg, phase["init"])}
    if mode == "generate":
        return {"generate": generate(cfg, phase["init"])}
    cfg.train.checkpoint.save = phase["save"]
    if phase.get("init"):
        cfg.train.checkpoint.load, cfg.train.checkpoint.finetune = phase["init"], True
    history = train(cfg)
    cfg.train.checkpoint.save = cfg.train.checkpoint.load = None
    return {
        "losses": [h["loss"] for h in history],
        "grad_norms": [h["grad_norm"] for h in history],
        "eval": evaluate(cfg, phase["save"]),
    }


def main() -> int:
    plan_path, out_path = sys.argv[1:3]
    with open(plan_path) as f:
        plan = json.load(f)
    results = {phase["name"]: run_phase(phase) for phase in plan}
    from megatron_bolt.runtime import world_from_env

    if world_from_env().rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
