"""The adapter interface: one raw dataset layout in, a sorted list of samples and decoded arrays out.

Each dataset module (``busi.py``, ``busbra.py``, ...) subclasses :class:`Adapter` and registers it under its
dataset key with :func:`register_adapter`. Everything downstream (prepare, manifests, audit) talks only to this
interface, so adding a dataset is adding one module.

The contract, in three steps:

- :meth:`Adapter.locate` finds the dataset's own folder below ``raw_root/<folder>``, through the nestings that
  real archives unpack to (``Dataset_BUSI_with_GT/``, ``BUS_UC/BUS_UC/``, ...).
- :meth:`Adapter.scan` lists the samples from file names and metadata tables only (no pixel decoding), sorted by
  ``sample_id`` (adapters implement :meth:`Adapter.list_samples`, which scan sorts), and raises one
  :class:`~busbench.errors.DataError` for any inconsistency (an image without its mask, a metadata row without a
  file, a file without a row, an empty class folder, ...). Samples that an adapter option drops are reported in
  :attr:`Adapter.excluded`.
- :meth:`Adapter.decode` reads one sample's image and mask(s) and applies the dataset's quirk rules, returning a
  uint8 image, a boolean lesion mask of the same size, a class map and notes worth recording.
"""

from __future__ import annotations

import csv
import difflib
import importlib
import inspect
import io
import os
import re
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from busbench import plugins
from busbench.errors import ConfigError, DataError

LABELS: tuple[str, ...] = ("normal", "benign", "malignant")
"""Image-level labels, in class-map order: class map value = index of the label for lesion pixels (0 = background)."""

CLASS_VALUES: dict[str, int] = {"benign": 1, "malignant": 2}
"""Class-map value of lesion pixels by label; background (and every pixel of a normal image) is 0."""


@dataclass(frozen=True)
class RawSample:
    """One image of a raw dataset as listed by :meth:`Adapter.scan` (paths and metadata only)."""

    sample_id: str  # unique in the dataset and filesystem-safe, e.g. "benign_0004", "bus_0001-l", "ALWI_000"
    label: str  # "normal" | "benign" | "malignant"
    patient_id: str  # from metadata where the dataset has one, else equal to sample_id
    image_path: Path  # absolute path of the raw image file
    mask_paths: tuple[Path, ...]  # absolute paths of the raw mask file(s), merged by OR when more than one
    meta: dict[str, str] = field(default_factory=dict, hash=False)  # extra metadata; stored as meta_<key>
    official_fold: int | None = None  # BUSBRA 5-fold-cv.csv kFold (test fold 1..5), else None


@dataclass
class DecodedSample:
    """Pixels of one sample after the dataset's quirk rules are applied."""

    image: np.ndarray  # uint8, (H, W) grey or (H, W, 3) RGB as stored, alpha dropped
    mask: np.ndarray  # bool (H, W), same size as image; lesion pixels
    class_map: np.ndarray  # uint8 (H, W): 0 background, 1 benign lesion, 2 malignant lesion
    notes: list[str] = field(default_factory=list)  # warnings worth recording; callers prefix the sample id


