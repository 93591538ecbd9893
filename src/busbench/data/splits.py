"""Held-out test split and cross-validation folds that keep groups whole and label proportions even.

A group (``group_id``: same patient or near-duplicate images) never straddles the test/dev boundary or two folds,
so no scan, nor any copy of it, is seen in training and in evaluation. Within that constraint the test split and
every fold should mirror the dataset's label mix; sklearn's ``StratifiedGroupKFold`` does the balancing.

Determinism: rows are put in ``sample_id`` order before anything random happens and every random choice comes
from ``seed``, so the same samples and seed give the same split on every machine and filesystem.

Library versions: ``StratifiedGroupKFold(shuffle=True)`` shuffles groups differently before and after scikit-learn
1.8 (older versions permute the per-group label counts without the groups that own them, so groups land in folds
almost at random). busbench therefore orders the groups itself, with the permutation scikit-learn >= 1.8 draws
(``RandomState(seed).shuffle`` of the group indices; NumPy keeps ``RandomState`` streams fixed across releases),
and calls the splitter with ``shuffle=False``, whose greedy assignment is the same in every scikit-learn since
1.0. Drawn splits are thus identical under every supported scikit-learn, and equal to what scikit-learn >= 1.8
gives with ``shuffle=True``.

Reference splits: for datasets whose full public release busbench has split once for everyone (v1), the split
ships with the package (``busbench/data/splits/<key>_v1.csv``) and :func:`compare_with_reference` checks a
dataset on disk against it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from busbench.errors import DataError

TEST_CANDIDATES = 12  # shuffled partitions tried at most when choosing the held-out test split
GOOD_ENOUGH = 0.01  # stop searching once |test fraction - target| + worst label-share gap is this small
MAX_PARTS = 20  # finest partition used to approximate a test fraction that is not 1/m


@dataclass
class SplitResult:
    """Per-row split ("dev" | "test") and fold (0..k-1 for dev rows, -1 for test rows), in input order."""

    split: np.ndarray  # str
    fold: np.ndarray  # int
    notes: list[str] = field(default_factory=list)


def label_deviation(labels: np.ndarray, subset: np.ndarray) -> float:
    """Largest absolute difference, over labels, between a subset's label shares and the whole set's."""
    labels = np.asarray(labels)
    subset_labels = labels[np.asarray(subset)]
    if len(subset_labels) == 0:
        return 1.0
    return max(
        abs(float(np.mean(subset_labels == value)) - float(np.mean(labels == value)))
        for value in np.unique(labels)
    )


def _partition(test_size: float) -> tuple[int, int]:
    """(m, j): split into m parts and hold out j of them, with j/m as close to ``test_size`` as possible.

    0.2 -> (5, 1), 0.25 -> (4, 1), 0.3 -> (10, 3); the smallest m wins among equally close fractions.
    """
    best = (2, 1)
    best_err = abs(0.5 - test_size)
    for m in range(2, MAX_PARTS + 1):
        j = min(max(round(test_size * m), 1), m - 1)
        err = abs(j / m - test_size)
        if err < best_err - 1e-12:
            best, best_err = (m, j), err
    return best


def shuffled_group_codes(groups: np.ndarray, seed: int) -> np.ndarray:
    """Integer code per row whose sorted order is a seeded permutation of the groups.

    The group at index i of ``np.unique(groups)`` gets code ``inverse[i]`` of ``perm = arange(n);
    RandomState(seed).shuffle(perm)``, so an unshuffled StratifiedGroupKFold visits the groups in ``perm`` order,
    which is what scikit-learn >= 1.8 does with ``shuffle=True, random_state=seed``.
    """
    _, group_index = np.unique(groups, return_inverse=True)
    n_groups = int(group_index.max()) + 1 if len(group_index) else 0
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(n_groups)
    return inverse[group_index.ravel()]


def _sgkf(n_splits: int, seed: int, labels: np.ndarray, groups: np.ndarray) -> list[np.ndarray]:
    """Validation index arrays of a seeded, version-independent StratifiedGroupKFold (see the module doc)."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=False)
    codes = shuffled_group_codes(groups, seed)
    with warnings.catch_warnings():
        # It warns when a class has fewer *members* than n_splits; group shortfalls are reported as notes.
        warnings.simplefilter("ignore", UserWarning)
        return [np.asarray(val) for _, val in splitter.split(np.zeros(len(labels)), labels, codes)]


