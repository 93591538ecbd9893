"""Shared fixtures.

Real-data tests read original files from the public datasets through ``BUSBENCH_REAL_DATA`` (CI points it at its copy of
the samples). Without it they skip and say why.
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


def write_folder_dataset(
    root: Path, n: int = 15, *, meta: bool = True, seed: int = 0, name: str = "img{i}", jpeg: bool = False
) -> Path:
    """A ``--layout folder`` dataset of synthetic B-mode images (40 x 44 px) under ``root``.

    Labels cycle normal, benign, malignant; masks are 0/255 PNGs; ``meta.csv`` (when ``meta``) puts two images per
    patient and adds a ``Scanner Model`` column. ``name`` formats the file stems; ``jpeg`` saves odd images as JPEG.
    """
    import numpy as np
    from PIL import Image

    from busbench.data.synth import render_bus_image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["sample_id,patient_id,label,Scanner Model"]
    for i in range(n):
        label = ("normal", "benign", "malignant")[i % 3]
        image, mask = render_bus_image(rng, 40, 44, label != "normal", malignant=label == "malignant")
        stem = name.format(i=i)
        suffix = ".jpg" if jpeg and i % 2 else ".png"
        Image.fromarray(image).save(root / "images" / f"{stem}{suffix}", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{stem}.png")
        rows.append(f"{stem},P{i // 2:02d},{label},scanner-{i % 2}")
    if meta:
        (root / "meta.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def folder_dataset():
    """:func:`write_folder_dataset`, for tests of the ``folder`` layout and of datasets prepared from outside."""
    return write_folder_dataset