class Adapter:
    """Base class of the dataset adapters; subclasses set ``key``, ``folder`` and implement the three steps.

    Constructor keyword arguments are the adapter's options (e.g. ``hesn_rule`` for BUS-UCLM); they are
    checked by :func:`get_adapter` and reported by :meth:`options`.
    """

    key: ClassVar[str] = ""
    folder: ClassVar[str] = ""  # default folder name under data/raw
    labels: ClassVar[tuple[str, ...]] = LABELS  # labels the dataset can contain
    layout: ClassVar[str] = ""  # one-line description of the expected layout, quoted in error messages
    search_depth: ClassVar[int] = 4  # how many folder levels below raw_root/<folder> locate() looks
    marks: ClassVar[tuple[str, ...]] = ()  # what the dataset's own folder holds: "name/" a folder, "name" a file
    size_quirk: ClassVar[str | None] = None  # documented image/mask size mismatch, if any (see decode_binary)

    def __init__(self) -> None:
        self.excluded: dict[str, str] = {}  # sample_id -> reason, filled by the last scan()

    def options(self) -> dict[str, Any]:
        """The options this adapter was built with (recorded in the prepare summary)."""
        return {}

    def is_dataset_dir(self, path: Path) -> bool:
        """Whether ``path`` looks like this dataset's own folder (used by :meth:`locate`): it holds every mark."""
        if not self.marks:
            raise NotImplementedError(f"adapter {type(self).__name__} sets no marks and no is_dataset_dir")
        return all((path / m).is_dir() if m.endswith("/") else (path / m).is_file() for m in self.marks)

    def locate(self, raw_root: Path) -> Path:
        """The dataset's own folder at or below ``raw_root/<folder>``, through real archive nestings.

        Searches breadth-first (sorted, hidden folders skipped, at most :attr:`search_depth` levels) for the
        shallowest folder that :meth:`is_dataset_dir` accepts, so ``BUSI/``, ``BUSI/Dataset_BUSI_with_GT/`` and
        ``BUS_UC/BUS_UC/BUS_UC/`` are all found. Raises DataError saying where it looked and what it expected.
        """
        top = Path(raw_root) / self.folder
        found = find_dataset_dir(top, self.is_dataset_dir, self.search_depth)
        if found is None:
            where = f"{top} does not exist" if not top.is_dir() else f"nothing below {top} matches"
            raise DataError(
                f"{self.key}: dataset folder not found ({where}, searched {self.search_depth} levels deep). "
                f"Unpack the dataset there so that it holds {self.layout}, or pass --raw-root pointing at the "
                f"folder that contains {self.folder}/"
            )
        check_utf8_path(found, "folder")
        return found

    def scan(self, dataset_dir: Path) -> list[RawSample]:
        """All samples, sorted by ``sample_id``; raises DataError on any inconsistency.

        Clears :attr:`excluded` and sorts what :meth:`list_samples` finds; adapters implement that method.
        """
        self.excluded = {}
        return sorted(self.list_samples(Path(dataset_dir)), key=lambda s: s.sample_id)

    def list_samples(self, dataset_dir: Path) -> list[RawSample]:
        """The samples of the dataset folder, in any order, filling :attr:`excluded` with what options drop."""
        raise NotImplementedError

    def decode(self, sample: RawSample) -> DecodedSample:
        """Read the sample's image and mask(s) and apply the dataset's quirk rules.

        By default the masks are binary and the lesion class is the image's label (:func:`decode_binary`, with the
        dataset's :attr:`size_quirk`); datasets with other mask encodings override this.
        """
        return decode_binary(sample, self.size_quirk)


# Archive by-products that hold copies of the folder structure but no real data.
_SKIPPED_DIRS = frozenset({"__MACOSX"})


def find_dataset_dir(top: Path, accept: Callable[[Path], bool], depth: int) -> Path | None:
    """Shallowest folder at or below ``top`` (within ``depth`` levels) that ``accept`` takes; sorted, so stable.

    Two accepted folders at the same depth are ambiguous and raise DataError naming both. Hidden folders and
    macOS ``__MACOSX`` resource-fork folders (left by zips made on a Mac) are skipped.
    """
    if not top.is_dir():
        return None
    level = [top]
    for _ in range(depth + 1):
        hits = [d for d in level if accept(d)]
        if len(hits) > 1:
            raise DataError(
                f"found more than one dataset copy: {hits[0]} and {hits[1]}; keep one of them below {top}"
            )
        if hits:
            return hits[0]
        level = sorted(
            child
            for d in level
            for child in d.iterdir()
            if child.is_dir() and not child.name.startswith(".") and child.name not in _SKIPPED_DIRS
        )
        if not level:
            break
    return None


# ------------------------------------------------------------------------------------ shared reading helpers


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, turning every decoder failure into one DataError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; restore it from the original archive") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{path}: cannot decode the image ({exc}); the file is truncated or damaged, re-extract it from the "
            "original archive"
        ) from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; restore it from the original archive") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"{path}: not a readable image ({exc}); re-extract it from the original archive"
        ) from None


def read_image(path: Path) -> tuple[np.ndarray, list[str]]:
    """The image as uint8: (H, W) for grey modes, (H, W, 3) for colour modes; alpha is dropped.

    16-bit grey images are scaled to 8 bits; every conversion that loses information is returned as a note.
    """
    image = open_image(path)
    notes: list[str] = []
    mode = image.mode
    if mode in ("L", "RGB"):
        return np.asarray(image, dtype=np.uint8), notes
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8), notes
    if mode == "LA":
        notes.append(f"{path.name}: alpha channel dropped from an LA image")
        return np.asarray(image.convert("L"), dtype=np.uint8), notes
    if mode in ("RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        if mode in ("RGBA", "PA"):
            notes.append(f"{path.name}: alpha channel dropped from an {mode} image")
        return np.asarray(image.convert("RGB"), dtype=np.uint8), notes
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 255.0 if values.max(initial=0) <= 255 else 65535.0
        notes.append(f"{path.name}: {mode} image scaled to 8 bits")
        return np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8), notes
    raise DataError(f"{path}: unsupported image mode {mode!r}; convert it to an 8-bit grey or RGB PNG")