def held_out_partition(n_groups: int, test_size: float) -> tuple[int, int]:
    """(m, j) of :func:`_partition`, with m cut to the number of groups when there are fewer groups than parts."""
    m, j = _partition(test_size)
    if n_groups < m:
        m, j = n_groups, max(1, min(round(test_size * n_groups), n_groups - 1))
    return m, j


def split_test(
    labels: np.ndarray, groups: np.ndarray, test_size: float, seed: int, candidates: int = TEST_CANDIDATES
) -> np.ndarray:
    """Boolean test mask (rows already in canonical order): whole groups, label mix close to the whole.

    Tries up to ``candidates`` shuffled StratifiedGroupKFold partitions (seeds drawn from ``seed``) and, in each,
    every run of j consecutive parts; keeps the one whose test fraction and label shares are closest to the
    targets. Large datasets usually hit :data:`GOOD_ENOUGH` with the first partition and stop there.
    """
    m, j = held_out_partition(len(np.unique(groups)), test_size)
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=candidates).tolist()
    best_mask: np.ndarray | None = None
    best_score = np.inf
    for candidate_seed in seeds:
        parts = _sgkf(m, int(candidate_seed), labels, groups)
        for start in range(m):
            mask = np.zeros(len(labels), dtype=bool)
            for k in range(start, start + j):
                mask[parts[k % m]] = True
            score = abs(mask.mean() - test_size) + label_deviation(labels, mask)
            if score < best_score - 1e-12:
                best_mask, best_score = mask, score
        if best_score <= GOOD_ENOUGH:
            break
    assert best_mask is not None
    return best_mask


