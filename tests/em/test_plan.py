"""The EM stage DAG: names, order, dependencies, arrays, and argv that the real CLI and loader accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_bolt.cli import build_parser
from megatron_bolt.config.loader import dump_yaml, load_config
from megatron_bolt.config.schema import BoltConfig, ConfigError
from megatron_bolt.em.plan import SHARD, build_plan, override, write_config

R = "runs/em"
CFG = "runs/em/config.yaml"


def _cfg(**em) -> BoltConfig:
    cfg = BoltConfig()
    cfg.data.tokenizer = "tok"
    cfg.estep.num_shards = 3
    cfg.em.iterations = 2
    cfg.em.warm_documents = ["data/warm"]
    cfg.em.warm_latents = ["data/warm_latents.jsonl"]
    cfg.em.bootstrap_documents = ["data/boot-a", "data/boot-b"]
    for key, value in em.items():
        setattr(cfg.em, key, value)
    return cfg


def _by_name(plan):
    return {s.name: s for s in plan}


def _overrides(stage) -> dict[str, str]:
    return dict(a.split("=", 1) for a in stage.argv if "=" in a)


def test_names_order_and_dependencies():
    plan = build_plan(_cfg(), R, CFG)
    m_step = ["build", "train", "export", "eval"]
    expected = [f"iter0/{n}" for n in m_step]
    for i in (1, 2):
        expected += [f"iter{i}/{n}" for n in ["sample", "score", "merge", *m_step]]
    assert [s.name for s in plan] == expected
    after = {s.name: s.after for s in plan}
    assert after["iter0/build"] == ()
    assert after["iter0/train"] == ("iter0/build",)
    assert after["iter0/eval"] == ("iter0/export",)
    assert after["iter1/sample"] == ("iter0/export",)  # the generator is the previous iteration's model
    assert after["iter2/sample"] == ("iter1/export",)
    assert after["iter2/score"] == ("iter2/sample",)
    assert after["iter2/merge"] == ("iter2/score",)
    assert after["iter2/build"] == ("iter2/merge",)
    seen: set[str] = set()
    for stage in plan:  # topological: every dependency comes earlier
        assert set(stage.after) <= seen, stage.name
        seen.add(stage.name)


def test_kinds_arrays_and_outputs():
    stages = _by_name(build_plan(_cfg(heldout_documents=["data/heldout"]), R, CFG))
    kinds = {n: (s.kind, s.array, s.distributed) for n, s in stages.items() if n.startswith("iter1/")}
    assert kinds == {"iter1/sample": ("sample", 3, False), "iter1/score": ("score", 3, True),
                     "iter1/merge": ("cpu", 0, False), "iter1/build": ("cpu", 0, False),
                     "iter1/train": ("train", 0, True), "iter1/export": ("cpu", 0, False),
                     "iter1/eval": ("eval", 0, False), "iter1/heldout": ("sample", 0, False)}
    assert all(SHARD in s.argv for s in stages.values() if s.array)
    assert not any(SHARD in a for s in stages.values() if not s.array for a in s.argv)
    assert stages["iter1/sample"].outputs == tuple(f"{R}/iter1/estep/samples/shard-0000{k}.jsonl" for k in range(3))
    assert stages["iter1/score"].outputs == tuple(f"{R}/iter1/estep/scores/shard-0000{k}.jsonl" for k in range(3))
    assert stages["iter1/merge"].outputs == (f"{R}/iter1/estep/estep.json",)
    assert stages["iter1/build"].outputs == (f"{R}/iter1/data/joint.json",)
    assert stages["iter1/train"].outputs == (f"{R}/iter1/checkpoints/step_00000020",)  # train.train_iters
    assert stages["iter1/export"].outputs == (f"{R}/iter1/hf/config.json",)
    assert stages["iter1/eval"].outputs == (f"{R}/iter1/eval/summary.json",)
    assert stages["iter0/heldout"].outputs == (f"{R}/iter0/heldout/estep.json",)
    assert stages["iter0/heldout"].after == ("iter0/export",)
    assert stages["iter2/sample"].shard_argv(7)[5:7] == ("--shard", "7")


def test_estep_stages_read_the_previous_model_and_heldout_its_own():
    stages = _by_name(build_plan(_cfg(heldout_documents=["data/heldout"]), R, CFG))
    for name in ("iter2/sample", "iter2/score", "iter2/merge"):
        argv = stages[name].argv
        assert argv[argv.index("--ckpt") + 1] == f"{R}/iter1/checkpoints"
        assert argv[argv.index("--hf-dir") + 1] == f"{R}/iter1/hf"
        assert _overrides(stages[name])["estep.output_dir"] == f"{R}/iter2/estep"
    heldout = stages["iter2/heldout"].argv
    assert heldout[heldout.index("--ckpt") + 1] == f"{R}/iter2/checkpoints"
    assert heldout[heldout.index("--stage") + 1] == "all"


@pytest.mark.parametrize("restart", [True, False])
@pytest.mark.parametrize("base", ["ckpt/base", None])
def test_restart_from_base(restart, base):
    stages = _by_name(build_plan(_cfg(restart_from_base=restart, base_checkpoint=base), R, CFG))
    loads = {i: _overrides(stages[f"iter{i}/train"]) for i in (0, 1, 2)}
    assert loads[0]["train.checkpoint.load"] == (base or "null")
    for i in (1, 2):
        expected = (base or "null") if restart else f"{R}/iter{i - 1}/checkpoints"
        assert loads[i]["train.checkpoint.load"] == expected
        assert loads[i]["train.checkpoint.finetune"] == ("false" if expected == "null" else "true")
        assert loads[i]["train.checkpoint.save"] == f"{R}/iter{i}/checkpoints"


@pytest.mark.parametrize("keep", [False, True])
def test_keep_warm_latents(keep):
    build = _overrides(_by_name(build_plan(_cfg(keep_warm_latents=keep), R, CFG))["iter1/build"])
    if keep:
        assert build["build.documents"] == "[data/boot-a,data/boot-b,data/warm]"
        assert build["build.latents"] == f"[{R}/iter1/estep/latents.jsonl,data/warm_latents.jsonl]"
    else:
        assert build["build.documents"] == "[data/boot-a,data/boot-b]"
        assert build["build.latents"] == f"[{R}/iter1/estep/latents.jsonl]"


@pytest.mark.parametrize("raw", [False, True])
def test_warm_raw_bootstrap_adds_the_bootstrap_documents_without_latents(raw):
    build = _overrides(_by_name(build_plan(_cfg(warm_raw_bootstrap=raw), R, CFG))["iter0/build"])
    assert build["build.documents"] == ("[data/warm,data/boot-a,data/boot-b]" if raw else "[data/warm]")
    assert build["build.latents"] == "[data/warm_latents.jsonl]"


def test_every_argv_parses_and_loads(tmp_path):
    """The argv reach the real parser and loader: flags exist, overrides name real keys with the right types."""
    cfg = _cfg(heldout_documents=["data/heldout"], base_checkpoint="ckpt/base", keep_warm_latents=True)
    run_dir = str(tmp_path / "run, with: odd null 'chars'")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(dump_yaml(cfg))
    plan = build_plan(cfg, run_dir, str(config_path))
    parser = build_parser()
    loaded = {}
    for stage in plan:
        args = parser.parse_args(list(stage.shard_argv(1)))
        assert args.command == stage.argv[0] and args.config == str(config_path)
        loaded[stage.name] = load_config(args.config, args.overrides)
    assert loaded["iter1/build"].build.latents == [f"{run_dir}/iter1/estep/latents.jsonl", "data/warm_latents.jsonl"]
    assert loaded["iter1/build"].build.output_prefix == f"{run_dir}/iter1/data/joint"
    assert loaded["iter2/train"].data.data_prefix == [f"{run_dir}/iter2/data/joint"]
    assert loaded["iter2/train"].train.checkpoint.load == "ckpt/base"
    assert loaded["iter2/train"].train.checkpoint.finetune is True
    assert loaded["iter1/eval"].eval.output_dir == f"{run_dir}/iter1/eval"
    assert loaded["iter1/heldout"].estep.documents == ["data/heldout"]
    assert loaded["iter1/heldout"].estep.num_shards == 1
    assert loaded["iter2/score"].estep.num_shards == 3  # arrays keep the configured shard count
    assert parser.parse_args(list(_by_name(plan)["iter2/score"].shard_argv(2))).shard == 2


@pytest.mark.parametrize("value", ["null", "1e5", "13:17:20", "a, b", "[x]", "- a", "a: b: c", "it's \"q\"", "#c"])
def test_override_values_read_back_as_strings(value):
    assert load_config(None, [override("build.output_prefix", value)]).build.output_prefix == value
    assert load_config(None, [override("build.documents", [value, "x"])]).build.documents == [value, "x"]


@pytest.mark.parametrize("em, field", [
    ({"warm_documents": []}, "em.warm_documents"),
    ({"warm_latents": []}, "em.warm_latents"),
    ({"bootstrap_documents": []}, "em.bootstrap_documents"),
    ({"iterations": -1}, "em.iterations"),
])
def test_missing_inputs_name_the_field(em, field):
    with pytest.raises(ConfigError, match=field):
        build_plan(_cfg(**em), R, CFG)


def test_warm_start_only_needs_no_bootstrap_documents():
    plan = build_plan(_cfg(iterations=0, bootstrap_documents=[]), R, CFG)
    assert [s.name for s in plan] == ["iter0/build", "iter0/train", "iter0/export", "iter0/eval"]


def test_tokenizer_and_shards_are_checked():
    cfg = _cfg()
    cfg.data.tokenizer = None
    cfg.estep.num_shards = 0
    with pytest.raises(ConfigError, match=r"(?s)estep.num_shards=0.*data.tokenizer"):
        build_plan(cfg, R, CFG)


def test_outputs_use_the_names_the_stages_write():
    """Done markers are the files each stage writes last; the names come from the modules that write them."""
    from megatron_bolt.checkpoint.dist import step_dir
    from megatron_bolt.estep.work import shard_name

    stages = _by_name(build_plan(_cfg(), R, CFG))
    assert stages["iter0/train"].outputs == (str(step_dir(f"{R}/iter0/checkpoints", 20)),)
    assert stages["iter2/score"].outputs[2] == f"{R}/iter2/estep/scores/{shard_name(2)}.jsonl"


def test_finished_needs_every_output(tmp_path):
    sample = _by_name(build_plan(_cfg(), "run", CFG))["iter1/sample"]
    for out in sample.outputs[:-1]:
        (tmp_path / out).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / out).touch()
    assert not sample.finished(tmp_path)  # one shard still missing
    (tmp_path / sample.outputs[-1]).touch()
    assert sample.finished(tmp_path) and not sample.finished(tmp_path / "elsewhere")


def test_write_config_keeps_a_run_consistent(tmp_path):
    cfg = _cfg()
    path = Path(write_config(cfg, str(tmp_path)))
    stamp = path.stat().st_mtime_ns
    assert load_config(path) == cfg
    assert write_config(cfg, str(tmp_path)) == str(path) and path.stat().st_mtime_ns == stamp  # untouched
    cfg.em.iterations = 5  # extending a run
    write_config(cfg, str(tmp_path))
    assert load_config(path).em.iterations == 5
    cfg.train.lr = 0.5
    with pytest.raises(ConfigError, match="holds a different config"):
        write_config(cfg, str(tmp_path))
