"""Security guarantees, checked on the sources and on the launchers (docs/reliability.md, "Security").

1. No untrusted file is unpickled: every ``torch.load`` passes ``weights_only=True``; no ``pickle.load``,
   ``np.load(allow_pickle=True)`` or unsafe ``yaml.load``; the one pickle torch.distributed.checkpoint reads
   (a checkpoint's ``.metadata``) goes through a restricted unpickler first. Checked by an AST scan of every
   Python file we ship (megatron_bolt/, tools/, examples/, benchmarks/) and by loading a crafted checkpoint.
2. No shell runs configuration: no ``shell=True``, ``os.system``, ``os.popen``, ``eval`` or ``exec``; the
   launchers pass values as argv elements or shell-quote them, so hostile values arrive intact and never run.
3. API keys only come from the environment (the config holds the variable's name): the schema has no field
   that could hold one. That the key never reaches logs, outputs or caches is tested against a server that
   echoes it back in tests/data/test_synthesize.py (and by every synthesize case of the bad-input campaign).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("megatron_bolt", "tools", "examples", "benchmarks")
HOSTILE = "x $(touch PWNED) `touch PWNED2`; touch PWNED3 'single' \"double\" a,b"


# ------------------------------------------------------------------------------------------ 1 + 2: the scan


def _dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load, 'np.load' for np.load, '' for anything that is not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


FORBIDDEN_CALLS = {
    "pickle.load": "unpickles a file", "pickle.loads": "unpickles bytes", "pickle.Unpickler": "unrestricted",
    "cPickle.load": "unpickles a file", "dill.load": "unpickles", "cloudpickle.load": "unpickles",
    "joblib.load": "unpickles", "marshal.load": "loads code objects", "shelve.open": "unpickles",
    "yaml.unsafe_load": "runs YAML tags", "yaml.full_load": "runs YAML tags", "yaml.load_all": "use safe_load_all",
    "os.system": "runs a shell", "os.popen": "runs a shell", "eval": "evaluates strings", "exec": "runs strings",
}
FORBIDDEN_IMPORTS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("os", "system"),
                     ("os", "popen"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load")}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader", "CSafeLoader"}


def scan(source: str, name: str = "<source>") -> list[str]:
    """Every unsafe deserialisation or shell use in ``source``, as 'name:line: what'."""
    tree = ast.parse(source, name)
    safe_loaders = set(SAFE_YAML_LOADERS)
    open_unpicklers = set()  # subclasses of pickle.Unpickler that do not restrict find_class
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b) for b in node.bases}
            if bases & SAFE_YAML_LOADERS:
                safe_loaders.add(node.name)
            overrides = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            if "pickle.Unpickler" in bases and "find_class" not in overrides:
                open_unpicklers.add(node.name)
    problems = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module:
            problems += [f"{where}: from {node.module} import {a.name}" for a in node.names
                         if (node.module, a.name) in FORBIDDEN_IMPORTS]
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        if func in FORBIDDEN_CALLS:
            problems.append(f"{where}: {func}() {FORBIDDEN_CALLS[func]}")
        elif func == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            problems.append(f"{where}: torch.load() without weights_only=True")
        elif func in ("np.load", "numpy.load") and not (
                _keyword(node, "allow_pickle") is None or isinstance(_keyword(node, "allow_pickle"), ast.Constant)
                and _keyword(node, "allow_pickle").value is False):
            problems.append(f"{where}: {func}() with allow_pickle other than False")
        elif func == "yaml.load" and _dotted(_keyword(node, "Loader") or ast.Constant(None)) not in safe_loaders:
            problems.append(f"{where}: yaml.load() without a SafeLoader")
        elif _is_true(_keyword(node, "shell")):
            problems.append(f"{where}: {func or 'a call'}(shell=True)")
        elif _is_true(_keyword(node, "trust_remote_code")):
            problems.append(f"{where}: trust_remote_code=True runs code from a model directory")
        elif func in open_unpicklers:
            problems.append(f"{where}: {func}() is a pickle.Unpickler without a restricted find_class")
    return problems


def shipped_sources() -> list[Path]:
    return sorted(p for d in SHIPPED for p in (ROOT / d).rglob("*.py"))


def test_shipped_code_never_unpickles_untrusted_files_or_runs_a_shell():
    files = shipped_sources()
    assert len(files) > 50 and ROOT / "megatron_bolt" / "checkpoint" / "dist.py" in files
    problems = [p for f in files for p in scan(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


VIOLATIONS = {
    "torch.load(path)": "without weights_only=True",
    "torch.load(path, weights_only=False)": "without weights_only=True",
    "pickle.load(f)": "unpickles a file",
    "from pickle import loads": "from pickle import loads",
    "np.load(path, allow_pickle=True)": "allow_pickle",
    "yaml.load(text)": "without a SafeLoader",
    "yaml.load(text, Loader=yaml.Loader)": "without a SafeLoader",
    "yaml.unsafe_load(text)": "runs YAML tags",
    "subprocess.run(cmd, shell=True)": "shell=True",
    "subprocess.Popen(f'sbatch {x}', shell=True)": "shell=True",
    "os.system('sbatch ' + x)": "runs a shell",
    "eval(text)": "evaluates strings",
    "AutoModel.from_pretrained(d, trust_remote_code=True)": "trust_remote_code",
    "class U(pickle.Unpickler):\n    pass\nU(f).load()": "without a restricted find_class",
}


@pytest.mark.parametrize("snippet", sorted(VIOLATIONS))
def test_the_scan_finds_each_kind_of_violation(snippet):
    problems = scan(snippet)
    assert len(problems) == 1 and VIOLATIONS[snippet] in problems[0], problems


def test_the_scan_accepts_the_safe_forms():
    safe = """
