"""``busbench audit``: check a prepared dataset before anything is trained on it.

The audit re-derives, from the files alone, every promise prepare makes: no patient, no group of near-duplicates
and no listed duplicate pair crosses the test/dev boundary or two folds; every path stays inside its root and
exists; derived masks are binary 0/255 and class maps 0/1/2 of the image's size and agree with each other; the
label/split/fold counts and the manifest's SHA-256 match the summary JSON. A hand-edited or stale manifest fails
here, with every problem listed, instead of silently leaking test images into training.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from busbench.data.manifest import (
    PATH_COLUMNS,
    DataRoots,
    join_inside,
    manifest_sha256,
    read_manifest,
    read_summary,
    summary_path,
)
from busbench.errors import DataError

MAX_EXAMPLES = 5  # examples listed per kind of problem


@dataclass
class AuditReport:
    """Outcome of one audit: ``problems`` is empty when everything holds."""

    dataset: str
    manifest: Path
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # what was checked: sizes, counts, duplicate findings

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        """Human-readable report: a header, the facts, then PASSED or every problem."""
        lines = [f"audit {self.dataset}: {self.manifest}"]
        for name, value in self.facts.items():
            lines.append(f"  {name}: {value}")
        if self.ok:
            lines.append(
                "PASSED: no patient, group or duplicate pair crosses test/dev or folds; files, masks, "
                "counts and hash check out"
            )
        else:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines.extend(f"  - {p}" for p in self.problems)
        return "\n".join(lines)


def _locate(manifest: str | os.PathLike, roots: DataRoots) -> Path:
    """A dataset key means ``<manifest_dir>/<key>.csv``; anything that looks like a file path is used as is."""
    text = os.fspath(manifest)
    if text.endswith(".csv") or os.sep in text or "/" in text:
        return Path(text)
    return roots.manifest_dir / f"{text}.csv"


def _recorded_root(explicit: Any, summary: dict[str, Any], name: str, default: Path) -> Path:
    """Explicit argument, else the root recorded by prepare when it still exists, else the data-root default."""
    if explicit is not None:
        return Path(explicit)
    recorded = summary.get(name)
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    return default


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_EXAMPLES])
    return shown + (f" and {len(items) - MAX_EXAMPLES} more" if len(items) > MAX_EXAMPLES else "")


def _partition(row: pd.Series) -> str:
    return "test" if row["split"] == "test" else f"fold {row['fold']}"


def _leakage(df: pd.DataFrame, pairs: Sequence[dict[str, Any]]) -> list[str]:
    problems = []
    part = df.apply(_partition, axis=1)
    for column, what in (("patient_id", "patient"), ("group_id", "group")):
        spread = part.groupby(df[column]).agg(lambda s: sorted(set(s)))
        crossing = spread[spread.map(len) > 1]
        if len(crossing):
            described = [f"{what} {name} in {' and '.join(parts)}" for name, parts in crossing.items()]
            problems.append(f"{len(crossing)} {what}(s) cross splits or folds: {_examples(described)}")
    where = dict(zip(df["sample_id"], part, strict=True))
    group = dict(zip(df["sample_id"], df["group_id"], strict=True))
    split_pairs, ungrouped = [], []
    for pair in pairs:
        a, b = str(pair.get("a")), str(pair.get("b"))
        if a not in where or b not in where:
            continue  # a pair naming rows not in the manifest is reported with the count checks
        if where[a] != where[b]:
            split_pairs.append(f"{a} ({where[a]}) / {b} ({where[b]})")
        elif group[a] != group[b]:
            ungrouped.append(f"{a}/{b}")
    if split_pairs:
        problems.append(
            f"{len(split_pairs)} near-duplicate pair(s) cross splits or folds: {_examples(split_pairs)}"
        )
    if ungrouped:
        problems.append(
            f"{len(ungrouped)} near-duplicate pair(s) sit in different groups: {_examples(ungrouped)}"
        )
    return problems


def _counts(df: pd.DataFrame, summary: dict[str, Any], summary_file: Path, manifest: Path) -> list[str]:
    problems = []
    recorded = summary.get("manifest_sha256")
    actual = manifest_sha256(manifest)
    if recorded != actual:
        problems.append(
            f"manifest SHA-256 {actual[:12]}... does not match {summary_file.name} ({str(recorded)[:12]}...): "
            "the manifest was edited or the summary is stale; re-run busbench prepare"
        )
    counts = summary.get("counts", {})
    checks = {
        "label": df["label"].value_counts().to_dict(),
        "split": df["split"].value_counts().to_dict(),
        "fold": df.loc[df["split"] == "dev", "fold"].astype(str).value_counts().to_dict(),
    }
    if counts.get("images") != len(df):
        problems.append(
            f"{manifest.name} has {len(df)} rows but {summary_file.name} counts {counts.get('images')}"
        )
    for name, actual_counts in checks.items():
        expected = {str(k): int(v) for k, v in (counts.get(name) or {}).items() if int(v) != 0}
        actual_counts = {str(k): int(v) for k, v in actual_counts.items()}
        if expected != actual_counts:
            problems.append(
                f"{name} counts in {manifest.name} {dict(sorted(actual_counts.items()))} differ from "
                f"{summary_file.name} {dict(sorted(expected.items()))}"
            )
    return problems


def _read_mask(path: Path) -> np.ndarray | None:
    data = np.fromfile(path, dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None


def _check_files(row: dict[str, Any]) -> list[str]:
    """Problems of one row's files; header-only read for the image, full read for the masks."""
    sid, h, w = row["sample_id"], int(row["height"]), int(row["width"])
    problems = []
    try:
        with Image.open(row["image_path"]) as img:
            if img.size != (w, h):
                problems.append(
                    f"{sid}: image {row['image_path']} is {img.size[1]}x{img.size[0]}, manifest says {h}x{w}"
                )
    except OSError as exc:
        problems.append(f"{sid}: image {row['image_path']} cannot be opened ({exc.__class__.__name__})")
    arrays = {}
    for column, allowed in (("mask_path", (0, 255)), ("class_mask_path", (0, 1, 2))):
        arr = _read_mask(Path(row[column]))
        if arr is None:
            problems.append(f"{sid}: {column} {row[column]} is not a readable PNG")
            continue
        if arr.ndim != 2 or arr.dtype != np.uint8:
            problems.append(f"{sid}: {column} {row[column]} is not a single-channel 8-bit PNG")
            continue
        if arr.shape != (h, w):
            problems.append(
                f"{sid}: {column} {row[column]} is {arr.shape[0]}x{arr.shape[1]}, manifest says {h}x{w}"
            )
            continue
        extra = sorted(set(np.unique(arr).tolist()) - set(allowed))
        if extra:
            kind = "binary 0/255" if column == "mask_path" else "a 0/1/2 class map"
            problems.append(f"{sid}: {column} {row[column]} is not {kind} (holds {extra[:5]})")
            continue
        arrays[column] = arr
    if len(arrays) == 2 and not np.array_equal(arrays["mask_path"] > 0, arrays["class_mask_path"] > 0):
        problems.append(f"{sid}: class map and mask disagree on lesion pixels")
    return problems


