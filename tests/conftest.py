"""Shared fixtures.

Real-data tests read original files from the public datasets through ``BUSBENCH_REAL_DATA`` (CI sets it to
``../shared/data/real``). Without it they skip and say why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_DATA_ENV = "BUSBENCH_REAL_DATA"


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    value = os.environ.get(REAL_DATA_ENV)
    if not value:
        pytest.skip(
            f"{REAL_DATA_ENV} is not set; point it at a folder holding BUSI/, BUSBRA/ and BUS-UCLM/ samples"
        )
    root = Path(value).resolve()
    if not root.is_dir():
        pytest.skip(f"{REAL_DATA_ENV}={value} is not a folder")
    return root
