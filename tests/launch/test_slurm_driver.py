"""The sbatch driver against a fake ``sbatch`` on PATH: what it would queue, chained exactly like the plan."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from megatron_bolt.config.loader import load_config
from megatron_bolt.config.schema import BoltConfig, ConfigError
from megatron_bolt.em.plan import build_plan, write_config
from megatron_bolt.launch import slurm
from megatron_bolt.launch.cluster import load_cluster, split_overrides

CLUSTER = ROOT / "examples" / "cluster.yaml"
FAKE_SBATCH = """#!{python} -S
import json, os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SBATCH_DIR"])
counter = state / "count"
n = int(counter.read_text()) + 1 if counter.exists() else 1001
counter.write_text(str(n))
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in {names!r}}}}}) + "\\n")
if os.environ.get("FAKE_SBATCH_FAIL_AT") == str(n):
    sys.exit("sbatch: error: Batch job submission failed: Invalid account")
print(f"{{n}};cluster0" if n % 2 else n)  # --parsable: "ID" or "ID;CLUSTER"
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """A ``sbatch`` first on PATH that records argv and job variables and prints incrementing job ids."""
    bin_dir, state = tmp_path / "bin", tmp_path / "sbatch-state"
    bin_dir.mkdir()
    state.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(FAKE_SBATCH.format(python=sys.executable, names=slurm.JOB_ENV))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SBATCH_DIR", str(state))

    def calls() -> list[dict]:
        path = state / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return calls


def _cfg(run_dir: str, **em) -> BoltConfig:
    cfg = load_config(ROOT / "examples" / "tinyllama_finemath.yaml", [f"em.run_dir={run_dir}"])
    cfg.em.iterations = 2
    cfg.estep.num_shards = 3
    for key, value in em.items():
        setattr(cfg.em, key, value)
    return cfg


