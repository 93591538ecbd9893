"""``busbench test``: score every fold model and the fold ensemble on the held-out test split.

For a run directory ``<output.root>/<experiment>/<dataset>/<model>`` (holding the ``config.yaml`` written by
``busbench train``) every fold's ``checkpoint_best.pt`` is loaded; each test batch is read once and passed through
all fold models, and the ensemble is the mean of their foreground probabilities, thresholded at ``eval.threshold``.

Metrics are the per-image metrics of :mod:`busbench.metrics` (reference §4), at the network's input resolution by
default or, with ``eval.resolution=original``, at each image's own size: the probability map is mapped back
through the letterbox (padding cropped, bilinear resize) and compared with the original mask. ``eval.tta``
averages each model's prediction with that of the horizontally flipped image.

Outputs, under the run directory:

* ``test/fold<k>_per_image.csv`` and ``test/ensemble_per_image.csv``: one row per test image
  (``sample_id, dataset_key, label, dice, iou, hd95, precision, recall, specificity, penalised, pred_empty, gt_empty``);
* ``summary.csv``: per test dataset, one row per fold model, ``mean`` and ``std`` rows over the fold models
  (sample standard deviation, ddof=1) and one ``ensemble`` row; columns listed in :data:`SUMMARY_COLUMNS`.

``task.mode`` adds columns after these (:mod:`busbench.engine.tasks`): multiclass runs score the lesion mask
``1 - p(background) >= eval.threshold`` with the binary metrics and add per-class Dice, IoU and HD95 of each lesion
class (per image and in the summary); multitask runs add the predicted label and class probabilities per image,
accuracy, macro F1 and per-class recall to the summary, and ``test/classification.json`` (confusion matrices). The
ensemble averages every probability (lesion, pixel classes, image classes) before thresholding and refinement.

Every fold of ``data.folds`` must be trained to completion: a missing or unfinished fold is an error naming it,
never a silently smaller average. The manifest must be the one the folds were trained on (its hash is checked
against each fold's ``run.json``), so a re-prepared split cannot leak training images into the test.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from busbench.atomic import atomic_write_text
from busbench.config import Config, config_from_file, deep_merge, parse_override, validate
from busbench.data.geometry import restore
from busbench.engine import checkpoint as ckpt
from busbench.engine import tasks
from busbench.engine.inference import amp_dtype, resolve_device
from busbench.engine.runlog import LOG, ensure_console_logging
from busbench.engine.train import CONFIG_FILE, DONE_FILE, build_model, sample_table
from busbench.errors import ConfigError, DataError, ModelError
from busbench.locking import locked
from busbench.metrics import per_image_batch, summarize
from busbench.models.cost import count_macs, count_params
from busbench.report import transfer

PER_IMAGE_COLUMNS = (
    "sample_id",
    "dataset_key",
    "label",
    "dice",
    "iou",
    "hd95",
    "precision",
    "recall",
    "specificity",
    "penalised",
    "pred_empty",
    "gt_empty",
)
SUMMARY_COLUMNS = (
    "experiment",
    "train_data",
    "dataset",
    "model",
    "fold",
    "n_test",
    "dice",
    "iou",
    "hd95",
    "precision",
    "recall",
    "specificity",
    "dice_lesion",
    "iou_lesion",
    "hd95_lesion",
    "precision_lesion",
    "recall_lesion",
    "hd95_penalised",
    "normal_fp_rate",
    "n_lesion",
    "n_normal",
    "params_m",
    "gmacs",
    "best_epoch",
    "best_val_dice",
    "train_seconds",
    "resolution",
    "hd95_mode",
    "tta",
    "threshold",
    "manifest_sha256",
    "config_hash",
)
SCORE_COLUMNS = (
    "dice",
    "iou",
    "hd95",
    "precision",
    "recall",
    "specificity",
    "dice_lesion",
    "iou_lesion",
    "hd95_lesion",
    "precision_lesion",
    "recall_lesion",
    "hd95_penalised",
    "normal_fp_rate",
)
# Settings that may differ at test time from training: how to score, where the data is, which device.
TEST_TIME_KEYS = (
    "eval.",
    "data.data_root",
    "data.num_workers",
    "data.cache",
    "train.device",
    "output.",
    "task.refine",
)
_FLUSH_IMAGES = 256  # images buffered per source before their metrics are computed


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The run's resolved ``config.yaml``, with optional test-time overrides (``eval.*`` and a few data keys)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found; --run must be a run folder written by busbench train "
            "(<output.root>/<experiment>/<dataset>/<model>)"
        )
    cfg = config_from_file(path)
    if not overrides:
        return cfg
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(TEST_TIME_KEYS)]
    if bad:
        raise ConfigError(
            f"--set {' '.join(bad)}: only eval.*, output.*, data.data_root, data.num_workers, data.cache, "
            "train.device and task.refine can change at test time; anything else needs a new training run"
        )
    merged = cfg.to_dict()
    for item in overrides:
        merged = deep_merge(merged, parse_override(item))
    return validate(merged, source=f"{path} with --set")


def _fold_checkpoints(run_dir: Path, cfg: Config) -> list[tuple[int, Path, dict[str, Any]]]:
    missing, unfinished, found = [], [], []
    for k in range(cfg.data.folds):
        fold_dir = run_dir / f"fold{k}"
        best = fold_dir / ckpt.BEST
        if not best.is_file():
            missing.append(k)
        elif not (fold_dir / DONE_FILE).is_file():
            unfinished.append(k)
        else:
            found.append((k, best, json.loads((fold_dir / DONE_FILE).read_text(encoding="utf-8"))))
    if missing or unfinished:
        parts = []
        if missing:
            parts.append(f"fold(s) {missing} have no {ckpt.BEST}")
        if unfinished:
            parts.append(f"fold(s) {unfinished} have not finished training (no {DONE_FILE})")
        folds = " ".join(f"--fold {k}" for k in missing + unfinished)
        raise DataError(
            f"{run_dir}: {'; '.join(parts)}; data.folds={cfg.data.folds} fold models are needed. "
            f"Train them first: busbench train --config {run_dir / CONFIG_FILE} {folds}"
        )
    return found


def _load_models(
    cfg: Config, checkpoints: list[tuple[int, Path, dict[str, Any]]], device: torch.device
) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    models, meta = [], []
    for fold, path, done in checkpoints:
        payload = ckpt.load_checkpoint(path)
        diffs = ckpt.setup_differences(payload, cfg)
        if diffs:
            raise ModelError(
                f"{path} was trained with another configuration than {path.parent.parent / CONFIG_FILE} "
                f"({ckpt.describe(diffs)}); retrain fold {fold} or restore that config.yaml"
            )
        model = build_model(cfg)
        ckpt.load_model_state(model, payload, path)
        model.eval().to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models.append(model)
        meta.append(
            {
                "fold": fold,
                "best_epoch": int(payload["epoch"]),
                "best_val_dice": float(payload["best_dice"]),
                "train_seconds": float(done.get("train_seconds", math.nan)),
            }
        )
    return models, meta


def _trained_manifests(run_dir: Path, folds: list[int]) -> dict[str, str]:
    """Manifest hashes the folds were trained on (from their run.json); all folds must agree."""
    seen: dict[str, str] = {}
    for k in folds:
        path = run_dir / f"fold{k}" / "run.json"
        if not path.is_file():
            continue
        hashes = json.loads(path.read_text(encoding="utf-8")).get("manifest_sha256", {}) or {}
        for key, value in hashes.items():
            if seen.setdefault(key, value) != value:
                raise DataError(
                    f"{run_dir}: folds were trained on different versions of the {key} manifest; retrain the run "
                    "on one manifest (busbench train --no-resume)"
                )
    return seen


class _Scorer:
    """Buffers predicted and true masks of one source and scores them in chunks (bounded memory)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.preds: list[np.ndarray] = []
        self.gts: list[np.ndarray] = []
        self.rows: list[dict[str, Any]] = []

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.preds.append(pred)
        self.gts.append(gt)
        if len(self.preds) >= _FLUSH_IMAGES:
            self.flush()

    def flush(self) -> None:
        if self.preds:
            e = self.cfg.eval
            self.rows += per_image_batch(self.preds, self.gts, hd95_mode=e.hd95_mode, workers=e.workers)
            self.preds, self.gts = [], []


