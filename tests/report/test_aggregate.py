"""Leaderboard aggregation over run summaries: mean ± std over fold models, the ensemble's scores, and the refusals
(incomplete runs, runs on different manifests of one dataset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from busbench import cli
from busbench.config import Config, save_config
from busbench.engine.evaluate import SCORE_COLUMNS, SUMMARY_COLUMNS
from busbench.errors import DataError
from busbench.report import aggregate as aggregate_mod
from busbench.report.aggregate import aggregate


def write_run(
    root: Path,
    model: str,
    dataset: str = "busi",
    folds: int = 3,
    present: list[int] | None = None,
    manifest: str = "m" * 64,
    seed: int = 0,
    experiment: str = "exp",
    summary_dir: str = "",
    **settings: object,
) -> pd.DataFrame:
    """A run folder as busbench train/test leave it: config.yaml plus a summary.csv with random scores."""
    rng = np.random.default_rng(seed)
    cfg = Config()
    cfg.experiment.name, cfg.data.dataset, cfg.model.name, cfg.data.folds = experiment, dataset, model, folds
    run = root / experiment / dataset / model
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    present = list(range(folds)) if present is None else present
    common = {
        "experiment": experiment,
        "train_data": dataset,
        "dataset": dataset,
        "model": model,
        "n_test": 40,
        "params_m": 1.5,
        "gmacs": 0.4,
        "manifest_sha256": manifest,
        "image_size": 224,
        "resolution": "original",
        "hd95_mode": "pooled",
        "tta": False,
        "threshold": 0.5,
        **settings,
    }
    rows = []
    for k in present:
        scores = {c: float(rng.uniform(0, 1)) for c in SCORE_COLUMNS}
        scores["hd95"], scores["hd95_lesion"] = float(rng.uniform(10, 60)), float(rng.uniform(10, 60))
        scores["hd95_penalised"] = int(rng.integers(0, 5))
        rows.append(
            {
                **common,
                "fold": str(k),
                **scores,
                "best_epoch": int(rng.integers(1, 50)),
                "train_seconds": float(rng.uniform(10, 100)),
            }
        )
    folds_df = pd.DataFrame(rows)
    mean = {**common, "fold": "mean", **folds_df[list(SCORE_COLUMNS)].mean().to_dict()}
    std = {**common, "fold": "std", **folds_df[list(SCORE_COLUMNS)].std(ddof=1).to_dict()}
    ens = {**common, "fold": "ensemble", **{c: float(rng.uniform(0, 1)) for c in SCORE_COLUMNS}}
    summary = pd.DataFrame([*rows, mean, std, ens]).reindex(columns=list(SUMMARY_COLUMNS))
    (run / summary_dir).mkdir(exist_ok=True)
    summary.to_csv(run / summary_dir / "summary.csv", index=False)
    return summary


def test_mean_std_and_ensemble_per_run(tmp_path):
    a = write_run(tmp_path / "results", "unet", seed=1)
    b = write_run(tmp_path / "results", "unext", seed=2)
    csv_path, md_path = aggregate([tmp_path / "results"], tmp_path / "board")
    board = pd.read_csv(csv_path).set_index("model")
    for name, summary in (("unet", a), ("unext", b)):
        folds = summary[summary["fold"].str.isdigit()]
        for col in SCORE_COLUMNS:
            assert board.loc[name, f"{col}_mean"] == pytest.approx(folds[col].mean())
            assert board.loc[name, f"{col}_std"] == pytest.approx(folds[col].std(ddof=1))
            ens = summary.loc[summary["fold"] == "ensemble", col].iloc[0]
            assert board.loc[name, f"ensemble_{col}"] == pytest.approx(ens)
        assert board.loc[name, "n_folds"] == 3
        assert board.loc[name, "train_seconds"] == pytest.approx(folds["train_seconds"].sum())
    # best mean lesion-only Dice first
    order = pd.read_csv(csv_path)["model"].tolist()
    assert order == sorted(order, key=lambda m: -board.loc[m, "dice_lesion_mean"])

    md = md_path.read_text()
    assert md.startswith("# Leaderboard") and "## busi (test images: 40)" in md
    row_a = next(line for line in md.splitlines() if line.startswith("| unet | exp | busi | 3 |"))
    folds_a = a[a["fold"].str.isdigit()]
    assert f"{folds_a['dice'].mean():.4f} ± {folds_a['dice'].std(ddof=1):.4f}" in row_a
    assert "Scored at each image's original resolution (ground truth not resampled); input 224 px" in md
    every = pd.read_csv(tmp_path / "board" / "folds.csv", dtype={"fold": str})
    assert sorted(every["fold"].unique()) == ["0", "1", "2", "ensemble"]
    assert len(every) == 2 * 4


def test_one_table_per_test_dataset(tmp_path):
    write_run(tmp_path, "unet", dataset="busi")
    write_run(tmp_path, "unet", dataset="busbra", manifest="b" * 64)
    csv_path, md_path = aggregate([tmp_path])
    assert csv_path.parent == tmp_path
    assert pd.read_csv(csv_path)["dataset"].tolist() == ["busbra", "busi"]
    md = md_path.read_text()
    assert "## busbra" in md and "## busi" in md


def test_incomplete_run_is_refused(tmp_path):
    write_run(tmp_path / "r", "unet")
    write_run(tmp_path / "r", "unext", folds=5, present=[0, 1, 3])
    with pytest.raises(DataError, match=r"unext \(busi\): has fold models \[0, 1, 3\], lacks \[2, 4\]"):
        aggregate([tmp_path / "r"], tmp_path / "board")
    assert not (tmp_path / "board").exists()


def test_different_manifests_of_one_dataset_are_refused_unless_allowed(tmp_path):
    write_run(tmp_path, "unet", manifest="a" * 64)
    write_run(tmp_path, "unext", manifest="b" * 64)
    with pytest.raises(DataError, match="different manifests of the same dataset.*--allow-mixed"):
        aggregate([tmp_path], tmp_path / "board")
    csv_path, _ = aggregate([tmp_path], tmp_path / "board", allow_mixed=True)
    assert len(pd.read_csv(csv_path)) == 2


def test_nothing_to_aggregate(tmp_path):
    with pytest.raises(DataError, match="no summary.csv found"):
        aggregate([tmp_path])
    with pytest.raises(DataError, match="does not exist"):
        aggregate([tmp_path / "missing"])


def test_a_run_given_twice_counts_once(tmp_path):
    write_run(tmp_path, "unet")
    csv_path, _ = aggregate([tmp_path, tmp_path / "exp" / "busi" / "unet"], tmp_path / "board")
    assert len(pd.read_csv(csv_path)) == 1


def test_command_line(tmp_path, capsys):
    write_run(tmp_path, "unet")
    write_run(tmp_path, "unext", manifest="c" * 64)
    assert cli.main(["aggregate", str(tmp_path)]) == 1
    assert "--allow-mixed" in capsys.readouterr().err
    assert cli.main(["aggregate", str(tmp_path), "--allow-mixed", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "# Leaderboard" in out and str(tmp_path / "o" / "leaderboard.csv") in out


def test_score_columns_match_what_the_evaluator_writes():
    assert aggregate_mod.SCORE_COLUMNS == SCORE_COLUMNS


def test_runs_scored_at_224_and_256_px_are_refused_unless_allowed(tmp_path):
    write_run(tmp_path, "unet", image_size=224)
    write_run(tmp_path, "unet", experiment="cheng", image_size=256)
    with pytest.raises(DataError, match=r"different settings.*image_size=256.*image_size=224.*--allow-mixed"):
        aggregate([tmp_path], tmp_path / "board")
    assert not (tmp_path / "board").exists()
    csv_path, md_path = aggregate([tmp_path], tmp_path / "board", allow_mixed=True)
    assert sorted(pd.read_csv(csv_path)["image_size"]) == [224, 256]
    md = md_path.read_text()
    assert "Mixed settings (image_size differ" in md
    assert "| model | experiment | train data | image_size | folds |" in md


def test_ranked_by_lesion_dice_or_a_chosen_score(tmp_path):
    for seed, model in enumerate(("a", "b", "c", "d")):
        write_run(tmp_path, model, seed=seed)
    board = pd.read_csv(aggregate([tmp_path], tmp_path / "o1")[0])
    assert board["dice_lesion_mean"].is_monotonic_decreasing
    board = pd.read_csv(aggregate([tmp_path], tmp_path / "o2", sort_by="hd95")[0])
    assert board["hd95_mean"].is_monotonic_increasing
    assert cli.main(["aggregate", str(tmp_path), "--sort-by", "dice", "--out", str(tmp_path / "o3")]) == 0
    assert pd.read_csv(tmp_path / "o3" / "leaderboard.csv")["dice_mean"].is_monotonic_decreasing


def test_tagged_results_are_rows_of_their_own_and_must_match_settings(tmp_path):
    write_run(tmp_path, "unet", seed=1)
    write_run(tmp_path, "unet", seed=2, summary_dir="test_tta", tta=True)
    with pytest.raises(DataError, match=r"unet \(tta=False\).*unet @tta \(tta=True\)"):
        aggregate([tmp_path], tmp_path / "board")
    board = pd.read_csv(aggregate([tmp_path], tmp_path / "board", allow_mixed=True)[0], keep_default_na=False)
    assert sorted(board["tag"]) == ["", "tta"]
    assert set(board["run"]) == {str((tmp_path / "exp" / "busi" / "unet").resolve())}