def mask_to_bool(array: np.ndarray, mode: str) -> np.ndarray:
    """Lesion pixels of a mask in any encoding found in the public datasets.

    - 1-bit, and grey/colour 0/255: a pixel is lesion when any colour channel is above 127.
    - 0/1-valued grey masks (max value 1): any non-zero pixel is lesion.
    - Alpha is ignored when it is constant (BUSI's RGBA masks have alpha all-on); when the colour channels are
      all zero and only alpha varies, the mask is carried by alpha and alpha > 127 is used.
    """
    if mode == "1":
        return array.astype(bool)
    has_alpha = mode in ("RGBA", "LA", "PA")
    colour = array[..., :-1] if has_alpha else array
    if colour.ndim == 3:
        if not colour.any() and has_alpha:
            alpha = array[..., -1]
            return alpha > 127 if alpha.min() != alpha.max() else np.zeros(alpha.shape, dtype=bool)
        top = int(colour.max(initial=0))
        return (colour > (0 if top == 1 else 127)).any(axis=-1)
    top = int(colour.max(initial=0))
    if top == 1:
        return colour > 0
    threshold = 32767 if top > 255 else 127
    return colour > threshold


def read_mask(path: Path) -> np.ndarray:
    """A mask file as a bool (H, W) array, whatever its PNG mode (see :func:`mask_to_bool`)."""
    image = open_image(path)
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    elif mode not in ("1", "L", "LA", "RGB", "RGBA") and not mode.startswith("I"):
        image = image.convert("RGB")
        mode = "RGB"
    return mask_to_bool(np.asarray(image), mode)


def fit_to_image(
    array: np.ndarray, shape: tuple[int, int], path: Path, why: str = ""
) -> tuple[np.ndarray, list[str]]:
    """Resize a mask or class map to the image's (H, W) by nearest neighbour, noting it when sizes differ.

    Nearest neighbour keeps the values exact (no new classes, still binary).
    """
    if array.shape[:2] == tuple(shape):
        return array, []
    h, w = shape
    note = (
        f"{path.name}: mask is {array.shape[1]}x{array.shape[0]} but the image is {w}x{h}; "
        f"mask resized to the image by nearest neighbour{why}"
    )
    resized = Image.fromarray(array).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(resized).astype(array.dtype), [note]


def class_map_for(mask: np.ndarray, label: str) -> np.ndarray:
    """uint8 class map of an image whose lesions all share the image-level ``label``."""
    value = CLASS_VALUES.get(label, 0)
    return mask.astype(np.uint8) * np.uint8(value)


def decode_binary(sample: RawSample, size_quirk: str | None = None) -> DecodedSample:
    """Shared decode for datasets with binary masks: read the image, OR the masks, check their size.

    Used by every dataset whose lesion class is the image-level label (all but BUS-UCLM). A mask of another size
    than its image is an error unless the dataset has a documented size quirk (``size_quirk``, e.g. BUS-UC's 1-px
    mismatch): for a dataset whose masks match their images, such a mask belongs to another image or was
    resampled, and stretching it would train on a wrong outline. With a quirk the mask is resized by nearest
    neighbour and a note records it.
    """
    image, notes = read_image(sample.image_path)
    shape = image.shape[:2]
    merged = np.zeros(shape, dtype=bool)
    for mask_path in sample.mask_paths:
        mask = read_mask(mask_path)
        if mask.shape != shape and size_quirk is None:
            raise DataError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image_path.name} is "
                f"{shape[1]}x{shape[0]}; this dataset's masks have their image's size, so the mask belongs to "
                "another image or was resampled. Restore both files from the original archive"
            )
        mask, fit_notes = fit_to_image(mask, shape, mask_path, f" ({size_quirk})" if size_quirk else "")
        notes.extend(fit_notes)
        merged |= mask
    if len(sample.mask_paths) > 1:
        names = ", ".join(p.name for p in sample.mask_paths)
        notes.append(f"{len(sample.mask_paths)} mask files merged by OR ({names})")
    if sample.label == "normal" and merged.any():
        notes.append(f"normal image has {int(merged.sum())} lesion pixels in its mask; kept")
    return DecodedSample(image=image, mask=merged, class_map=class_map_for(merged, sample.label), notes=notes)


