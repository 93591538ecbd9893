"""The whole job through the command line (synth -> prepare -> train -> test -> aggregate) on synthetic data, and
a learning check on real BUSI images: a small U-Net must beat trivial predictors on the validation fold."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
from engine_testdata import DEMO

from busbench import cli
from busbench.config import load_config
from busbench.data.loader import build_datasets
from busbench.data.prepare import prepare
from busbench.engine.evaluate import SUMMARY_COLUMNS
from busbench.engine.train import train
from busbench.metrics import per_image, summarize

FOLD_FILES = (
    "checkpoint_last.pt",
    "checkpoint_best.pt",
    "val_per_image.csv",
    "train_log.csv",
    "run.json",
    "done.json",
)


def test_cli_pipeline_on_synthetic_data(tmp_path, capsys):
    data, results = tmp_path / "data", tmp_path / "results"
    assert (
        cli.main(
            ["synth", "--layout", "busi", "--out", str(data / "raw" / "BUSI"), "--n", "24", "--seed", "3"]
        )
        == 0
    )
    assert (
        cli.main(["prepare", "--datasets", "busi", "--data-root", str(data), "--folds", "2", "--quiet"]) == 0
    )
    sets = [
        f"data.data_root={data}",
        f"output.root={results}",
        "data.image_size=32",
        "data.folds=2",
        "model.params.base_width=4",
        "train.epochs=2",
        "train.batch_size=4",
    ]
    assert cli.main(["train", "--config", str(DEMO), "--set", *sets]) == 0
    run = results / "demo" / "busi" / "unet"
    assert cli.main(["test", "--run", str(run)]) == 0
    assert cli.main(["aggregate", str(results / "demo"), "--out", str(results / "board")]) == 0
    out = capsys.readouterr().out
    assert "# Leaderboard" in out and "| unet | demo | busi | 2 |" in out

    # the results layout, file by file
    assert (run / "config.yaml").is_file()
    for k in (0, 1):
        for name in FOLD_FILES:
            assert (run / f"fold{k}" / name).is_file(), f"fold{k}/{name}"
        assert sorted((run / f"fold{k}" / "tensorboard").glob("events.out.tfevents.*"))
        assert json.loads((run / f"fold{k}" / "run.json").read_text())["status"] == "completed"
    for name in ("fold0", "fold1", "ensemble"):
        assert (run / "test" / f"{name}_per_image.csv").is_file()
    for name in ("leaderboard.csv", "leaderboard.md", "folds.csv"):
        assert (results / "board" / name).is_file()

    summary = pd.read_csv(run / "summary.csv", dtype={"fold": str})
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    assert summary["fold"].tolist() == ["0", "1", "mean", "std", "ensemble"]
    ensemble = summary.set_index("fold").loc["ensemble"]
    per_image_ens = pd.read_csv(run / "test" / "ensemble_per_image.csv")
    assert ensemble["dice"] == pytest.approx(per_image_ens["dice"].mean())
    manifest = pd.read_csv(data / "manifests" / "busi.csv")
    assert ensemble["n_test"] == len(per_image_ens) == (manifest["split"] == "test").sum()
    assert set(per_image_ens["sample_id"]) == set(manifest.loc[manifest["split"] == "test", "sample_id"])

    board = pd.read_csv(results / "board" / "leaderboard.csv")
    assert len(board) == 1
    assert board["dice_mean"].iloc[0] == pytest.approx(summary.iloc[:2]["dice"].mean())
    assert board["ensemble_dice"].iloc[0] == pytest.approx(ensemble["dice"])


def test_a_second_train_command_skips_finished_folds(tmp_path, synthetic_root, capsys):
    sets = [
        f"data.data_root={synthetic_root}",
        f"output.root={tmp_path}",
        "data.image_size=32",
        "data.folds=2",
        "model.params.base_width=4",
        "train.epochs=1",
        "train.batch_size=4",
        "output.tensorboard=false",
    ]
    assert cli.main(["train", "--config", str(DEMO), "--fold", "1", "--set", *sets]) == 0
    stamp = (tmp_path / "demo" / "busi" / "unet" / "fold1" / "done.json").stat().st_mtime_ns
    assert cli.main(["train", "--config", str(DEMO), "--fold", "1", "--set", *sets]) == 0
    assert (tmp_path / "demo" / "busi" / "unet" / "fold1" / "done.json").stat().st_mtime_ns == stamp


def test_cli_errors_are_one_line(tmp_path, synthetic_root, capsys):
    assert cli.main(["test", "--run", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.yaml not found" in err
    assert cli.main(["aggregate", str(tmp_path)]) == 1
    assert "no summary.csv found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real data


def centred_ellipse(size: int) -> np.ndarray:
    """A fixed guess: an ellipse in the middle of the input, a third of its width and a quarter of its height."""
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2), (size // 6, size // 8), 0, 0, 360, 1, -1)
    return mask.astype(bool)


@pytest.mark.realdata
@pytest.mark.slow
def test_small_unet_learns_real_busi(real_data_root, tmp_path):
    """On real BUSI images a small U-Net beats predicting nothing and predicting a centred ellipse.

    Both baselines are scored with the same metrics on the same validation images as the network.
    """
    data = tmp_path / "data"
    prepare(["busi"], data_root=data, raw_root=real_data_root, folds=5, progress=False, splits="new")
    cfg = load_config(
        DEMO,
        [
            f"data.data_root={data}",
            f"output.root={tmp_path / 'results'}",
            "data.image_size=64",
            "data.augment=light",
            "model.params.base_width=12",
            "train.epochs=8",
            "train.batch_size=8",
            "train.lr=3e-3",
            "train.min_lr=1e-4",
            "train.warmup_epochs=1",
            "output.tensorboard=false",
            "eval.batch_size=32",
        ],
    )
    (fold_dir,) = train(cfg, folds=[0])
    network = pd.read_csv(fold_dir / "val_per_image.csv")

    _, val = build_datasets(cfg, 0)
    ellipse = centred_ellipse(cfg.data.image_size)
    empty = np.zeros_like(ellipse)
    rows = {"empty": [], "ellipse": []}
    for i in range(len(val)):
        gt = val[i]["mask"][0].numpy() > 0.5
        label = val.rows["label"][i]
        rows["empty"].append({**per_image(empty, gt), "label": label})
        rows["ellipse"].append({**per_image(ellipse, gt), "label": label})
    baselines = {name: summarize(pd.DataFrame(r))["dice"] for name, r in rows.items()}
    learned = summarize(network)["dice"]
    print(
        f"validation Dice: network {learned:.4f}, all-background {baselines['empty']:.4f}, "
        f"centred ellipse {baselines['ellipse']:.4f} ({len(val)} images)"
    )
    assert set(network["sample_id"]) == set(val.rows["sample_id"])
    # measured on the CPU: network 0.67, all-background 0.19, centred ellipse 0.15 (32 validation images)
    assert learned > max(baselines.values()) + 0.25