def _flags(argv: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(--flag=value options, bare options, everything from the script on)."""
    script = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
    opts = [a.split("=", 1) for a in argv[:script] if "=" in a]
    return dict(opts), [a for a in argv[:script] if "=" not in a], argv[script:]


def test_queues_the_plan_with_afterok_arrays_and_resources(tmp_path, fake_sbatch, monkeypatch):
    monkeypatch.setenv("BOLT_CONTAINER_IMAGE", "leaked-from-my-shell")
    run_dir = str(tmp_path / "run")
    cfg = _cfg(run_dir)
    config_path = write_config(cfg, run_dir)
    overrides = [f"cluster.workdir={tmp_path}", "cluster.account=acct", "cluster.train.nodes=2",
                 "cluster.sample.array_limit=2", "cluster.cpu.container_image=null", "cluster.container_image=null",
                 "cluster.train.container_image=trainer.sqsh"]
    subs = slurm.submit_em(cfg, run_dir, config_path, CLUSTER, cluster_overrides=overrides)
    plan = build_plan(cfg, run_dir, config_path)
    calls = fake_sbatch()
    assert [s.stage for s in subs] == [s.name for s in plan] and len(calls) == len(plan)
    assert [s.job_id for s in subs] == [str(1001 + i) for i in range(len(plan))]  # ";cluster0" stripped
    ids = {s.stage: s.job_id for s in subs}
    for stage, call in zip(plan, calls, strict=True):
        opts, bare, tail = _flags(call["argv"])
        assert tail == [str(slurm.REPO_SLURM / f"{stage.kind}.sbatch"), *stage.argv]  # argv passed through as is
        assert "--parsable" in bare and opts["--account"] == "acct" and opts["--partition"] == "batch"
        assert opts["--chdir"] == str(tmp_path)
        assert opts["--job-name"] == "bolt-" + stage.name.replace("/", "-")
        if stage.after:
            assert opts["--dependency"] == "afterok:" + ":".join(ids[a] for a in stage.after)
            assert opts["--kill-on-invalid-dep"] == "yes"
        else:
            assert "--dependency" not in opts
        expected_array = {"sample": "0-2%2", "score": "0-2"}.get(stage.name.split("/")[1])
        assert opts.get("--array") == expected_array
        assert opts["--output"].endswith("%x-%A_%a.out" if expected_array else "%x-%j.out")
        assert opts["--output"].startswith(str(tmp_path / "run" / "logs"))
        r = load_cluster(CLUSTER, overrides).resources(stage.kind)
        assert opts["--nodes"] == str(r.nodes) and opts["--time"] == r.time
        assert opts.get("--gpus-per-node") == (str(r.gpus_per_node) if r.gpus_per_node else None)
    by_stage = {s.name: call for s, call in zip(plan, calls, strict=True)}
    train = by_stage["iter1/train"]
    assert _flags(train["argv"])[0]["--nodes"] == "2" and "--exclusive" in train["argv"]
    assert train["env"]["BOLT_CONTAINER_IMAGE"] == "trainer.sqsh" and train["env"]["GPUS_PER_NODE"] == "8"
    assert train["env"]["BOLT_CONTAINER_MOUNTS"].count(",") == 2
    sample = by_stage["iter2/sample"]["env"]
    assert sample["BOLT_SAMPLE_PYTHON"] == "python"
    assert sample["BOLT_SAMPLE_CONTAINER_IMAGE"] == "/shared/images/tensorrt-llm-bolt.sqsh"
    assert by_stage["iter1/merge"]["env"]["BOLT_CONTAINER_IMAGE"] is None  # the shell's value does not leak in
    assert "--gpus-per-node=1" in by_stage["iter0/heldout"]["argv"] and "--array" not in str(by_stage["iter0/heldout"])
    assert (tmp_path / "run" / "logs").is_dir()


def test_hostile_config_values_arrive_intact_and_never_run(tmp_path, fake_sbatch, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weird = "x $(touch PWNED) `touch PWNED2`; touch PWNED3 'single' \"double\" a,b"
    run_dir = str(tmp_path / weird)
    cfg = _cfg(run_dir, iterations=1, bootstrap_documents=[weird, "plain"])
    config_path = write_config(cfg, run_dir)
    slurm.submit_em(cfg, run_dir, config_path, CLUSTER, cluster_overrides=["cluster.workdir=null"])
    calls = fake_sbatch()
    merge = next(c["argv"] for c in calls if "--job-name=bolt-iter1-merge" in c["argv"])
    assert merge[merge.index("--config") + 1] == config_path
    overrides = [a for a in merge if a.startswith("estep.")]
    loaded = load_config(None, overrides).estep
    assert loaded.documents == [weird, "plain"] and loaded.output_dir == f"{run_dir}/iter1/estep"
    assert not list(tmp_path.glob("PWNED*"))


def test_dry_run_prints_and_queues_nothing(tmp_path, fake_sbatch):
    run_dir = str(tmp_path / "run")
    cfg = _cfg(run_dir)
    subs = slurm.submit_em(cfg, run_dir, f"{run_dir}/config.yaml", CLUSTER, dry_run=True,
                           cluster_overrides=["cluster.workdir=null"])
    assert fake_sbatch() == [] and not Path(run_dir).exists()
    score = next(s for s in subs if s.stage == "iter1/score")
    assert "--dependency=afterok:<iter1/sample>" in score.command
    line = shlex.split(score.shell())
    assert line[-len(score.command):] == list(score.command) and "GPUS_PER_NODE=8" in line


def test_resubmission_queues_only_unfinished_stages(tmp_path, fake_sbatch):
    run_dir = "run"  # relative: resolved against cluster.workdir, as the jobs see it
    cfg = _cfg(run_dir, iterations=1)
    plan = build_plan(cfg, run_dir, f"{run_dir}/config.yaml")
    done = {"iter0/build", "iter0/train", "iter0/export", "iter0/eval"}
    stages = {s.name: s for s in plan}
    for out in [o for name in done for o in stages[name].outputs] + [stages["iter1/sample"].outputs[0]]:
        (tmp_path / out).parent.mkdir(parents=True, exist_ok=True)  # iter1/sample: 1 of 3 shards done
        (tmp_path / out).touch()
    subs = slurm.submit_em(cfg, run_dir, str(tmp_path / "unused.yaml"), CLUSTER, dry_run=True,
                           cluster_overrides=[f"cluster.workdir={tmp_path}"])
    assert [s.stage for s in subs] == [s.name for s in plan if s.name not in done]
    sample = next(s for s in subs if s.stage == "iter1/sample")
    assert not any(a.startswith("--dependency") for a in sample.command)  # its dependency already finished
    assert "--dependency=afterok:<iter1/sample>" in next(s for s in subs if s.stage == "iter1/score").command


def test_sbatch_failure_lists_the_jobs_to_cancel(tmp_path, fake_sbatch, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL_AT", "1003")
    run_dir = str(tmp_path / "run")
    cfg = _cfg(run_dir)
    with pytest.raises(slurm.SubmitError, match=r"iter0/export failed.*Invalid account.*scancel 1001 1002\)"):
        slurm.submit_em(cfg, run_dir, write_config(cfg, run_dir), CLUSTER, cluster_overrides=["cluster.workdir=null"])
    assert len(fake_sbatch()) == 3


def test_config_is_validated_at_the_training_world_size(tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = _cfg(run_dir)
    # 192 rows a step cannot split into micro-batches of 4 over 5 data-parallel ranks
    with pytest.raises(ConfigError, match="global_batch_size=192"):
        slurm.submit_em(cfg, run_dir, "unused", CLUSTER, dry_run=True,
                        cluster_overrides=["cluster.train.gpus_per_node=5"])
    with pytest.raises(ConfigError, match="does not exist"):
        slurm.submit_em(cfg, run_dir, str(tmp_path / "missing.yaml"), CLUSTER)


def test_main_writes_the_config_and_splits_overrides(tmp_path, fake_sbatch, capsys):
    run_dir = tmp_path / "run"
    argv = ["--config", str(ROOT / "examples" / "tiny_em.yaml"), "--cluster", str(CLUSTER), f"em.run_dir={run_dir}",
            "cluster.workdir=null", "cluster.account=me", "cluster.train.gpus_per_node=1", "em.iterations=0"]
    assert slurm.main(argv) == 0
    assert load_config(run_dir / "config.yaml").em.run_dir == str(run_dir)
    calls = fake_sbatch()
    assert len(calls) == 5 and all("--account=me" in c["argv"] for c in calls)
    assert "queued 5 jobs" in capsys.readouterr().out
    assert slurm.main([*argv, "em.iterations=1"]) == 0  # extending a run is allowed
    assert slurm.main([*argv, "train.lr=0.5"]) == 2  # changing one is not
    assert "holds a different config" in capsys.readouterr().err


def test_cluster_yaml_keeps_per_kind_defaults_and_rejects_nonsense(tmp_path):
    partial = tmp_path / "cluster.yaml"
    partial.write_text("train:\n  time: '01:00:00'\nsample:\n  python: /opt/trtllm/bin/python\n")
    cluster = load_cluster(partial)
    assert cluster.train.time == "01:00:00" and cluster.train.gpus_per_node == 8  # not reset by the partial section
    assert cluster.python_for("sample") == "/opt/trtllm/bin/python"
    assert cluster.python_for("train") == ".venv/bin/python"
    with pytest.raises(ConfigError, match="unknown config key train.gpus"):
        load_cluster(partial, ["cluster.train.gpus=4"])
    with pytest.raises(ConfigError, match="sample.gpus_per_node=0"):
        load_cluster(partial, ["sample.gpus_per_node=0"])
    with pytest.raises(ConfigError, match="score.nodes=2: only train"):
        load_cluster(partial, ["score.nodes=2"])
    assert split_overrides(["a.b=1", "cluster.x=2"]) == (["a.b=1"], ["cluster.x=2"])
