"""Manifest CSV and summary JSON: the contract between data preparation and everything downstream.

One manifest row per image. Paths in it are relative (``image_path`` to the raw root, mask paths to the derived
root, posix separators), so a prepared dataset moves between machines; :func:`resolve_paths` joins them to the
roots in use and refuses any path that would leave its root. Writing is deterministic (fixed column order, rows
sorted by ``sample_id``, ``\\n`` line endings, integers only), so the same inputs give the same bytes and the
SHA-256 of those bytes, stored in the summary JSON, identifies a split.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from busbench.atomic import atomic_write_bytes, atomic_write_text
from busbench.config import read_mapping_file
from busbench.data.adapters.base import LABELS
from busbench.errors import DataError

DATA_ENV = "BUSBENCH_DATA"
DEFAULT_DATA_ROOT = "data"

COLUMNS: tuple[str, ...] = (
    "sample_id",
    "dataset",
    "patient_id",
    "group_id",
    "label",
    "image_path",
    "mask_path",
    "class_mask_path",
    "height",
    "width",
    "split",
    "fold",
)
"""Fixed leading columns; ``meta_*`` columns follow in sorted order."""
PATH_COLUMNS: dict[str, str] = {"image_path": "raw", "mask_path": "derived", "class_mask_path": "derived"}
"""Path column -> the root it is relative to."""
INT_COLUMNS: tuple[str, ...] = ("height", "width", "fold")
SPLITS: tuple[str, ...] = ("dev", "test")
META_PREFIX = "meta_"
_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class DataRoots:
    """Where raw data, derived masks and manifests live for one invocation."""

    data_root: Path
    raw_root: Path
    derived_root: Path
    manifest_dir: Path

    @classmethod
    def resolve(
        cls,
        data_root: str | os.PathLike | None = None,
        raw_root: str | os.PathLike | None = None,
        derived_root: str | os.PathLike | None = None,
        manifest_dir: str | os.PathLike | None = None,
    ) -> DataRoots:
        """Explicit paths win; the rest sit under the data root (argument, else $BUSBENCH_DATA, else ``data``)."""
        base = Path(data_root if data_root is not None else os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT)
        return cls(
            data_root=base,
            raw_root=Path(raw_root) if raw_root is not None else base / "raw",
            derived_root=Path(derived_root) if derived_root is not None else base / "derived",
            manifest_dir=Path(manifest_dir) if manifest_dir is not None else base / "manifests",
        )


def add_root_arguments(parser: argparse.ArgumentParser, fallback: str = "") -> None:
    """The ``--data-root``, ``--raw-root`` and ``--derived-root`` options of the data commands (see :class:`DataRoots`).

    ``fallback`` is said before the under-the-data-root default (audit: "as recorded by prepare, else ").
    """
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder holding raw/, derived/ and manifests/ (default: $BUSBENCH_DATA or data)",
    )
    for flag, what, folder in (
        ("--raw-root", "folder holding the unpacked datasets", "raw"),
        ("--derived-root", "folder of the derived masks", "derived"),
    ):
        parser.add_argument(flag, type=Path, default=None, help=f"{what} (default: {fallback}<data-root>/{folder})")


def library_versions() -> dict[str, str]:
    """Versions a prepared split or a result may depend on: busbench, Python, numpy, scikit-learn, OpenCV, pandas."""
    import platform

    import cv2
    import numpy
    import sklearn

    from busbench import __version__

    return {
        "busbench": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "opencv": cv2.__version__,
        "pandas": pd.__version__,
    }


def split_provenance(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Where a manifest's split came from, as its summary JSON records it (older summaries: a drawn split)."""
    splits = summary.get("splits")
    if isinstance(splits, Mapping):
        return dict(splits)
    seed = summary.get("seed")
    return {
        "source": f"drawn, seed {seed}",
        "seed": seed,
        "test_size": summary.get("test_size"),
        "folds": summary.get("folds"),
        "partial": False,
    }


def summary_path(manifest_path: str | os.PathLike) -> Path:
    """The summary JSON beside a manifest: ``<key>.csv`` -> ``<key>.json``."""
    return Path(manifest_path).with_suffix(".json")


# ---------------------------------------------------------------------------------------------------- paths


