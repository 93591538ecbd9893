"""The trainer on a small synthetic dataset: files it writes, determinism, refusals, divergence, CPU fallbacks,
and the pieces it is built from (losses, schedules, RNG state, checkpoints)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import segmentation_models_pytorch.losses as smp_losses
import torch
import torch.nn.functional as F
from engine_testdata import tiny_config

from busbench.config import config_from_file
from busbench.engine import checkpoint as ckpt
from busbench.engine import train as train_mod
from busbench.engine.seeding import rng_state, set_rng_state
from busbench.engine.train import Schedule, TrainingDiverged, lr_factor, train
from busbench.errors import BusbenchError, ConfigError, DataError, ModelError
from busbench.losses import LOSS_NAMES, build_criterion, build_loss, deep_supervision_weights
from busbench.models import create_model


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(path)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def one_fold(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Fold 0 trained for 2 epochs; returns (output root, fold folder)."""
    out = tmp_path_factory.mktemp("one_fold")
    cfg = tiny_config(synthetic_root, out, "output.tensorboard=true", "output.overlays=2")
    (fold_dir,) = train(cfg, folds=[0])
    return out, fold_dir


# ------------------------------------------------------------------------------------------------ what a fold writes


def test_fold_folder_holds_every_output(one_fold, synthetic_root):
    out, fold_dir = one_fold
    run_dir = out / "demo" / "busi" / "unet"
    assert fold_dir == run_dir / "fold0"
    for name in (
        "checkpoint_last.pt",
        "checkpoint_best.pt",
        "val_per_image.csv",
        "train_log.csv",
        "run.json",
        "done.json",
    ):
        assert (fold_dir / name).is_file(), name
    assert sorted((fold_dir / "tensorboard").glob("events.out.tfevents.*"))
    saved = config_from_file(run_dir / "config.yaml")
    assert saved.data.image_size == 32 and saved.model.params == {"base_width": 4}
    assert not list(fold_dir.glob(".*.pt*")), "temporary checkpoint files left behind"


def test_train_log_has_one_row_per_epoch(one_fold):
    _, fold_dir = one_fold
    log = pd.read_csv(fold_dir / "train_log.csv")
    assert list(log.columns) == ["epoch", "lr", "train_loss", "val_dice", "val_iou", "val_hd95", "seconds"]
    assert log["epoch"].tolist() == [1, 2]
    assert log[["train_loss", "val_dice", "val_iou", "val_hd95"]].notna().all().all()
    assert ((log["val_dice"] >= 0) & (log["val_dice"] <= 1)).all()
    # cosine schedule ends at min_lr after the last step
    assert log["lr"].iloc[-1] == pytest.approx(1e-4)


def test_best_checkpoint_is_the_best_validation_epoch(one_fold, synthetic_root):
    _, fold_dir = one_fold
    log = pd.read_csv(fold_dir / "train_log.csv")
    best = ckpt.load_checkpoint(fold_dir / "checkpoint_best.pt")
    first_max = int(
        log.loc[log["val_dice"].idxmax(), "epoch"]
    )  # strict improvement keeps the earliest maximum
    assert best["epoch"] == first_max
    assert best["best_dice"] == pytest.approx(log["val_dice"].max())
    per_image = pd.read_csv(fold_dir / "val_per_image.csv")
    assert (per_image["epoch"] == first_max).all()
    # the validation fold, and only it: every row is a dev row of fold 0
    manifest = pd.read_csv(synthetic_root / "manifests" / "busi.csv")
    val_ids = set(manifest.loc[(manifest["split"] == "dev") & (manifest["fold"] == 0), "sample_id"])
    assert set(per_image["sample_id"]) == val_ids
    assert per_image["dice"].mean() == pytest.approx(best["best_dice"])
    done = json.loads((fold_dir / "done.json").read_text())
    assert done["best_epoch"] == first_max


