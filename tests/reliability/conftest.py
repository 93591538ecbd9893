"""Fixtures for the bad-input tests (helpers live in badinput_testdata.py): pristine synthetic raw trees, written
once per session and copied per test, and one prepared tiny dataset for the train/audit/test commands."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from badinput_testdata import FOLDERS, REPO, SIZES

from busbench.data.prepare import prepare
from busbench.data.synth import synthesize


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """key -> (pristine raw root holding <Folder>/, dataset folder relative to that raw root); never modified."""
    raw = tmp_path_factory.mktemp("pristine") / "raw"
    out = {}
    for key, folder in FOLDERS.items():
        dataset_dir = synthesize(key, raw / folder, n=SIZES[key], seed=0)
        out[key] = (raw, dataset_dir.relative_to(raw))
    return out


@pytest.fixture
def make_raw(pristine: dict[str, tuple[Path, Path]], tmp_path: Path):
    """``make_raw(key) -> (data_root, dataset_dir)``: a private copy of a pristine raw tree to damage."""

    def make(key: str) -> tuple[Path, Path]:
        raw, rel = pristine[key]
        data_root = tmp_path / "data"
        shutil.copytree(raw / FOLDERS[key], data_root / "raw" / FOLDERS[key], symlinks=True)
        return data_root, data_root / "raw" / rel

    return make


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data root with a prepared 16-image BUSI-layout dataset, 2 folds (read-only for the tests)."""
    root = tmp_path_factory.mktemp("prepared")
    synthesize("busi", root / "raw" / "BUSI", n=16, seed=0)
    prepare(["busi"], data_root=root, folds=2, test_size=0.25, seed=42, progress=False)
    return root


@pytest.fixture
def configs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose configs from the repository's configs/ whatever the working directory."""
    monkeypatch.setenv("BUSBENCH_CONFIGS", os.fspath(REPO / "configs"))
