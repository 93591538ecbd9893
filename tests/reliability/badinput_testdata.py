"""Helpers for the bad-input tests: the command-line runners, the one-error-line check and tree snapshots.

Every bad-input test checks the same three promises: one error line that names the offending file or key and
says how to fix it, a non-zero exit, and a data root / results tree that is exactly what it was before.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from busbench import cli

REPO = Path(__file__).resolve().parents[2]
FOLDERS: dict[str, str] = {"busi": "BUSI", "busbra": "BUSBRA", "bus_uclm": "BUS-UCLM", "bus_uc": "BUS_UC"}
SIZES: dict[str, int] = {"busi": 16, "busbra": 20, "bus_uclm": 12, "bus_uc": 10}
SUBPROCESS_TIMEOUT = 120  # generous for a loaded CI machine; a hang (symlink loop) would blow through it


@dataclass
class Result:
    code: int
    out: str
    err: str

    def error_line(self, command: str) -> str:
        """The single error line of a failed command; fails the test unless there is exactly one, and no traceback."""
        assert self.code != 0, f"expected a failure, got exit 0\nstdout: {self.out}\nstderr: {self.err}"
        assert "Traceback" not in self.err, self.err
        lines = [line for line in self.err.splitlines() if line.strip()]
        prefix = f"busbench {command}: error: "
        assert len(lines) == 1 and lines[0].startswith(prefix), (
            f"expected one '{prefix}...' line:\n{self.err}"
        )
        return lines[0][len(prefix) :]


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> Result:
    """``busbench ARGS`` in this process (fast: torch and the models are imported once per session)."""
    capsys.readouterr()
    code = cli.main([os.fspath(a) if isinstance(a, Path) else str(a) for a in args])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def run_subprocess(*args: object, cwd: Path | None = None) -> Result:
    """``python -m busbench ARGS`` in a child process: the real exit status and the real stderr bytes, with a timeout.

    The C locale is the strictest setting for undecodable file names (Python then runs in UTF-8 mode).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING"))}
    env["LC_ALL"] = "C"
    argv = [
        sys.executable,
        "-m",
        "busbench",
        *(os.fsencode(a) if isinstance(a, Path) else str(a) for a in args),
    ]
    proc = subprocess.run(argv, capture_output=True, timeout=SUBPROCESS_TIMEOUT, env=env, cwd=cwd)
    # Decode strictly: every byte the command writes must be valid UTF-8 text.
    return Result(proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8"))


def snapshot(root: Path) -> dict[bytes, str]:
    """Every entry below ``root`` (relative bytes path -> content hash, "dir" or the link target); links not followed.

    Bytes paths, so that file names that are not UTF-8 are compared too. Hidden temporary files and folders
    show up like any other entry; only run-folder lock files are left out (a command that refuses still takes the
    lock first, and the kernel lock leaves an empty ``.lock`` file behind by design).
    """
    base = os.fsencode(root)
    found: dict[bytes, str] = {}
    if not os.path.lexists(base):
        return found
    for dirpath, dirnames, filenames in os.walk(base):
        for name in sorted(dirnames + filenames):
            if name == b".lock":
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            if os.path.islink(path):
                found[rel] = "link -> " + os.fsdecode(os.readlink(path))
            elif os.path.isdir(path):
                found[rel] = "dir"
            else:
                with open(path, "rb") as fh:
                    found[rel] = hashlib.sha256(fh.read()).hexdigest()
    return found


def assert_unchanged(before: dict[bytes, str], root: Path) -> None:
    after = snapshot(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), (
        f"added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}"
    )
