"""Paired statistics on constructed per-image tables with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from busbench.cli import main
from busbench.errors import DataError
from busbench.report.stats import (
    bootstrap_ci,
    collect_per_image,
    holm,
    mean_ranks,
    pairwise_tests,
    wilcoxon_paired,
)


def long_table(values: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    rows = []
    for (dataset, model), dice in values.items():
        for i, d in enumerate(dice):
            rows.append(
                {
                    "dataset": dataset,
                    "model": model,
                    "sample_id": f"s{i:03d}",
                    "dice": d,
                    "hd95": 10 * (1 - d),
                }
            )
    return pd.DataFrame(rows)


def test_identical_models_give_p_one():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.5, 0.9, 40)
    assert wilcoxon_paired(d, d.copy()) == (0.0, 1.0)
    res = pairwise_tests(long_table({("busi", "a"): d, ("busi", "b"): d.copy()}))
    assert res.loc[0, "p_value"] == 1.0 and res.loc[0, "p_holm"] == 1.0 and not res.loc[0, "significant"]


def test_clear_shift_gives_small_p_and_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 0.9, 40)
    b = a - 0.05 - rng.uniform(0, 0.01, 40)
    res = pairwise_tests(long_table({("busi", "a"): a, ("busi", "b"): b}))
    assert res.loc[0, "p_value"] < 1e-6
    assert res.loc[0, "p_value"] == pytest.approx(sps.wilcoxon(a, b).pvalue)
    assert res.loc[0, "mean_diff"] == pytest.approx(float(np.mean(a - b)))
    assert bool(res.loc[0, "significant"])


def test_holm_against_hand_computation():
    # p sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06 -> monotone 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    p = [0.03, 0.01, 0.04, 0.02]
    np.testing.assert_allclose(holm(p), [0.06, 0.04, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # 2 x 0.5 caps at 1, monotone
    assert holm([]).size == 0


def test_holm_is_applied_within_each_dataset():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.4, 0.9, 30)
    table = long_table(
        {
            ("busi", "a"): base,
            ("busi", "b"): base - 0.1,
            ("busi", "c"): base + rng.normal(0, 0.01, 30),
            ("busbra", "a"): base,
            ("busbra", "b"): base + 0.02,
        }
    )
    res = pairwise_tests(table)
    assert len(res) == 3 + 1
    busi = res[res.dataset == "busi"]
    np.testing.assert_allclose(busi["p_holm"], holm(busi["p_value"].to_numpy()))
    busbra = res[res.dataset == "busbra"].iloc[0]
    assert busbra["p_holm"] == busbra["p_value"]  # a single comparison is not corrected


def test_mismatched_images_are_refused():
    table = long_table({("busi", "a"): np.ones(5), ("busi", "b"): np.ones(5)})
    table = table[~((table.model == "b") & (table.sample_id == "s004"))]
    with pytest.raises(DataError, match="different test images"):
        pairwise_tests(table)


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean():
    rng = np.random.default_rng(3)
    v = rng.normal(0.7, 0.1, 200)
    low, high = bootstrap_ci(v, seed=5)
    assert low < v.mean() < high
    assert (low, high) == bootstrap_ci(v, seed=5)
    se = v.std(ddof=1) / np.sqrt(v.size)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_mean_rank_across_datasets():
    table = long_table(
        {
            ("d1", "a"): np.full(3, 0.9),
            ("d1", "b"): np.full(3, 0.8),
            ("d1", "c"): np.full(3, 0.8),
            ("d2", "a"): np.full(3, 0.5),
            ("d2", "b"): np.full(3, 0.7),
            ("d2", "c"): np.full(3, 0.6),
        }
    )
    ranks = mean_ranks(table).set_index("model")["mean_rank"]
    # d1: a=1, b=c=2.5; d2: b=1, c=2, a=3
    assert ranks.to_dict() == {"a": 2.0, "b": 1.75, "c": 2.25}


def write_run(root: Path, dataset: str, model: str, dice: np.ndarray) -> None:
    run = root / "exp" / dataset / model / "test"
    run.mkdir(parents=True)
    labels = ["benign" if i % 2 else "malignant" for i in range(len(dice))]
    pd.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(len(dice))],
            "label": labels,
            "dice": dice,
            "hd95": 5 * (1 - dice),
        }
    ).to_csv(run / "ensemble_per_image.csv", index=False)


def test_compare_command_writes_tables(tmp_path: Path, capsys):
    rng = np.random.default_rng(4)
    d = rng.uniform(0.5, 0.9, 25)
    write_run(tmp_path / "results", "busi", "unet", d)
    write_run(tmp_path / "results", "busi", "unext", d - 0.1)
    table = collect_per_image([tmp_path / "results"])
    assert set(table.model) == {"unet", "unext"} and set(table.dataset) == {"busi"}
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "results"), "--out", str(out), "--n-boot", "500"]) == 0
    for name in ("pairwise_wilcoxon", "bootstrap_ci", "mean_rank"):
        assert (out / f"{name}.csv").stat().st_size > 0 and (out / f"{name}.md").read_text().startswith("| ")
    pairwise = pd.read_csv(out / "pairwise_wilcoxon.csv")
    assert pairwise.loc[0, "p_holm"] < 1e-4
    assert main(["compare", str(tmp_path / "nothing-here")]) == 1
    assert "does not exist" in capsys.readouterr().err
