"""The literature methods end to end on small synthetic datasets: synth -> prepare -> train -> test.

Each run is the demo experiment shrunk to seconds (32 px, a 4-channel-wide network, two folds, one or two epochs).
The networks barely learn in that time; what is checked is that every method trains, resumes and is scored as
documented, by recomputing the evaluator's numbers independently from the saved checkpoints.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import confusion_matrix

from busbench.config import Config, load_config
from busbench.data.decode import read_class_map
from busbench.data.geometry import restore
from busbench.data.loader import build_datasets, build_test_dataset, network_input
from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine import checkpoint as ckpt
from busbench.engine import tasks
from busbench.engine.evaluate import SUMMARY_COLUMNS, evaluate_run
from busbench.engine.train import FoldTrainer, train
from busbench.methods.multiclass import CLASS_NAMES, LABEL_TO_CLASS, lesion_probability, predicted_classes
from busbench.methods.multitask import CLASS_LABELS, MultiTaskModel, oversampling_factors
from busbench.metrics import per_class
from busbench.models import create_model

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiments" / "demo.yaml"
RAW_FOLDERS = {"busi": "BUSI", "bus_uclm": "BUS-UCLM"}


def prepared(root: Path, key: str, n: int = 24) -> Path:
    synthesize(key, root / "raw" / RAW_FOLDERS[key], n=n, seed=0)
    prepare([key], data_root=root, folds=2, test_size=0.25, seed=42, progress=False)
    return root


@pytest.fixture(scope="module")
def busi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared(tmp_path_factory.mktemp("busi"), "busi")


@pytest.fixture(scope="module")
def uclm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared(tmp_path_factory.mktemp("uclm"), "bus_uclm")


def config(data_root: Path, out: Path, key: str, *sets: str) -> Config:
    return load_config(
        DEMO,
        [
            f"data.data_root={data_root}",
            f"output.root={out}",
            f"data.dataset={key}",
            "data.image_size=32",
            "data.folds=2",
            "model.params.base_width=4",
            "train.epochs=2",
            "train.batch_size=4",
            "eval.batch_size=8",
            "output.tensorboard=false",
            *sets,
        ],
    )


def fold_model(cfg: Config, fold: int) -> torch.nn.Module:
    """Fold ``fold``'s best weights in a network built here, not by the trainer's own builder."""
    out = 3 if cfg.task.mode == "multiclass" else 1
    net = create_model(cfg.model.name, in_channels=1, num_classes=out, image_size=32, **cfg.model.params)
    if cfg.task.mode == "multitask":
        net = MultiTaskModel(net, num_classes=3, dropout=cfg.task.cls_dropout)
    net.load_state_dict(ckpt.load_checkpoint(cfg.run_dir() / f"fold{fold}" / ckpt.BEST)["model"])
    return net.eval()


def per_image(run: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run / "test" / f"{name}_per_image.csv").set_index("sample_id")


# --------------------------------------------------------------------------------------------------------------
# multiclass


def check_multiclass_run(cfg: Config, original: bool = False) -> None:
    """Recompute fold 0's and the ensemble's binary and per-class scores from the checkpoints and compare."""
    run = cfg.run_dir()
    models = [fold_model(cfg, k) for k in range(2)]
    ds = build_test_dataset(cfg)
    tables = {name: per_image(run, name) for name in ("fold0", "ensemble")}
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            x = network_input(item["image"][None], cfg.data.normalize)
            probs = [torch.softmax(m(x), dim=1) for m in models]
            sources = {"fold0": probs[0], "ensemble": (probs[0] + probs[1]) / 2}
            sid = ds.rows["sample_id"][i]
            for name, p in sources.items():
                if original:
                    row = ds.rows.iloc[i]
                    path = row.get("class_mask_path")
                    if isinstance(path, str) and path:  # BUS-UCLM: the colour mask's classes
                        gt = read_class_map(path)
                    else:
                        gt = ds.original_mask(i).astype(np.uint8) * LABEL_TO_CLASS[row["label"]]
                    back = restore(p[0].numpy().transpose(1, 2, 0), ds.letterbox_info(i), gt.shape)
                    lesion = 1 - back[..., 0] >= cfg.eval.threshold
                    labels = np.where(lesion, back[..., 1:].argmax(axis=-1) + 1, 0)
                else:
                    gt = item["class_map"].numpy()
                    labels = predicted_classes(torch.log(p), cfg.eval.threshold)[0].numpy()
                    lesion = (lesion_probability(torch.log(p))[0, 0] >= cfg.eval.threshold).numpy()
                    assert np.array_equal(labels > 0, lesion)
                    # at network resolution only the letterbox content is scored
                    g = ds.letterbox_info(i)
                    box = (slice(g.pad_top, g.pad_top + g.content_hw[0]), slice(g.pad_left, g.pad_left + g.content_hw[1]))
                    gt, labels = gt[box], labels[box]
                expected = per_class(labels, gt, 3, class_names=CLASS_NAMES)
                got = tables[name].loc[sid]
                for key in (
                    "dice",
                    "iou",
                    "hd95",
                    "dice_benign",
                    "hd95_benign",
                    "dice_malignant",
                    "iou_malignant",
                ):
                    assert got[key] == pytest.approx(expected[key], abs=1e-6), (name, sid, key)

    summary = pd.read_csv(run / "summary.csv", dtype={"fold": str})
    assert list(summary.columns) == [*SUMMARY_COLUMNS, *tasks.MulticlassTask.summary_columns]
    summary = summary.set_index("fold")
    ens = tables["ensemble"]
    assert summary.loc["ensemble", "dice_benign"] == pytest.approx(ens["dice_benign"].mean())
    benign = ens[ens["label"] == "benign"]
    assert summary.loc["ensemble", "dice_benign_only"] == pytest.approx(benign["dice_benign"].mean())
    assert summary.loc["ensemble", "hd95_penalised_malignant"] == ens["penalised_malignant"].sum()
    folds = summary.loc[["0", "1"], "iou_malignant"]
    assert summary.loc["mean", "iou_malignant"] == pytest.approx(folds.mean())


def test_multiclass_on_bus_uclm_colour_masks(uclm_root, tmp_path):
    cfg = config(uclm_root, tmp_path, "bus_uclm", "task.mode=multiclass")
    train_ds, _ = build_datasets(cfg, 0)
    classes = set(
        np.unique(np.concatenate([train_ds[i]["class_map"].numpy().ravel() for i in range(len(train_ds))]))
    )
    assert classes == {0, 1, 2}  # BUS-UCLM's green/red masks give both lesion classes
    train(cfg)
    evaluate_run(cfg.run_dir())
    check_multiclass_run(cfg)
    val = pd.read_csv(cfg.run_dir() / "fold0" / "val_per_image.csv")
    assert {"dice_benign", "hd95_malignant"} <= set(val.columns)

    evaluate_run(cfg.run_dir(), ["eval.resolution=original"])
    check_multiclass_run(cfg, original=True)


def test_multiclass_on_busi_label_coloured_masks(busi_root, tmp_path):
    cfg = config(busi_root, tmp_path, "busi", "task.mode=multiclass", "train.epochs=1", "train.loss=bce")
    train_ds, _ = build_datasets(cfg, 0)
    for i in range(len(train_ds)):
        item = train_ds[i]
        assert set(np.unique(item["class_map"].numpy())) <= {
            0,
            item["label"],
        }  # lesion pixels carry the label
    train(cfg)
    evaluate_run(cfg.run_dir())
    check_multiclass_run(cfg)


# --------------------------------------------------------------------------------------------------------------
# multitask


def test_multitask_on_busi_with_oversampling_and_refinement(busi_root, tmp_path):
    cfg = config(busi_root, tmp_path, "busi", "task.mode=multitask", "task.oversample=true")
    trainer = FoldTrainer(cfg, 0, tmp_path / "probe", torch.device("cpu"), {})
    labels = [CLASS_LABELS[int(v)] for v in trainer.train_ds.labels]
    factors = oversampling_factors(labels)
    assert max(factors.values()) > 1  # the synthetic training fold is unbalanced
    seen = Counter(labels[i] for i, _ in trainer.train_loader.sampler)
    assert seen == Counter({k: v * factors[k] for k, v in Counter(labels).items()})
    assert len(trainer.val_loader.sampler) == len(trainer.val_ds)  # validation is never oversampled
    del trainer

    train(cfg)
    run = cfg.run_dir()
    evaluate_run(run, ["task.refine=false"])
    raw = {name: per_image(run, name) for name in ("fold0", "fold1", "ensemble")}
    evaluate_run(run)
    refined = {name: per_image(run, name) for name in ("fold0", "fold1", "ensemble")}
    report = json.loads((run / "test" / tasks.CLASSIFICATION_FILE).read_text())
    summary = pd.read_csv(run / "summary.csv", dtype={"fold": str}).set_index("fold")
    assert report["refine"] is True and report["classes"] == list(CLASS_LABELS)

    # fold 0's image probabilities recomputed from its checkpoint (before refinement)
    model = fold_model(cfg, 0)
    ds = build_test_dataset(cfg)
    with torch.no_grad():
        x = network_input(torch.stack([ds[i]["image"] for i in range(len(ds))]), cfg.data.normalize)
        cls = torch.softmax(model(x)[1], dim=1).numpy()
    fold0 = raw["fold0"].loc[ds.rows["sample_id"]]
    np.testing.assert_allclose(fold0[[f"prob_{c}" for c in CLASS_LABELS]].to_numpy(), cls, atol=1e-5)
    assert fold0["pred_label"].tolist() == [CLASS_LABELS[k] for k in cls.argmax(axis=1)]

    for name, table in refined.items():
        before = raw[name].loc[table.index]
        # the rule holds: normal => empty mask, non-empty mask => not normal (probability 0)
        assert table.loc[table["pred_label"] == "normal", "pred_empty"].all()
        assert (table.loc[~table["pred_empty"], "prob_normal"] == 0).all()
        # and it is exactly the refinement of the unrefined outputs
        assert (
            table["pred_empty"].tolist()
            == (before["pred_empty"] | (before["pred_label"] == "normal")).tolist()
        )
        assert table["pred_label"].tolist() == before["pred_label"].tolist()
        lesion = ~table["pred_empty"]
        rest = before.loc[lesion, ["prob_benign", "prob_malignant"]]
        expected = rest.div(rest.sum(axis=1), axis=0)
        np.testing.assert_allclose(table.loc[lesion, ["prob_benign", "prob_malignant"]], expected, atol=1e-6)

        # classification scores: summary row, classification.json and the per-image labels agree
        row = "ensemble" if name == "ensemble" else name.removeprefix("fold")
        scores = report["sources"][name]["busi"]
        accuracy = float((table["pred_label"] == table["label"]).mean())
        assert summary.loc[row, "accuracy"] == pytest.approx(accuracy) == pytest.approx(scores["accuracy"])
        matrix = confusion_matrix(table["label"], table["pred_label"], labels=list(CLASS_LABELS))
        assert scores["confusion"] == matrix.tolist()
        assert summary.loc[row, "macro_f1"] == pytest.approx(scores["macro_f1"])
        for c in CLASS_LABELS:
            truth = table["label"] == c
            if truth.any():
                recall = float((table.loc[truth, "pred_label"] == c).mean())
                assert summary.loc[row, f"recall_{c}"] == pytest.approx(recall)
    assert summary.loc["mean", "accuracy"] == pytest.approx(summary.loc[["0", "1"], "accuracy"].mean())
    assert "pred_label" in pd.read_csv(run / "fold1" / "val_per_image.csv").columns


# --------------------------------------------------------------------------------------------------------------
# adversarial deep supervision


ADVERSARIAL = (
    "model.name=unet_ds",
    "train.strategy=adversarial_ds",
    "train.adv_disc_width=8",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
)


def test_adversarial_deep_supervision_trains_resumes_and_tests(busi_root, tmp_path, monkeypatch):
    straight = config(busi_root, tmp_path / "straight", "busi", *ADVERSARIAL)
    train(straight, folds=[0])

    resumed = config(busi_root, tmp_path / "resumed", "busi", *ADVERSARIAL)
    real_step, calls = tasks.AdversarialTraining.step, {"n": 0}
    manifest = pd.read_csv(busi_root / "manifests" / "busi.csv")
    per_epoch = (
        int(((manifest["split"] == "dev") & (manifest["fold"] != 0)).sum()) // resumed.train.batch_size
    )

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > per_epoch:  # Ctrl-C in the first batch of epoch 2
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(tasks.AdversarialTraining, "step", step)
        with pytest.raises(KeyboardInterrupt):
            train(resumed, folds=[0])
    fold0 = resumed.run_dir() / "fold0"
    after_one = ckpt.load_checkpoint(fold0 / ckpt.LAST)
    assert after_one["epoch"] == 1
    assert after_one["strategy"]["discriminator_optimizer"]["state"]  # Adam moments of the discriminators
    train(resumed, folds=[0])

    a = ckpt.load_checkpoint(straight.run_dir() / "fold0" / ckpt.LAST)
    b = ckpt.load_checkpoint(fold0 / ckpt.LAST)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    discriminators = a["strategy"]["discriminators"]
    assert len({k.split(".")[0] for k in discriminators}) == 4  # one per decoder stage
    for key in discriminators:
        assert torch.equal(discriminators[key], b["strategy"]["discriminators"][key]), key
        assert key.endswith("num_batches_tracked") or not torch.equal(
            discriminators[key], after_one["strategy"]["discriminators"][key]
        ), f"{key} did not train in epoch 2"
    torch.testing.assert_close(
        a["strategy"]["discriminator_optimizer"]["state"], b["strategy"]["discriminator_optimizer"]["state"]
    )

    train(resumed)  # fold 1
    summary = pd.read_csv(evaluate_run(resumed.run_dir()), dtype={"fold": str}).set_index("fold")
    assert list(summary.index) == ["0", "1", "mean", "std", "ensemble"]
    assert np.isfinite(summary["dice"]).all()
    assert summary.loc["ensemble", "dice"] == pytest.approx(
        per_image(resumed.run_dir(), "ensemble")["dice"].mean()
    )


# --------------------------------------------------------------------------------------------------------------
# Mask R-CNN


@pytest.mark.slow
def test_mask_rcnn_trains_on_its_own_losses_and_tests(busi_root, tmp_path):
    # fewer proposals and detections than torchvision's defaults (made for 800 px COCO images with many objects)
    small = (
        "{rpn_post_nms_top_n_train: 200, rpn_post_nms_top_n_test: 50, box_batch_size_per_image: 64, "
        "box_detections_per_img: 5}"
    )
    sets = ("model.name=maskrcnn", f"model.params={small}", "train.epochs=1", "train.lr=1e-4")
    cfg = config(busi_root, tmp_path, "busi", *sets)
    train(cfg)
    log = pd.read_csv(cfg.run_dir() / "fold0" / "train_log.csv")
    assert np.isfinite(log["train_loss"]).all() and (log["train_loss"] > 0).all()
    summary = pd.read_csv(evaluate_run(cfg.run_dir()), dtype={"fold": str}).set_index("fold")
    ens = per_image(cfg.run_dir(), "ensemble")
    assert summary.loc["ensemble", "n_test"] == len(ens)
    assert summary.loc["ensemble", "dice"] == pytest.approx(ens["dice"].mean())
