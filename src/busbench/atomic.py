"""Atomic file writes: a file is either absent, the old version, or the complete new version."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from busbench.errors import BusbenchError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temporary file is removed and ``path`` is left untouched.
    ``suffix`` defaults to the target's suffix so that writers that pick a format by extension
    (cv2.imwrite, PIL) keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.",
        suffix=path.suffix if suffix is None else suffix,
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get ordinary permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BusbenchError(
                f"no space left on the device while writing {path}; the previous version is intact. "
                "Free disk space (or point output.root / --data-root elsewhere) and run the command again"
            ) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# what atomic_path's temporary files are called: "." + target name + "." + mkstemp's 8 random characters + suffix
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}(?P<suffix>.*)")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed mid-write (SIGKILL, power loss) left in ``folder``.

    Such a file is never read (the target keeps its previous version), but a checkpoint's can be gigabytes.
    Only call this while holding ``folder``'s lock (:mod:`busbench.locking`): a live writer's file looks the same.
    Returns the removed paths; subfolders are not searched.
    """
    removed = []
    for path in sorted(Path(folder).iterdir()):
        match = _TEMPORARY.fullmatch(path.name)
        ours = match is not None and Path(match["target"]).suffix == match["suffix"]
        if ours and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (newline translation off, so bytes are exact)."""
    atomic_write_bytes(path, text.encode(encoding))


def staging_dir(target: str | os.PathLike) -> Path:
    """A new empty hidden folder beside ``target`` to build its next version in (see :func:`replace_dir`)."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def replace_dir(staged: Path, target: str | os.PathLike) -> None:
    """Put the finished folder ``staged`` (from :func:`staging_dir`) in ``target``'s place.

    ``staged`` gets the permissions of an ordinary mkdir (mkdtemp makes 0700 folders). An existing ``target`` is
    moved aside and removed only after ``staged`` took its place, so ``target`` is at every moment either the old
    or the new folder, never a mixture.
    """
    target = Path(target)
    umask = os.umask(0)
    os.umask(umask)
    staged.chmod(0o777 & ~umask)
    if not target.exists():
        os.replace(staged, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, trash / target.name)
    os.replace(staged, target)
    shutil.rmtree(trash)