def _path_problem(value: str) -> str | None:
    """Why ``value`` is not a clean relative posix path inside its root, or None."""
    if not value:
        return "is empty"
    if "\\" in value:
        return "uses backslashes (manifests use '/')"
    if value.startswith("/") or _WINDOWS_ABSOLUTE.match(value):
        return "is absolute (manifests hold paths relative to their root)"
    if ".." in PurePosixPath(value).parts:
        return "contains '..' and would leave its root"
    return None


def relative_posix(path: str | os.PathLike, root: str | os.PathLike, what: str) -> str:
    """``path`` relative to ``root`` with '/' separators; DataError if it is not below ``root``.

    Compared lexically (after normalising '.' and '..'), not through symlinks, so a raw root made of links to
    read-only copies still works.
    """
    norm_path = os.path.normpath(os.path.abspath(path))
    norm_root = os.path.normpath(os.path.abspath(root))
    rel = os.path.relpath(norm_path, norm_root)
    if rel == "." or rel.startswith("..") or os.path.isabs(rel):
        raise DataError(f"{what} {path} is not inside {root}; keep the dataset below its root folder")
    return PurePosixPath(*Path(rel).parts).as_posix()


def join_inside(root: str | os.PathLike, rel: str, what: str) -> Path:
    """``root/rel`` as an absolute path; DataError when ``rel`` is absolute or climbs out of ``root``."""
    problem = _path_problem(rel)
    if problem:
        raise DataError(f"{what} {rel!r} {problem}")
    norm_root = os.path.normpath(os.path.abspath(root))
    joined = os.path.normpath(os.path.join(norm_root, *PurePosixPath(rel).parts))
    if os.path.commonpath([norm_root, joined]) != norm_root or joined == norm_root:
        raise DataError(f"{what} {rel!r} resolves outside {root}")
    return Path(joined)


def resolve_paths(
    df: pd.DataFrame, raw_root: str | os.PathLike, derived_root: str | os.PathLike
) -> pd.DataFrame:
    """Copy of ``df`` whose path columns are absolute strings under the given roots.

    Raises DataError (naming the sample and column) for a path that is absolute, uses '..' or otherwise escapes.
    """
    roots = {"raw": raw_root, "derived": derived_root}
    out = df.copy()
    for column, root_name in PATH_COLUMNS.items():
        if column not in out.columns:
            continue
        resolved = []
        for sid, rel in zip(out["sample_id"], out[column], strict=True):
            what = f"manifest row {sid!r} column {column!r}:"
            resolved.append(os.fspath(join_inside(roots[root_name], str(rel), what)))
        out[column] = resolved
    return out


# ---------------------------------------------------------------------------------------------------- writing


def column_order(columns: Iterable[str]) -> list[str]:
    """Fixed columns first, then ``meta_*`` sorted; anything else is a programming error."""
    columns = list(columns)
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"manifest rows lack columns {missing}")
    extra = sorted(c for c in columns if c not in COLUMNS)
    bad = [c for c in extra if not c.startswith(META_PREFIX)]
    if bad:
        raise ValueError(f"manifest columns {bad} are neither standard nor meta_*")
    return [*COLUMNS, *extra]


def manifest_bytes(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """CSV bytes of manifest rows: fixed column order, rows sorted by sample_id, '\\n' endings, UTF-8."""
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("a manifest needs at least one row")
    all_columns: set[str] = set()
    for row in rows:
        all_columns.update(row)
    columns = column_order(all_columns)
    rows.sort(key=lambda r: str(r["sample_id"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c, "")) for c in columns])
    return buffer.getvalue().encode("utf-8")


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        raise TypeError("booleans are not manifest values; store 'yes'/'no' strings")
    if isinstance(value, float):
        # Only integers are expected; a float would make the bytes depend on formatting.
        if not value.is_integer():
            raise TypeError(f"non-integer float {value!r} in a manifest row")
        return str(int(value))
    return str(value)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a manifest file's bytes (what the summary JSON records)."""
    return sha256_bytes(Path(path).read_bytes())


