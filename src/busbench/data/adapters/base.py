"""The adapter interface: one raw dataset layout in, a sorted list of samples and decoded arrays out.

Each dataset module (``busi.py``, ``busbra.py``, ...) subclasses :class:`Adapter` and registers it under its
dataset key with :func:`register_adapter`. Everything downstream (prepare, manifests, audit) talks only to this
interface, so adding a dataset is adding one module.

The contract, in three steps:

- :meth:`Adapter.locate` finds the dataset's own folder below ``raw_root/<folder>``, through the nestings that
  real archives unpack to (``Dataset_BUSI_with_GT/``, ``BUS_UC/BUS_UC/``, ...).
- :meth:`Adapter.scan` lists the samples from file names and metadata tables only (no pixel decoding), sorted by
  ``sample_id``, and raises one :class:`~busbench.errors.DataError` for any inconsistency (an image without its
  mask, a metadata row without a file, a file without a row, an empty class folder, ...). Samples that an
  adapter option drops are reported in :attr:`Adapter.excluded`.
- :meth:`Adapter.decode` reads one sample's image and mask(s) and applies the dataset's quirk rules, returning a
  uint8 image, a boolean lesion mask of the same size, a class map and notes worth recording.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

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
    meta: dict[str, str] = field(default_factory=dict)  # extra metadata; the manifest stores it as meta_<key>
    official_fold: int | None = None  # BUSBRA 5-fold-cv.csv kFold (test fold 1..5), else None


@dataclass
class DecodedSample:
    """Pixels of one sample after the dataset's quirk rules are applied."""

    image: np.ndarray  # uint8, (H, W) grey or (H, W, 3) RGB as stored, alpha dropped
    mask: np.ndarray  # bool (H, W), same size as image; lesion pixels
    class_map: np.ndarray  # uint8 (H, W): 0 background, 1 benign lesion, 2 malignant lesion
    notes: list[str] = field(default_factory=list)  # warnings worth recording in the prepare report


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

    def __init__(self) -> None:
        self.excluded: dict[str, str] = {}  # sample_id -> reason, filled by the last scan()

    def options(self) -> dict[str, Any]:
        """The options this adapter was built with (recorded in the prepare summary)."""
        return {}

    def is_dataset_dir(self, path: Path) -> bool:
        """Whether ``path`` looks like this dataset's own folder (used by :meth:`locate`)."""
        raise NotImplementedError

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
        return found

    def scan(self, dataset_dir: Path) -> list[RawSample]:
        """All samples, sorted by ``sample_id``; raises DataError on any inconsistency."""
        raise NotImplementedError

    def decode(self, sample: RawSample) -> DecodedSample:
        """Read the sample's image and mask(s) and apply the dataset's quirk rules."""
        raise NotImplementedError


def find_dataset_dir(top: Path, accept: Callable[[Path], bool], depth: int) -> Path | None:
    """Shallowest folder at or below ``top`` (within ``depth`` levels) that ``accept`` takes; sorted, so stable.

    Two accepted folders at the same depth are ambiguous and raise DataError naming both.
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
            child for d in level for child in d.iterdir() if child.is_dir() and not child.name.startswith(".")
        )
        if not level:
            break
    return None


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


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator registering an adapter under its ``key``."""
    if not cls.key or not cls.folder:
        raise RuntimeError(f"adapter {cls.__name__} must set key and folder")
    if cls.key in ADAPTERS and ADAPTERS[cls.key] is not cls:
        raise RuntimeError(f"dataset key {cls.key!r} registered twice")
    ADAPTERS[cls.key] = cls
    return cls


def load_adapters() -> dict[str, type[Adapter]]:
    """Import every dataset module and return the registry."""
    for module in DATASET_MODULES:
        importlib.import_module(module)
    return ADAPTERS


def dataset_keys() -> list[str]:
    """Registered dataset keys, sorted."""
    return sorted(load_adapters())


def get_adapter(key: str, **options: Any) -> Adapter:
    """Build the adapter registered under ``key`` with its options.

    Raises DataError for an unknown key (listing valid keys with a did-you-mean) and ConfigError for an
    option the adapter does not take.
    """
    registry = load_adapters()
    if key not in registry:
        valid = sorted(registry)
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown dataset key {key!r}.{hint} Valid keys: {', '.join(valid)}")
    cls = registry[key]
    accepted = [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise ConfigError(
            f"dataset {key!r} has no option {', '.join(map(repr, unknown))}; its options: {allowed}"
        )
    return cls(**options)
