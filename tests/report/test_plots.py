"""Figures are written as real, non-trivial PNGs; overlays reproduce the masks the evaluator scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from busbench.cli import main
from busbench.config import load_config
from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine.evaluate import evaluate_run
from busbench.engine.train import train
from busbench.errors import DataError
from busbench.metrics import per_image
from busbench.report.overlays import overlay_cases, pick_ranks
from busbench.report.plots import heatmap_matrix, overlay_grid, transfer_heatmap

DEMO = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "demo.yaml"


def assert_real_png(path: Path, min_side: int = 200) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert min(pixels.shape) >= min_side
    assert pixels.std() > 10  # not a blank canvas


def fake_run(root: Path, dataset: str, model: str, shift: float) -> Path:
    run = root / "exp" / dataset / model
    rng = np.random.default_rng(len(model))
    for k in range(2):
        (run / f"fold{k}").mkdir(parents=True)
        epochs = np.arange(1, 6)
        pd.DataFrame(
            {
                "epoch": epochs,
                "train_loss": 1 / epochs + 0.1 * k,
                "val_dice": np.minimum(0.2 * epochs + shift, 0.95),
            }
        ).to_csv(run / f"fold{k}" / "train_log.csv", index=False)
    (run / "config.yaml").write_text("experiment: {name: exp}\n")
    (run / "test").mkdir()
    pd.DataFrame(
        {"sample_id": [f"s{i}" for i in range(30)], "dice": np.clip(rng.normal(0.6 + shift, 0.15, 30), 0, 1)}
    ).to_csv(run / "test" / "ensemble_per_image.csv", index=False)
    return run


def test_curves_and_dice_plots(tmp_path: Path):
    fake_run(tmp_path, "busi", "unet", 0.1)
    fake_run(tmp_path, "busi", "unext", 0.0)
    fake_run(tmp_path, "busbra", "unet", 0.2)
    out = tmp_path / "figs"
    assert main(["plot", "curves", str(tmp_path / "exp"), "--out", str(out)]) == 0
    curves = sorted(out.glob("curves_*.png"))
    assert [p.name for p in curves] == [
        "curves_busbra_unet.png",
        "curves_busi_unet.png",
        "curves_busi_unext.png",
    ]
    for p in curves:
        assert_real_png(p)
    assert main(["plot", "dice", str(tmp_path / "exp"), "--out", str(out)]) == 0
    assert_real_png(out / "dice_ensemble.png")


def test_transfer_heatmap(tmp_path: Path):
    csv = tmp_path / "transfer.csv"
    pd.DataFrame(
        {
            "train_dataset": ["busi", "busi", "busbra", "busbra"],
            "test_dataset": ["busi", "busbra", "busi", "busbra"],
            "dice": [0.8, 0.5, 0.45, 0.85],
        }
    ).to_csv(csv, index=False)
    assert_real_png(transfer_heatmap(csv, tmp_path / "h.png"))
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"a": [1]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match="needs columns"):
        transfer_heatmap(bad, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_heatmap_averages_one_experiment_over_models_in_every_cell(tmp_path: Path):
    rows = []
    for experiment, model, trained_on, test, dice in [
        ("e1", "unet", "busi", "busi", 0.8),
        ("e1", "unet", "busi", "busbra", 0.4),
        ("e1", "unet", "busbra", "busi", 0.5),
        ("e1", "unet", "busbra", "busbra", 0.9),
        ("e1", "unext", "busi", "busi", 0.6),  # unext only on the diagonal: left out of every cell
        ("e1", "unext", "busbra", "busbra", 0.7),
        ("e2", "unet", "busi", "busi", 0.1),  # another experiment: never averaged with e1
        ("e2", "unet", "busi", "busbra", 0.1),
    ]:
        rows.append(
            dict(
                experiment=experiment,
                model=model,
                train_dataset=trained_on,
                test_dataset=test,
                dice=dice,
                source="ensemble",
            )
        )
    df = pd.DataFrame(rows)
    matrix, models = heatmap_matrix(df[df["experiment"] == "e1"])
    assert models == ["unet"]
    assert matrix.loc["busi", "busi"] == 0.8 and matrix.loc["busbra", "busbra"] == 0.9
    csv = tmp_path / "transfer.csv"
    df.to_csv(csv, index=False)
    with pytest.raises(DataError, match="several experiments"):
        transfer_heatmap(csv, tmp_path / "h.png")
    assert main(["plot", "transfer", str(csv), "--out", str(tmp_path)]) == 0
    for name in ("e1", "e2"):
        assert_real_png(tmp_path / f"transfer_heatmap_{name}.png")


def test_overlay_grid(tmp_path: Path):
    yy, xx = np.mgrid[:64, :64]
    image = (128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    gt = (yy - 32) ** 2 + (xx - 30) ** 2 < 150
    cases = [
        {"name": n, "image": image, "gt": gt, "pred": np.roll(gt, s, axis=1), "dice": d}
        for n, s, d in [("best", 1, 0.95), ("median", 5, 0.7), ("worst", 20, 0.1)]
    ]
    assert_real_png(overlay_grid(cases, tmp_path / "o.png", title="synthetic"), min_side=150)


def red_pixels(path: Path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())


def test_overlay_grid_draws_a_whole_image_prediction(tmp_path: Path):
    image = np.tile(np.arange(64, dtype=np.uint8) * 3, (64, 1))
    gt = np.zeros((64, 64), bool)
    gt[20:40, 20:40] = True
    case = {"name": "all foreground", "image": image, "gt": gt, "dice": 0.2}
    full = overlay_grid([{**case, "pred": np.ones((64, 64), bool)}], tmp_path / "full.png")
    empty = overlay_grid([{**case, "pred": np.zeros((64, 64), bool)}], tmp_path / "empty.png")
    assert red_pixels(empty) == 0
    assert red_pixels(full) > 100  # the contour runs along the image edge


def test_missing_inputs_fail_clearly(tmp_path: Path, capsys):
    assert main(["plot", "curves", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tested_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained and tested run on synthetic BUSI-layout data (2 folds, 32 px, 3 epochs)."""
    root = tmp_path_factory.mktemp("overlay_run")
    synthesize("busi", root / "data" / "raw" / "BUSI", n=24, seed=5)
    prepare(["busi"], data_root=root / "data", folds=2, test_size=0.3, seed=42, progress=False)
    return train_and_test(root / "data", root / "results", "train.epochs=3")