def test_validation_metrics_recomputed_from_best_weights(one_fold, synthetic_root):
    """Reload the best weights and score the validation fold independently (plain numpy Dice)."""
    out, fold_dir = one_fold
    from busbench.data.loader import build_datasets, network_input

    cfg = config_from_file(out / "demo" / "busi" / "unet" / "config.yaml")
    _, val_ds = build_datasets(cfg, 0)
    model = create_model("unet", in_channels=1, num_classes=1, image_size=32, base_width=4)
    ckpt.load_model_state(model, ckpt.load_checkpoint(fold_dir / "checkpoint_best.pt"), fold_dir)
    model.eval()
    dice = {}
    with torch.inference_mode():
        for i in range(len(val_ds)):
            item = val_ds[i]
            x = network_input(item["image"][None], cfg.data.normalize)
            pred = torch.sigmoid(model(x))[0, 0].numpy() >= 0.5
            gt = item["mask"][0].numpy() >= 0.5
            denom = pred.sum() + gt.sum()
            dice[val_ds.rows["sample_id"][i]] = 1.0 if denom == 0 else 2 * (pred & gt).sum() / denom
    per_image = pd.read_csv(fold_dir / "val_per_image.csv").set_index("sample_id")
    for sid, value in dice.items():
        assert per_image.loc[sid, "dice"] == pytest.approx(value, abs=1e-9)


def test_run_json_records_provenance(one_fold, synthetic_root):
    _, fold_dir = one_fold
    info = json.loads((fold_dir / "run.json").read_text())
    from busbench.data.manifest import manifest_sha256

    assert info["status"] == "completed"
    assert info["manifest_sha256"] == {"busi": manifest_sha256(synthetic_root / "manifests" / "busi.csv")}
    assert info["seeds"]["train"] == 0
    assert info["torch"] == torch.__version__
    assert info["device"] == "cpu" and info["precision"] == "float32"
    assert info["train_seconds"] > 0
    (session,) = info["sessions"]
    assert session["status"] == "completed" and session["end"] >= session["start"]


def test_checkpoints_load_with_weights_only(one_fold):
    _, fold_dir = one_fold
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        payload = torch.load(fold_dir / name, map_location="cpu", weights_only=True)
        assert payload["busbench_version"] and payload["config_hash"] and payload["model_name"] == "unet"
    last = torch.load(fold_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["finished"] is True
    assert set(last) >= {"optimizer", "scheduler", "scaler", "rng", "best_dice", "bad_rounds", "history"}


def test_done_fold_is_skipped(one_fold, synthetic_root):
    out, fold_dir = one_fold
    before = (fold_dir / "checkpoint_last.pt").stat().st_mtime_ns
    train(tiny_config(synthetic_root, out, "output.tensorboard=true", "output.overlays=2"), folds=[0])
    assert (fold_dir / "checkpoint_last.pt").stat().st_mtime_ns == before


def test_loading_into_another_model_is_a_model_error(one_fold):
    _, fold_dir = one_fold
    wider = create_model("unet", in_channels=1, num_classes=1, image_size=32, base_width=8)
    with pytest.raises(ModelError, match=r"checkpoint_best\.pt.*does not fit.*model\.params"):
        ckpt.load_model_state(
            wider, ckpt.load_checkpoint(fold_dir / "checkpoint_best.pt"), fold_dir / "checkpoint_best.pt"
        )


def test_checkpoint_setup_survives_new_config_keys(one_fold, synthetic_root):
    """A key added to the schema later (at its default) does not set a checkpoint apart from its run; a changed
    setting does, and the message names it."""
    out, fold_dir = one_fold
    cfg = tiny_config(synthetic_root, out, "output.tensorboard=true", "output.overlays=2")
    payload = ckpt.load_checkpoint(fold_dir / "checkpoint_best.pt")
    assert ckpt.setup_differences(payload, cfg) == []
    stored = json.loads(payload["training_config"])
    assert stored["train"]["momentum"] == 0.9  # the schema default
    del stored["train"]["momentum"]  # as if written before train.momentum existed
    older = {**payload, "training_config": json.dumps(stored), "config_hash": "from-an-older-version"}
    assert ckpt.setup_differences(older, cfg) == []
    changed = tiny_config(synthetic_root, out, "train.lr=0.01")
    assert ckpt.setup_differences(payload, changed) == ["train.lr: 0.003 -> 0.01"]


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="damaged or not a busbench checkpoint"):
        ckpt.load_checkpoint(path)


# ------------------------------------------------------------------------------------------------ run directory rules