def make_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number 0..folds-1 per row (rows already in canonical order), whole groups per fold."""
    fold = np.full(len(labels), -1, dtype=int)
    for k, val in enumerate(_sgkf(folds, seed, labels, groups)):
        fold[val] = k
    return fold


def _label_counts(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts, strict=True)}


def _unstratifiable(dataset: str, what: str, parts: int, counts: Mapping[str, int], fix: str) -> DataError:
    """The error for ``what`` needing ``parts`` stratified parts when every label has fewer images than that.

    scikit-learn's StratifiedGroupKFold refuses to split when no label has at least as many images as parts; this
    says so in busbench's terms before anything is written.
    """
    return DataError(
        f"{dataset}: {what} needs {parts} stratified parts, but every label has fewer images "
        f"({_label_text(counts)}); {fix}"
    )


def _test_size_fix(n_groups: int, most: int) -> str:
    """Advice for a test split whose partition has more parts than the largest label has images."""
    for parts in range(most, 1, -1):
        size = math.ceil(100 / parts) / 100
        if held_out_partition(n_groups, size)[0] <= most:
            return f"use --test-size {size:g} (split into {parts} parts) or add more images"
    return "add more images (at least 2 of one label)"


def _rare_label_notes(labels: np.ndarray, groups: np.ndarray, parts: int, dataset: str) -> list[str]:
    """Notes for labels found in fewer groups than there are parts (test split + folds) to spread them over."""
    notes = []
    for value in sorted(np.unique(labels).tolist()):
        k = len(np.unique(groups[labels == value]))
        if k < parts:
            notes.append(
                f"{dataset}: label {value!r} occurs in {k} group(s), fewer than the {parts} parts "
                f"(test split + folds); some parts hold none of it"
            )
    return notes


def assign_splits(
    sample_ids: Sequence[str],
    labels: Sequence[str],
    groups: Sequence[str],
    *,
    test_size: float = 0.2,
    folds: int = 5,
    seed: int = 42,
    official_folds: Sequence[int | None] | None = None,
    dataset: str = "dataset",
) -> SplitResult:
    """Split rows into a grouped, stratified test set and k grouped, stratified folds over the rest.

    With ``official_folds`` (BUSBRA's ``5-fold-cv.csv`` kFold per row) the test split is still made here, grouped as
    usual, and each dev row keeps its official fold, renumbered 0..k-1 in the official order; k must equal the
    number of official folds. A group whose dev rows sit in more than one official fold (two patients joined by a
    near-duplicate) is moved whole into the official fold of its smallest sample_id, with a note.
    """
    if not 0.0 < test_size < 1.0:
        raise DataError(f"{dataset}: --test-size must be between 0 and 1 (exclusive), got {test_size}")
    if folds < 2:
        raise DataError(f"{dataset}: --folds must be at least 2, got {folds}")
    n = len(sample_ids)
    if not (len(labels) == len(groups) == n):
        raise ValueError("sample_ids, labels and groups differ in length")
    order = np.argsort(np.asarray(sample_ids, dtype=object).astype(str), kind="stable")
    ids = np.asarray(sample_ids, dtype=object)[order]
    y = np.asarray(labels, dtype=object)[order].astype(str)
    g = np.asarray(groups, dtype=object)[order].astype(str)

    n_groups = len(np.unique(g))
    if n_groups < folds + 1:
        fix = f"use --folds {n_groups - 1}" if n_groups >= 3 else "add more independent images"
        raise DataError(
            f"{dataset}: {n_groups} group(s) of linked images (same patient or near-duplicates) cannot fill a "
            f"test split and {folds} folds, which need at least {folds + 1}; {fix}"
        )
    notes = _rare_label_notes(y, g, folds + 1, dataset)
    parts = held_out_partition(n_groups, test_size)[0]
    counts = _label_counts(y)
    most = max(counts.values())
    if most < parts:
        what = f"the test split (--test-size {test_size:g})"
        raise _unstratifiable(dataset, what, parts, counts, _test_size_fix(n_groups, most))
    is_test = split_test(y, g, test_size, seed)
    dev = ~is_test
    dev_groups = len(np.unique(g[dev]))
    if dev_groups < folds:
        raise DataError(
            f"{dataset}: after the test split only {dev_groups} group(s) remain for {folds} folds; "
            f"use a smaller --test-size or --folds {max(2, dev_groups)}"
        )
    fold_sorted = np.full(n, -1, dtype=int)
    if official_folds is None:
        dev_counts = _label_counts(y[dev])
        most_dev = max(dev_counts.values())
        if most_dev < folds:
            what = f"{folds}-fold cross-validation of the {int(dev.sum())} dev images"
            fix = f"use --folds {most_dev}" if most_dev >= 2 else "use a smaller --test-size"
            raise _unstratifiable(dataset, what, folds, dev_counts, f"{fix} or add more images")
        fold_sorted[dev] = make_folds(y[dev], g[dev], folds, seed)
    else:
        official = np.asarray(list(official_folds), dtype=object)[order]
        fold_sorted[dev], official_notes = _official(ids[dev], g[dev], official[dev], folds, dataset)
        notes += official_notes

    split_sorted = np.where(is_test, "test", "dev")
    split = np.empty(n, dtype=object)
    fold = np.empty(n, dtype=int)
    split[order] = split_sorted
    fold[order] = fold_sorted
    return SplitResult(split=split.astype(str), fold=fold, notes=notes)


def _official(
    ids: np.ndarray, groups: np.ndarray, official: np.ndarray, folds: int, dataset: str
) -> tuple[np.ndarray, list[str]]:
    missing = [str(sid) for sid, value in zip(ids, official, strict=True) if value is None]
    if missing:
        raise DataError(
            f"{dataset}: --official-folds needs an official fold for every image, but {missing[0]} "
            f"(and {len(missing) - 1} more) has none; drop --official-folds"
        )
    values = sorted({int(v) for v in official})
    if len(values) != folds:
        raise DataError(
            f"{dataset}: the official fold file defines {len(values)} folds among the dev rows "
            f"({', '.join(map(str, values))}) but --folds is {folds}; set --folds {len(values)}"
        )
    renumber = {v: k for k, v in enumerate(values)}
    fold = np.array([renumber[int(v)] for v in official], dtype=int)
    notes = []
    for gid in sorted(set(groups.tolist())):
        rows = np.nonzero(groups == gid)[0]  # ids are sorted, so rows[0] holds the group's smallest sample_id
        if len(set(fold[rows].tolist())) > 1:
            spanned = sorted({int(v) for v in official[rows]})
            notes.append(
                f"{dataset}: group {gid} spans official folds {spanned}; all its dev images follow "
                f"{ids[rows[0]]} into official fold {int(official[rows[0]])}"
            )
            fold[rows] = fold[rows[0]]
    return fold, notes


# ------------------------------------------------------------------------------------------ reference splits

REFERENCE_VERSIONS: tuple[str, ...] = ("v1",)
REFERENCE_PACKAGE_DIR = "splits"  # below busbench/data/
REFERENCE_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "patient_id",
    "group_id",
    "label",
    "image_path",
    "height",
    "width",
    "split",
    "fold",
    "image_sha256",
    "mask_sha256",
)
# Settings prepare drew v1 with on the full public releases (commit 8be76c7, Python 3.11, scikit-learn 1.9.1,
# numpy 2.4.6, OpenCV 5.0.0, pandas 3.1.1; BUS-UCLM HESN rule "resize").
REFERENCE_SETTINGS: dict[str, dict[str, Any]] = {
    "v1": {"seed": 42, "test_size": 0.2, "folds": 5, "busbench_commit": "8be76c7"},
}
# Image and label counts of public releases that busbench has no reference split for (BUS-UC from its
# Mendeley release, Yap2018 from DatasetB.xlsx).
DOCUMENTED_COUNTS: dict[str, dict[str, int]] = {
    "bus_uc": {"benign": 358, "malignant": 453},
    "yap2018": {"benign": 109, "malignant": 54},
}
RELEASE_NAMES: dict[str, str] = {
    "busi": "BUSI",
    "curated_busi": "Curated BUSI",
    "busbra": "BUS-BRA",
    "bus_uc": "BUS-UC",
    "bus_uclm": "BUS-UCLM",
    "yap2018": "Yap2018",
}
SHOWN_IDS = 5  # ids named in one-line messages


def _first(ids: Sequence[str], n: int = SHOWN_IDS) -> str:
    shown = ", ".join(ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _label_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()) if v)


@dataclass(frozen=True)
class ReferenceSplit:
    """One shipped reference split: the rows of a full public release with their split, fold and group."""

    key: str
    version: str
    file: str  # package-relative name, e.g. "splits/busi_v1.csv"
    rows: pd.DataFrame = field(repr=False)  # indexed by sample_id, every column a string except the ints

    @property
    def settings(self) -> dict[str, Any]:
        return dict(REFERENCE_SETTINGS[self.version])


def reference_keys(version: str = "v1") -> list[str]:
    """Dataset keys busbench ships a ``version`` reference split for."""
    folder = resources.files("busbench.data") / REFERENCE_PACKAGE_DIR
    suffix = f"_{version}.csv"
    return sorted(p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix))


def reference_split(key: str, version: str = "v1") -> ReferenceSplit | None:
    """The shipped ``version`` split of ``key``'s full public release, or None when busbench has none."""
    if version not in REFERENCE_VERSIONS:
        raise DataError(
            f"unknown reference split {version!r}; busbench ships {', '.join(REFERENCE_VERSIONS)}"
        )
    name = f"{REFERENCE_PACKAGE_DIR}/{key}_{version}.csv"
    resource = resources.files("busbench.data") / name
    if not resource.is_file():
        return None
    with resource.open("rb") as handle:
        df = pd.read_csv(handle, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    missing = [c for c in REFERENCE_COLUMNS if c not in df.columns]
    if missing or df["sample_id"].duplicated().any():
        raise DataError(f"packaged reference split busbench/data/{name} is damaged; reinstall busbench")
    for column in ("height", "width", "fold"):
        df[column] = df[column].astype(int)
    return ReferenceSplit(key=key, version=version, file=name, rows=df.set_index("sample_id", drop=False))


@dataclass
class ReferenceCheck:
    """A dataset on disk compared with a reference split, row by row through ``sample_id``."""

    reference: ReferenceSplit
    present: list[str]  # ids on disk that the reference holds
    missing: list[str]  # reference ids neither on disk nor left out by an adapter option
    excluded: list[str]  # reference ids an adapter option left out (e.g. --exclude-doppler)
    extra: list[str]  # ids on disk that the reference does not hold
    changed: list[str]  # present ids whose image bytes differ from image_sha256
    same_bytes: int  # present ids with the released bytes
    same_size: int  # present ids with the released pixel size
    mismatched: list[str]  # "<id>: label benign, reference malignant" and the like

    @property
    def is_release(self) -> bool:
        """At least one image on disk is a file of the release (its bytes, or its pixel size under its id)."""
        return self.same_bytes > 0 or self.same_size > 0

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def missing_by_label(self) -> dict[str, int]:
        labels = self.reference.rows.loc[self.missing, "label"] if self.missing else pd.Series(dtype=str)
        return {str(k): int(v) for k, v in sorted(labels.value_counts().items())}

    def missing_line(self) -> str:
        total = len(self.reference.rows)
        name = RELEASE_NAMES.get(self.reference.key, self.reference.key)
        return (
            f"{self.reference.key}: {len(self.missing)} of the {total} images of the {name} public release are "
            f"missing ({_label_text(self.missing_by_label())}; first: {_first(self.missing)})"
        )

    def as_dict(self, status: str) -> dict[str, Any]:
        return {
            "file": self.reference.file,
            "version": self.reference.version,
            "status": status,
            "images": len(self.reference.rows),
            "present": len(self.present),
            "same_bytes": self.same_bytes,
            "missing": len(self.missing),
            "missing_by_label": self.missing_by_label(),
            "missing_ids": list(self.missing),
            "excluded_by_options": list(self.excluded),
            "extra": list(self.extra),
            "changed": list(self.changed),
        }


def compare_with_reference(
    reference: ReferenceSplit,
    sample_ids: Sequence[str],
    labels: Sequence[str],
    patients: Sequence[str],
    image_sha256: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    excluded: Sequence[str] = (),
) -> ReferenceCheck:
    """Compare the samples on disk with ``reference`` (all sequences aligned with ``sample_ids``)."""
    rows = reference.rows
    known = set(rows.index)
    on_disk = set(sample_ids)
    left_out = set(excluded)
    present, extra, changed, mismatched = [], [], [], []
    same_bytes = same_size = 0
    for sid, label, patient, digest, (h, w) in zip(
        sample_ids, labels, patients, image_sha256, sizes, strict=True
    ):
        if sid not in known:
            extra.append(sid)
            continue
        present.append(sid)
        ref = rows.loc[sid]
        if digest == ref["image_sha256"]:
            same_bytes += 1
        else:
            changed.append(sid)
        same_size += (int(ref["height"]), int(ref["width"])) == (h, w)
        if label != ref["label"]:
            mismatched.append(f"{sid}: label {label}, reference {ref['label']}")
        elif patient != ref["patient_id"]:
            mismatched.append(f"{sid}: patient {patient}, reference {ref['patient_id']}")
    missing = sorted(known - on_disk - left_out)
    return ReferenceCheck(
        reference=reference,
        present=present,
        missing=missing,
        excluded=sorted(known & left_out - on_disk),
        extra=sorted(extra),
        changed=sorted(changed),
        same_bytes=same_bytes,
        same_size=same_size,
        mismatched=mismatched,
    )


def documented_count_line(key: str, labels: Sequence[str]) -> str | None:
    """One line naming what differs from the documented counts of ``key``'s public release, or None."""
    documented = DOCUMENTED_COUNTS.get(key)
    if documented is None:
        return None
    counts = {k: 0 for k in documented}
    for label in labels:
        counts[str(label)] = counts.get(str(label), 0) + 1
    if counts == documented:
        return None
    total = sum(documented.values())
    short = {k: documented.get(k, 0) - v for k, v in counts.items() if documented.get(k, 0) > v}
    over = {k: v - documented.get(k, 0) for k, v in counts.items() if v > documented.get(k, 0)}
    parts = []
    if short:
        parts.append(f"{sum(short.values())} missing ({_label_text(short)})")
    if over:
        parts.append(f"{sum(over.values())} more than released ({_label_text(over)})")
    return (
        f"{key}: {len(labels)} images ({_label_text(counts)}) but the public release has {total} "
        f"({_label_text(documented)}): {'; '.join(parts)}"
    )