def train_and_test(data_root: Path, out: Path, *overrides: str) -> Path:
    """Train a tiny demo run (32 px, width 4, 2 folds) with ``overrides``, test it, return its folder."""
    sets = [f"data.data_root={data_root}", f"output.root={out}", "data.image_size=32", "data.folds=2"]
    sets += ["model.params.base_width=4", "train.batch_size=4", "output.tensorboard=false", *overrides]
    cfg = load_config(DEMO, sets)
    train(cfg)
    evaluate_run(cfg.run_dir())
    return cfg.run_dir()


def test_pick_ranks():
    assert pick_ranks(7, 3) == [("best", 0), ("median", 3), ("worst", 6)]
    assert pick_ranks(2, 3) == [("best", 0), ("worst", 1)]
    assert pick_ranks(9, 5) == [("best", 0), ("rank 3/9", 2), ("median", 4), ("rank 7/9", 6), ("worst", 8)]
    assert pick_ranks(0, 3) == []


def assert_cases_are_the_scored_masks(cases: list[dict], scores: pd.DataFrame) -> None:
    by_id = scores.set_index("sample_id")
    for case in cases:
        sid = case["name"].split(": ")[1]
        assert case["image"].dtype == np.uint8 and case["image"].std() > 0
        assert case["gt"].dtype == bool and case["pred"].dtype == bool
        assert case["image"].shape == case["gt"].shape == case["pred"].shape
        # the re-run prediction is the one the evaluator scored (network resolution, padding cropped)
        scored = per_image(case["pred"], case["gt"])
        assert scored["dice"] == pytest.approx(by_id.loc[sid, "dice"], abs=1e-6)
        assert scored["specificity"] == pytest.approx(by_id.loc[sid, "specificity"], abs=1e-6)