class Loader(yaml.SafeLoader): pass
class Meta(pickle.Unpickler):
    def find_class(self, module, name): raise pickle.UnpicklingError(name)
yaml.load(text, Loader=Loader); yaml.safe_load(text); yaml.load(text, Loader=yaml.SafeLoader)
torch.load(path, weights_only=True); np.load(path, allow_pickle=False); np.load(path, mmap_mode="r")
Meta(f).load(); pickle.dumps(obj); subprocess.run(["sbatch", x]); model.eval()
"""
    assert scan(safe) == []


class _Evil:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_crafted_checkpoint_metadata_pickle_is_refused_before_it_runs(tmp_path):
    from megatron_bolt.checkpoint import dist as ckpt

    step = tmp_path / "step_00000001"
    step.mkdir()
    (step / "bolt_meta.json").write_text(json.dumps({"step": 1}))
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(tmp_path / "PWNED")))
    with pytest.raises(ckpt.CheckpointError, match=r"references posix\.system.*refusing to load"):
        ckpt.load(step, {})
    (step / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ckpt.CheckpointError, match="is corrupt"):
        ckpt.verify_metadata(step)
    assert not (tmp_path / "PWNED").exists()
    # Real checkpoints pass the same check on every load: tests/checkpoint/test_dist.py, tests/train/test_resume.py
    # and the checkpoint cases of the bad-input campaign load them through ckpt.load.


# ------------------------------------------------------------------------------------------ 3: API keys


def test_no_config_field_can_hold_a_key_only_the_name_of_its_variable():
    from megatron_bolt.config.loader import field_help
    from megatron_bolt.config.schema import BoltConfig
    from megatron_bolt.launch.cluster import ClusterConfig

    keys = [key for cls, prefix in ((BoltConfig, ""), (ClusterConfig, "cluster.")) for key, _, _ in
            field_help(cls, prefix)]
    assert "synthesize.base_url" in keys and "cluster.account" in keys
    words = {"key", "secret", "password", "passwd", "credential", "credentials", "auth", "bearer"}
    secretish = [k for k in keys if words & set(k.split(".")[-1].split("_"))
                 or k.split(".")[-1] in ("token", "api_token", "access_token", "hf_token")]
    assert secretish == ["synthesize.api_key_env"], secretish


# ------------------------------------------------------------------------------------------ 4: launchers

RECORDER = """#!{python} -S
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
                         "env": {{k: v for k, v in os.environ.items() if k.startswith(("BOLT_", "GPUS_"))}}}}) + "\\n")
print(1000 + sum(1 for _ in open(os.environ["FAKE_LOG"])))
"""


def _recorder(bin_dir: Path, name: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(RECORDER.format(python=sys.executable))
    path.chmod(0o755)
    return path


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


CLUSTER_VALUES = {  # every cluster field that reaches an sbatch command line or a job variable
    "account": HOSTILE, "partition": HOSTILE, "python": f"/opt/{HOSTILE}/python", "container_image": HOSTILE,
    "container_mounts": [f"/a {HOSTILE}:/a", "/b:/b"], "workdir": f"/shared/{HOSTILE}", "job_name_prefix": HOSTILE,
    "train.time": HOSTILE, "train.mem": HOSTILE, "train.sbatch_args": [f"--qos={HOSTILE}"],
    "sample.python": f"/trtllm/{HOSTILE}/python", "sample.container_image": f"trt {HOSTILE}.sqsh",
}


@pytest.fixture
def hostile_submission(tmp_path, monkeypatch):
    """A 1-iteration plan submitted with a hostile value in every cluster field and in the run's config."""
    from megatron_bolt.config.loader import load_config
    from megatron_bolt.em.plan import override, write_config
    from megatron_bolt.launch import slurm

    monkeypatch.chdir(tmp_path)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    _recorder(tmp_path / "bin", "sbatch")
    run_dir = str(tmp_path / f"run {HOSTILE}")
    cfg = load_config(ROOT / "examples" / "tinyllama_finemath.yaml",
                      [override("em.run_dir", run_dir), "em.iterations=1", "estep.num_shards=2",
                       override("em.bootstrap_documents", [f"docs\n{HOSTILE}", "plain"])])
    values = {**CLUSTER_VALUES, "log_dir": str(tmp_path / f"logs {HOSTILE}")}  # created by the driver
    overrides = [override(f"cluster.{k}", v) for k, v in values.items()]
    subs = slurm.submit_em(cfg, run_dir, write_config(cfg, run_dir), ROOT / "examples" / "cluster.yaml",
                           cluster_overrides=overrides)
    return tmp_path, subs, _calls(log), run_dir


