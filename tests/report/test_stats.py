"""Group-aware statistics on constructed per-image tables with known answers, a coverage simulation of the
cluster bootstrap on clustered data, and ``busbench compare`` on run folders (ablations, settings, unions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from busbench.cli import main
from busbench.errors import DataError
from busbench.report.stats import (
    bootstrap_ci,
    collect_per_image,
    compare,
    friedman,
    holm,
    mean_ranks,
    pairwise_tests,
    permutation_p,
)


def long_table(values: dict[tuple[str, str], np.ndarray], group_size: int = 1) -> pd.DataFrame:
    rows = []
    for (dataset, model), dice in values.items():
        for i, d in enumerate(dice):
            rows.append(
                {
                    "dataset": dataset,
                    "model": model,
                    "sample_id": f"s{i:03d}",
                    "group_id": f"g{i // group_size:03d}",
                    "label": "normal" if i % 5 == 0 else "benign",
                    "dice": d,
                    "hd95": 10 * (1 - d),
                }
            )
    return pd.DataFrame(rows)


def test_identical_models_give_p_one():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.5, 0.9, 40)
    res = pairwise_tests(long_table({("busi", "a"): d, ("busi", "b"): d.copy()}), n_boot=200)
    assert set(res["metric"]) == {"dice", "dice_lesion", "hd95"}
    assert (res["p_value"] == 1.0).all() and (res["p_holm"] == 1.0).all() and not res["significant"].any()
    assert (res["diff_ci_low"] == 0).all() and (res["diff_ci_high"] == 0).all()


def test_permutation_test_flips_whole_groups():
    # 4 groups with summed differences 1, 2, 3, 4: of the 16 sign patterns, |sum| >= 10 only for all + or all -
    diffs = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    groups = np.array(["a", "b", "b", "c", "c", "c", "d", "d", "d", "d"])
    assert permutation_p(diffs, groups) == pytest.approx(2 / 16)
    # as independent images the same differences look far more convincing
    assert permutation_p(diffs) == pytest.approx(2 / 1024)


def test_clear_shift_is_significant_with_a_ci_of_the_difference():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 0.9, 60)
    b = a - 0.05 - rng.uniform(0, 0.01, 60)
    res = pairwise_tests(long_table({("busi", "a"): a, ("busi", "b"): b}, group_size=3), n_boot=500)
    dice = res.set_index("metric").loc["dice"]
    assert dice["n_groups"] == 20 and dice["n_images"] == 60
    assert dice["mean_diff"] == pytest.approx(float(np.mean(a - b)))
    assert dice["diff_ci_low"] < dice["mean_diff"] < dice["diff_ci_high"]
    assert dice["diff_ci_low"] > 0.05 and dice["diff_ci_high"] < 0.06
    assert dice["p_value"] < 1e-4 and bool(dice["significant"])
    lesion = res.set_index("metric").loc["dice_lesion"]
    assert lesion["n_images"] == 48  # every fifth image is normal


def test_holm_against_hand_computation():
    # p sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06 -> monotone 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    p = [0.03, 0.01, 0.04, 0.02]
    np.testing.assert_allclose(holm(p), [0.06, 0.04, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    assert holm([]).size == 0


def test_holm_runs_over_pairs_and_metrics_of_each_dataset():
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
    res = pairwise_tests(table, n_boot=200)
    assert len(res) == 3 * 3 + 1 * 3
    for dataset in ("busi", "busbra"):
        part = res[res.dataset == dataset]
        np.testing.assert_allclose(part["p_holm"], holm(part["p_value"].to_numpy()))


def test_mismatched_images_are_refused():
    table = long_table({("busi", "a"): np.ones(5), ("busi", "b"): np.ones(5)})
    table = table[~((table.model == "b") & (table.sample_id == "s004"))]
    with pytest.raises(DataError, match="different test images"):
        pairwise_tests(table)


def test_cluster_bootstrap_covers_the_truth_on_clustered_data():
    """8 patients x 17 images, patient effects larger than image noise: the group interval covers the true mean
    in >= 90% of repetitions, the image-level one (the old behaviour) far less often."""
    rng = np.random.default_rng(7)
    truth, reps, patients, images = 0.7, 300, 8, 17
    groups = np.repeat(np.arange(patients), images)
    covered = {"group": 0, "image": 0}
    for r in range(reps):
        values = (
            truth + np.repeat(rng.normal(0, 0.1, patients), images) + rng.normal(0, 0.1, patients * images)
        )
        low, high = bootstrap_ci(values, groups, n_boot=500, seed=r)
        covered["group"] += low <= truth <= high
        low, high = bootstrap_ci(values, None, n_boot=500, seed=r)
        covered["image"] += low <= truth <= high
    assert covered["group"] / reps >= 0.90
    assert covered["image"] / reps < 0.70


def test_bootstrap_ci_is_deterministic_and_matches_the_normal_interval_for_many_groups():
    rng = np.random.default_rng(3)
    v = rng.normal(0.7, 0.1, 400)
    low, high = bootstrap_ci(v, seed=5)
    assert low < v.mean() < high
    assert (low, high) == bootstrap_ci(v, seed=5)
    se = v.std(ddof=1) / np.sqrt(v.size)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_mean_rank_and_friedman_across_datasets():
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
    ranks = mean_ranks(table, metric="dice").set_index("model")["mean_rank"]
    # d1: a=1, b=c=2.5; d2: b=1, c=2, a=3
    assert ranks.to_dict() == {"a": 2.0, "b": 1.75, "c": 2.25}
    # five datasets where a > b > c every time: Friedman chi2 = 12 N / (k (k+1)) * sum(R^2) - 3 N (k+1) = 10
    five = long_table(
        {(f"d{i}", m): np.full(3, v) for i in range(5) for m, v in (("a", 0.9), ("b", 0.8), ("c", 0.7))}
    )
    result = friedman(five, metric="dice")
    assert result["statistic"] == pytest.approx(10.0)
    assert result["p_value"] == pytest.approx(np.exp(-5.0))  # chi2 with 2 dof: exp(-x/2)
    # Nemenyi CD for k=3 at alpha 0.05: q = 2.343, CD = q sqrt(k(k+1)/(6N))
    assert result["critical_difference"] == pytest.approx(2.343 * np.sqrt(12 / 30), rel=1e-3)
    assert friedman(table.query("dataset == 'd1'"), metric="dice")["note"].startswith("needs at least 3")


def write_run(
    root: Path, experiment: str, datasets: list[str], model: str, dice: np.ndarray, **settings
) -> Path:
    """A tested run folder: config.yaml, summary.csv (settings only) and test/ensemble_per_image.csv."""
    run = root / experiment / "+".join(datasets) / model
    (run / "test").mkdir(parents=True)
    cfg = {"experiment": {"name": experiment}, "data": {"dataset": datasets}, "model": {"name": model}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    row = {"image_size": 224, "resolution": "original", "hd95_mode": "pooled", "tta": False, "threshold": 0.5}
    pd.DataFrame([{**row, **settings}]).to_csv(run / "summary.csv", index=False)
    n = len(dice)
    pd.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "dataset_key": [datasets[i % len(datasets)] for i in range(n)],
            "patient_id": [f"p{i // 2}" for i in range(n)],
            "group_id": [f"g{i // 2}" for i in range(n)],
            "label": ["benign" if i % 2 else "malignant" for i in range(n)],
            "dice": dice,
            "hd95": 5 * (1 - dice),
        }
    ).to_csv(run / "test" / "ensemble_per_image.csv", index=False)
    return run


def test_compare_accepts_one_model_under_two_experiments(tmp_path: Path, capsys):
    rng = np.random.default_rng(4)
    d = rng.uniform(0.5, 0.9, 24)
    write_run(tmp_path / "results", "lr3e-4", ["busi"], "unet", d)
    write_run(tmp_path / "results", "lr1e-4", ["busi"], "unet", d - 0.1)
    table = collect_per_image([tmp_path / "results"])
    assert set(table.model) == {"lr3e-4/unet", "lr1e-4/unet"} and set(table.dataset) == {"busi"}
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "results"), "--out", str(out), "--n-boot", "300"]) == 0
    for name in ("pairwise", "confidence_intervals", "mean_rank", "friedman", "settings"):
        assert (out / f"{name}.csv").stat().st_size > 0 and (out / f"{name}.md").read_text().startswith("| ")
    pairwise = pd.read_csv(out / "pairwise.csv").set_index("metric")
    assert pairwise.loc["dice", "n_groups"] == 12
    assert pairwise.loc["dice", "p_holm"] < 0.01
    assert main(["compare", str(tmp_path / "nothing-here")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_compare_splits_a_union_run_by_dataset(tmp_path: Path):
    d = np.linspace(0.5, 0.9, 20)
    write_run(tmp_path, "exp", ["busi", "busbra"], "unet", d)
    write_run(tmp_path, "exp", ["busi", "busbra"], "unext", d - 0.05)
    compare([tmp_path], tmp_path / "cmp", n_boot=200)
    cis = pd.read_csv(tmp_path / "cmp" / "confidence_intervals.csv")
    assert sorted(set(cis["dataset"])) == ["busbra", "busi"] and (cis["n_images"] == 10).all()


def test_compare_refuses_mixed_settings(tmp_path: Path):
    d = np.linspace(0.5, 0.9, 20)
    write_run(tmp_path, "a", ["busi"], "unet", d, image_size=224)
    write_run(tmp_path, "b", ["busi"], "unet", d, image_size=256, tta=True)
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 1
    assert not (tmp_path / "cmp").exists()
    assert (
        main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp"), "--allow-mixed", "--n-boot", "200"])
        == 0
    )
    settings = pd.read_csv(tmp_path / "cmp" / "settings.csv")
    assert sorted(settings["image_size"]) == [224, 256]


def test_compare_draws_the_critical_difference_diagram(tmp_path: Path):
    rng = np.random.default_rng(6)
    base = rng.uniform(0.5, 0.8, 16)
    for shift, model in ((0.0, "a"), (0.05, "b"), (0.1, "c")):
        write_run(tmp_path, "exp", ["busi", "busbra"], model, base + shift)
    written = {p.name for p in compare([tmp_path], tmp_path / "cmp", n_boot=200)}
    assert {"cd_diagram.png", "nemenyi.csv", "friedman.csv"} <= written
    assert (tmp_path / "cmp" / "cd_diagram.png").read_bytes().startswith(b"\x89PNG")
    friedman_row = pd.read_csv(tmp_path / "cmp" / "friedman.csv").iloc[0]
    assert friedman_row["n_datasets"] == 2 and friedman_row["n_models"] == 3
    ranks = pd.read_csv(tmp_path / "cmp" / "mean_rank.csv")
    assert ranks["model"].tolist() == ["exp/c", "exp/b", "exp/a"]
