"""``busbench audit``: check a prepared dataset before anything is trained on it.

The audit re-derives, from the files alone, every promise prepare makes: no patient, no group of near-duplicates
and no listed duplicate pair crosses the test/dev boundary or two folds; every path stays inside its root and
exists; derived masks are binary 0/255 and class maps 0/1/2 of the image's size and agree with each other; the
label/split/fold counts and the manifest's SHA-256 match the summary JSON; a manifest whose summary says it holds
the shipped v1 split still holds it. A hand-edited or stale manifest fails here, with every problem listed,
instead of silently leaking test images into training.

``--split-file`` audits someone else's split (a paper's fold list, another benchmark's CSV) against busbench's
patient and near-duplicate links of a prepared dataset: which test images have a near-duplicate or a same-patient
image in training or validation, which validation images have one in training, every such pair (written to a
CSV), and the label balance of each part.
"""

from __future__ import annotations

import argparse
import csv
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

from busbench.atomic import atomic_write_bytes
from busbench.data.manifest import (
    PATH_COLUMNS,
    DataRoots,
    add_root_arguments,
    join_inside,
    manifest_sha256,
    read_manifest,
    read_summary,
    split_provenance,
    summary_path,
)
from busbench.data.splits import reference_split
from busbench.errors import DataError

MAX_EXAMPLES = 5  # examples listed per kind of problem


@dataclass
class AuditReport:
    """Outcome of one audit: ``problems`` is empty when everything holds."""

    dataset: str
    manifest: Path
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # what was checked: sizes, counts, duplicate findings
    partial: str | None = None  # "201 of the 780 images of the public release" for a partial copy

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
                "counts and hash check out" + (f" (partial copy: {self.partial})" if self.partial else "")
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


def _split_record(df: pd.DataFrame, summary: dict[str, Any], report: AuditReport) -> list[str]:
    """Describe the split's source in the facts; a manifest recorded as v1 must still hold the shipped v1 rows."""
    if not summary:
        return []
    record = split_provenance(summary)
    reference_info = summary.get("reference") or {}
    source = str(record.get("source"))
    if record.get("partial"):
        report.partial = (
            f"{reference_info.get('present')} of the {reference_info.get('images')} images of the release"
        )
        source += f", partial ({report.partial})"
    report.facts["split"] = source
    if record.get("source") != "v1":
        return []
    reference = reference_split(report.dataset, str(record.get("version") or "v1"))
    if reference is None:
        return [f"the summary says the split is v1, but busbench has no v1 split for {report.dataset}"]
    rows = reference.rows
    unknown = sorted(set(df["sample_id"]) - set(rows.index))
    if unknown:
        return [f"{len(unknown)} row(s) recorded as v1 are not in the v1 split: {_examples(unknown)}"]
    ref = rows.loc[df["sample_id"]]
    moved = [
        f"{sid} ({column} {mine!r}, v1 {theirs!r})"
        for column in ("split", "fold", "group_id")
        for sid, mine, theirs in zip(
            df["sample_id"], df[column].astype(str), ref[column].astype(str), strict=True
        )
        if mine != theirs
    ]
    if moved:
        return [f"{len(moved)} value(s) differ from the v1 split the summary names: {_examples(moved)}"]
    return []


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
    report.problems += _split_record(df, summary, report)
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


# ------------------------------------------------------------------------------------------- someone's split

SPLIT_COLUMNS = ("split", "set", "subset", "partition", "phase", "part")
FOLD_COLUMNS = ("fold", "kfold", "k_fold", "cv_fold", "folds")
SPLIT_NAMES: dict[str, str] = {
    **dict.fromkeys(("train", "training", "trn", "dev", "development", "trainval"), "train"),
    **dict.fromkeys(("val", "valid", "validation", "vali", "tune"), "val"),
    **dict.fromkeys(("test", "testing", "tst", "holdout", "held-out", "heldout", "eval"), "test"),
}
PAIR_COLUMNS = (
    "a", "b", "link", "score", "part_a", "part_b", "label_a", "label_b", "image_a", "image_b"
)  # fmt: skip


@dataclass
class SplitAudit:
    """Leakage of a split from a file, against a prepared dataset's patient and near-duplicate links."""

    dataset: str
    split_file: Path
    pairs_file: Path | None
    lines: list[str] = field(default_factory=list)
    leaks: int = 0  # straddling pairs (near-duplicate or same patient)

    @property
    def ok(self) -> bool:
        return self.leaks == 0

    def text(self) -> str:
        return "\n".join(self.lines)


def _column(df: pd.DataFrame, names: Sequence[str]) -> str | None:
    lowered = {c.strip().lower(): c for c in df.columns}
    return next((lowered[n] for n in names if n in lowered), None)


