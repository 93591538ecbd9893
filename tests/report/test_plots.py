"""Figures are written as real, non-trivial PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from busbench.cli import main
from busbench.errors import DataError
from busbench.report.plots import overlay_grid, transfer_heatmap


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


def test_overlay_grid(tmp_path: Path):
    yy, xx = np.mgrid[:64, :64]
    image = (128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    gt = (yy - 32) ** 2 + (xx - 30) ** 2 < 150
    cases = [
        {"name": n, "image": image, "gt": gt, "pred": np.roll(gt, s, axis=1), "dice": d}
        for n, s, d in [("best", 1, 0.95), ("median", 5, 0.7), ("worst", 20, 0.1)]
    ]
    assert_real_png(overlay_grid(cases, tmp_path / "o.png", title="synthetic"), min_side=150)


def test_missing_inputs_fail_clearly(tmp_path: Path, capsys):
    assert main(["plot", "curves", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err
