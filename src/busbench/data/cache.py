"""Preprocessed-pixel cache: decode and resize each image once per sweep instead of once per step.

For one dataset at one ``(image_size, resize, channels)`` setting the cache is a folder
``<data_root>/cache/<key>/<hash>/`` holding

* ``images.npy``    - ``(N, S, S, C)`` uint8, the resized pixels before augmentation and normalisation;
* ``classmaps.npy`` - ``(N, S, S)`` uint8 class maps (0 background, 1 benign, 2 malignant; binary mask = class > 0);
* ``index.json``    - sample ids in manifest order, original sizes, each image's placement in the square, and the
  inputs of the hash.

Both arrays are opened as read-only memory maps, so DataLoader workers and the fold runs of a sweep share one copy
through the page cache. The pixels are exactly :func:`busbench.data.decode.square_row`'s output, the same function
the on-the-fly loader uses.

``<hash>`` covers the manifest's sha256, the preprocessing settings, :data:`CACHE_FORMAT_VERSION`, the size and
modification time of every image and mask file, and the code that makes the pixels (:func:`preprocessing_digest`:
the source of the decoding and geometry modules and OpenCV's version), so a new manifest, regenerated masks,
another setting, an edited decoder or resizer, or another OpenCV lead to a different folder and a rebuild; a cache
is never reused stale. Folders are built under a temporary name and renamed
into place, so a reader sees either nothing or a complete cache. When two processes build the same cache at once,
the first rename wins and the other discards its copy. Old folders are not deleted automatically (another sweep may
be reading them); remove ``<data_root>/cache/`` to reclaim space.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from tqdm import tqdm

from busbench.atomic import atomic_write_text
from busbench.data.decode import square_row
from busbench.data.geometry import RESIZE_MODES, LetterboxInfo
from busbench.errors import DataError

CACHE_FORMAT_VERSION = 1
IMAGES_FILE = "images.npy"
CLASSMAPS_FILE = "classmaps.npy"
INDEX_FILE = "index.json"
_TMP_PREFIX = ".building-"
#: the modules whose code decides a cached pixel: decoding (colour, bit depth, masks) and squaring (resize, padding)
PIXEL_MODULES: tuple[str, ...] = ("busbench.data.decode", "busbench.data.geometry")


@dataclass(frozen=True)
class CacheSettings:
    """The preprocessing a cache holds; a dataset only uses a cache built with its own settings."""

    image_size: int
    resize: str
    channels: int

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")


def file_fingerprint(rows: pd.DataFrame) -> str:
    """sha256 over every image/mask path with its size and mtime: changes when a source file is rewritten."""
    digest = hashlib.sha256()
    columns = [c for c in ("image_path", "mask_path", "class_mask_path") if c in rows.columns]
    for values in rows[columns].itertuples(index=False):
        for value in values:
            if not isinstance(value, (str, os.PathLike)) or str(value) in ("", "nan"):
                digest.update(b"-\0")
                continue
            try:
                st = os.stat(value)
                digest.update(f"{value}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except FileNotFoundError:
                raise DataError(
                    f"{value} listed in the manifest does not exist; re-run `busbench prepare` or fix data.data_root"
                ) from None
    return digest.hexdigest()


@functools.cache
def _module_digest(name: str) -> str:
    module = importlib.import_module(name)
    try:
        source = Path(module.__file__ or "").read_bytes()
    except OSError:  # no source file (a frozen or zipped install): fall back to the package version
        import busbench

        source = f"busbench {busbench.__version__}".encode()
    return hashlib.sha256(source).hexdigest()


def preprocessing_digest(modules: Sequence[str] | None = None) -> str:
    """sha256 over the code that turns files into cached pixels: the source of :data:`PIXEL_MODULES` (or
    ``modules``) and the OpenCV version that decodes and resizes. Any edit there keys new caches."""
    digest = hashlib.sha256(f"opencv {cv2.__version__}\0".encode())
    for name in PIXEL_MODULES if modules is None else modules:
        digest.update(f"{name}\0{_module_digest(name)}\0".encode())
    return digest.hexdigest()


def cache_hash(manifest_sha256: str, settings: CacheSettings, fingerprint: str) -> str:
    """The folder name of a cache: 20 hex digits of sha256 over everything that determines its contents."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "code": preprocessing_digest(),
        "manifest_sha256": manifest_sha256,
        "image_size": settings.image_size,
        "resize": settings.resize,
        "channels": settings.channels,
        "files": fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir_for(data_root: str | os.PathLike, key: str, digest: str) -> Path:
    return Path(data_root) / "cache" / key / digest


