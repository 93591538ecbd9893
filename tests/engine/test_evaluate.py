"""The evaluator on a trained two-fold run: per-image files, summary rows, the ensemble recomputed by hand,
original-resolution scoring, TTA, and the refusals (missing folds, changed manifest, foreign checkpoints)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from engine_testdata import tiny_config
from PIL import Image

from busbench import cli
from busbench.config import config_from_file, load_config, save_config
from busbench.data.loader import build_test_dataset, network_input
from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine import checkpoint as ckpt
from busbench.engine.evaluate import PER_IMAGE_COLUMNS, SUMMARY_COLUMNS, evaluate_run
from busbench.engine.train import train
from busbench.errors import ConfigError, DataError, ModelError
from busbench.models import create_model
from busbench.report.aggregate import aggregate


@pytest.fixture(scope="module")
def trained_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_run")
    train(tiny_config(synthetic_root, out))
    return out / "demo" / "busi" / "unet"


@pytest.fixture(scope="module")
def evaluated(trained_run: Path) -> Path:
    return evaluate_run(trained_run)


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("test", "summary.csv", ".lock"))
    return dest


def fold_models(run: Path, n: int = 2) -> list[torch.nn.Module]:
    models = []
    for k in range(n):
        model = create_model("unet", in_channels=1, num_classes=1, image_size=32, base_width=4)
        path = run / f"fold{k}" / "checkpoint_best.pt"
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        models.append(model.eval())
    return models


def content(a: np.ndarray, ds, i: int) -> np.ndarray:
    """The letterbox content of a network-resolution array: what busbench scores at network resolution."""
    g = ds.letterbox_info(i)
    return a[g.pad_top : g.pad_top + g.content_hw[0], g.pad_left : g.pad_left + g.content_hw[1]]


def numpy_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU with the empty-mask convention (both empty: 1)."""
    inter, total, union = (pred & gt).sum(), pred.sum() + gt.sum(), (pred | gt).sum()
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / union


def test_outputs_and_summary_columns(evaluated, trained_run, synthetic_root):
    assert evaluated == trained_run / "summary.csv"
    manifest = pd.read_csv(synthetic_root / "manifests" / "busi.csv")
    test_ids = sorted(manifest.loc[manifest["split"] == "test", "sample_id"])
    for name in ("fold0", "fold1", "ensemble"):
        df = pd.read_csv(trained_run / "test" / f"{name}_per_image.csv")
        assert list(df.columns) == list(PER_IMAGE_COLUMNS)
        assert sorted(df["sample_id"]) == test_ids
        assert df[["dice", "iou", "hd95", "precision", "recall", "specificity"]].notna().all().all()
    summary = pd.read_csv(evaluated, dtype={"fold": str})
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    assert summary["fold"].tolist() == ["0", "1", "mean", "std", "ensemble"]
    assert (summary["dataset"] == "busi").all() and (summary["model"] == "unet").all()
    assert (summary["n_test"] == len(test_ids)).all()
    folds = summary.iloc[:2]
    for col in (
        "dice",
        "iou",
        "hd95",
        "precision",
        "recall",
        "dice_lesion",
        "hd95_lesion",
        "hd95_penalised",
        "normal_fp_rate",
        "params_m",
        "gmacs",
        "best_epoch",
        "train_seconds",
    ):
        assert folds[col].notna().all(), col
    params = sum(p.numel() for p in create_model("unet", base_width=4, image_size=32).parameters())
    assert folds["params_m"].iloc[0] == pytest.approx(params / 1e6)
    assert summary.set_index("fold").loc["ensemble", "params_m"] == pytest.approx(2 * params / 1e6)