_SEPARATORS = {";": "';'", ",": "','", "\t": "tab", "|": "'|'"}


def read_table(
    path: Path,
    delimiter: str,
    required: tuple[str, ...],
    encoding: str = "utf-8-sig",
    fix: str = "restore the original file",
) -> list[dict[str, str]]:
    """Rows of a delimited metadata table as dicts of stripped strings, with one clear error per problem.

    Checks the separator (a header without ``delimiter`` but with another common one is a wrong separator) and
    the required columns. A UTF-8 BOM is accepted whether or not the real file has one. ``fix`` ends the
    messages about the file's content (a public dataset's table is restored; a user's own table is corrected).
    """
    try:
        text = path.read_bytes().decode(encoding)
    except FileNotFoundError:
        raise DataError(f"{path}: metadata file not found; restore it from the original archive") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); {fix}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty metadata file; {fix}")
    header = lines[0]
    if delimiter not in header:
        found = next((name for d, name in _SEPARATORS.items() if d != delimiter and d in header), None)
        what = f"found {found} instead" if found else "found no separator"
        raise DataError(
            f"{path}: header is not {delimiter!r}-separated ({what}); save the file with {delimiter!r} as separator"
        )
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (header has {', '.join(columns)}); {fix}"
        )
    rows = []
    for raw in reader:
        row = {str(k).strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if any(row.values()):
            rows.append(row)
    return rows


def shown_path(path: str | os.PathLike) -> str:
    """``path`` for a message: bytes that are not UTF-8 appear as ``\\xff`` escapes, as ``ls -b`` shows them."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    """Whether a file-system name decoded to valid UTF-8 (undecodable bytes become lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_utf8_path(path: Path, what: str) -> None:
    """DataError when ``path`` has a name that is not UTF-8: manifests and summaries are UTF-8 text.

    ``what`` is "file" (the file's own name is checked: rename it) or "folder" (the whole path is checked, raw
    root included: rename the folder that holds the bytes).
    """
    if what == "file" and not is_utf8(path.name):
        raise DataError(
            f"{shown_path(path)}: file name is not valid UTF-8 (undecodable bytes shown as \\x..); rename it to "
            "a UTF-8 name (e.g. convmv -f latin1 -t utf8) or move it out of the dataset"
        )
    if what != "file" and not is_utf8(os.fspath(path)):
        raise DataError(
            f"{shown_path(path)}: folder path is not valid UTF-8 (undecodable bytes shown as \\x..); rename the "
            "folder holding those bytes to a UTF-8 name (e.g. convmv -f latin1 -t utf8)"
        )


def list_files(folder: Path, suffix: str | tuple[str, ...] = ".png") -> list[Path]:
    """Sorted files with ``suffix`` (one or a tuple, case-insensitive) in ``folder``, hidden files skipped.

    A listed file whose name is not valid UTF-8 raises DataError naming it (it could not be written to a manifest).
    """
    if not folder.is_dir():
        return []
    suffixes = (suffix,) if isinstance(suffix, str) else suffix
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )
    for path in files:
        check_utf8_path(path, "file")
    return files


# ------------------------------------------------------------------------------------ shared scan helpers

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
"""What a sample id may look like: it names derived mask files, so letters, digits, '.', '_', '-' only."""

UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9._-]")
"""A character a sample id may not hold."""


def check_sample_id(sample_id: str, path: Path, fix: str) -> str:
    """``sample_id`` when :data:`SAFE_ID` accepts it, else DataError naming ``path`` and ending with ``fix``."""
    if not SAFE_ID.match(sample_id):
        raise DataError(
            f"{path}: sample id {sample_id!r} is not usable as a file name (letters, digits, '_', '.', '-' only, "
            f"starting with a letter or digit); {fix}"
        )
    return sample_id


def make_sample(
    sample_id: str,
    label: str,
    image_path: Path,
    mask_paths: Path | Sequence[Path],
    *,
    patient_id: str | None = None,
    meta: Mapping[str, str] | None = None,
    official_fold: int | None = None,
) -> RawSample:
    """A :class:`RawSample` with absolute paths; without ``patient_id`` the image is its own patient."""
    masks = (mask_paths,) if isinstance(mask_paths, Path) else tuple(mask_paths)
    return RawSample(
        sample_id=sample_id,
        label=label,
        patient_id=sample_id if patient_id is None else patient_id,
        image_path=image_path.resolve(),
        mask_paths=tuple(p.resolve() for p in masks),
        meta=dict(meta or {}),
        official_fold=official_fold,
    )


