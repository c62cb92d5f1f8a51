"""The ``bolt`` command: one subcommand per pipeline stage.

    bolt train --config examples/tiny_cpu.yaml train.train_iters=50
    torchrun --nproc-per-node 2 -m megatron_bolt.cli train --config ... parallel.tensor_model_parallel_size=2

Every subcommand takes ``--config FILE.yaml`` plus ``key=value`` overrides; ``bolt CMD --help`` lists the
config keys it reads, with defaults and meaning. Handlers are imported only when their command runs, so
``--help`` never pays for importing torch or megatron-core.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass, field

from megatron_bolt.config.loader import field_help
from megatron_bolt.config.schema import BoltConfig, ConfigError

log = logging.getLogger("bolt")


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    required: bool = False
    type: type = str
    default: object = None
    action: str | None = None  # e.g. "store_true" for a switch
    nargs: str | None = None  # e.g. "+" for a positional taking one or more values (names without dashes)


@dataclass(frozen=True)
class Command:
    help: str
    sections: tuple[str, ...]
    handler: str  # "module:function" taking (cfg, args)
    flags: tuple[Flag, ...] = field(default_factory=tuple)
    recipe: str | None = None  # "module:function" returning default overrides when no --config is given
    # False where the model comes from a checkpoint or HF directory: the handler validates against it.
    validate_early: bool = True


_ESTEP_FLAGS = (
    Flag("--ckpt", "Megatron checkpoint of the generator (the previous iteration's model).", required=True),
    Flag("--hf-dir", "Its Hugging Face export, loaded by the engine (default: exported once into OUTPUT/hf)."),
    Flag("--shard", "Run this shard only (Slurm array task id); default: every pending shard.", type=int),
    Flag("--stage", "all | sample | score | merge.", default="all"),
)

ALL = ("model", "parallel", "data", "train", "estep", "em", "eval")

COMMANDS: dict[str, Command] = {
    "quickstart": Command("Run the whole EM loop at tiny scale on this machine (the README's main job).", ALL,
                          "megatron_bolt.em.quickstart:main",
                          (Flag("--out", "Output directory (default: runs/quickstart)."),),
                          recipe="megatron_bolt.recipes:tiny_cpu_quickstart"),
    "prepare": Command("Read a corpus, split it and chunk documents by sentences.", ("prepare",),
                       "megatron_bolt.data.prepare:main"),
    "synthesize": Command("Write warm-start latents with a teacher model (OpenAI-compatible or local).",
                          ("synthesize",), "megatron_bolt.data.synthesize:main"),
    "build-dataset": Command("Build joint latent+text Megatron indexed datasets.", ("data", "build"),
                             "megatron_bolt.data.build:main"),
    "train": Command("M-step: train the Megatron model (launch with torchrun for several ranks).",
                     ("model", "parallel", "data", "train"), "megatron_bolt.train.loop:main"),
    "import-hf": Command("Convert a Hugging Face Llama checkpoint to a Megatron distributed checkpoint.",
                         ("model", "parallel"), "megatron_bolt.convert.hf_io:import_main",
                         (Flag("--hf-dir", "HF model directory.", required=True),
                          Flag("--out", "Output checkpoint directory.", required=True),
                          Flag("--tp", "Intended tensor parallel size: validated and recorded (the checkpoint "
                                "reshards on load to any layout).", type=int, default=1),
                          Flag("--pp", "Intended pipeline parallel size (validated and recorded, like --tp).", type=int,
                               default=1)), validate_early=False),
    "export-hf": Command("Export a Megatron checkpoint as a Hugging Face directory.", ("model",),
                          "megatron_bolt.convert.hf_io:export_main",
                         (Flag("--ckpt", "Checkpoint directory.", required=True),
                          Flag("--out", "Output HF directory.", required=True)), validate_early=False),
    "sample": Command("E-step sample stage alone: draw K latents per chunk through a generation backend.",
                      ("parallel", "train", "estep"), "megatron_bolt.estep.run:sample_main", _ESTEP_FLAGS[:3],
                      validate_early=False),
    "score": Command("Teacher-forced per-token log-probabilities with the Megatron model.",
                     ("model", "parallel", "train"), "megatron_bolt.score.scorer:main",
                     (Flag("--ckpt", "Checkpoint directory.", required=True),
                      Flag("--input", "Input JSONL (token_ids or text per line).", required=True),
                      Flag("--output", "Output JSONL.", required=True)), validate_early=False),
    "estep": Command("E-step: sample, score, importance-resample latents for the next iteration.",
                     ("parallel", "train", "estep"), "megatron_bolt.estep.run:main", _ESTEP_FLAGS,
                     validate_early=False),
    "em": Command("Run the EM loop: warm start, then E-step / M-step iterations (resumable).", ALL,
                  "megatron_bolt.em.runner:main",
                  (Flag("--launcher", "local (this process, stage by stage) or slurm (queue the whole plan).",
                        default="local"),
                   Flag("--cluster", "Cluster settings for --launcher slurm (see examples/cluster.yaml)."),
                   Flag("--dry-run", "With --launcher slurm: print the sbatch commands, submit nothing.",
                        action="store_true"))),
    "eval": Command("Evaluate a model: greedy few-shot accuracy (embedded task, MATH, GSM8K) or raw perplexity.",
                    ("eval",), "megatron_bolt.eval.runner:main",
                    (Flag("--ckpt", "Megatron checkpoint (exported to HF once) or HF directory to evaluate.",
                          required=True),), validate_early=False),
    "report": Command("Render report.md and plots from EM runs' report.json files (compare several runs).", (),
                      "megatron_bolt.report.render:main",
                      (Flag("runs", "Run directories, each holding report.json.", nargs="+"),
                       Flag("--out", "Output directory for report.md and the PNG plots.", required=True)),
                      validate_early=False),
}


def _config_epilog(sections: tuple[str, ...]) -> str:
    rows = [r for r in field_help(BoltConfig) if r[0].split(".")[0] in sections]
    if not rows:
        return ""
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (set in --config YAML or as key=value overrides):"]
    for key, default, text in rows:
        lines.append(f"  {key:<{width}}  {text} [default: {default}]")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bolt", description="megatron-bolt: BoLT latent-thought pretraining on megatron-core.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=_config_epilog(cmd.sections),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE.yaml", help="YAML config file (see examples/).")
        for flag in cmd.flags:
            extra = {"nargs": flag.nargs} if flag.nargs else {}
            if flag.name.startswith("-"):  # argparse takes `required` for options only
                extra["required"] = flag.required
            if flag.action:
                extra["action"] = flag.action
            else:
                extra["type"] = flag.type
            p.add_argument(flag.name, help=flag.help, default=flag.default, **extra)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="Config overrides, e.g. train.lr=3e-4.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cmd = COMMANDS[args.command]
    from megatron_bolt.config.loader import load_config
    from megatron_bolt.launch.cluster import split_overrides as split_cluster
    from megatron_bolt.runtime.world import world_from_env

    try:
        base = None
        if cmd.recipe and not args.config:
            module, func = cmd.recipe.split(":")
            base = getattr(importlib.import_module(module), func)()
        if args.command == "em":  # `bolt em --launcher slurm cluster.train.nodes=4 ...`: cluster keys go aside
            args.overrides, args.cluster_overrides = split_cluster(args.overrides)
        cfg = load_config(args.config, args.overrides, base=base)
        if cmd.validate_early:
            cfg.validate(world_from_env().world_size)
    except ConfigError as exc:
        print(f"bolt {args.command}: {exc}", file=sys.stderr)
        return 2
    module, func = cmd.handler.split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(cfg, args) or 0)
    except OSError as exc:  # a full disk, a read-only or missing directory: one line, not a traceback
        from megatron_bolt.utils.atomic import describe_os_error

        log.debug("bolt %s failed", args.command, exc_info=True)
        print(f"bolt {args.command}: {describe_os_error(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