def _files(df: pd.DataFrame, roots: dict[str, Path], workers: int) -> tuple[list[str], bool]:
    """Path containment and existence for every row, then pixel checks of rows whose files all exist."""
    escaping, missing, present_rows = [], [], []
    for row in df.to_dict("records"):
        ok = True
        for column, root_name in PATH_COLUMNS.items():
            try:
                path = join_inside(roots[root_name], str(row[column]), f"{row['sample_id']}: {column}")
            except DataError as exc:
                escaping.append(str(exc))
                ok = False
                continue
            if not path.is_file():
                missing.append(f"{row['sample_id']}: {column} {path}")
                ok = False
            row[column] = path
        if ok:
            present_rows.append(row)
    problems = []
    if escaping:
        problems.append(f"{len(escaping)} path(s) escape their root: {_examples(escaping)}")
    if missing:
        problems.append(f"{len(missing)} file(s) missing: {_examples(missing)}")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pixel = [p for found in pool.map(_check_files, present_rows) for p in found]
    if pixel:
        problems.append(f"{len(pixel)} image/mask problem(s): {_examples(pixel)}")
    return problems, any(": image_path " in m for m in missing)


def audit_manifest(
    manifest: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    raw_root: str | os.PathLike | None = None,
    derived_root: str | os.PathLike | None = None,
    manifest_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> AuditReport:
    """Audit one prepared dataset, given its key (looked up in the manifest folder) or its manifest path.

    Roots: explicit arguments, else the roots recorded in the summary JSON when they exist, else the data-root
    defaults. Never raises for a bad dataset; every problem goes into the report.
    """
    defaults = DataRoots.resolve(data_root, None, None, manifest_dir)
    path = _locate(manifest, defaults)
    report = AuditReport(dataset=path.stem, manifest=path)
    try:
        df = read_manifest(path)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    report.dataset = str(df["dataset"].iloc[0])
    summary_file = summary_path(path)
    try:
        summary = read_summary(summary_file)
    except DataError as exc:
        report.problems.append(str(exc))
        summary = {}
    roots = {
        "raw": _recorded_root(raw_root, summary, "raw_root", defaults.raw_root),
        "derived": _recorded_root(derived_root, summary, "derived_root", defaults.derived_root),
    }
    pairs = (summary.get("duplicates") or {}).get("pairs") or []
    dev = df["split"] == "dev"
    report.facts = {
        "images": len(df),
        "patients": df["patient_id"].nunique(),
        "groups": df["group_id"].nunique(),
        "test": int((~dev).sum()),
        "folds": "/".join(str(int(n)) for n in df.loc[dev, "fold"].value_counts().sort_index().tolist()),
        "near-duplicate pairs": len(pairs),
        "label conflicts": _conflicts_text(summary),
        "raw root": os.fspath(roots["raw"]),
        "derived root": os.fspath(roots["derived"]),
    }
    report.problems += _leakage(df, pairs)
    if summary:
        report.problems += _counts(df, summary, summary_file, path)
    file_problems, images_missing = _files(
        df, roots, workers if workers is not None else min(4, os.cpu_count() or 1)
    )
    if images_missing and raw_root is None:
        file_problems.append(
            f"(raw files looked up under {roots['raw']}; pass --raw-root if they live elsewhere)"
        )
    report.problems += file_problems
    return report


def _conflicts_text(summary: dict[str, Any]) -> str:
    conflicts = (summary.get("duplicates") or {}).get("label_conflicts") or []
    if not conflicts:
        return "none"
    return f"{len(conflicts)}: " + _examples([f"{c.get('a')}/{c.get('b')}" for c in conflicts])


def check_manifest(
    manifest: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    raw_root: str | os.PathLike | None = None,
    derived_root: str | os.PathLike | None = None,
    manifest_dir: str | os.PathLike | None = None,
) -> AuditReport:
    """:func:`audit_manifest`, raising DataError with the full report when anything is wrong."""
    report = audit_manifest(manifest, data_root, raw_root, derived_root, manifest_dir)
    if not report.ok:
        raise DataError(
            f"audit of {report.manifest} failed; fix the data or re-run busbench prepare:\n" + report.text()
        )
    return report


# -------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "datasets", nargs="+", metavar="KEY", help="dataset key(s), or path(s) to manifest CSVs"
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder holding raw/, derived/ and manifests/ (default: $BUSBENCH_DATA or data)",
    )
    parser.add_argument(
        "--raw-root",
        type=Path,
        default=None,
        help="raw data folder (default: as recorded by prepare, else <data-root>/raw)",
    )
    parser.add_argument(
        "--derived-root",
        type=Path,
        default=None,
        help="derived mask folder (default: as recorded by prepare, else <data-root>/derived)",
    )
    parser.add_argument(
        "--manifests",
        type=Path,
        default=None,
        help="folder holding <key>.csv/.json (default: <data-root>/manifests)",
    )


def run(args: argparse.Namespace) -> int:
    """Print one report per dataset; exit status 1 if any audit failed.

    A manifest that does not exist is a usage error (wrong key or data root), reported on one line before any
    audit runs.
    """
    defaults = DataRoots.resolve(args.data_root, None, None, args.manifests)
    for key in args.datasets:
        path = _locate(key, defaults)
        if not path.is_file():
            raise DataError(
                f"manifest {path} not found; run busbench prepare --datasets {path.stem} first, or pass "
                "--data-root / --manifests pointing at the folder that holds it"
            )
    failed = 0
    for key in args.datasets:
        report = audit_manifest(key, args.data_root, args.raw_root, args.derived_root, args.manifests)
        print(report.text())
        failed += not report.ok
    return 1 if failed else 0