def check_masks_have_images(
    masks: Mapping[Any, Path], images: Container[Any], image_of: Callable[[Any], Path]
) -> None:
    """DataError for the first mask (in key order) whose key has no image; ``image_of(key)`` is the expected image."""
    orphans = sorted(k for k in masks if k not in images)
    if orphans:
        raise DataError(
            f"{masks[orphans[0]]}: mask without its image {image_of(orphans[0])}; restore the image or remove the mask"
        )


def check_images_have_masks(
    images: Mapping[Any, Path],
    masks: Container[Any],
    mask_of: Callable[[Any], Path],
    source: str = "the original archive",
) -> None:
    """DataError for the first image (in key order) whose key has no mask; ``mask_of(key)`` is the expected mask."""
    lacking = sorted(k for k in images if k not in masks)
    if lacking:
        raise DataError(
            f"{images[lacking[0]]}: image without its mask {mask_of(lacking[0])}; restore the mask from {source} or "
            "remove the image"
        )


def check_pairs(
    images: Mapping[Any, Path],
    masks: Mapping[Any, Path],
    image_of: Callable[[Any], Path],
    mask_of: Callable[[Any], Path],
    source: str = "the original archive",
) -> None:
    """Every mask has its image and every image its mask (matched by key), else one DataError naming the file."""
    check_masks_have_images(masks, images, image_of)
    check_images_have_masks(images, masks, mask_of, source)


class MetadataTable:
    """A dataset's metadata table (one row per image) and the checks every table-listed scan makes.

    ``rows`` are the table's data rows, the header being row 1; ``unit`` is how messages count them ("line" for
    CSV, "row" for a worksheet). An empty table is an error. Iterating gives ``(where, row)`` with ``where`` like
    "line 7"; :meth:`add` records the image a row lists, :meth:`check_files` that its image and mask exist, and
    :meth:`check_folder` that no file is left without a row.
    """

    def __init__(self, path: Path, rows: Sequence[Mapping[str, str]], unit: str = "line") -> None:
        if not rows:
            raise DataError(f"{path}: no rows; restore the original {path.name}")
        self.path, self.rows, self.unit = path, rows, unit
        self.listed: set[str] = set()

    def __iter__(self) -> Iterator[tuple[str, Mapping[str, str]]]:
        for number, row in enumerate(self.rows, start=2):
            yield f"{self.unit} {number}", row

    def add(self, name: str, where: str, what: str = "image") -> None:
        """Record ``name`` as listed; DataError when an earlier row listed it too."""
        if name in self.listed:
            raise DataError(f"{self.path}: {what} {name} appears twice ({where}); remove the duplicate row")
        self.listed.add(name)

    def check_files(self, where: str, name: str, image_path: Path, mask_path: Path) -> None:
        """DataError unless the image and the mask that the row at ``where`` lists both exist."""
        if not image_path.is_file():
            raise DataError(
                f"{self.path}: {where} lists {name} but {image_path} does not exist; restore the image or use the "
                f"{self.path.name} of the same release"
            )
        if not mask_path.is_file():
            raise DataError(
                f"{image_path}: image without its mask {mask_path}; restore the mask from the original archive"
            )

    def check_folder(
        self, folder: Path, what: str = "file", by: str = "name", listed: Container[str] | None = None
    ) -> None:
        """DataError for the first file in ``folder`` whose ``by`` ("name" or "stem") is not listed."""
        listed = self.listed if listed is None else listed
        for path in list_files(folder):
            if getattr(path, by) not in listed:
                raise DataError(
                    f"{path}: {what} without a row in {self.path}; add its row or move the {what} out of "
                    f"{folder.name}/"
                )


ADAPTERS: dict[str, type[Adapter]] = {}
"""Dataset key -> adapter class. Filled by the dataset modules on import; use :func:`get_adapter`."""

# Dataset modules imported on first use, so that registering a dataset is adding a module to this list.
DATASET_MODULES: tuple[str, ...] = (
    "busbench.data.adapters.busi",
    "busbench.data.adapters.curated_busi",
    "busbench.data.adapters.busbra",
    "busbench.data.adapters.bus_uc",
    "busbench.data.adapters.bus_uclm",
    "busbench.data.adapters.yap2018",
)