def test_overlay_cases_reproduce_the_scored_masks(tested_run: Path):
    scores = pd.read_csv(tested_run / "test" / "ensemble_per_image.csv", dtype={"sample_id": str})
    cases = overlay_cases(tested_run)
    lesion = scores[scores["label"] != "normal"]
    ranked = lesion.sort_values(["dice", "sample_id"], ascending=[False, True]).reset_index(drop=True)
    expected_ids = [ranked["sample_id"][i] for i in (0, round((len(ranked) - 1) / 2), len(ranked) - 1)]
    assert [c["name"] for c in cases[:3]] == [
        f"{kind}: {sid}" for kind, sid in zip(("best", "median", "worst"), expected_ids, strict=True)
    ]
    assert [c["dice"] for c in cases[:3]] == sorted((c["dice"] for c in cases[:3]), reverse=True)
    normal_fp = scores[(scores["label"] == "normal") & ~scores["pred_empty"]].sort_values("sample_id")
    if len(normal_fp):
        assert cases[3]["name"] == f"normal FP: {normal_fp['sample_id'].iloc[0]}" and cases[3]["pred"].any()
    assert len(cases) == 3 + (len(normal_fp) > 0)
    assert_cases_are_the_scored_masks(cases, scores)
    fold_cases = overlay_cases(tested_run, source="fold1", n=2)
    fold_scores = pd.read_csv(tested_run / "test" / "fold1_per_image.csv", dtype={"sample_id": str})
    fold_lesion = fold_scores[fold_scores["label"] != "normal"]
    assert [c["dice"] for c in fold_cases[:2]] == [fold_lesion["dice"].max(), fold_lesion["dice"].min()]
    assert_cases_are_the_scored_masks(fold_cases, fold_scores)
    with pytest.raises(DataError, match="ensemble or fold<k>"):
        overlay_cases(tested_run, source="best")


def test_plot_overlays_and_all(tested_run: Path, tmp_path: Path):
    out = tmp_path / "figs"
    assert main(["plot", "overlays", str(tested_run), "--out", str(out)]) == 0
    png = out / "overlays_busi_unet.png"
    assert_real_png(png, min_side=150)
    assert png.stat().st_size > 10_000
    assert main(["plot", "all", str(tested_run.parent.parent), "--out", str(tmp_path / "all")]) == 0
    names = sorted(p.name for p in (tmp_path / "all").glob("*.png"))
    assert names == ["curves_busi_unet.png", "dice_ensemble.png", "overlays_busi_unet.png"]
    for name in names:
        assert_real_png(tmp_path / "all" / name, min_side=150)


def test_overlays_need_a_tested_run(tmp_path: Path, capsys):
    run = fake_run(tmp_path, "busi", "unet", 0.0)
    (run / "test" / "ensemble_per_image.csv").unlink()
    assert main(["plot", "overlays", str(run)]) == 1
    assert "busbench test --run" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["multiclass", "multitask"])
def test_overlays_of_multiclass_and_multitask_runs_draw_the_scored_masks(tested_run: Path, mode: str):
    """A multiclass run's lesion is 1 - p(background), a multitask run's mask is refined by its label: the
    overlays draw the masks the evaluator scored, not a one-channel reading of the output."""
    root = tested_run.parents[3]
    run = train_and_test(root / "data", root / mode, "train.epochs=1", f"task.mode={mode}")
    scores = pd.read_csv(run / "test" / "ensemble_per_image.csv", dtype={"sample_id": str})
    assert_cases_are_the_scored_masks(overlay_cases(run, n=3), scores)