def test_sbatch_driver_passes_hostile_values_as_single_arguments(hostile_submission):
    tmp_path, subs, calls, run_dir = hostile_submission
    assert len(calls) == len(subs) > 5
    for sub, call in zip(subs, calls, strict=True):
        assert call["argv"][1:] == list(sub.command[1:])  # what the driver meant is what sbatch got
        argv = call["argv"]
        for flag in ("--account", "--job-name"):
            assert any(a.startswith(f"{flag}={HOSTILE}") for a in argv), (flag, argv)
        assert f"--chdir=/shared/{HOSTILE}" in argv
        assert any(a.startswith(f"--output={tmp_path}/logs {HOSTILE}/%x-%") for a in argv), argv
        kind = Path(next(a for a in argv if a.endswith(".sbatch"))).stem
        python = {"sample": f"/trtllm/{HOSTILE}/python"}.get(kind, f"/opt/{HOSTILE}/python")
        assert call["env"].get("BOLT_SAMPLE_PYTHON" if kind == "sample" else "BOLT_PYTHON") == python
        if kind == "train":
            assert f"--time={HOSTILE}" in argv and f"--mem={HOSTILE}" in argv and f"--qos={HOSTILE}" in argv
    from megatron_bolt.config.loader import load_config

    merge = next(c["argv"] for c in calls if f"--job-name={HOSTILE}-iter1-merge" in c["argv"])
    estep = load_config(None, [a for a in merge if a.startswith("estep.")]).estep
    assert estep.documents == [f"docs\n{HOSTILE}", "plain"] and estep.output_dir == f"{run_dir}/iter1/estep"
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path(run_dir).rglob("PWNED*"))


def test_dry_run_lines_are_shell_quoted(hostile_submission, tmp_path, monkeypatch):
    """Each printed ``VAR=... sbatch ...`` line, pasted into bash, runs sbatch with exactly the same argv."""
    _, subs, _, _ = hostile_submission
    log = tmp_path / "pasted.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    for sub in subs:
        proc = subprocess.run(["bash", "-c", sub.shell()], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    pasted = _calls(log)
    assert [c["argv"][1:] for c in pasted] == [list(s.command[1:]) for s in subs]
    assert [{k: v for k, v in c["env"].items() if k in s.env} for c, s in zip(pasted, subs, strict=True)] == [
        s.env for s in subs]
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("key", ["account", "partition", "python", "container_image", "container_mounts", "workdir",
                                 "log_dir", "job_name_prefix", "train.time", "train.mem", "train.sbatch_args",
                                 "sample.container_image"])
def test_cluster_values_with_control_characters_are_refused(key):
    """A newline would end an ``#SBATCH`` comment line of a generated job script and start a command there."""
    from megatron_bolt.config.schema import ConfigError
    from megatron_bolt.em.plan import override
    from megatron_bolt.launch.cluster import load_cluster

    value = "ok\ntouch PWNED"
    value = [value] if key in ("container_mounts", "train.sbatch_args") else value
    with pytest.raises(ConfigError, match=rf"cluster\.{key} holds a control character"):
        load_cluster(ROOT / "examples" / "cluster.yaml", [override(f"cluster.{key}", value)])


@pytest.mark.nemo
def test_nemo_task_script_quotes_a_hostile_python_workdir_and_argv(tmp_path):
    """examples/nemo_em.py writes each task as a bash script: every value in it is shell-quoted."""
    import importlib.util

    from megatron_bolt.em.plan import Stage

    spec = importlib.util.spec_from_file_location("nemo_em_example", ROOT / "examples" / "nemo_em.py")
    nemo_em = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nemo_em)
    workdir = tmp_path / f"work {HOSTILE}"
    workdir.mkdir()
    python = _recorder(tmp_path / f"env {HOSTILE}" / "bin", "python")
    stage = Stage(name="iter1/sample", iteration=1, kind="sample", argv=("estep", "--shard", "{shard}",
                  f"x={HOSTILE}"), after=(), array=2, outputs=(f"out {HOSTILE}/shard.jsonl",))
    script = nemo_em.stage_script(stage, [f"in {HOSTILE}"], str(python), nemo_em.ARRAY_TASK, str(workdir))
    (workdir / f"in {HOSTILE}").touch()
    log = tmp_path / "python.jsonl"
    env = {"PATH": "/usr/bin:/bin", "FAKE_LOG": str(log), "SLURM_ARRAY_TASK_ID": "1"}
    proc = subprocess.run(["bash", "-c", script.inline], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (call,) = _calls(log)
    assert call["argv"] == ["python", "-m", "megatron_bolt.cli", "estep", "--shard", "1", f"x={HOSTILE}"]
    assert not list(tmp_path.rglob("PWNED*"))
    assert shlex.quote(str(python)) in script.inline
