"""Grouped, stratified test split and folds: groups stay whole, label shares stay close, results are reproducible."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import sklearn
from sklearn.model_selection import StratifiedGroupKFold

from busbench.data import splits as splits_module
from busbench.data.splits import (
    _partition,
    assign_splits,
    label_deviation,
    make_folds,
    shuffled_group_codes,
)
from busbench.errors import DataError


def _dataset(n_groups: int, seed: int, shares=(0.2, 0.5, 0.3), max_size: int = 4):
    """Groups of 1..max_size images; one label per group (like patients), shares roughly as given."""
    rng = np.random.default_rng(seed)
    ids, labels, groups = [], [], []
    for g in range(n_groups):
        label = rng.choice(["normal", "benign", "malignant"], p=shares)
        for k in range(int(rng.integers(1, max_size + 1))):
            ids.append(f"s{g:04d}_{k}")
            labels.append(str(label))
            groups.append(f"g{g:04d}")
    return ids, labels, groups


def _check(ids, labels, groups, result, folds, test_size, tolerance=0.05):
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    split, fold = result.split, result.fold
    assert set(split) == {"dev", "test"}
    assert (fold[split == "test"] == -1).all()
    assert sorted(set(fold[split == "dev"])) == list(range(folds))
    part = np.where(split == "test", -1, fold)
    for g in np.unique(groups):
        assert len(set(part[groups == g])) == 1, f"group {g} crosses parts"
    test = split == "test"
    assert abs(test.mean() - test_size) <= 0.03
    deviations = [label_deviation(labels, test)] + [label_deviation(labels, fold == k) for k in range(folds)]
    assert max(deviations) <= tolerance, deviations
    return max(deviations)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_whole_and_label_shares_within_5_points(seed):
    ids, labels, groups = _dataset(400, seed)
    result = assign_splits(ids, labels, groups, test_size=0.2, folds=5, seed=seed)
    worst = _check(ids, labels, groups, result, 5, 0.2)
    print(f"synthetic groups seed {seed}: max label-share deviation {100 * worst:.2f} points")


def test_imbalanced_labels_and_large_groups():
    ids, labels, groups = _dataset(300, 5, shares=(0.05, 0.8, 0.15), max_size=8)
    result = assign_splits(ids, labels, groups, test_size=0.25, folds=4, seed=1)
    _check(ids, labels, groups, result, 4, 0.25)


def test_same_seed_same_split_whatever_the_input_order():
    ids, labels, groups = _dataset(120, 3)
    first = assign_splits(ids, labels, groups, seed=7)
    order = list(range(len(ids)))
    random.Random(1).shuffle(order)
    shuffled = assign_splits(
        [ids[i] for i in order], [labels[i] for i in order], [groups[i] for i in order], seed=7
    )
    by_id = {ids[i]: (first.split[i], first.fold[i]) for i in range(len(ids))}
    assert all(by_id[ids[i]] == (shuffled.split[k], shuffled.fold[k]) for k, i in enumerate(order))
    other = assign_splits(ids, labels, groups, seed=8)
    assert not np.array_equal(other.split, first.split) or not np.array_equal(other.fold, first.fold)


@pytest.mark.parametrize(
    ("test_size", "expected"), [(0.2, (5, 1)), (0.25, (4, 1)), (0.3, (10, 3)), (0.1, (10, 1)), (0.5, (2, 1))]
)
def test_partition_approximates_any_test_fraction(test_size, expected):
    assert _partition(test_size) == expected


def test_test_fraction_that_is_not_one_over_k():
    ids, labels, groups = _dataset(300, 9, max_size=2)
    result = assign_splits(ids, labels, groups, test_size=0.3, folds=3, seed=0)
    _check(ids, labels, groups, result, 3, 0.3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_size": 0.0}, "--test-size must be between 0 and 1"),
        ({"test_size": 1.0}, "--test-size must be between 0 and 1"),
        ({"folds": 1}, "--folds must be at least 2"),
    ],
)
def test_bad_arguments(kwargs, message):
    ids, labels, groups = _dataset(20, 0)
    with pytest.raises(DataError, match=message):
        assign_splits(ids, labels, groups, **kwargs)


def test_too_few_groups_names_the_dataset_and_the_fix():
    ids = [f"s{i}" for i in range(12)]
    groups = [f"p{i % 4}" for i in range(12)]
    labels = ["benign"] * 12
    with pytest.raises(DataError, match=r"toy: 4 group\(s\).*need at least 6; use --folds 3"):
        assign_splits(ids, labels, groups, folds=5, dataset="toy")
    result = assign_splits(ids, labels, groups, folds=3, dataset="toy")
    assert (result.split == "test").sum() == 3  # one whole group of three images


def test_labels_smaller_than_the_partition_are_one_clear_error():
    # 9 images, 3 per label: a 0.2 test split needs 5 stratified parts, 5 folds need 5 images of some label
    ids = [f"s{i}" for i in range(9)]
    labels = ["normal", "benign", "malignant"] * 3
    with pytest.raises(
        DataError,
        match=r"tiny: the test split \(--test-size 0.2\) needs 5 stratified parts, but every label has fewer images "
        r"\(3 benign, 3 malignant, 3 normal\); use --test-size 0.34",
    ):
        assign_splits(ids, labels, ids, dataset="tiny")
    with pytest.raises(
        DataError, match=r"tiny: 5-fold cross-validation of the 6 dev images .*\(2 benign, 2 malignant, 2 normal\); "
        r"use --folds 2",
    ):
        assign_splits(ids, labels, ids, test_size=0.34, dataset="tiny")
    result = assign_splits(ids, labels, ids, test_size=0.34, folds=2, dataset="tiny")  # the advice works
    assert sorted(set(result.fold.tolist())) == [-1, 0, 1] and (result.split == "test").sum() == 3
    with pytest.raises(DataError, match=r"1 benign, 1 malignant, 1 normal\); add more images"):
        assign_splits(ids[:3], labels[:3], ids[:3], folds=2, dataset="tiny")


def test_rare_label_is_noted_not_fatal():
    ids, labels, groups = _dataset(60, 4, shares=(0.0, 0.6, 0.4))
    ids += ["rare_a", "rare_b"]
    labels += ["normal", "normal"]
    groups += ["rare", "rare"]
    result = assign_splits(ids, labels, groups, folds=3, dataset="toy")
    assert any("label 'normal' occurs in 1 group(s)" in n for n in result.notes)


def test_official_folds_are_kept_and_renumbered():
    ids, labels, groups = _dataset(100, 6)
    gindex = {g: i for i, g in enumerate(sorted(set(groups)))}
    official = [gindex[g] % 5 + 1 for g in groups]  # patient-grouped official folds 1..5
    result = assign_splits(ids, labels, groups, folds=5, seed=3, official_folds=official)
    dev = result.split == "dev"
    assert (result.fold[dev] == np.asarray(official)[dev] - 1).all()
    assert (result.fold[~dev] == -1).all()
    plain = assign_splits(ids, labels, groups, folds=5, seed=3)
    assert np.array_equal(plain.split, result.split)  # the test split does not depend on the option


def test_official_folds_errors_and_group_spanning_folds():
    ids, labels, groups = _dataset(60, 2)
    gindex = {g: i for i, g in enumerate(sorted(set(groups)))}
    official = [gindex[g] % 5 + 1 for g in groups]
    with pytest.raises(DataError, match="defines 5 folds.*--folds is 3; set --folds 5"):
        assign_splits(ids, labels, groups, folds=3, official_folds=official, dataset="busbra")
    missing = list(official)
    missing[0] = None
    with pytest.raises(DataError, match=f"{ids[0]} .*has none"):
        assign_splits(ids, labels, groups, folds=5, official_folds=missing, dataset="busbra")
    # two patients joined by a near-duplicate link, filed in different official folds
    joined = ["joined" if g in ("g0000", "g0001") else g for g in groups]
    rows = [i for i, g in enumerate(joined) if g == "joined"]
    assert len({official[i] for i in rows}) == 2
    for seed in range(20):  # find a seed whose test split leaves the joined group in dev
        result = assign_splits(ids, labels, joined, folds=5, seed=seed, official_folds=official)
        if result.split[rows[0]] == "dev":
            break
    assert {(result.split[i], result.fold[i]) for i in rows} == {("dev", official[0] - 1)}
    assert any("group joined spans official folds [1, 2]" in n for n in result.notes)


# ----------------------------------------------------------------------------- scikit-learn version independence


def _busi_like(seed: int):
    """BUSI-like labels and groups: mostly single images, some near-duplicate groups of 2-4."""
    return _dataset(300, seed, shares=(0.17, 0.56, 0.27), max_size=3)


class _Recording(StratifiedGroupKFold):
    """The real splitter, recording how busbench calls it and handing it an unrelated random state."""

    calls: list[dict] = []

    def __init__(self, n_splits=5, *, shuffle=False, random_state=None):
        type(self).calls.append({"shuffle": shuffle, "random_state": random_state})
        super().__init__(n_splits=n_splits, shuffle=shuffle, random_state=None if not shuffle else 12345)


def test_sklearn_randomness_never_decides_a_split(monkeypatch):
    """Every scikit-learn release runs the same deterministic assignment when shuffle=False (the shuffling
    changed in 1.8); busbench draws the group order itself, so sklearn's random state must not matter."""
    ids, labels, groups = _busi_like(0)
    before = assign_splits(ids, labels, groups, test_size=0.2, folds=5, seed=42)
    _Recording.calls = []
    monkeypatch.setattr(splits_module, "StratifiedGroupKFold", _Recording)
    after = assign_splits(ids, labels, groups, test_size=0.2, folds=5, seed=42)
    assert _Recording.calls and all(c["shuffle"] is False for c in _Recording.calls)
    assert np.array_equal(before.split, after.split) and np.array_equal(before.fold, after.fold)