def _score_dataset(
    cfg: Config, key: str, models: list[nn.Module], device: torch.device, trained_on: str | None
) -> tuple[list[pd.DataFrame], str]:
    """Per-image tables (fold models..., ensemble) on ``key``'s test split, and the manifest hash."""
    from busbench.data import loader as data_loader

    _, info = data_loader.load_dataset_rows(cfg, key)
    manifest = str(info["manifest_sha256"])
    if trained_on is not None and trained_on != manifest:
        raise DataError(
            f"the {key} manifest {info['manifest']} changed since the run was trained (sha256 {manifest[:12]} "
            f"now, {trained_on[:12]} at training); its test split may hold training images. Restore the manifest "
            "the run was trained on, or retrain with --no-resume"
        )
    ds = data_loader.build_test_dataset(cfg, key)
    dl = data_loader.make_loader(
        ds, cfg.eval.batch_size, shuffle=False, seed=0, num_workers=cfg.data.num_workers
    )
    e = cfg.eval
    dtype = amp_dtype(device, cfg.train.amp)
    task = tasks.build_task(cfg)
    scorers = [_Scorer(cfg) for _ in range(len(models) + 1)]
    extras: list[list[dict[str, Any]]] = [[] for _ in scorers]  # task-specific columns (per-class, labels)
    indices: list[int] = []
    for batch in tqdm(dl, disable=None, leave=False, desc=f"test {key}"):
        predicted = task.predict(
            models, batch["image"], device, dtype, tta=e.tta, channels_last=cfg.train.channels_last
        )
        # the ensemble averages every probability (lesion, pixel classes, image classes) before post-processing
        predicted = task.finalize(predicted.with_ensemble(), e.threshold)
        probs = predicted.lesion.numpy()  # (n_models + 1, B, S, S)
        index = batch["index"].tolist()
        indices += index
        gt_net = batch["mask"][:, 0].numpy() >= 0.5
        gt_classes = batch["class_map"].numpy().astype(np.uint8)
        for j, i in enumerate(index):
            if e.resolution == "original":
                geometry = ds.letterbox_info(i)
                gt = ds.original_mask(i)
                gt_cls = tasks.original_class_map(ds, i) if task.needs_class_map else None

                def back(a: np.ndarray, geometry=geometry, shape=gt.shape) -> np.ndarray:
                    return restore(a, geometry, shape)

                for s, scorer in enumerate(scorers):
                    scorer.add(back(probs[s, j]) >= e.threshold, gt)
                    extras[s].append(task.image_columns(predicted, s, j, e.threshold, gt_cls, back))
            else:
                for s, scorer in enumerate(scorers):
                    scorer.add(probs[s, j] >= e.threshold, gt_net[j])
                    extras[s].append(task.image_columns(predicted, s, j, e.threshold, gt_classes[j]))
    ids = sample_table(ds, indices)
    tables = []
    for scorer, extra in zip(scorers, extras, strict=True):
        scorer.flush()
        table = pd.concat([ids, pd.DataFrame(scorer.rows)], axis=1)[list(PER_IMAGE_COLUMNS)]
        tables.append(pd.concat([table, pd.DataFrame(extra, index=table.index)], axis=1))
    return tables, manifest