def test_fold_rows_summarise_their_per_image_files(evaluated, trained_run, synthetic_root):
    summary = pd.read_csv(evaluated, dtype={"fold": str}).set_index("fold")
    manifest = pd.read_csv(synthetic_root / "manifests" / "busi.csv")
    for name in ("0", "1", "ensemble"):
        src = f"fold{name}" if name != "ensemble" else name
        df = pd.read_csv(trained_run / "test" / f"{src}_per_image.csv")
        row = summary.loc[name]
        assert row["dice"] == pytest.approx(df["dice"].mean())
        assert row["hd95"] == pytest.approx(df["hd95"].mean())
        lesion = df["label"] != "normal"
        assert row["dice_lesion"] == pytest.approx(df.loc[lesion, "dice"].mean())
        assert row["hd95_penalised"] == int(df["penalised"].sum())
        normal = df["label"] == "normal"
        assert row["normal_fp_rate"] == pytest.approx((~df.loc[normal, "pred_empty"]).mean())
    for k in (0, 1):
        best = ckpt.load_checkpoint(trained_run / f"fold{k}" / "checkpoint_best.pt")
        assert summary.loc[str(k), "best_epoch"] == best["epoch"]
    assert set(manifest["label"]) >= {"normal", "benign", "malignant"}


def test_mean_and_std_rows_are_over_fold_models(evaluated):
    summary = pd.read_csv(evaluated, dtype={"fold": str}).set_index("fold")
    for col in ("dice", "iou", "hd95", "recall", "normal_fp_rate"):
        values = summary.loc[["0", "1"], col].astype(float).to_numpy()
        assert summary.loc["mean", col] == pytest.approx(values.mean())
        assert summary.loc["std", col] == pytest.approx(values.std(ddof=1))


def test_ensemble_is_the_mean_of_fold_probabilities(evaluated, trained_run):
    cfg = config_from_file(trained_run / "config.yaml")
    ds = build_test_dataset(cfg, "busi")
    models = fold_models(trained_run)
    per_image = pd.read_csv(trained_run / "test" / "ensemble_per_image.csv").set_index("sample_id")
    fold0 = pd.read_csv(trained_run / "test" / "fold0_per_image.csv").set_index("sample_id")
    with torch.inference_mode():
        for i in range(len(ds)):
            item = ds[i]
            x = network_input(item["image"][None], cfg.data.normalize)
            probs = [content(torch.sigmoid(m(x))[0, 0].numpy(), ds, i) for m in models]
            gt = content(item["mask"][0].numpy() > 0.5, ds, i)
            sid = ds.rows["sample_id"][i]
            pred = np.mean(probs, axis=0) >= 0.5
            dice, iou = numpy_scores(pred, gt)
            assert per_image.loc[sid, "dice"] == pytest.approx(dice, abs=1e-9)
            assert per_image.loc[sid, "iou"] == pytest.approx(iou, abs=1e-9)
            assert per_image.loc[sid, "gt_empty"] == (not gt.any())
            assert fold0.loc[sid, "dice"] == pytest.approx(numpy_scores(probs[0] >= 0.5, gt)[0], abs=1e-9)
            # letterbox padding is not scored: no true negatives there, worst case = diagonal of the content
            tn, fp = int((~pred & ~gt).sum()), int((pred & ~gt).sum())
            assert per_image.loc[sid, "specificity"] == pytest.approx(tn / (tn + fp) if tn + fp else 1.0)
            if per_image.loc[sid, "penalised"]:
                assert per_image.loc[sid, "hd95"] == pytest.approx(math.hypot(*gt.shape))
    assert (per_image["hd95"] <= math.hypot(32, 32)).all()
    padded = [i for i in range(len(ds)) if ds.letterbox_info(i).content_hw != (32, 32)]
    assert padded, "the synthetic images should not all be square"


