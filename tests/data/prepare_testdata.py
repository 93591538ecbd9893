"""Helpers for the prepare/audit/duplicate tests: raw roots built from the real samples or from synthetic data,
and snapshots of a folder tree to prove that a failed run wrote nothing and that raw files stay untouched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from busbench.data.synth import synthesize

# Folder of each dataset under the raw root, as prepare expects it.
FOLDERS: dict[str, str] = {
    "busi": "BUSI",
    "curated_busi": "Curated_BUSI",
    "busbra": "BUSBRA",
    "bus_uc": "BUS_UC",
    "bus_uclm": "BUS-UCLM",
    "yap2018": "Yap2018",
}
REAL_FOLDERS: dict[str, str] = {"busi": "BUSI", "busbra": "BUSBRA", "bus_uclm": "BUS-UCLM"}


def link_real(real_root: Path, data_root: Path, keys: tuple[str, ...] = tuple(REAL_FOLDERS)) -> Path:
    """``data_root/raw/<Folder>`` as symlinks to the read-only real samples; returns the data root."""
    raw = data_root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for key in keys:
        (raw / REAL_FOLDERS[key]).symlink_to(real_root / REAL_FOLDERS[key], target_is_directory=True)
    return data_root


def synth_raw(data_root: Path, key: str, n: int, seed: int = 0) -> Path:
    """Synthetic ``key`` dataset at ``data_root/raw/<Folder>``; returns the dataset's own folder."""
    return synthesize(key, data_root / "raw" / FOLDERS[key], n=n, seed=seed)


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and "dir" for every folder) below ``root``, links not followed."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in sorted(filenames):
            path = Path(dirpath) / name
            found[os.path.relpath(path, root)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found