def _match_rows(table: pd.DataFrame, manifest: pd.DataFrame, skip: set[str], source: Path) -> pd.Series:
    """sample_id per row of ``table``, from the column that names the most manifest images (by sample_id, image
    path, file name or file name without extension); NaN where a row names none."""
    keys: dict[str, dict[str, str]] = {"id": {}, "path": {}, "name": {}, "stem": {}}
    for sid, rel in zip(manifest["sample_id"], manifest["image_path"], strict=True):
        name = rel.rsplit("/", 1)[-1]
        keys["id"][sid] = sid
        keys["path"][rel] = sid
        keys["name"][name] = sid
        keys["stem"][name.rsplit(".", 1)[0]] = sid
    best: tuple[int, pd.Series | None] = (0, None)
    for column in table.columns:
        if column in skip:
            continue
        values = table[column].astype(str).str.strip()
        tails = values.str.replace("\\", "/", regex=False).str.rsplit("/", n=1).str[-1]
        for kind, lookup in keys.items():
            probe = values if kind in ("id", "path") else tails
            if kind == "stem":
                probe = tails.str.rsplit(".", n=1).str[0]
            mapped = probe.map(lookup)
            hits = int(mapped.notna().sum())
            if hits > best[0]:
                best = (hits, mapped)
    if best[1] is None:
        raise DataError(
            f"split file {source}: no column names images of the prepared dataset (by sample_id, image path "
            "or file name); check that it is a split of this dataset"
        )
    return best[1]


def _parts(table: pd.DataFrame, source: Path) -> tuple[pd.Series, pd.Series]:
    """(part, role) per row: part names the set an image is in; role is test, val or train."""
    split_col = _column(table, SPLIT_COLUMNS)
    fold_col = _column(table, FOLD_COLUMNS)
    if split_col is None and fold_col is None:
        raise DataError(
            f"split file {source} has neither a split column ({', '.join(SPLIT_COLUMNS)}) nor a fold column "
            f"({', '.join(FOLD_COLUMNS)}); its columns are {list(table.columns)}"
        )
    fold = table[fold_col].astype(str).str.strip() if fold_col else None
    if split_col is None:
        # a fold list: every fold is held out once, so each fold is a test set for the others
        assert fold is not None
        return "fold " + fold, pd.Series("test", index=table.index)
    raw = table[split_col].astype(str).str.strip()
    role = raw.str.lower().map(SPLIT_NAMES)
    if role.isna().any():
        odd = sorted(set(raw[role.isna()]))
        raise DataError(
            f"split file {source}: column {split_col!r} holds {odd[:5]}, not train/val/test (or dev/test); "
            "rename those values"
        )
    part = role.copy()
    if fold is not None:
        # busbench-style files: dev rows carry a fold; each fold is the validation set of the others
        in_fold = (role != "test") & (fold != "-1") & (fold != "")
        part[in_fold] = "fold " + fold[in_fold]
        role[in_fold] = "val"
    return part, role


