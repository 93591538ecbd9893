"""``busbench predict`` on a tiny trained run: masks at each image's own size whatever the file encoding, the
summaries and provenance, probabilities, fold selection, and bad inputs reported while good ones are predicted."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from engine_testdata import tiny_config
from PIL import Image

from busbench import cli
from busbench.data.decode import read_mask
from busbench.engine.predict import PREDICTION_COLUMNS, predict_images
from busbench.engine.train import train
from busbench.errors import DataError


@pytest.fixture(scope="module")
def run_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict_run")
    train(tiny_config(synthetic_root, out, "train.epochs=1"))
    return out / "demo" / "busi" / "unet"


@pytest.fixture(scope="module")
def test_images(synthetic_root: Path) -> list[Path]:
    manifest = pd.read_csv(synthetic_root / "manifests" / "busi.csv")
    rel = manifest.loc[manifest["split"] == "test", "image_path"]
    return [synthetic_root / "raw" / p for p in sorted(rel)]


def encodings(source: Path, folder: Path) -> dict[str, Path]:
    """The grey image ``source`` saved as 8-bit grey, RGB, RGBA, palette and 16-bit PNGs, and as a BMP and TIFF."""
    grey = np.asarray(Image.open(source).convert("L"))
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "grey": (Image.fromarray(grey), "grey.png"),
        "rgb": (Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)), "rgb.png"),
        "rgba": (Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 128)])), "rgba.png"),
        "palette": (Image.fromarray(grey).convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "palette.png"),
        "bmp": (Image.fromarray(grey), "bmp.bmp"),
        "tiff": (Image.fromarray(grey), "tiff.tiff"),
    }
    out = {}
    for key, (image, name) in files.items():
        image.save(folder / name)
        out[key] = folder / name
    cv2.imwrite(str(folder / "grey16.png"), grey.astype(np.uint16) * 257)
    out["grey16"] = folder / "grey16.png"
    return out


def test_masks_at_own_size_for_every_encoding(run_dir, test_images, tmp_path):
    files = encodings(test_images[0], tmp_path / "in")
    # the palette quantises nothing on a 256-level grey image only when it keeps every level; compare where exact
    palette_exact = np.array_equal(
        np.asarray(Image.open(files["palette"]).convert("L")), np.asarray(Image.open(files["grey"]))
    )
    out = tmp_path / "out"
    csv, failures = predict_images(run_dir, [tmp_path / "in"], out, save_probabilities=True)
    assert failures == []
    table = pd.read_csv(csv, keep_default_na=False)
    assert list(table.columns) == list(PREDICTION_COLUMNS)
    assert sorted(table["mask"]) == sorted(f"{p.stem}.png" for p in files.values())
    h, w = np.asarray(Image.open(test_images[0])).shape[:2]
    reference = read_mask(out / "grey.png")
    assert reference.shape == (h, w)
    prob = np.load(out / "grey_prob.npz")["lesion"]
    assert prob.shape == (h, w) and prob.dtype == np.float32
    np.testing.assert_array_equal(reference, prob >= 0.5)
    row = table.set_index("mask").loc["grey.png"]
    assert (row["height"], row["width"]) == (h, w)
    assert row["lesion_pixels"] == int(reference.sum())
    assert row["max_prob"] == pytest.approx(float(prob.max()), abs=1e-6)
    assert bool(row["empty"]) == (not reference.any())
    raw = np.asarray(Image.open(out / "grey.png"))
    assert set(np.unique(raw)) <= {0, 255}
    for key, path in files.items():
        if key == "palette" and not palette_exact:
            continue
        np.testing.assert_array_equal(read_mask(out / f"{path.stem}.png"), reference, err_msg=key)


def test_provenance_and_fold_selection(run_dir, test_images, tmp_path):
    out = tmp_path / "fold0"
    predict_images(run_dir, test_images[:2], out, folds=["0"])
    info = json.loads((out / "predict.json").read_text())
    assert info["folds"] == [0] and len(info["checkpoints"]) == 1
    ckpt = run_dir / "fold0" / "checkpoint_best.pt"
    assert info["checkpoints"][0]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert info["run"] == str(run_dir.resolve()) and info["config_hash"]
    assert info["environment"]["torch"] and info["environment"]["device"] == "cpu"
    both = tmp_path / "both"
    predict_images(run_dir, test_images[:2], both)
    assert len(json.loads((both / "predict.json").read_text())["checkpoints"]) == 2
    with pytest.raises(Exception, match="--folds 7"):
        predict_images(run_dir, test_images[:1], tmp_path / "bad", folds=["7"])


def test_bad_inputs_reported_good_ones_predicted(run_dir, test_images, tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(test_images[0], good / "a.png")
    shutil.copy(test_images[1], good / "b.png")
    (good / "empty.png").write_bytes(b"")
    (good / "junk.png").write_bytes(b"not an image at all")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(test_images[2], other / "a.png")  # same stem as good/a.png
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text(f"# inputs\n{good / 'b.png'}\nmissing.png\n")
    out = tmp_path / "out"
    status = cli.main(
        ["predict", "--run", str(run_dir), "--input", str(good), str(other), str(empty_dir), str(listing),
         "--out", str(out)]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert status == 1
    for needle in ("empty.png: file is empty (0 bytes)", "junk.png", "stem 'a' is shared by", "holds no",
                   "missing.png", "5 input(s)"):  # fmt: skip
        assert needle in err, needle
    table = pd.read_csv(out / "predictions.csv")
    assert table["mask"].tolist() == ["b.png"]  # listed twice (folder and list): predicted once
    assert (out / "b.png").is_file() and not (out / "a.png").exists()
    assert len(json.loads((out / "predict.json").read_text())["failures"]) == 5

    # an existing OUT is refused without --force, kept intact, and replaced with it
    before = (out / "b.png").read_bytes()
    assert cli.main(["predict", "--run", str(run_dir), "--input", str(good / "b.png"), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "b.png").read_bytes() == before
    args = ["predict", "--run", str(run_dir), "--input", str(good / "b.png"), "--out", str(out), "--force"]
    assert cli.main(args) == 0


def test_nothing_usable_is_an_error(run_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match="no image to predict") as info:
        predict_images(run_dir, [tmp_path / "in"], tmp_path / "out")
    assert "zero.png: file is empty" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["multiclass", "multitask"])
def test_task_outputs(mode, synthetic_root, test_images, tmp_path):
    """Multiclass runs add a class map that partitions the lesion mask; multitask runs add the predicted label."""
    train(tiny_config(synthetic_root, tmp_path / "runs", "train.epochs=1", f"task.mode={mode}"))
    run = tmp_path / "runs" / "demo" / "busi" / "unet"
    out = tmp_path / "out"
    predict_images(run, test_images[:3], out, save_probabilities=True)
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    for path in test_images[:3]:
        mask = read_mask(out / f"{path.stem}.png")
        probs = np.load(out / f"{path.stem}_prob.npz")
        if mode == "multiclass":
            classes = np.asarray(Image.open(out / f"{path.stem}_classes.png"))
            assert classes.shape == mask.shape and set(np.unique(classes)) <= {0, 1, 2}
            np.testing.assert_array_equal(classes > 0, mask)
            assert probs["classes"].shape == (*mask.shape, 3)
        else:
            assert not (out / f"{path.stem}_classes.png").exists()
            assert probs["label"].shape == (3,) and probs["label"].sum() == pytest.approx(1.0, abs=1e-5)
    if mode == "multitask":
        assert set(table["label"]) <= {"normal", "benign", "malignant"} and (table["label"] != "").all()
    else:
        assert (table["label"] == "").all()
