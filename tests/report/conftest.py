"""Fixtures for the report tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Run torch on one thread while these tests train and run their tiny networks (32 px inputs gain nothing
    from a second thread, and on a busy machine threads waiting for each other slow every convolution down)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