def _check_rows(rows: pd.DataFrame, where: str) -> None:
    missing = [
        c
        for c in ("sample_id", "dataset", "image_path", "mask_path", "label", "height", "width")
        if c not in rows
    ]
    if missing:
        raise DataError(f"{where} lacks columns {', '.join(missing)}; re-run `busbench prepare`")
    dupes = rows["sample_id"][rows["sample_id"].duplicated()]
    if len(dupes):
        raise DataError(
            f"{where} lists sample_id {dupes.iloc[0]!r} more than once; sample ids must be unique, re-run `busbench prepare`"
        )


def _build(
    rows: pd.DataFrame, settings: CacheSettings, tmp: Path, meta: dict[str, Any], workers: int
) -> None:
    n, s, c = len(rows), settings.image_size, settings.channels
    arrays = {
        "images": open_memmap(tmp / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(n, s, s, c)),
        "classmaps": open_memmap(tmp / CLASSMAPS_FILE, mode="w+", dtype=np.uint8, shape=(n, s, s)),
    }
    geometry: list[dict[str, Any] | None] = [None] * n
    records = rows.to_dict("records")

    def fill(i: int) -> None:
        image, class_map, info = square_row(records[i], s, settings.resize, c)
        arrays["images"][i] = image
        arrays["classmaps"][i] = class_map
        geometry[i] = info.to_dict()

    # OpenCV releases the GIL while decoding and resizing, so threads scale without pickling rows to processes.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        desc = f"caching {meta['dataset']} at {s}px"
        for _ in tqdm(pool.map(fill, range(n)), total=n, desc=desc, leave=False, disable=None):
            pass
    for array in arrays.values():
        array.flush()
    arrays.clear()  # drops the last references, which unmaps the files
    for name in (IMAGES_FILE, CLASSMAPS_FILE):
        with open(tmp / name, "rb+") as fh:
            os.fsync(fh.fileno())
    index = {**meta, "n": n, "sample_ids": [str(v) for v in rows["sample_id"]], "geometry": geometry}
    atomic_write_text(tmp / INDEX_FILE, json.dumps(index, indent=1, sort_keys=True) + "\n")


def ensure_cache(
    rows: pd.DataFrame,
    key: str,
    data_root: str | os.PathLike,
    manifest_sha256: str,
    settings: CacheSettings,
    workers: int | None = None,
) -> Path:
    """The cache folder of ``rows`` (one whole manifest, absolute paths) at ``settings``; built first if absent.

    ``key`` names the dataset (its folder under ``<data_root>/cache``). Safe to call from several processes at once.
    """
    where = f"manifest of {key!r}"
    _check_rows(rows, where)
    rows = rows.reset_index(drop=True)
    digest = cache_hash(manifest_sha256, settings, file_fingerprint(rows))
    final = cache_dir_for(data_root, key, digest)
    if (final / INDEX_FILE).is_file():
        return final
    tmp = final.parent / f"{_TMP_PREFIX}{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the cache folder {final.parent} ({exc.strerror or exc}); make {data_root} writable, "
            "or set data.cache: false to read the PNG files directly"
        ) from None
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "code": preprocessing_digest(),
        "hash": digest,
        "dataset": key,
        "manifest_sha256": manifest_sha256,
        "image_size": settings.image_size,
        "resize": settings.resize,
        "channels": settings.channels,
    }
    try:
        try:
            _build(rows, settings, tmp, meta, workers or os.cpu_count() or 1)
        except OSError as exc:
            raise DataError(
                f"writing the cache under {final.parent} failed ({exc.strerror or exc}); free disk space there, "
                "or set data.cache: false to read the PNG files directly"
            ) from exc
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INDEX_FILE).is_file():
                raise
            # another process finished the same cache first; its copy is identical
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass
class _Part:
    folder: Path
    index: dict[str, Any]
    images: np.ndarray | None = None
    classmaps: np.ndarray | None = None

    def open(self) -> None:
        if self.images is None:
            self.images = np.load(self.folder / IMAGES_FILE, mmap_mode="r")
            self.classmaps = np.load(self.folder / CLASSMAPS_FILE, mmap_mode="r")


