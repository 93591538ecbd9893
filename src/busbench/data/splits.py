"""Held-out test split and cross-validation folds that keep groups whole and label proportions even.

A group (``group_id``: same patient or near-duplicate images) never straddles the test/dev boundary or two folds,
so no scan, nor any copy of it, is seen in training and in evaluation. Within that constraint the test split and
every fold should mirror the dataset's label mix; sklearn's ``StratifiedGroupKFold`` does the balancing.

Determinism: rows are put in ``sample_id`` order before anything random happens and every random choice comes
from ``seed``, so the same samples and seed give the same split on every machine and filesystem.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
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


def _sgkf(n_splits: int, seed: int, labels: np.ndarray, groups: np.ndarray) -> list[np.ndarray]:
    """Validation index arrays of StratifiedGroupKFold, without its per-class member-count warning."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # It warns when a class has fewer *members* than n_splits; group shortfalls are reported as notes.
        warnings.simplefilter("ignore", UserWarning)
        return [val for _, val in splitter.split(np.zeros(len(labels)), labels, groups)]


def split_test(
    labels: np.ndarray, groups: np.ndarray, test_size: float, seed: int, candidates: int = TEST_CANDIDATES
) -> np.ndarray:
    """Boolean test mask (rows already in canonical order): whole groups, label mix close to the whole.

    Tries up to ``candidates`` shuffled StratifiedGroupKFold partitions (seeds drawn from ``seed``) and, in each,
    every run of j consecutive parts; keeps the one whose test fraction and label shares are closest to the
    targets. Large datasets usually hit :data:`GOOD_ENOUGH` with the first partition and stop there.
    """
    n_groups = len(np.unique(groups))
    m, j = _partition(test_size)
    if n_groups < m:
        m, j = n_groups, max(1, min(round(test_size * n_groups), n_groups - 1))
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