def test_tta_averages_the_flipped_prediction(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    evaluate_run(run, ["eval.tta=true"])
    cfg = config_from_file(run / "config.yaml")
    ds = build_test_dataset(cfg, "busi")
    (model,) = fold_models(run, 1)
    per_image = pd.read_csv(run / "test" / "fold0_per_image.csv").set_index("sample_id")
    with torch.inference_mode():
        for i in range(len(ds)):
            x = network_input(ds[i]["image"][None], cfg.data.normalize)
            prob = 0.5 * (
                torch.sigmoid(model(x)) + torch.flip(torch.sigmoid(model(torch.flip(x, [-1]))), [-1])
            )
            gt = content(ds[i]["mask"][0].numpy() > 0.5, ds, i)
            expected = numpy_scores(content(prob[0, 0].numpy(), ds, i) >= 0.5, gt)[0]
            assert per_image.loc[ds.rows["sample_id"][i], "dice"] == pytest.approx(expected, abs=1e-9)
    assert (pd.read_csv(run / "summary.csv")["tta"]).all()


def test_original_resolution_scores_against_original_masks(trained_run, tmp_path, synthetic_root):
    run = copy_run(trained_run, tmp_path / "run")
    evaluate_run(run, ["eval.resolution=original"])
    per_image = pd.read_csv(run / "test" / "ensemble_per_image.csv").set_index("sample_id")
    manifest = pd.read_csv(synthetic_root / "manifests" / "busi.csv").set_index("sample_id")
    for sid, row in per_image.iterrows():
        h, w = manifest.loc[sid, ["height", "width"]]
        mask = np.asarray(Image.open(synthetic_root / "derived" / manifest.loc[sid, "mask_path"])) > 0
        assert mask.shape == (h, w)
        assert row["gt_empty"] == (not mask.any())
        if row["penalised"]:
            assert row["hd95"] == pytest.approx(math.hypot(h, w))  # worst case at the original size
    summary = pd.read_csv(run / "summary.csv")
    assert (summary["resolution"] == "original").all()
    network = pd.read_csv(trained_run / "test" / "ensemble_per_image.csv").set_index("sample_id")
    # the same predictions, scored at another resolution: emptiness agrees, scores stay close
    assert (network["pred_empty"] == per_image.loc[network.index, "pred_empty"]).mean() >= 0.8
    assert abs(network["dice"].mean() - per_image["dice"].mean()) < 0.15


def test_max_directed_hd95_is_at_least_pooled(trained_run, evaluated, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    evaluate_run(run, ["eval.hd95_mode=max_directed"])
    pooled = pd.read_csv(trained_run / "test" / "ensemble_per_image.csv")["hd95"]
    directed = pd.read_csv(run / "test" / "ensemble_per_image.csv")["hd95"]
    assert (directed >= pooled - 1e-9).all()


def test_missing_fold_is_an_error_naming_it(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "fold1" / "checkpoint_best.pt").unlink()
    with pytest.raises(DataError, match=r"fold\(s\) \[1\] have no checkpoint_best\.pt.*--fold 1"):
        evaluate_run(run)
    assert not (run / "summary.csv").exists() and not (run / "test").exists()


def test_unfinished_fold_is_an_error(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "fold0" / "done.json").unlink()
    with pytest.raises(DataError, match=r"fold\(s\) \[0\] have not finished training"):
        evaluate_run(run)


def test_changed_manifest_is_refused(trained_run, synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data, ignore=shutil.ignore_patterns("cache"))
    path = data / "manifests" / "busi.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    test = df.index[df["split"] == "test"]
    df.loc[test[0], "split"], df.loc[test[0], "fold"] = "dev", "0"  # a test image moved into training folds
    df.to_csv(path, index=False, lineterminator="\n")
    run = copy_run(trained_run, tmp_path / "run")
    with pytest.raises(DataError, match="manifest .* changed since the run was trained"):
        evaluate_run(run, [f"data.data_root={data}"])


def test_training_keys_cannot_be_overridden_at_test_time(trained_run):
    with pytest.raises(ConfigError, match="only eval.*can change at test time"):
        evaluate_run(trained_run, ["model.params.base_width=8"])


def test_checkpoint_of_another_config_is_refused(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    cfg = config_from_file(run / "config.yaml")
    cfg.train.lr = 0.5
    save_config(cfg, run / "config.yaml")
    with pytest.raises(ModelError, match="trained with another configuration"):
        evaluate_run(run)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(DataError, match="config.yaml not found"):
        evaluate_run(tmp_path)


def test_tiny_config_is_what_was_trained(trained_run, synthetic_root):
    cfg = config_from_file(trained_run / "config.yaml")
    expected = tiny_config(synthetic_root, trained_run.parents[2])
    assert ckpt.training_hash(cfg) == ckpt.training_hash(expected)


def test_union_run_scores_each_test_split_separately(tmp_path):
    root = tmp_path / "data"
    synthesize("busi", root / "raw" / "BUSI", n=20, seed=1)
    synthesize("busbra", root / "raw" / "BUSBRA", n=20, seed=2)
    prepare(["busi", "busbra"], data_root=root, folds=2, test_size=0.25, progress=False)
    train(tiny_config(root, tmp_path / "out", "data.dataset=[busi, busbra]", "train.epochs=1"))
    run = tmp_path / "out" / "demo" / "busi+busbra" / "unet"
    val = pd.read_csv(run / "fold0" / "val_per_image.csv")
    assert set(val["dataset_key"]) == {"busi", "busbra"}

    summary = pd.read_csv(evaluate_run(run), dtype={"fold": str})
    assert summary["dataset"].tolist() == ["busi"] * 5 + ["busbra"] * 5
    assert (summary["train_data"] == "busi+busbra").all()
    ensemble = pd.read_csv(run / "test" / "ensemble_per_image.csv")
    for key in ("busi", "busbra"):
        manifest = pd.read_csv(root / "manifests" / f"{key}.csv")
        test_ids = set(manifest.loc[manifest["split"] == "test", "sample_id"])
        rows = summary[summary["dataset"] == key]
        assert (rows["n_test"] == len(test_ids)).all()
        assert set(ensemble.loc[ensemble["dataset_key"] == key, "sample_id"]) == test_ids
        scored = ensemble[ensemble["dataset_key"] == key]
        assert rows.set_index("fold").loc["ensemble", "dice"] == pytest.approx(scored["dice"].mean())
    board, _ = aggregate([tmp_path / "out"])
    assert sorted(pd.read_csv(board)["dataset"]) == ["busbra", "busi"]


def test_per_image_files_carry_patient_and_group(evaluated, trained_run, synthetic_root):
    manifest = pd.read_csv(synthetic_root / "manifests" / "busi.csv", dtype=str).set_index("sample_id")
    per_image = pd.read_csv(trained_run / "test" / "ensemble_per_image.csv", dtype=str).set_index("sample_id")
    for column in ("patient_id", "group_id"):
        assert per_image[column].equals(manifest.loc[per_image.index, column])


def test_tagged_test_with_device_and_cache_overrides_lives_beside_the_default(trained_run, evaluated, tmp_path):
    """busbench test --set train.device=cpu data.cache=false eval.threshold=0.4 --tag NAME: runs, writes
    test_NAME/ with its own summary, leaves the default results alone and records both thresholds."""
    run = copy_run(trained_run, tmp_path / "run")
    evaluate_run(run)
    default = {p: p.read_bytes() for p in [run / "summary.csv", *sorted((run / "test").iterdir())]}
    overrides = ["train.device=cpu", "data.cache=false", "eval.threshold=0.4"]
    assert cli.main(["test", "--run", str(run), "--set", *overrides, "--tag", "t04"]) == 0
    assert all(p.read_bytes() == data for p, data in default.items())
    tagged = pd.read_csv(run / "test_t04" / "summary.csv")
    assert (tagged["threshold"] == 0.4).all() and (tagged["image_size"] == 32).all()
    assert (tagged["selection_threshold"] == 0.5).all()
    assert sorted(p.name for p in (run / "test_t04").iterdir()) == [
        "ensemble_per_image.csv",
        "fold0_per_image.csv",
        "fold1_per_image.csv",
        "summary.csv",
    ]
    payload = ckpt.load_checkpoint(run / "fold0" / "checkpoint_best.pt")
    assert payload["selection_threshold"] == 0.5
    with pytest.raises(ConfigError, match="--tag"):
        evaluate_run(run, tag="../x")


def test_mask_rcnn_refuses_a_threshold_below_its_mask_threshold():
    """Mask R-CNN zeroes instance-mask probabilities below model.params.mask_threshold: a lower eval.threshold
    would silently act as that threshold, so it is refused, at training and at test time alike."""
    with pytest.raises(ConfigError, match=r"eval.threshold=0.3 would act as 0.5"):
        load_config(None, ["model.name=maskrcnn", "eval.threshold=0.3"])
    cfg = load_config(None, ["model.name=maskrcnn", "eval.threshold=0.3", "model.params.mask_threshold=0.3"])
    assert cfg.eval.threshold == 0.3
