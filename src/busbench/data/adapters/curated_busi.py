"""Curated BUSI (Aumente-Maestro et al.): BUSI without its duplicated and inconsistent images.

Two sources give the same 450 samples (222 benign, 164 malignant, 64 normal), chosen with ``source``:

- ``"zenodo"``: the published release, ``Curated BUSI/images/<cls>_id_<n>.png`` with
  ``masks/<cls>_id_<n>_mask.png``; the class is the file-name prefix. Masks are read as "any value above 127",
  which also covers the release script's uint8 sum of two outlines (254 where they overlap).
- ``"busi"``: a BUSI download filtered by the published keep-list shipped with busbench
  (``busbench/data/curated_busi_ids.csv``, byte-identical to ``mapping_curated_BUSI.csv``, SHA-256 checked at
  load). Every listed id must exist in the BUSI copy; the dropped images are listed in :attr:`excluded`. Masks
  are merged by OR over ``_mask``, ``_mask_1`` and ``_mask_2`` as for BUSI (the published script sums only
  ``_mask`` and ``_mask_1``; OR keeps every outline and never wraps).
- ``"auto"`` (default): the Zenodo layout when ``Curated_BUSI/`` holds one, else BUSI from ``Curated_BUSI/`` or
  ``BUSI/``.

Sample ids are BUSI's (``benign_0020`` for ``benign (20).png`` / ``benign_id_20.png``), so results from both
sources line up with each other and with BUSI.
"""

from __future__ import annotations

import csv
import hashlib
import io
from importlib import resources
from pathlib import Path
from typing import Any

from busbench.data import layouts as L
from busbench.data.adapters.base import (
    Adapter,
    RawSample,
    check_pairs,
    find_dataset_dir,
    list_files,
    make_sample,
    read_table,
    register_adapter,
)
from busbench.data.adapters.busi import BusiAdapter, is_busi_dir, scan_busi_folder
from busbench.errors import ConfigError, DataError

SOURCES = ("auto", "busi", "zenodo")


def packaged_keep_list_bytes() -> bytes:
    """The shipped keep-list, verified against the published SHA-256."""
    data = (resources.files("busbench.data") / L.CURATED_KEEP_LIST).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != L.CURATED_KEEP_LIST_SHA256:
        raise DataError(
            f"packaged keep-list busbench/data/{L.CURATED_KEEP_LIST} has SHA-256 {digest}, not the published "
            f"{L.CURATED_KEEP_LIST_SHA256}; reinstall busbench (git may have converted its CRLF line endings)"
        )
    return data


def load_keep_list(path: Path | None = None) -> dict[str, set[int]]:
    """Class -> kept BUSI ids, from the packaged list (default) or a ``class;id`` CSV at ``path``."""
    if path is None:
        text = packaged_keep_list_bytes().decode("utf-8")
        rows = [
            dict(zip(("class", "id"), r, strict=False))
            for r in list(csv.reader(io.StringIO(text), delimiter=";"))[1:]
        ]
        source = f"busbench/data/{L.CURATED_KEEP_LIST}"
    else:
        rows = read_table(Path(path), ";", ("class", "id"))
        source = str(path)
    keep: dict[str, set[int]] = {cls: set() for cls in L.BUSI_CLASSES}
    for line, row in enumerate(rows, start=2):
        cls, value = row.get("class", "").strip(), row.get("id", "").strip()
        if cls not in keep or not value.isdigit():
            raise DataError(
                f"{source}: line {line} ({cls};{value}) is not '<benign|malignant|normal>;<BUSI number>'; fix the line"
            )
        keep[cls].add(int(value))
    if not any(keep.values()):
        raise DataError(
            f"{source}: the keep-list is empty; give a list with header 'class;id' and one row per kept image"
        )
    return keep


def is_zenodo_dir(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "masks").is_dir()


def scan_zenodo(dataset_dir: Path) -> list[RawSample]:
    """Samples of the Zenodo release (in image order): names checked, every image paired with its mask and vice
    versa."""
    images: dict[tuple[str, int], Path] = {}
    masks: dict[tuple[str, int], Path] = {}
    for folder, pattern, store, expected in (
        (dataset_dir / "images", L.CURATED_IMAGE_RE, images, "'<cls>_id_<n>.png'"),
        (dataset_dir / "masks", L.CURATED_MASK_RE, masks, "'<cls>_id_<n>_mask.png'"),
    ):
        for path in list_files(folder):
            match = pattern.match(path.name)
            if match is None:
                raise DataError(
                    f"{path}: unexpected file name; {folder.name}/ holds only {expected} files. Move it out of the "
                    "dataset folder"
                )
            store[match["cls"], int(match["n"])] = path
    if not images:
        raise DataError(
            f"curated_busi: {dataset_dir / 'images'} holds no images; re-extract the Curated BUSI release"
        )
    check_pairs(
        images,
        masks,
        lambda key: dataset_dir / "images" / L.curated_image_name(*key),
        lambda key: dataset_dir / "masks" / L.curated_mask_name(*key),
        source="the release",
    )
    return [
        make_sample(
            L.busi_sample_id(cls, n),
            cls,
            image_path,
            masks[cls, n],
            meta={"busi_image": L.busi_image_name(cls, n)},
        )
        for (cls, n), image_path in sorted(images.items())
    ]


