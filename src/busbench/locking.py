"""Exclusive locks on run folders, so that two processes never write the same results.

The lock is an ``fcntl.flock`` on a ``.lock`` file inside the folder. The kernel drops it when the holder exits, even
through SIGKILL, so a crashed run never leaves a stale lock behind; the file itself only records who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from busbench.errors import BusbenchError

LOCK_NAME = ".lock"


class LockedError(BusbenchError):
    """Another process holds the lock."""


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"


@contextlib.contextmanager
def locked(folder: str | os.PathLike, wait: float = 0.0, poll: float = 0.5) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for the ``with`` block.

    ``wait`` seconds are spent retrying (0: refuse at once); then :class:`LockedError` names the holder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockedError(
                        f"{folder} is in use by {_holder(lock_file)}; wait for that run to finish "
                        f"(or pass a different experiment.name / output.root)"
                    ) from None
                time.sleep(poll)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield lock_file
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
