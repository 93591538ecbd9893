"""BUSI (Al-Dhabyani et al. 2020): ``Dataset_BUSI_with_GT/{benign,malignant,normal}/``.

Layout: ``"<cls> (<n>).png"`` images (RGB, mostly R=G=B, 16 with colour overlays), one ``"<cls> (<n>)_mask.png"``
per image (normal images included, all zero), and for 17 cases extra ``_mask_1`` / ``_mask_2`` files, one per
further lesion outline. Labels come from the folder; there are no patient ids, so ``patient_id == sample_id``.

Quirk rules:

- all mask files of an image are merged by OR (a pixel is lesion if any outline covers it), so no lesion is lost
  and overlapping outlines are not double-counted;
- masks may be 1-bit, L, RGB or RGBA (0/255, alpha all-on); see :func:`~busbench.data.adapters.base.mask_to_bool`;
- the image is returned as stored (RGB), colour overlays included;
- BUSI masks have their image's size, so a mask of another size is an error (it belongs to another image or was
  resampled), as are two files naming the same sample (``benign (7).png`` and ``benign (07).png``).

Sample ids are ``<cls>_<nnnn>`` (``benign_0004``), so they sort by class then number.
"""

from __future__ import annotations

from pathlib import Path

from busbench.data import layouts as L
from busbench.data.adapters.base import (
    Adapter,
    RawSample,
    check_images_have_masks,
    check_masks_have_images,
    list_files,
    make_sample,
    register_adapter,
)
from busbench.errors import DataError


def scan_busi_folder(dataset_dir: Path, key: str = "busi") -> list[RawSample]:
    """Samples of a BUSI copy (in any order: :meth:`Adapter.scan` sorts them); shared with Curated BUSI built from a
    BUSI download.

    Every PNG in a class folder must follow BUSI's naming, every image must have its ``_mask`` and every mask
    its image, so an incomplete or foreign copy is caught here rather than in training.
    """
    samples: list[RawSample] = []
    for cls in L.BUSI_CLASSES:
        folder = dataset_dir / cls
        if not folder.is_dir():
            raise DataError(
                f"{key}: class folder {folder} is missing; a BUSI copy holds {', '.join(L.BUSI_CLASSES)}/ "
                "side by side (re-extract Dataset_BUSI.zip)"
            )
        images: dict[int, Path] = {}
        masks: dict[int, dict[int, Path]] = {}
        for path in list_files(folder):
            match = L.BUSI_FILE_RE.match(path.name)
            if match is None:
                raise DataError(
                    f"{path}: unexpected file name; BUSI class folders hold only '<cls> (<n>).png' images and their "
                    "'_mask.png' / '_mask_<k>.png' masks. Move the file out of the dataset folder"
                )
            if match["cls"] != cls:
                raise DataError(
                    f"{path}: a {match['cls']} file in the {cls}/ folder; move it to {match['cls']}/"
                )
            n = int(match["n"])
            # "benign (7).png" and "benign (07).png" (or "_mask" and "_mask_0") name the same sample; keeping
            # either one silently would drop the other, so the pair is refused.
            if match["mask"]:
                slot, k = masks.setdefault(n, {}), int(match["k"] or 0)
                earlier = slot.get(k)
                slot[k] = path
            else:
                earlier = images.get(n)
                images[n] = path
            if earlier is not None:
                raise DataError(
                    f"{path}: names the same {'mask' if match['mask'] else 'image'} as {earlier.name} (sample "
                    f"{L.busi_sample_id(cls, n)}); keep one of the two files in {folder}"
                )
        if not images:
            raise DataError(f"{key}: class folder {folder} holds no images; re-extract Dataset_BUSI.zip")
        check_masks_have_images(
            {n: files[min(files)] for n, files in masks.items()},
            images,
            lambda n, cls=cls, folder=folder: folder / L.busi_image_name(cls, n),
        )
        check_images_have_masks(
            images,
            {n for n, files in masks.items() if 0 in files},
            lambda n, cls=cls, folder=folder: folder / L.busi_mask_name(cls, n),
        )
        for n, image_path in sorted(images.items()):
            files = masks[n]
            samples.append(
                make_sample(
                    L.busi_sample_id(cls, n),
                    cls,
                    image_path,
                    [files[k] for k in sorted(files)],
                    meta={"mask_files": str(len(files))},
                )
            )
    return samples


def is_busi_dir(path: Path) -> bool:
    """A folder holding BUSI class folders (scan then insists on all three, with a precise message)."""
    return any((path / cls).is_dir() for cls in L.BUSI_CLASSES)


@register_adapter
class BusiAdapter(Adapter):
    key = "busi"
    folder = "BUSI"
    layout = (
        "Dataset_BUSI_with_GT/{benign,malignant,normal}/ with '<cls> (<n>).png' images and '<cls> (<n>)_mask.png' "
        "masks"
    )

    def is_dataset_dir(self, path: Path) -> bool:
        return is_busi_dir(path)

    def list_samples(self, dataset_dir: Path) -> list[RawSample]:
        return scan_busi_folder(dataset_dir, self.key)