def test_changed_training_setup_is_refused(one_fold, synthetic_root):
    out, _ = one_fold
    cfg = tiny_config(synthetic_root, out, "output.tensorboard=true", "output.overlays=2", "train.lr=0.01")
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.003 -> 0\.01.*experiment\.name.*--force"):
        train(cfg, folds=[0])


def test_force_deletes_earlier_results(synthetic_root, tmp_path):
    train(tiny_config(synthetic_root, tmp_path, "train.epochs=1"), folds=[0])
    run_dir = tmp_path / "demo" / "busi" / "unet"
    assert (run_dir / "fold0" / "done.json").is_file()
    cfg = tiny_config(synthetic_root, tmp_path, "train.epochs=1", "train.lr=0.01")
    train(cfg, folds=[1], force=True)
    assert not (run_dir / "fold0").exists()
    assert (run_dir / "fold1" / "done.json").is_file()
    assert config_from_file(run_dir / "config.yaml").train.lr == 0.01


def test_reporting_keys_may_change_between_sessions(synthetic_root, tmp_path):
    train(tiny_config(synthetic_root, tmp_path, "train.epochs=1"), folds=[0])
    train(
        tiny_config(synthetic_root, tmp_path, "train.epochs=1", "eval.tta=true", "data.num_workers=1"),
        folds=[1],
    )
    assert config_from_file(tmp_path / "demo" / "busi" / "unet" / "config.yaml").eval.tta is True


def test_unknown_fold_is_refused(synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match=r"--fold must be in 0\.\.1"):
        train(tiny_config(synthetic_root, tmp_path), folds=[2])