def write_manifest(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> str:
    """Write a manifest atomically; returns its SHA-256."""
    data = manifest_bytes(rows)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def summary_json(summary: Mapping[str, Any]) -> str:
    """Stable JSON text (sorted keys, two-space indent, trailing newline)."""
    return json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_summary(path: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    atomic_write_text(path, summary_json(summary))


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Summary JSON; DataError naming the file when it is missing or not JSON."""
    path = Path(path)
    return read_mapping_file(
        path,
        _parse_json,
        DataError,
        missing=f"summary {path} not found; run busbench prepare for this dataset",
        not_text=f"summary {path} is not UTF-8 text; re-run busbench prepare",
        not_mapping=f"summary {path} does not hold a JSON object; re-run busbench prepare",
    )


def _parse_json(text: str, path: str | os.PathLike) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"summary {path} is not valid JSON ({exc}); re-run busbench prepare") from exc


# ---------------------------------------------------------------------------------------------------- reading


def validate_manifest(df: pd.DataFrame, source: str, fold_gaps: bool = False) -> pd.DataFrame:
    """Check columns and values; return ``df`` with integer columns as ints. ``source`` names the file in errors.

    ``fold_gaps`` accepts dev folds that skip a number: a partial copy of a release keeps the reference split's
    fold numbers, and a fold may hold none of the images present.
    """

    def fail(column: str, problem: str, rows: pd.Series | None = None) -> DataError:
        where = ""
        if rows is not None and rows.any():
            ids = df.loc[rows, "sample_id"].astype(str).tolist() if "sample_id" in df.columns else []
            first = ids[0] if ids else str(rows[rows].index[0])
            more = f" and {len(ids) - 1} more" if len(ids) > 1 else ""
            where = f" (row {first!r}{more})"
        return DataError(
            f"manifest {source}: column {column!r} {problem}{where}; re-run busbench prepare to rebuild it"
        )

    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise fail(missing[0], "is missing" + (f" (also {missing[1:]})" if len(missing) > 1 else ""))
    if len(df) == 0:
        raise DataError(f"manifest {source} has no rows; re-run busbench prepare")
    df = df.copy()
    for column in ("sample_id", "dataset", "patient_id", "group_id"):
        empty = df[column].astype(str).str.len() == 0
        if empty.any():
            raise fail(column, "has empty values", empty)
    dup = df["sample_id"].duplicated(keep=False)
    if dup.any():
        raise fail("sample_id", "has repeated values", dup)
    datasets = sorted(set(df["dataset"].astype(str)))
    if len(datasets) > 1:
        raise fail("dataset", f"mixes datasets {datasets}")
    bad = ~df["label"].isin(LABELS)
    if bad.any():
        raise fail("label", f"has values outside {list(LABELS)}", bad)
    bad = ~df["split"].isin(SPLITS)
    if bad.any():
        raise fail("split", f"has values outside {list(SPLITS)}", bad)
    for column in INT_COLUMNS:
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna() | (values != values.round())
        if bad.any():
            raise fail(column, "has non-integer values", bad)
        df[column] = values.astype("int64")
    for column in ("height", "width"):
        bad = df[column] <= 0
        if bad.any():
            raise fail(column, "has values that are not positive", bad)
    dev = df["split"] == "dev"
    bad = dev & (df["fold"] < 0)
    if bad.any():
        raise fail("fold", "is negative on dev rows (dev rows need fold 0..k-1)", bad)
    bad = ~dev & (df["fold"] != -1)
    if bad.any():
        raise fail("fold", "is not -1 on test rows", bad)
    if dev.any() and not fold_gaps:
        present = set(df.loc[dev, "fold"].tolist())
        expected = set(range(max(present) + 1))
        if present != expected:
            raise fail("fold", f"skips fold(s) {sorted(expected - present)}")
    for column in PATH_COLUMNS:
        problems = df[column].astype(str).map(_path_problem)
        bad = problems.notna()
        if bad.any():
            raise fail(column, f"holds a path that {problems[bad].iloc[0]}", bad)
    return df


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Load and validate a manifest; every column is a string except height, width and fold (int)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} not found; run busbench prepare --datasets {path.stem} first")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"manifest {path} is not a readable CSV ({exc}); re-run busbench prepare") from exc
    summary_file = summary_path(path)
    fold_gaps = False
    if summary_file.is_file():
        with contextlib.suppress(DataError):
            fold_gaps = bool(split_provenance(read_summary(summary_file)).get("partial"))
    return validate_manifest(df, str(path), fold_gaps=fold_gaps)
