"""Atomic writes survive failures (including a full disk); run-folder locks keep two writers apart."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from busbench.atomic import atomic_path, atomic_write_text
from busbench.errors import BusbenchError
from busbench.locking import LockedError, locked


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failed_write_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "summary.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_full_disk_is_a_clear_error_and_old_results_survive(tmp_path: Path, monkeypatch):
    target = tmp_path / "leaderboard.csv"
    atomic_write_text(target, "model,dice\nunet,0.7\n")

    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(BusbenchError, match=r"no space left on the device while writing .*leaderboard.csv"):
        atomic_write_text(target, "model,dice\nunet,0.8\n")
    monkeypatch.undo()
    assert target.read_text() == "model,dice\nunet,0.7\n"
    assert leftovers(tmp_path) == []


HOLD = """
import sys, time
from busbench.locking import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    open(sys.argv[1] + "/finished", "w").close()
"""


def start_holder(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_refuses_with_the_holder_named(tmp_path: Path):
    proc = start_holder(tmp_path, 30)
    try:
        with (
            pytest.raises(LockedError, match=rf"in use by pid {proc.pid} on .*; wait for that run"),
            locked(tmp_path),
        ):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_waiting_writer_gets_the_lock_when_released(tmp_path: Path):
    proc = start_holder(tmp_path, 1.0)
    start = time.monotonic()
    with locked(tmp_path, wait=20, poll=0.05):
        assert (tmp_path / "finished").exists()  # the holder had to finish its work first
    assert time.monotonic() - start < 20
    proc.wait()


def test_killed_holder_leaves_no_stale_lock(tmp_path: Path):
    proc = start_holder(tmp_path, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with locked(tmp_path):
        pass


def test_atomic_files_get_ordinary_permissions(tmp_path: Path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.csv", "a\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "shared.csv").stat().st_mode & 0o777 == 0o644
