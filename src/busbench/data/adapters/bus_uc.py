"""BUS-UC (Mendeley 3ksd7w7jkx): ``BUS_UC/{Benign,Malignant}/{images,masks}/<name>.png``.

Each mask has its image's file name; the class is the capitalised folder. ``All/`` (the union of both classes)
is ignored, so no image is listed twice. Mirrors add nesting (``BUS_UC/BUS_UC/``), which :meth:`locate` walks
through. There are no patient ids or metadata, so ``patient_id == sample_id``.

Rules: masks are black/white and read as "any channel above 127"; a mask whose size differs from its image (one
mirror has a 1-px mismatch) is resized to the image by nearest neighbour and the change is noted.

Sample ids are ``<label>_<stem>`` (``benign_012``): stems like ``01`` and ``010`` stay distinct.
"""

from __future__ import annotations

from pathlib import Path

from busbench.data import layouts as L
from busbench.data.adapters.base import (
    Adapter,
    RawSample,
    check_pairs,
    check_sample_id,
    list_files,
    make_sample,
    register_adapter,
)
from busbench.errors import DataError


@register_adapter
class BusUcAdapter(Adapter):
    key = "bus_uc"
    folder = "BUS_UC"
    labels = ("benign", "malignant")
    layout = "Benign/{images,masks}/ and Malignant/{images,masks}/ with the mask under its image's file name"
    marks = tuple(f"{cls}/" for cls in L.BUS_UC_CLASSES)
    size_quirk = "BUS-UC mirrors have a 1-px image/mask size mismatch"

    def list_samples(self, dataset_dir: Path) -> list[RawSample]:
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
            masks = {p.name: p for p in list_files(masks_dir)}
            check_pairs(
                {p.name: p for p in images},
                masks,
                lambda name, images_dir=images_dir: images_dir / name,
                lambda name, masks_dir=masks_dir: masks_dir / name,
            )
            for image in images:
                sample_id = check_sample_id(
                    f"{label}_{image.stem}", image, "rename the image and its mask alike"
                )
                samples.append(make_sample(sample_id, label, image, masks[image.name]))
        return samples
