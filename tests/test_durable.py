"""Atomic durable writes (models/durable.py) and the run folder's files that use them."""

from __future__ import annotations

import os

import pytest

from models.durable import write_atomic, write_text_atomic
from server_app.run_folder import RunFolder


@pytest.fixture
def synced(monkeypatch):
    """The paths os.fsync was called on, in order (through /proc: Linux only)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the synced files")
    paths, real_fsync = [], os.fsync

    def fsync(descriptor):
        paths.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


def test_text_is_synced_then_renamed_then_its_folder_synced(tmp_path, synced):
    path = write_text_atomic(tmp_path / "a.txt", "new")
    assert path.read_text() == "new"
    assert synced == [str(tmp_path / "a.txt.tmp"), str(tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_the_run_folders_config_and_metrics_rewrite_are_synced(tmp_path, synced):
    folder = RunFolder(tmp_path / "run")
    folder.write_config("seed: 0\n")
    for row in range(3):
        folder.append_metrics({"round": row})
    synced.clear()
    folder.truncate_metrics(1)
    assert synced == [str(folder.metrics_file) + ".tmp", str(folder.path)]
    assert [r["round"] for r in folder.read_metrics()] == [0, 1]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def half_then_fail(temporary):
        temporary.write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
