"""``busbench score``: predictions of any tool on the held-out test split, in the results layout.

The round trip: ``busbench predict`` on a run's own test images, then ``busbench score``, reproduces the fold
ensemble's (and a single fold's) numbers of ``busbench test --set eval.resolution=original`` exactly; the scored
folder then takes part in ``busbench aggregate`` and ``busbench compare`` like a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from engine_testdata import tiny_config
from PIL import Image

from busbench import cli
from busbench.engine.evaluate import PER_IMAGE_COLUMNS, SUMMARY_COLUMNS, evaluate_run
from busbench.engine.predict import predict_images
from busbench.engine.score import score_predictions
from busbench.engine.train import train
from busbench.errors import DataError
from busbench.report.aggregate import aggregate
from busbench.report.plots import dice_distribution

METRICS = ["dice", "iou", "hd95", "precision", "recall", "specificity", "penalised", "pred_empty", "gt_empty"]


@pytest.fixture(scope="module")
def setup(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("score_run")
    train(tiny_config(synthetic_root, out, "train.epochs=1"))
    run = out / "demo" / "busi" / "unet"
    evaluate_run(run, ["eval.resolution=original"], save_masks=True)
    manifest = pd.read_csv(synthetic_root / "manifests" / "busi.csv")
    test = manifest[manifest["split"] == "test"]
    return {"out": out, "run": run, "root": synthetic_root, "test": test}


def gt_masks(setup: dict, folder: Path, value: int = 1) -> Path:
    """The ground truth written as ``<sample_id>.png`` with values 0/``value`` (nnU-Net's encoding for 1)."""
    folder.mkdir(parents=True)
    for rec in setup["test"].to_dict("records"):
        mask = np.asarray(Image.open(setup["root"] / "derived" / rec["mask_path"])) > 127
        Image.fromarray(mask.astype(np.uint8) * np.uint8(value)).save(folder / f"{rec['sample_id']}.png")
    return folder


def overrides(setup: dict) -> list[str]:
    return [f"data.data_root={setup['root']}", f"output.root={setup['out']}"]


@pytest.mark.parametrize("source", ["ensemble", "fold0"])
def test_predict_then_score_equals_test_at_original_resolution(setup, tmp_path, source):
    images = [setup["root"] / "raw" / p for p in setup["test"]["image_path"]]
    preds = tmp_path / "preds"
    folds = ["all"] if source == "ensemble" else ["0"]
    predict_images(setup["run"], images, preds, folds=folds)
    summary = score_predictions("busi", preds, f"roundtrip_{source}", overrides=overrides(setup))
    mine = pd.read_csv(summary.parent / "test" / "ensemble_per_image.csv").sort_values("sample_id")
    theirs = pd.read_csv(setup["run"] / "test" / f"{source}_per_image.csv").sort_values("sample_id")
    assert list(mine.columns) == list(PER_IMAGE_COLUMNS)
    pd.testing.assert_frame_equal(
        mine.reset_index(drop=True), theirs[list(PER_IMAGE_COLUMNS)].reset_index(drop=True), check_exact=True
    )
    rows = pd.read_csv(summary, dtype={"fold": str})
    assert list(rows.columns) == list(SUMMARY_COLUMNS) and rows["fold"].tolist() == ["0", "ensemble"]
    own = pd.read_csv(setup["run"] / "summary.csv", dtype={"fold": str})
    own = own[own["fold"] == ("ensemble" if source == "ensemble" else "0")].iloc[0]
    for col in ("dice", "iou", "hd95", "dice_lesion", "hd95_penalised", "normal_fp_rate", "manifest_sha256"):
        assert rows.iloc[1][col] == own[col], col
    assert rows.iloc[1]["resolution"] == "original"


def test_scored_folder_joins_aggregate_and_compare(setup, tmp_path):
    preds = gt_masks(setup, tmp_path / "perfect")
    summary = score_predictions("busi", preds, "oracle", experiment="demo", overrides=overrides(setup))
    per_image = pd.read_csv(summary.parent / "test" / "ensemble_per_image.csv")
    assert (per_image["dice"] == 1.0).all() and (per_image["hd95"] == 0.0).all()
    written = aggregate([setup["out"] / "demo"], tmp_path / "board")
    board = pd.read_csv(next(p for p in written if p.name == "leaderboard.csv"))
    assert sorted(board["model"]) == ["oracle", "unet"]
    oracle = board.set_index("model").loc["oracle"]
    assert oracle["n_folds"] == 1 and oracle["ensemble_dice"] == 1.0 and oracle["dice_mean"] == 1.0
    status = cli.main(["compare", str(setup["out"] / "demo"), "--out", str(tmp_path / "stats")])
    assert status == 0 and any((tmp_path / "stats").iterdir())
    # the Dice-distribution figure finds the scored folder although it has no config.yaml
    assert dice_distribution([summary.parent], tmp_path / "dice.png").is_file()


def test_refusals_list_the_files(setup, tmp_path):
    preds = gt_masks(setup, tmp_path / "p", value=255)
    ids = sorted(setup["test"]["sample_id"])
    (preds / f"{ids[0]}.png").unlink()
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(preds / "stranger.png")
    dev_id = sorted(setup["root"].glob("derived/busi/*.png"))[0].stem
    shutil.copy(setup["root"] / "derived" / "busi" / f"{dev_id}.png", preds / f"{dev_id}.png")
    (preds / "plans.json").write_text("{}")  # other tools' side files are ignored
    with pytest.raises(DataError) as info:
        score_predictions("busi", preds, "bad", overrides=overrides(setup))
    text = str(info.value)
    assert f"without a prediction (1): {ids[0]}" in text and "stranger.png" in text
    if dev_id not in ids:
        assert f"development-split images (not in the test split) (1): {dev_id}.png" in text

    wrong = gt_masks(setup, tmp_path / "w")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(wrong / f"{ids[1]}.png")
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    h, w = np.asarray(Image.open(wrong / f"{ids[2]}.png")).shape
    Image.fromarray(np.resize(grey, (h, w))).save(wrong / f"{ids[2]}.png")
    with pytest.raises(DataError) as info:
        score_predictions("busi", wrong, "bad", overrides=overrides(setup))
    text = str(info.value)
    assert f"{ids[1]}.png is 5x5, the image is" in text and f"{ids[2]}.png holds 64 distinct values" in text
    assert not (setup["out"] / "external" / "busi" / "bad").exists()


def test_suffix_and_command_line(setup, tmp_path, capsys):
    preds = gt_masks(setup, tmp_path / "s")
    for p in preds.iterdir():
        p.rename(p.with_name(f"{p.stem}_mask.png"))
    args = ["score", "--dataset", "busi", "--pred-dir", str(preds), "--name", "suffixed", "--suffix", "_mask",
            "--set", *overrides(setup)]  # fmt: skip
    assert cli.main(args) == 0
    assert "suffixed" in capsys.readouterr().out
    assert cli.main(args[:-5] + ["--set", *overrides(setup)]) == 1  # without --suffix nothing matches
    assert "files matching no image" in capsys.readouterr().err


def test_saved_test_masks_score_back_to_the_same_numbers(setup):
    """``busbench test --save-masks`` writes every source's masks; scored, they give that source's numbers."""
    masks = setup["run"] / "test" / "masks" / "busi"
    assert sorted(p.name for p in masks.iterdir()) == ["ensemble", "fold0", "fold1"]
    for source in ("fold1", "ensemble"):
        assert sorted(p.stem for p in (masks / source).iterdir()) == sorted(setup["test"]["sample_id"])
        summary = score_predictions("busi", masks / source, f"saved_{source}", overrides=overrides(setup))
        mine = pd.read_csv(summary.parent / "test" / "ensemble_per_image.csv").sort_values("sample_id")
        theirs = pd.read_csv(setup["run"] / "test" / f"{source}_per_image.csv").sort_values("sample_id")
        pd.testing.assert_frame_equal(mine.reset_index(drop=True), theirs[list(PER_IMAGE_COLUMNS)].reset_index(drop=True))
