"""The generic ``folder`` layout: a dataset of your own, prepared under a key you choose.

``busbench prepare --layout folder --key hospital_a --dataset-dir DIR`` reads::

    DIR/
      images/   <stem>.png | .jpg | .jpeg | .bmp | .tif | .tiff     one ultrasound image each
      masks/    <stem>.png | .bmp | .tif | .tiff                    its mask, same stem (lossless formats only)
      meta.csv  optional: sample_id,patient_id,label[,more columns]

Mask values (grey masks; palette PNGs are read by palette index, RGB masks must be grey, i.e. R = G = B):

- ``0`` background everywhere: no lesion;
- ``255`` lesion, whose class is the image's label from ``meta.csv`` (required for such masks);
- ``1`` benign lesion and ``2`` malignant lesion: a class map. When ``meta.csv`` labels the image, a mask of
  only 0 and 1 is read as a binary mask (1 = lesion of the labelled class).

Any other value (anti-aliased edges, JPEG noise, 0/1/255 mixed) is an error naming the file and the values found.
Without a label in ``meta.csv`` the label comes from the mask: empty -> normal, only 1 -> benign, any 2 ->
malignant. A label that contradicts the mask (normal with lesion pixels, benign with malignant pixels) is an error.

``meta.csv`` (comma-separated, UTF-8): ``sample_id`` is the image's file name without its extension;
``patient_id`` links images of one patient (empty -> the image is its own patient); ``label`` is normal, benign or
malignant (any case; empty -> from the mask). Every image needs exactly one row and every row an image. Other
columns are kept in the manifest as ``meta_<column>`` (lower-cased, non-alphanumerics as ``_``).

Sample ids are the file stems, with characters other than letters, digits, ``.``, ``_`` and ``-`` written as
``_``. Everything else (near-duplicates, patient groups, the drawn split, the audit) is the common pipeline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from busbench.data import layouts as L
from busbench.data.adapters.base import (
    CLASS_VALUES,
    LABELS,
    UNSAFE_CHAR,
    Adapter,
    DecodedSample,
    RawSample,
    check_utf8_path,
    find_dataset_dir,
    list_files,
    open_image,
    read_image,
    read_table,
    register_layout,
)
from busbench.errors import DataError

_LOSSY = (".jpg", ".jpeg")
_META_FIX = "correct meta.csv (comma-separated UTF-8 with columns sample_id, patient_id, label)"
_CONVENTION = "0 background, 255 lesion (class from meta.csv label), or a class map 0/1 benign/2 malignant"


def _examples(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def sample_id_of(stem: str) -> str:
    """The sample id of an image file stem: unsafe characters as ``_``; a leading '.', '_' or '-' gets ``s``."""
    sid = UNSAFE_CHAR.sub("_", stem)
    return sid if sid[:1].isalnum() else "s" + sid


def meta_column(name: str) -> str:
    """A meta.csv column name as a manifest ``meta_*`` suffix: lower-case, non-alphanumerics as ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def mask_values(path: Path) -> np.ndarray:
    """A mask file's values as a uint8 (H, W) array, before any convention is applied.

    1-bit masks read as 0/255, palette masks by index, grey-with-alpha and RGB(A) masks by their grey value
    (alpha dropped; colour that is not grey is an error). 16-bit masks must hold values of the 8-bit convention.
    """
    image = open_image(path)
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8)
    array = np.asarray(image)
    if mode in ("LA", "PA"):
        array = array[..., 0]
    elif mode in ("RGB", "RGBA", "RGBX"):
        colour = array[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise DataError(
                f"{path}: colour mask (red, green and blue differ); the folder layout reads grey masks "
                f"({_CONVENTION}); save it as a grey PNG"
            )
        array = colour[..., 0]
    elif mode not in ("L", "P") and not mode.startswith("I"):
        raise DataError(f"{path}: unsupported mask mode {mode!r}; save the mask as an 8-bit grey PNG ({_CONVENTION})")
    if array.ndim != 2:
        raise DataError(f"{path}: mask is not a single-channel image; save it as an 8-bit grey PNG")
    if int(array.max(initial=0)) > 255 or int(array.min(initial=0)) < 0:
        raise DataError(
            f"{path}: mask holds values above 255 ({mode} image); save it as an 8-bit grey PNG ({_CONVENTION})"
        )
    return array.astype(np.uint8)


def classify(values: np.ndarray, label: str | None, path: Path) -> tuple[np.ndarray, str]:
    """Class map (0/1/2) and image label of a mask under the folder convention; ``label`` is meta.csv's or None."""
    present = {int(v) for v in np.unique(values)} - {0}
    if present and not (present == {L.FOLDER_LESION} or present <= {1, 2}):
        found = ", ".join(str(v) for v in sorted(present | {0}))
        raise DataError(
            f"{path}: mask values {found} do not follow the folder convention ({_CONVENTION}); write every lesion "
            "pixel with one of those values (no anti-aliasing, no JPEG)"
        )
    lesion = values > 0
    if not present:
        return np.zeros(values.shape, dtype=np.uint8), label or "normal"
    if label == "normal":
        raise DataError(
            f"{path}: meta.csv labels this image normal but its mask marks {int(lesion.sum())} lesion pixels; "
            "correct the label or clear the mask"
        )
    if present == {L.FOLDER_LESION} or present == {1}:
        if label is None:
            if present == {L.FOLDER_LESION}:
                raise DataError(
                    f"{path}: mask marks lesions with 255, which carries no class, and the image has no label; add "
                    "meta.csv with sample_id, patient_id and label (benign or malignant), or write the mask as a "
                    "class map (1 benign, 2 malignant)"
                )
            label = "benign"
        return lesion.astype(np.uint8) * np.uint8(CLASS_VALUES[label]), label
    if label == "benign":
        raise DataError(
            f"{path}: meta.csv labels this image benign but its mask marks malignant pixels (value 2); correct the "
            "label or the mask"
        )
    return values.copy(), "malignant"


@register_layout("folder")
class FolderAdapter(Adapter):
    """images/ + masks/ (+ meta.csv) under any dataset key; see the module docstring for the conventions."""

    layout = "images/ and masks/ with the same file stems, and optionally meta.csv"
    search_depth = 2

    def __init__(self, key: str, folder: str | None = None) -> None:
        """``folder``: the dataset folder below the raw root (default: the key; ``.`` = the raw root itself)."""
        super().__init__()
        self.key = key  # type: ignore[misc]  # one class serves every key of this layout
        self.folder = key if folder is None else folder  # type: ignore[misc]

    def options(self) -> dict[str, Any]:
        return {"layout": "folder"}

    def is_dataset_dir(self, path: Path) -> bool:
        return (path / L.FOLDER_IMAGE_DIR).is_dir()

    def locate(self, raw_root: Path) -> Path:
        top = Path(raw_root) / self.folder
        if not top.is_dir():
            raise DataError(
                f"{self.key}: dataset folder {top} does not exist; pass --dataset-dir pointing at the folder that "
                f"holds {L.FOLDER_IMAGE_DIR}/ and {L.FOLDER_MASK_DIR}/"
            )
        found = find_dataset_dir(top, self.is_dataset_dir, self.search_depth)
        if found is None:
            raise DataError(
                f"{self.key}: {top} has no {L.FOLDER_IMAGE_DIR}/ folder (searched {self.search_depth} levels deep); "
                f"a folder dataset holds {self.layout}"
            )
        if not (found / L.FOLDER_MASK_DIR).is_dir():
            raise DataError(
                f"{self.key}: {found} has {L.FOLDER_IMAGE_DIR}/ but no {L.FOLDER_MASK_DIR}/ folder; put each image's "
                f"mask in {found / L.FOLDER_MASK_DIR} under the image's file stem (e.g. case1.jpg -> case1.png)"
            )
        check_utf8_path(found, "folder")
        return found

    # -------------------------------------------------------------------------------------------------- scan

    def list_samples(self, dataset_dir: Path) -> list[RawSample]:
        image_dir, mask_dir = dataset_dir / L.FOLDER_IMAGE_DIR, dataset_dir / L.FOLDER_MASK_DIR
        images = self._by_stem(list_files(image_dir, L.FOLDER_IMAGE_SUFFIXES), "image")
        masks = self._by_stem(list_files(mask_dir, L.FOLDER_MASK_SUFFIXES + _LOSSY), "mask")
        if not images:
            raise DataError(
                f"{self.key}: {image_dir} holds no images ({', '.join(L.FOLDER_IMAGE_SUFFIXES)}); put the dataset's "
                "images there"
            )
        lossy = sorted(p.name for p in masks.values() if p.suffix.lower() in _LOSSY)
        if lossy:
            raise DataError(
                f"{self.key}: masks {_examples(lossy)} in {mask_dir} are JPEG, whose compression changes mask values; "
                "save the masks as PNG"
            )
        orphans = sorted(masks[s].name for s in masks.keys() - images.keys())
        if orphans:
            raise DataError(
                f"{self.key}: mask(s) {_examples(orphans)} in {mask_dir} have no image of the same stem in "
                f"{image_dir}; add the image or remove the mask"
            )
        missing = sorted(images[s].name for s in images.keys() - masks.keys())
        if missing:
            raise DataError(
                f"{self.key}: image(s) {_examples(missing)} in {image_dir} have no mask of the same stem in "
                f"{mask_dir}; add the mask (an all-zero mask for an image without lesion) or remove the image"
            )
        ids: dict[str, str] = {}
        for stem in sorted(images):
            sid = sample_id_of(stem)
            if sid in ids:
                raise DataError(
                    f"{self.key}: images {ids[sid]!r} and {stem!r} both become sample id {sid!r}; rename one of them"
                )
            ids[sid] = stem
        meta = self._read_meta(dataset_dir / L.FOLDER_META, set(images))
        samples = []
        for sid, stem in sorted(ids.items()):
            row = meta.get(stem, {})
            label = row.pop("label", None) or None
            patient = row.pop("patient_id", None) or sid
            if label is None:
                _, label = classify(mask_values(masks[stem]), None, masks[stem])
            samples.append(
                RawSample(
                    sample_id=sid,
                    label=label,
                    patient_id=patient,
                    image_path=images[stem],
                    mask_paths=(masks[stem],),
                    meta=row,
                )
            )
        return samples

    def _by_stem(self, files: list[Path], what: str) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in files:
            if path.stem in found:
                raise DataError(
                    f"{self.key}: {what}s {found[path.stem].name} and {path.name} in {path.parent} share the stem "
                    f"{path.stem!r}; keep one {what} per stem"
                )
            found[path.stem] = path
        return found

    def _read_meta(self, path: Path, stems: set[str]) -> dict[str, dict[str, str]]:
        """meta.csv rows by sample_id (file stem): patient_id, label (normalised) and ``meta_*`` columns."""
        if not path.exists():
            return {}
        rows = read_table(path, ",", L.FOLDER_META_REQUIRED, fix=_META_FIX)
        if not rows:
            raise DataError(f"{path}: no rows; add one row per image or remove meta.csv")
        extra: dict[str, str] = {}
        for column in rows[0]:
            if column in L.FOLDER_META_REQUIRED:
                continue
            name = meta_column(column)
            if not name or name in extra.values():
                raise DataError(
                    f"{path}: column {column!r} gives no usable or a repeated meta_ name ({name or 'empty'!r}); "
                    "rename the column"
                )
            extra[column] = name
        out: dict[str, dict[str, str]] = {}
        for line, row in enumerate(rows, start=2):
            sid = row.get("sample_id", "")
            if not sid:
                raise DataError(f"{path}: row {line} has an empty sample_id; {_META_FIX}")
            if sid in out:
                raise DataError(f"{path}: sample_id {sid!r} occurs twice; keep one row per image")
            label = row.get("label", "").lower()
            if label and label not in LABELS:
                raise DataError(
                    f"{path}: row {line} ({sid}) has label {row['label']!r}; use one of {', '.join(LABELS)} "
                    "(or leave it empty to take the label from the mask)"
                )
            out[sid] = {
                "patient_id": row.get("patient_id", ""),
                "label": label,
                **{name: row.get(column, "") for column, name in extra.items()},
            }
        unknown = sorted(out.keys() - stems)
        if unknown:
            raise DataError(
                f"{path}: sample_id(s) {_examples(unknown)} match no image in {L.FOLDER_IMAGE_DIR}/ (sample_id is the "
                "image's file name without its extension); correct or remove those rows"
            )
        missing = sorted(stems - out.keys())
        if missing:
            raise DataError(
                f"{path}: no row for image(s) {_examples(missing)}; add one row per image (sample_id = file name "
                "without extension)"
            )
        return out

    # ------------------------------------------------------------------------------------------------ decode

    def decode(self, sample: RawSample) -> DecodedSample:
        image, notes = read_image(sample.image_path)
        mask_path = sample.mask_paths[0]
        values = mask_values(mask_path)
        h, w = image.shape[:2]
        if values.shape != (h, w):
            raise DataError(
                f"{mask_path}: mask is {values.shape[1]}x{values.shape[0]} but its image {sample.image_path.name} is "
                f"{w}x{h}; save the mask at its image's size"
            )
        class_map, label = classify(values, sample.label, mask_path)
        if label != sample.label:  # only when scan took the label from the mask and the file changed since
            raise DataError(f"{mask_path}: mask changed while preparing; run busbench prepare again")
        return DecodedSample(image=image, mask=class_map > 0, class_map=class_map, notes=notes)