def test_fold_count_must_match_the_manifest(synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.folds.*prepared with 2 folds"):
        train(tiny_config(synthetic_root, tmp_path, "data.folds=3"))
    assert not (tmp_path / "demo").exists()


def test_leaking_manifest_is_refused_before_training(synthetic_root, tmp_path):
    """A patient with images in both the test split and a fold: nothing may be trained."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns("cache"))
    path = root / "manifests" / "busi.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    test_row = df.index[df["split"] == "test"][0]
    dev_row = df.index[df["split"] == "dev"][0]
    df.loc[test_row, ["patient_id", "group_id"]] = df.loc[dev_row, ["patient_id", "group_id"]].to_numpy()
    df.to_csv(path, index=False, lineterminator="\n")
    with pytest.raises(DataError, match="audit of .*busi.csv failed") as err:
        train(tiny_config(root, tmp_path / "results"))
    assert df.loc[dev_row, "patient_id"] in str(err.value) or df.loc[dev_row, "group_id"] in str(err.value)
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_weights_and_metrics(synthetic_root, tmp_path):
    runs = []
    for name in ("a", "b"):
        (fold_dir,) = train(
            tiny_config(synthetic_root, tmp_path / name, "train.deterministic=true"), folds=[1]
        )
        runs.append(fold_dir)
    assert_same_weights(weights(runs[0] / "checkpoint_last.pt"), weights(runs[1] / "checkpoint_last.pt"))
    logs = [pd.read_csv(d / "train_log.csv").drop(columns="seconds") for d in runs]
    pd.testing.assert_frame_equal(logs[0], logs[1])
    tables = [pd.read_csv(d / "val_per_image.csv") for d in runs]
    pd.testing.assert_frame_equal(tables[0], tables[1])


def test_other_seed_other_weights(synthetic_root, tmp_path):
    a = train(tiny_config(synthetic_root, tmp_path / "a", "train.epochs=1"), folds=[1])[0]
    b = train(tiny_config(synthetic_root, tmp_path / "b", "train.epochs=1", "train.seed=1"), folds=[1])[0]
    wa, wb = weights(a / "checkpoint_last.pt"), weights(b / "checkpoint_last.pt")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------------------------ divergence, fallbacks


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(synthetic_root, tmp_path, monkeypatch):
    manifest = pd.read_csv(synthetic_root / "manifests" / "busi.csv")
    per_epoch = int(((manifest["split"] == "dev") & (manifest["fold"] != 0)).sum()) // 4  # batch 4, drop_last
    real_build_loss = train_mod.build_loss
    n_batches = {"seen": 0}

    def poisoned(cfg):
        loss = real_build_loss(cfg)

        def forward(outputs, target):
            n_batches["seen"] += 1
            value = loss(outputs, target)
            return value * float("nan") if n_batches["seen"] > per_epoch else value  # epoch 2 diverges

        return forward

    monkeypatch.setattr(train_mod, "build_loss", poisoned)
    cfg = tiny_config(synthetic_root, tmp_path, "train.epochs=3")
    with pytest.raises(
        TrainingDiverged, match=r"loss became nan during epoch 2.*keeps the last good epoch \(1\)"
    ) as err:
        train(cfg, folds=[0])
    assert isinstance(err.value, BusbenchError)
    fold_dir = tmp_path / "demo" / "busi" / "unet" / "fold0"
    last = ckpt.load_checkpoint(fold_dir / "checkpoint_last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (fold_dir / "done.json").exists()
    assert json.loads((fold_dir / "run.json").read_text())["status"] == "diverged"


def test_cuda_only_settings_fall_back_on_cpu(synthetic_root, tmp_path):
    cfg = tiny_config(
        synthetic_root,
        tmp_path,
        "train.epochs=1",
        "train.amp=fp16",
        "train.compile=true",
        "train.channels_last=true",
        "train.accumulate=2",
        "train.grad_clip=1.0",
        "train.optimizer=sgd",
    )
    (fold_dir,) = train(cfg, folds=[0])
    info = json.loads((fold_dir / "run.json").read_text())
    assert info["precision"] == "float32" and info["device"] == "cpu"
    last = ckpt.load_checkpoint(fold_dir / "checkpoint_last.pt")
    assert last["scaler"] == {}  # a disabled gradient scaler has no state
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_cuda_requested_without_gpu_is_a_config_error(synthetic_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="train.device"):
        train(tiny_config(synthetic_root, tmp_path, "train.device=cuda"))


def test_early_stopping_counts_validation_rounds(synthetic_root, tmp_path):
    """A learning rate too small to change the masks: no validation round improves, so patience 1 stops at the
    second validation; with val_every=2 validation runs at epochs 2 and 4."""
    cfg = tiny_config(
        synthetic_root,
        tmp_path,
        "train.epochs=8",
        "train.val_every=2",
        "train.early_stopping=1",
        "train.lr=1e-12",
        "train.min_lr=0",
    )
    (fold_dir,) = train(cfg, folds=[0])
    log = pd.read_csv(fold_dir / "train_log.csv")
    assert log["epoch"].tolist() == [1, 2, 3, 4]
    assert log["val_dice"].isna().tolist() == [True, False, True, False]
    done = json.loads((fold_dir / "done.json").read_text())
    assert done["epochs_run"] == 4 and done["best_epoch"] == 2
    assert done["stop_reason"] == "early stopping after epoch 4"


def test_deep_supervision_model_trains(synthetic_root, tmp_path):
    cfg = tiny_config(
        synthetic_root,
        tmp_path,
        "model.name=unet_ds",
        "train.epochs=1",
        "train.deep_supervision_weights=[1.0, 0.5, 0.25, 0.125]",
    )
    (fold_dir,) = train(cfg, folds=[0])
    assert fold_dir.parent.name == "unet_ds"
    assert (fold_dir / "done.json").is_file()
    bad = tiny_config(
        synthetic_root,
        tmp_path / "bad",
        "model.name=unet_ds",
        "train.epochs=1",
        "train.deep_supervision_weights=[1.0, 0.5]",
    )
    with pytest.raises(ConfigError, match="deep_supervision_weights.*2 weights.*4 outputs"):
        train(bad, folds=[0])


# ------------------------------------------------------------------------------------------------ losses


def _logits_and_target(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(3, 1, 16, 16)
    target[0, 0, 4:10, 5:12] = 1
    target[1, 0, 0:3, 0:16] = 1  # image 2 is empty, as a normal image is
    logits = torch.randn(3, 1, 16, 16, generator=g) * 2
    return logits, target


def test_bce_dice_is_the_weighted_sum_of_bce_and_batch_dice():
    logits, target = _logits_and_target()
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = 1 - 2 * (p * target).sum() / (p.sum() + target.sum())
    for w in (0.5, 0.2):
        value = build_criterion("bce_dice", bce_weight=w)(logits, target)
        assert value.item() == pytest.approx((w * bce + (1 - w) * dice).item(), rel=1e-5)


def test_tversky_weights_misses_more_than_false_alarms():
    logits, target = _logits_and_target()
    p = torch.sigmoid(logits)
    tp, fp, fn = (p * target).sum(), (p * (1 - target)).sum(), ((1 - p) * target).sum()
    expected = 1 - tp / (tp + 0.3 * fp + 0.7 * fn)
    assert build_criterion("tversky")(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_is_finite_and_decreases_when_the_prediction_improves(name):
    logits, target = _logits_and_target()
    criterion = build_criterion(name)
    good = (target * 2 - 1) * 4.0  # confident and right
    assert torch.isfinite(criterion(logits, target))
    assert criterion(good, target) < criterion(-good, target)
    x = logits.clone().requires_grad_(True)
    criterion(x, target).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dice_loss_on_an_all_empty_batch_is_defined():
    empty = torch.zeros(2, 1, 8, 8)
    assert torch.isfinite(build_criterion("bce_dice")(torch.randn(2, 1, 8, 8), empty))


def test_deep_supervision_default_and_custom_weights():
    assert deep_supervision_weights(1, None) == [1.0]
    assert deep_supervision_weights(4, None) == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert deep_supervision_weights(2, [3.0, 1.0]) == pytest.approx([0.75, 0.25])
    with pytest.raises(ConfigError, match="deep_supervision_weights.*3 weights.*2 outputs"):
        deep_supervision_weights(2, [1.0, 1.0, 1.0])

    logits, target = _logits_and_target()
    aux = torch.zeros_like(logits)
    cfg = tiny_config(Path("unused"), Path("unused")).train
    loss = build_loss(cfg)
    base = build_criterion(cfg.loss, cfg.bce_weight)
    expected = 0.5 * base(logits, target) + 0.5 * base(aux, target)
    assert loss([logits, aux], target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(logits, target).item() == pytest.approx(base(logits, target).item(), rel=1e-6)


def test_smp_losses_are_used():
    crit = build_criterion("bce_dice")
    kinds = {type(m) for m in crit.modules()}
    assert smp_losses.DiceLoss in kinds and smp_losses.SoftBCEWithLogitsLoss in kinds


# ------------------------------------------------------------------------------------------------ schedules


def _cfg(*overrides):
    return tiny_config(Path("unused"), Path("unused"), *overrides)


def test_cosine_with_warmup_reaches_min_lr():
    cfg = _cfg("train.epochs=10", "train.warmup_epochs=2", "train.lr=1e-3", "train.min_lr=1e-5")
    steps = 5
    factors = [lr_factor(s, cfg, steps) for s in range(10 * steps + 1)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup over 2 epochs
    assert factors[10] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.01)  # min_lr / lr
    middle = 10 + 20  # half-way through the decay
    assert factors[middle] == pytest.approx(0.01 + 0.99 * 0.5)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_poly_decay():
    cfg = _cfg("train.epochs=4", "train.scheduler=poly", "train.lr=1e-2", "train.min_lr=0")
    assert lr_factor(0, cfg, 10) == pytest.approx(1.0)
    assert lr_factor(20, cfg, 10) == pytest.approx(0.5**0.9)
    assert lr_factor(40, cfg, 10) == pytest.approx(0.0)


def test_plateau_halves_after_patience_and_stops_at_min_lr():
    cfg = _cfg("train.scheduler=plateau", "train.lr=1e-3", "train.min_lr=3e-4")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Schedule(cfg, opt, steps_per_epoch=3)
    for _ in range(3):
        sched.step()
    lrs = []
    for dice in [0.5] + [0.4] * 14:
        sched.validated(dice)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(1e-3)  # 5 rounds without improvement are tolerated
    assert lrs[6] == pytest.approx(5e-4)
    assert lrs[-1] == pytest.approx(3e-4)


# ------------------------------------------------------------------------------------------------ RNG state


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(7)
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002 - the legacy global stream is what is saved
    torch.manual_seed(3)
    torch.save({"rng": rng_state(gen)}, tmp_path / "s.pt")
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())  # noqa: NPY002
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"], gen)
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())  # noqa: NPY002
    assert first == again
    assert math.isfinite(first[0])