def _summary_rows(
    cfg: Config,
    key: str,
    tables: list[pd.DataFrame],
    meta: list[dict[str, Any]],
    cost: tuple[float, float],
    manifest: str,
) -> list[dict[str, Any]]:
    params_m, gmacs = cost
    common = {
        "experiment": cfg.experiment.name,
        "train_data": "+".join(cfg.data.datasets),
        "dataset": key,
        "model": cfg.model.name,
        "resolution": cfg.eval.resolution,
        "hd95_mode": cfg.eval.hd95_mode,
        "tta": cfg.eval.tta,
        "threshold": cfg.eval.threshold,
        "manifest_sha256": manifest,
        "config_hash": ckpt.training_hash(cfg),
    }
    task = tasks.build_task(cfg)
    rows = []
    for table, m in zip(tables[:-1], meta, strict=True):
        s = summarize(table)
        rows.append(
            {
                **common,
                "fold": str(m["fold"]),
                "n_test": s["n_images"],
                **s,
                **task.summary_scores(table),
                "params_m": params_m,
                "gmacs": gmacs,
                "best_epoch": m["best_epoch"],
                "best_val_dice": m["best_val_dice"],
                "train_seconds": m["train_seconds"],
            }
        )
    folds = pd.DataFrame(rows)
    numeric = [*SCORE_COLUMNS, *task.summary_columns, "best_epoch", "best_val_dice", "train_seconds"]
    mean = {
        **common,
        "fold": "mean",
        "n_test": rows[0]["n_test"],
        "n_lesion": rows[0]["n_lesion"],
        "n_normal": rows[0]["n_normal"],
        "params_m": params_m,
        "gmacs": gmacs,
        **{c: float(folds[c].astype(float).mean()) for c in numeric},
    }
    std = {
        **common,
        "fold": "std",
        "n_test": rows[0]["n_test"],
        **{c: float(folds[c].astype(float).std(ddof=1)) if len(folds) > 1 else math.nan for c in numeric},
    }
    s = summarize(tables[-1])
    ensemble = {
        **common,
        "fold": "ensemble",
        "n_test": s["n_images"],
        **s,
        **task.summary_scores(tables[-1]),
        "params_m": params_m * len(meta),
        "gmacs": gmacs * len(meta),
        "train_seconds": float(folds["train_seconds"].astype(float).sum()),
    }
    return [*rows, mean, std, ensemble]


