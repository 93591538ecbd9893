"""Fixtures for the engine tests (helpers live in engine_testdata.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_testdata import prepare_synthetic


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Run torch on one thread while these tests train their tiny networks.

    A second OpenMP thread buys nothing on 32 px inputs, and on a busy shared machine threads that wait for each
    other at every parallel region make each small convolution many times slower (25x measured under load).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared synthetic dataset shared by the engine tests (read-only: copy it before tampering)."""
    return prepare_synthetic(tmp_path_factory.mktemp("busi_synth"))