class ArrayCache:
    """Read access to one or more built cache folders (one per dataset of a union), by ``(dataset, sample_id)``."""

    def __init__(self, folders: Sequence[str | os.PathLike]):
        if not folders:
            raise ValueError("ArrayCache needs at least one cache folder")
        self._parts: list[_Part] = []
        self._where: dict[tuple[str, str], tuple[int, int]] = {}
        settings = None
        for p, folder in enumerate(folders):
            part = _open_part(Path(folder))
            this = CacheSettings(part.index["image_size"], part.index["resize"], part.index["channels"])
            if settings is not None and this != settings:
                raise ValueError(f"cache folders hold different settings: {settings} vs {this} ({folder})")
            settings = this
            self._parts.append(part)
            for j, sid in enumerate(part.index["sample_ids"]):
                self._where[(part.index["dataset"], sid)] = (p, j)
        assert settings is not None
        self.settings: CacheSettings = settings

    @property
    def folders(self) -> list[Path]:
        return [part.folder for part in self._parts]

    def locate(self, dataset: str, sample_id: str) -> tuple[int, int]:
        """``(part, row)`` of a sample; DataError if the cache does not hold it."""
        try:
            return self._where[(str(dataset), str(sample_id))]
        except KeyError:
            raise DataError(
                f"sample {sample_id!r} of dataset {dataset!r} is not in the cache folders "
                f"{', '.join(map(str, self.folders))}; the rows come from another manifest than the cache was built from"
            ) from None

    def read(self, where: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Writable copies of the ``(S, S, C)`` image and ``(S, S)`` class map at ``where`` (from :meth:`locate`)."""
        part = self._parts[where[0]]
        part.open()
        assert part.images is not None and part.classmaps is not None
        return np.array(part.images[where[1]]), np.array(part.classmaps[where[1]])

    def geometry(self, where: tuple[int, int]) -> LetterboxInfo:
        return LetterboxInfo.from_dict(self._parts[where[0]].index["geometry"][where[1]])

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are reopened in each worker instead of being pickled (which would copy the arrays)
        state = self.__dict__.copy()
        state["_parts"] = [_Part(part.folder, part.index) for part in self._parts]
        return state


def _open_part(folder: Path) -> _Part:
    fix = f"delete {folder} and run again to rebuild it"
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cache index {folder / INDEX_FILE} cannot be read ({exc}); {fix}") from None
    if index.get("format") != CACHE_FORMAT_VERSION:
        raise DataError(
            f"cache {folder} has format {index.get('format')}, expected {CACHE_FORMAT_VERSION}; {fix}"
        )
    part = _Part(folder, index)
    try:
        part.open()
    except (OSError, ValueError) as exc:
        raise DataError(f"cache arrays in {folder} cannot be opened ({exc}); {fix}") from None
    n, s, c = index["n"], index["image_size"], index["channels"]
    assert part.images is not None and part.classmaps is not None
    if (
        part.images.shape != (n, s, s, c)
        or part.classmaps.shape != (n, s, s)
        or part.images.dtype != np.uint8
        or part.classmaps.dtype != np.uint8
        or len(index["sample_ids"]) != n
        or len(index["geometry"]) != n
    ):
        raise DataError(f"cache {folder} is inconsistent with its index (sizes differ); {fix}")
    return part