DATASET_KEY = re.compile(r"^[a-z0-9][a-z0-9_]*$")
"""What a dataset key may look like: it names files, folders and ``--option KEY.NAME=VALUE`` prefixes."""


def check_dataset_key(key: str, what: str = "dataset key") -> str:
    """``key`` when it is a usable dataset key (lower-case letters, digits, '_'), else DataError."""
    if not isinstance(key, str) or not DATASET_KEY.match(key):
        raise DataError(
            f"{what} {key!r} is not usable: use lower-case letters, digits and '_' (e.g. hospital_a), starting with "
            "a letter or digit"
        )
    return key


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator registering an adapter under its ``key``; plugin modules use it the same way.

    The adapter's source (busbench or the plugin module) is recorded for messages.
    """
    if not cls.key or not cls.folder:
        raise RuntimeError(f"adapter {cls.__name__} must set key and folder")
    check_dataset_key(cls.key, f"adapter {cls.__name__}: dataset key")
    if cls.key in ADAPTERS and ADAPTERS[cls.key] is not cls:
        first = plugins.source_of(ADAPTERS[cls.key].__module__)
        raise ConfigError(
            f"dataset key {cls.key!r} of {cls.__module__}.{cls.__name__} is already registered by {first}; "
            "give the adapter another key"
        )
    ADAPTERS[cls.key] = cls
    plugins.record_dataset(cls.key, cls.__module__)
    return cls


def load_adapters() -> dict[str, type[Adapter]]:
    """Import every built-in dataset module and every plugin (see :mod:`busbench.plugins`); return the registry."""
    for module in DATASET_MODULES:
        importlib.import_module(module)
    plugins.load_plugins()
    return ADAPTERS


def adapter_source(key: str) -> str:
    """Where the adapter registered under ``key`` comes from: ``busbench`` or ``plugin <module> (...)``."""
    return plugins.source_of(load_adapters()[key].__module__)


def dataset_keys() -> list[str]:
    """Registered dataset keys, sorted."""
    return sorted(load_adapters())


LAYOUTS: dict[str, type[Adapter]] = {}
"""Generic layout name -> adapter class taking ``key`` as its first argument (``folder``: images/ + masks/)."""

LAYOUT_MODULES: tuple[str, ...] = ("busbench.data.adapters.folder",)


def register_layout(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator registering a generic layout: one adapter class serving any dataset key."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        if name in LAYOUTS and LAYOUTS[name] is not cls:
            raise ConfigError(f"layout {name!r} is already registered by {LAYOUTS[name].__module__}")
        LAYOUTS[name] = cls
        return cls

    return decorate


def layout_names() -> list[str]:
    """Registered generic layouts (``folder`` and any from plugins), sorted."""
    for module in LAYOUT_MODULES:
        importlib.import_module(module)
    plugins.load_plugins()
    return sorted(LAYOUTS)


def get_adapter(key: str, layout: str | None = None, **options: Any) -> Adapter:
    """Build the adapter registered under ``key`` with its options, or a generic ``layout`` for a new key.

    Raises DataError for an unknown key (listing valid keys with a did-you-mean, and how to prepare a new
    one), for a ``layout`` key that clashes with a registered dataset, and ConfigError for an option the
    adapter does not take.
    """
    registry = load_adapters()
    if layout is not None:
        layouts = layout_names()
        if layout not in layouts:
            raise DataError(f"unknown layout {layout!r}; valid layouts: {', '.join(layouts)}")
        check_dataset_key(key)
        if key in registry:
            raise DataError(
                f"dataset key {key!r} is already a registered dataset (from {adapter_source(key)}); give your "
                f"{layout} dataset another key (e.g. --key {key}_local)"
            )
        return _build(LAYOUTS[layout], f"{layout} layout", options, key)
    if key not in registry:
        valid = sorted(registry)
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"unknown dataset key {key!r}.{hint} Valid keys: {', '.join(valid)}. A dataset of your own is "
            "prepared with --layout folder --key NAME --dataset-dir DIR"
        )
    return _build(registry[key], f"dataset {key!r}", options)


def _build(cls: type[Adapter], what: str, options: dict[str, Any], *args: Any) -> Adapter:
    """``cls(*args, **options)`` after checking the option names against its constructor."""
    accepted = [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    accepted = accepted[len(args):]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise ConfigError(f"{what} has no option {', '.join(map(repr, unknown))}; its options: {allowed}")
    return cls(*args, **options)
