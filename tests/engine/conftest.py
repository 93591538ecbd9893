"""Fixtures for the engine tests (helpers live in engine_testdata.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_testdata import prepare_synthetic


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared synthetic dataset shared by the engine tests (read-only: copy it before tampering)."""
    return prepare_synthetic(tmp_path_factory.mktemp("busi_synth"))