def evaluate_run(run_dir: Path, overrides: list[str] | None = None, dataset: str | None = None) -> Path:
    """Evaluate a trained run on its test split(s); writes ``test/*_per_image.csv`` and returns ``summary.csv``.

    ``dataset`` (cross-dataset transfer) scores the fold models and their ensemble on that dataset's held-out test
    split instead, with the run's own preprocessing; everything goes to ``test_on_<dataset>/`` (the per-image files
    and ``summary.csv``, same names and columns) and the run's own files are left alone. Test images the run trained
    on through a dataset sharing them (BUSI and Curated BUSI) are left out and listed in ``excluded.csv``.
    """
    ensure_console_logging()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    if dataset is not None:
        transfer.check_target(cfg, dataset)
    with locked(run_dir, wait=30.0):
        return _evaluate_locked(run_dir, cfg, dataset)


def _evaluate_locked(run_dir: Path, cfg: Config, dataset: str | None = None) -> Path:
    keys = list(cfg.data.datasets) if dataset is None else [dataset]
    out_dir = run_dir if dataset is None else transfer.transfer_dir(run_dir, dataset)
    seen = set() if dataset is None else transfer.seen_sample_ids(cfg, dataset)
    checkpoints = _fold_checkpoints(run_dir, cfg)
    trained_on = _trained_manifests(run_dir, [k for k, _, _ in checkpoints])
    device = resolve_device(cfg.train.device)
    models, meta = _load_models(cfg, checkpoints, device)
    probe = build_model(cfg)
    cost = (count_params(probe) / 1e6, count_macs(probe, cfg.data.channels, cfg.data.image_size) / 1e9)
    del probe

    per_source: list[list[pd.DataFrame]] = [[] for _ in range(len(models) + 1)]
    summary_rows = []
    for key in keys:
        LOG.info(
            "testing %d fold models of %s and their ensemble on the %s test split (%s resolution)",
            len(models),
            cfg.model.name,
            key,
            cfg.eval.resolution,
        )
        tables, manifest = _score_dataset(cfg, key, models, device, trained_on.get(key))
        if seen:
            LOG.warning(
                "leaving out %d %s test image(s) the run trained on (see excluded.csv)", len(seen), key
            )
            tables = [t[~t["sample_id"].astype(str).isin(seen)].reset_index(drop=True) for t in tables]
        for s, table in enumerate(tables):
            per_source[s].append(table)
        summary_rows += _summary_rows(cfg, key, tables, meta, cost, manifest)

    test_dir = run_dir / "test" if dataset is None else out_dir
    if seen:
        excluded = pd.DataFrame(
            {"sample_id": sorted(seen), "reason": "in the development split the run trained on"}
        )
        atomic_write_text(out_dir / "excluded.csv", excluded.to_csv(index=False, lineterminator="\n"))
    names = [f"fold{m['fold']}" for m in meta] + ["ensemble"]
    for name, frames in zip(names, per_source, strict=True):
        df = pd.concat(frames, ignore_index=True)
        atomic_write_text(test_dir / f"{name}_per_image.csv", df.to_csv(index=False, lineterminator="\n"))
    task = tasks.build_task(cfg)
    task.write_reports(
        test_dir,
        {name: dict(zip(keys, frames, strict=True)) for name, frames in zip(names, per_source, strict=True)},
    )
    summary = pd.DataFrame(summary_rows).reindex(columns=[*SUMMARY_COLUMNS, *task.summary_columns])
    path = out_dir / "summary.csv"
    atomic_write_text(path, summary.to_csv(index=False, lineterminator="\n"))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        required=True,
        type=Path,
        metavar="DIR",
        help="run folder <output.root>/<experiment>/<dataset>/<model> written by busbench train",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="test-time overrides, e.g. --set eval.resolution=original eval.tta=true",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        metavar="KEY",
        help="score on another dataset's held-out test split (cross-dataset transfer); "
        "results go to DIR/test_on_KEY/",
    )


def run(args: argparse.Namespace) -> int:
    path = evaluate_run(args.run, args.set, dataset=args.dataset)
    summary = pd.read_csv(path, dtype={"fold": str})
    shown = summary[["dataset", "fold", "n_test", "dice", "iou", "hd95", "hd95_penalised", "normal_fp_rate"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {path} and {path.parent if args.dataset else path.parent / 'test'}/")
    return 0
