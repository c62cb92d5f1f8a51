"""Atomic writes: a failure mid-write leaves the previous file and no temporary behind."""

from __future__ import annotations

import pytest

from megatron_bolt.utils.atomic import atomic_open, write_bytes_atomic, write_text_atomic


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.jsonl"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half of the new")
        raise RuntimeError("crash")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


def test_write_errors_without_a_file_name_get_the_path_and_a_one_line_description(tmp_path):
    import errno

    from megatron_bolt.utils.atomic import describe_os_error, naming_write_errors

    target = tmp_path / "shard.jsonl"
    with pytest.raises(OSError) as caught, naming_write_errors(target):
        raise OSError(errno.ENOSPC, "No space left on device")  # what f.write raises on a full disk
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    text = describe_os_error(caught.value)
    assert text.startswith(f"No space left on device: {target} [ENOSPC]") and "rerun the same command" in text
    assert "\n" not in text
    with pytest.raises(FileNotFoundError) as caught, naming_write_errors(target):  # named errors pass through
        open(tmp_path / "missing")
    assert caught.value.filename == str(tmp_path / "missing")
    assert describe_os_error(caught.value) == f"No such file or directory: {tmp_path / 'missing'} [ENOENT]"