@register_adapter
class CuratedBusiAdapter(Adapter):
    key = "curated_busi"
    folder = "Curated_BUSI"
    layout = (
        "'Curated BUSI/images/<cls>_id_<n>.png' + 'masks/<cls>_id_<n>_mask.png' (Zenodo release), "
        "or a BUSI copy in Curated_BUSI/ or BUSI/ filtered by the packaged keep-list"
    )

    def __init__(self, source: str = "auto", keep_list: str | Path | None = None) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ConfigError(f"curated_busi option source={source!r} is not one of {', '.join(SOURCES)}")
        self.source = source
        self.keep_list = Path(keep_list) if keep_list is not None else None

    def options(self) -> dict[str, Any]:
        return {"source": self.source, "keep_list": str(self.keep_list) if self.keep_list else "packaged"}

    def is_dataset_dir(self, path: Path) -> bool:
        if self.source == "zenodo":
            return is_zenodo_dir(path)
        if self.source == "busi":
            return is_busi_dir(path)
        return is_zenodo_dir(path) or is_busi_dir(path)

    def locate(self, raw_root: Path) -> Path:
        """Zenodo release under ``Curated_BUSI/`` first, then a BUSI copy under ``Curated_BUSI/`` or ``BUSI/``."""
        raw_root = Path(raw_root)
        tries: list[tuple[Path, Any]] = []
        if self.source in ("auto", "zenodo"):
            tries.append((raw_root / self.folder, is_zenodo_dir))
        if self.source in ("auto", "busi"):
            tries += [(raw_root / self.folder, is_busi_dir), (raw_root / BusiAdapter.folder, is_busi_dir)]
        for top, accept in tries:
            found = find_dataset_dir(top, accept, self.search_depth)
            if found is not None:
                return found
        looked = ", ".join(dict.fromkeys(str(top) for top, _ in tries))
        raise DataError(
            f"curated_busi: dataset folder not found (looked below {looked}, source={self.source}). Unpack the Zenodo "
            f"release into {raw_root / self.folder} so that it holds 'Curated BUSI/images/' and 'masks/', or put a "
            f"BUSI download in {raw_root / BusiAdapter.folder} (Dataset_BUSI_with_GT/{{benign,malignant,normal}}/)"
        )

    def list_samples(self, dataset_dir: Path) -> list[RawSample]:
        if is_zenodo_dir(dataset_dir) and self.source in ("auto", "zenodo"):
            return scan_zenodo(dataset_dir)
        if is_busi_dir(dataset_dir) and self.source in ("auto", "busi"):
            return self._scan_busi(dataset_dir)
        wanted = {"zenodo": "images/ and masks/", "busi": "benign/, malignant/ and normal/"}.get(
            self.source, "images/ and masks/ (Zenodo) or benign/, malignant/ and normal/ (BUSI)"
        )
        raise DataError(
            f"curated_busi: {dataset_dir} does not hold {wanted} (source={self.source}); point it at the Curated "
            "BUSI release or a BUSI copy, or change the source option"
        )

    def _scan_busi(self, dataset_dir: Path) -> list[RawSample]:
        keep = load_keep_list(self.keep_list)
        samples = scan_busi_folder(dataset_dir, self.key)
        present = {(s.label, int(s.sample_id.rsplit("_", 1)[1])) for s in samples}
        missing = sorted((cls, n) for cls, ids in keep.items() for n in ids if (cls, n) not in present)
        if missing:
            shown = ", ".join(f"{dataset_dir / cls / L.busi_image_name(cls, n)}" for cls, n in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataError(
                f"curated_busi: the keep-list names {len(missing)} images this BUSI copy lacks: {shown}{more}; "
                "use a complete BUSI download (437 benign, 210 malignant, 133 normal)"
            )
        kept = []
        for sample in samples:
            if int(sample.sample_id.rsplit("_", 1)[1]) in keep[sample.label]:
                kept.append(sample)
            else:
                self.excluded[sample.sample_id] = (
                    "not in the Curated BUSI keep-list (duplicate or inconsistent)"
                )
        return kept
