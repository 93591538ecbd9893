"""BUS-UC (Mendeley 3ksd7w7jkx): ``BUS_UC/{Benign,Malignant}/{images,masks}/<name>.png``.

Each mask has its image's file name; the class is the capitalised folder. ``All/`` (the union of both classes)
is ignored, so no image is listed twice. Mirrors add nesting (``BUS_UC/BUS_UC/``), which :meth:`locate` walks
through. There are no patient ids or metadata, so ``patient_id == sample_id``.

Rules: masks are black/white and read as "any channel above 127"; a mask whose size differs from its image (one
mirror has a 1-px mismatch) is resized to the image by nearest neighbour and the change is noted.

Sample ids are ``<label>_<stem>`` (``benign_012``): stems like ``01`` and ``010`` stay distinct.
"""

from __future__ import annotations

import re
from pathlib import Path

from busbench.data import layouts as L
from busbench.data.adapters.base import (
    Adapter,
    DecodedSample,
    RawSample,
    decode_binary,
    list_files,
    register_adapter,
)
from busbench.errors import DataError

_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


@register_adapter
class BusUcAdapter(Adapter):
    key = "bus_uc"
    folder = "BUS_UC"
    labels = ("benign", "malignant")
    layout = "Benign/{images,masks}/ and Malignant/{images,masks}/ with the mask under its image's file name"

    def is_dataset_dir(self, path: Path) -> bool:
        return all((path / cls).is_dir() for cls in L.BUS_UC_CLASSES)

    def scan(self, dataset_dir: Path) -> list[RawSample]:
        dataset_dir = Path(dataset_dir)
        self.excluded = {}
        samples: list[RawSample] = []
        for folder_name, label in L.BUS_UC_CLASSES.items():
            images_dir = dataset_dir / folder_name / "images"
            masks_dir = dataset_dir / folder_name / "masks"
            for needed in (images_dir, masks_dir):
                if not needed.is_dir():
                    raise DataError(
                        f"bus_uc: folder {needed} is missing; each class folder holds images/ and masks/ "
                        "(re-extract the BUS-UC archive)"
                    )
            images = list_files(images_dir)
            if not images:
                raise DataError(f"bus_uc: {images_dir} holds no PNG images; re-extract the BUS-UC archive")
            image_names = {p.name for p in images}
            for mask in list_files(masks_dir):
                if mask.name not in image_names:
                    raise DataError(
                        f"{mask}: mask without its image {images_dir / mask.name}; restore the image or remove the mask"
                    )
            for image in images:
                mask = masks_dir / image.name
                if not mask.is_file():
                    raise DataError(
                        f"{image}: image without its mask {mask}; restore the mask from the original archive or "
                        "remove the image"
                    )
                if not _SAFE.match(image.stem):
                    raise DataError(
                        f"{image}: file name has characters other than letters, digits, '_', '.', '-'; rename the "
                        "image and its mask alike"
                    )
                sample_id = f"{label}_{image.stem}"
                samples.append(
                    RawSample(
                        sample_id=sample_id,
                        label=label,
                        patient_id=sample_id,
                        image_path=image.resolve(),
                        mask_paths=(mask.resolve(),),
                        meta={},
                    )
                )
        return sorted(samples, key=lambda s: s.sample_id)

    def decode(self, sample: RawSample) -> DecodedSample:
        return decode_binary(sample, size_quirk="BUS-UC mirrors have a 1-px image/mask size mismatch")
