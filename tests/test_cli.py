"""The `bolt` command surface: fixed subcommand names, help rendered from the config schema, clean errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_bolt import cli

FIXED = ["quickstart", "prepare", "synthesize", "build-dataset", "train", "import-hf", "export-hf", "sample",
         "score", "estep", "em", "eval", "report"]


def _bolt(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "megatron_bolt.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_subcommand_names_are_frozen():
    assert list(cli.COMMANDS) == FIXED


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in FIXED:
        assert name in out


@pytest.mark.parametrize("name", FIXED)
def test_subcommand_help_explains_its_config_keys(name, capsys):
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert "--config" in out and "key=value" in out
    for section in cli.COMMANDS[name].sections:
        assert f"  {section}." in out, f"{name} --help lacks the {section} section"
    if "parallel" in cli.COMMANDS[name].sections:
        assert "Tensor parallel ranks" in out and "[default: 1]" in out


def test_bad_config_fails_before_anything_starts():
    proc = _bolt("train", "parallel.tensor_model_parallel_size=3")
    assert proc.returncode == 2
    assert "parallel.tensor_model_parallel_size=3 must divide model.num_attention_heads=4" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_world_size_from_the_launcher_is_checked():
    proc = _bolt("train", "parallel.tensor_model_parallel_size=2", env={"RANK": "0", "WORLD_SIZE": "3"})
    assert proc.returncode == 2 and "world size 3 is not divisible" in proc.stderr


def test_checkpoint_commands_validate_against_the_checkpoint_model(tmp_path, capsys):
    """A layout that only the default model cannot take must not block `score`: its model is the checkpoint's."""
    code = cli.main(["score", "--ckpt", str(tmp_path / "absent"), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "out.jsonl"), "model.num_attention_heads=3"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "num_attention_heads" not in err