def _links(manifest: pd.DataFrame, summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(a, b, kind, score) for near-duplicate pairs (from prepare) and same-patient pairs (from the manifest)."""
    links = [
        (str(p.get("a")), str(p.get("b")), str(p.get("kind", "near")), str(p.get("score", "")))
        for p in (summary.get("duplicates") or {}).get("pairs") or []
    ]
    by_patient = manifest.groupby("patient_id")["sample_id"].agg(sorted)
    for ids in by_patient[by_patient.map(len) > 1]:
        links += [(a, b, "patient", "") for i, a in enumerate(ids) for b in ids[i + 1 :]]
    return links


def audit_split_file(
    dataset: str,
    split_file: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    manifest_dir: str | os.PathLike | None = None,
    pairs_out: str | os.PathLike | None = None,
) -> SplitAudit:
    """Audit the split in ``split_file`` (a CSV: an image's sample_id, path or file name per row, and a split
    and/or fold column) against the prepared ``dataset``; writes every straddling pair to ``pairs_out`` (default
    ``<split file stem>_leaks.csv`` beside the split file)."""
    roots = DataRoots.resolve(data_root, None, None, manifest_dir)
    manifest_file = _locate(dataset, roots)
    manifest = read_manifest(manifest_file)
    summary = read_summary(summary_path(manifest_file))
    key = str(manifest["dataset"].iloc[0])
    source = Path(split_file)
    if not source.is_file():
        raise DataError(f"split file {source} not found")
    try:
        table = pd.read_csv(source, dtype=str, keep_default_na=False, sep=None, engine="python")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
        raise DataError(f"split file {source} is not a readable CSV ({exc})") from exc
    part, role = _parts(table, source)
    skip = {c for c in (_column(table, SPLIT_COLUMNS), _column(table, FOLD_COLUMNS)) if c}
    sid = _match_rows(table, manifest, skip, source)
    unmatched = table.index[sid.isna()]
    matched = sid.notna()
    repeated = sid[matched][sid[matched].duplicated()]
    if len(repeated):
        raise DataError(
            f"split file {source}: images listed more than once: {_examples(sorted(set(repeated)))}"
        )
    where = dict(zip(sid[matched], part[matched], strict=True))
    role_of = dict(zip(sid[matched], role[matched], strict=True))
    info = manifest.set_index("sample_id")

    rows, kinds = [], {"near": [0, 0], "patient": [0, 0]}
    leaking_test: set[str] = set()
    leaking_val: set[str] = set()
    for a, b, kind, score in _links(manifest, summary):
        if a not in where or b not in where:
            continue
        counter = kinds["patient" if kind == "patient" else "near"]
        counter[1] += 1
        if where[a] == where[b]:
            continue
        counter[0] += 1
        for x, y in ((a, b), (b, a)):
            if role_of[x] == "test":
                leaking_test.add(x)
            elif role_of[x] == "val" and role_of[y] != "test":
                leaking_val.add(x)
        rows.append(
            [a, b, kind, score, where[a], where[b], info.at[a, "label"], info.at[b, "label"],
             info.at[a, "image_path"], info.at[b, "image_path"]]
        )  # fmt: skip
    target = Path(pairs_out) if pairs_out is not None else source.with_name(f"{source.stem}_leaks.csv")
    out = pd.DataFrame(rows, columns=list(PAIR_COLUMNS)).sort_values(["a", "b", "link"])
    atomic_write_bytes(target, out.to_csv(index=False, lineterminator="\n").encode("utf-8"))

    report = SplitAudit(dataset=key, split_file=source, pairs_file=target, leaks=len(rows))
    near, patient = kinds["near"], kinds["patient"]
    n_test = int((role[matched] == "test").sum())
    n_val = int((role[matched] == "val").sum())
    lines = report.lines
    lines.append(f"audit of split file {source} against {key} ({manifest_file})")
    lines.append(
        f"  rows: {len(table)} ({int(matched.sum())} matched to {key} images"
        + (
            f"; {len(unmatched)} name no image of it, e.g. row {int(unmatched[0]) + 2}"
            if len(unmatched)
            else ""
        )
        + f"); {len(manifest) - int(matched.sum())} of the {len(manifest)} prepared images are not in the file"
    )
    labels = info["label"]
    for name in sorted(set(part[matched]), key=lambda p: (p != "train", p != "val", p)):
        members = [s for s, p in where.items() if p == name]
        counts = labels.loc[members].value_counts()
        balance = ", ".join(
            f"{lab} {n} ({100 * n / len(members):.0f}%)" for lab, n in counts.sort_index().items()
        )
        lines.append(f"  {name}: {len(members)} images: {balance}")
    lines.append(
        f"  {len(leaking_test)} of {n_test} test images have a near-duplicate or same-patient image in another part"
        + (f"; {len(leaking_val)} of {n_val} validation images have one in training" if n_val else "")
    )
    lines.append(f"  every straddling pair: {target}")
    verdict = "LEAKS" if rows else "OK"
    lines.append(
        f"{verdict}: {near[0]} of {near[1]} near-duplicate pairs and {patient[0]} of {patient[1]} same-patient "
        f"pairs straddle parts"
    )
    return report


# -------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "datasets", nargs="+", metavar="KEY", help="dataset key(s), or path(s) to manifest CSVs"
    )
    add_root_arguments(parser, fallback="as recorded by prepare, else ")
    parser.add_argument(
        "--manifests",
        type=Path,
        default=None,
        help="folder holding <key>.csv/.json (default: <data-root>/manifests)",
    )
    parser.add_argument(
        "--split-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="audit this split instead (a CSV with an image's sample_id or file name per row and a split "
        "and/or fold column) against KEY's patient and near-duplicate links; exit 1 if any pair straddles parts",
    )
    parser.add_argument(
        "--pairs-out",
        type=Path,
        default=None,
        metavar="CSV",
        help="with --split-file: where to write every straddling pair (default: <FILE stem>_leaks.csv beside it)",
    )


def run(args: argparse.Namespace) -> int:
    """Print one report per dataset; exit status 1 if any audit failed.

    A manifest that does not exist is a usage error (wrong key or data root), reported on one line before any
    audit runs.
    """
    defaults = DataRoots.resolve(args.data_root, None, None, args.manifests)
    if args.split_file is not None:
        if len(args.datasets) != 1:
            raise DataError("--split-file audits one dataset's split; give exactly one KEY")
    elif args.pairs_out is not None:
        raise DataError("--pairs-out goes with --split-file")
    for key in args.datasets:
        path = _locate(key, defaults)
        if not path.is_file():
            raise DataError(
                f"manifest {path} not found; run busbench prepare --datasets {path.stem} first, or pass "
                "--data-root / --manifests pointing at the folder that holds it"
            )
    if args.split_file is not None:
        split_report = audit_split_file(
            args.datasets[0], args.split_file, args.data_root, args.manifests, args.pairs_out
        )
        print(split_report.text())
        return 0 if split_report.ok else 1
    failed = 0
    for key in args.datasets:
        report = audit_manifest(key, args.data_root, args.raw_root, args.derived_root, args.manifests)
        print(report.text())
        failed += not report.ok
    return 1 if failed else 0
