"""examples/nemo_em.py: the plan as a nemo-run experiment, on Slurm (through a fake sbatch) and locally.

Each run is a subprocess with NEMORUN_HOME in a temporary directory (nemo-run reads it at import).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from megatron_bolt.config.loader import load_config
from megatron_bolt.em.plan import build_plan, override

pytestmark = pytest.mark.nemo

SCRIPT = ROOT / "examples" / "nemo_em.py"
CLUSTER = ROOT / "examples" / "cluster.yaml"
WEIRD = "docs $(touch PWNED); `touch PWNED2` 'single' \"double\" a,b"
RECORDER = """#!{python} -S
import fcntl, json, os, sys
log = os.environ["FAKE_LOG"]
with open(log + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # nemo-run submits the stages of one DAG level from several threads
    calls = open(log).read().splitlines() if os.path.exists(log) else []
    job_id = 1001 + len(calls)
    with open(log, "a") as f:
        f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]], "id": job_id}}) + "\\n")
if os.path.basename(sys.argv[0]) == "sbatch":
    print(job_id)
"""


def _nemo_em(tmp_path: Path, *args: str, path: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "nemo-home"), "FAKE_LOG": str(tmp_path / "calls.jsonl"),
           "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    if path:
        env["PATH"] = path
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=tmp_path)


def _fake_bin(tmp_path: Path, *names: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        (bin_dir / name).write_text(RECORDER.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"


def _calls(tmp_path: Path) -> list[dict]:
    log = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _slurm_args(tmp_path: Path) -> tuple[list[str], list]:
    run_dir = str(tmp_path / "run")
    overrides = [f"em.run_dir={run_dir}", "em.iterations=1", "estep.num_shards=3",
                 override("em.bootstrap_documents", [WEIRD])]
    cluster = ["cluster.account=acct", f"cluster.workdir={tmp_path}", "cluster.train.nodes=2",
               "cluster.sample.array_limit=2"]
    args = ["--config", str(ROOT / "examples" / "tinyllama_finemath.yaml"), "--executor", "slurm",
            "--cluster", str(CLUSTER), *overrides, *cluster]
    cfg = load_config(ROOT / "examples" / "tinyllama_finemath.yaml", overrides)
    return args, build_plan(cfg, run_dir, f"{run_dir}/config.yaml")


def _sbatch_params(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script.read_text(), flags=re.M))


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """One Slurm submission of a 1-iteration plan through the fake sbatch: (tmp dir, PATH, plan, sbatch calls)."""
    tmp_path = tmp_path_factory.mktemp("slurm")
    args, plan = _slurm_args(tmp_path)
    path = _fake_bin(tmp_path, "sbatch", "python")
    proc = _nemo_em(tmp_path, *args, path=path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp_path, path, plan, _calls(tmp_path)


def test_slurm_experiment_submits_the_plan(submitted):
    _, _, plan, calls = submitted
    assert len(calls) == len(plan)  # one Slurm job per stage: arrays are one job
    scripts = {Path(c["argv"][-1]).name.removesuffix("_sbatch.sh"): c for c in calls}
    ids = {s.name: str(scripts[s.name.replace("/", "-")]["id"]) for s in plan}
    for stage in plan:
        call = scripts[stage.name.replace("/", "-")]
        deps = [a for a in call["argv"] if a.startswith("--dependency=")]
        assert deps == ([f"--dependency=afterok:{':'.join(ids[a] for a in stage.after)}"] if stage.after else [])
        params = _sbatch_params(Path(call["argv"][-1]))
        assert params["account"] == "acct" and params["partition"] == "batch"
        assert params["job-name"] == "bolt-" + stage.name.replace("/", "-")
        assert params.get("array") == ({"sample": "0-2%2", "score": "0-2"}.get(stage.kind) if stage.array else None)
        assert ("kill-on-invalid-dep" in params) == bool(stage.after)
        gpus = {"cpu": None, "sample": "1", "score": "8", "train": "8", "eval": "1"}[stage.kind]
        assert params.get("gpus-per-node") == gpus
        assert params["nodes"] == ("2" if stage.kind == "train" else "1")
        body = Path(call["argv"][-1]).read_text()
        image = "tensorrt-llm-bolt.sqsh" if stage.kind == "sample" else "megatron-bolt.sqsh"
        assert f"--container-image /shared/images/{image}" in body
        if stage.distributed:
            assert re.search(rf"torchrun .*--nnodes {params['nodes']} --nproc-per-node 8 .*--no-python", body)
    assert "exclusive" in _sbatch_params(Path(scripts["iter1-train"]["argv"][-1]))


def test_task_scripts_run_the_stage_argv_verbatim(submitted):
    """The scripts nemo-run would start: the shard comes from the array task, hostile values stay one argument."""
    tmp_path, path, plan, _ = submitted
    stages = {s.name: s for s in plan}
    env = {"PATH": path, "FAKE_LOG": str(tmp_path / "python.jsonl"), "SLURM_ARRAY_TASK_ID": "2"}

    def run(stage: str) -> subprocess.CompletedProcess:
        (task,) = (tmp_path / "nemo-home").rglob(f"scripts/{stage.replace('/', '-')}.sh")
        return subprocess.run(["bash", str(task)], capture_output=True, text=True, env=env, cwd=tmp_path)

    missing = run("iter1/score")  # its input, iter1/sample's output, does not exist yet
    assert missing.returncode == 1 and "iter1/estep/samples/shard-00000.jsonl is missing" in missing.stderr
    assert not (tmp_path / "python.jsonl").exists()
    for output in stages["iter0/export"].outputs:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).touch()
    assert run("iter1/sample").returncode == 0
    (call,) = [json.loads(line) for line in (tmp_path / "python.jsonl").read_text().splitlines()]
    assert call["argv"] == ["python", "-m", "megatron_bolt.cli", *stages["iter1/sample"].shard_argv(2)]
    assert not list(tmp_path.rglob("PWNED*"))
    for output in stages["iter1/sample"].outputs:  # every shard done: a rerun of the task does nothing
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).touch()
    again = run("iter1/sample")
    assert again.returncode == 0 and "iter1/sample already finished" in again.stdout
    assert len((tmp_path / "python.jsonl").read_text().splitlines()) == 1


def test_dryrun_submits_nothing(tmp_path):
    args, plan = _slurm_args(tmp_path)
    proc = _nemo_em(tmp_path, *args, "--dryrun", path=_fake_bin(tmp_path, "sbatch"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _calls(tmp_path) == [] and not (tmp_path / "run").exists()
    assert len(list((tmp_path / "nemo-home").rglob("*_sbatch.sh"))) == len(plan)


def test_slurm_needs_an_account(tmp_path):
    args, _ = _slurm_args(tmp_path)
    proc = _nemo_em(tmp_path, *[a for a in args if a != "cluster.account=acct"], "cluster.account=null")
    assert proc.returncode == 2 and "set cluster.account" in proc.stderr


def _tiny_data(root: Path) -> list[str]:
    """The embedded corpus split into warm-start and bootstrap documents, warm latents filtered (as quickstart)."""
    from megatron_bolt.config.schema import PrepareConfig
    from megatron_bolt.data.embedded import generate_embedded
    from megatron_bolt.data.prepare import run_prepare

    generate_embedded(root / "corpus", 200, seed=0, num_eval=20)
    for name, split in (("warm", "0:1:2"), ("bootstrap", "1:2:2")):
        run_prepare(PrepareConfig(input=[str(root / "corpus" / "corpus.jsonl")], split=split, chunk_lambda=0.0,
                                  output_prefix=str(root / "data" / name / "docs")), progress=False)
    warm = {json.loads(line)["doc_id"] for f in (root / "data" / "warm").glob("*.jsonl") for line in open(f)}
    with open(root / "data" / "warm-latents.jsonl", "w") as out:
        out.writelines(line for line in open(root / "corpus" / "latents.jsonl") if json.loads(line)["doc_id"] in warm)
    return [f"data.tokenizer={root}/corpus/tokenizer", f"em.warm_documents=[{root}/data/warm]",
            f"em.warm_latents=[{root}/data/warm-latents.jsonl]", f"em.bootstrap_documents=[{root}/data/bootstrap]",
            f"eval.data_path={root}/corpus/eval.jsonl"]


@pytest.mark.slow
def test_local_executor_runs_the_tiny_em_loop(tmp_path):
    """Warm start and one bootstrap iteration of examples/tiny_em.yaml, every stage a local nemo-run task."""
    run_dir = tmp_path / "run"
    overrides = [*_tiny_data(tmp_path), f"em.run_dir={run_dir}", "em.iterations=1", "em.heldout_documents=[]",
                 "train.train_iters=20", "eval.limit=10"]
    proc = _nemo_em(tmp_path, "--config", str(ROOT / "examples" / "tiny_em.yaml"), *overrides, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all 13 tasks succeeded" in proc.stdout  # the 2 sampling and 2 scoring shards ran as 4 tasks
    cfg = load_config(run_dir / "config.yaml")
    for stage in build_plan(cfg, str(run_dir), str(run_dir / "config.yaml")):
        assert all(Path(p).exists() for p in stage.outputs), stage.name
    assert sorted(p.name for p in (run_dir / "iter1" / "estep" / "scores").glob("*.jsonl")) == \
        ["shard-00000.jsonl", "shard-00001.jsonl"]
    estep = json.loads((run_dir / "iter1" / "estep" / "estep.json").read_text())
    assert estep["with_latent"] > 0 and estep["samples"] == cfg.estep.sampling.num_samples * estep["chunks"]
    joint = json.loads((run_dir / "iter1" / "data" / "joint.json").read_text())
    teacher = len((tmp_path / "data" / "warm-latents.jsonl").read_text().splitlines())
    assert cfg.em.keep_warm_latents  # the M-step trains on the E-step's latents and the teacher's
    assert joint["counts"]["chunks_with_latent"] == estep["with_latent"] + teacher
    assert (run_dir / "iter1" / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    assert json.loads((run_dir / "iter1" / "eval" / "summary.json").read_text())["accuracy"]["n"] == 10
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = _nemo_em(tmp_path, "--config", str(ROOT / "examples" / "tiny_em.yaml"), *overrides, timeout=600)
    assert again.returncode == 0 and "all 13 tasks succeeded" in again.stdout  # every stage found finished
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # and nothing was redone