def test_group_order_is_numpys_fixed_legacy_permutation():
    groups = np.array(["g3", "g1", "g2", "g1", "g0", "g3"])
    codes = shuffled_group_codes(groups, seed=7)
    perm = np.random.RandomState(7).permutation(4)  # RandomState streams are frozen across numpy releases
    names = np.unique(groups)
    # the group sklearn visits k-th (code k) is perm[k]
    for code, name in zip(codes, groups, strict=True):
        assert names[perm[code]] == name


@pytest.mark.skipif(
    tuple(int(x) for x in sklearn.__version__.split(".")[:2]) < (1, 8),
    reason="scikit-learn < 1.8 shuffles groups differently; the comparison is with the fixed shuffle",
)
@pytest.mark.parametrize("seed", [0, 42, 2024])
def test_folds_equal_sklearn_18_shuffled_folds(seed):
    """The v1 reference splits were drawn with scikit-learn 1.9.1 and shuffle=True: drawing with busbench's own
    group order reproduces that assignment exactly, under any scikit-learn."""
    ids, labels, groups = _busi_like(seed)
    y, g = np.asarray(labels), np.asarray(groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sk = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
        expected = [val for _, val in sk.split(np.zeros(len(y)), y, g)]
    fold = make_folds(y, g, 5, seed)
    for k, val in enumerate(expected):
        assert sorted(np.nonzero(fold == k)[0].tolist()) == sorted(val.tolist())
