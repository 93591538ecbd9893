"""``busbench test``: score every fold model and the fold ensemble on the held-out test split.

For a run directory ``<output.root>/<experiment>/<dataset>/<model>`` (holding the ``config.yaml`` written by
``busbench train``) every fold's ``checkpoint_best.pt`` is loaded; each test batch is read once and passed through
all fold models, and the ensemble is the mean of their foreground probabilities, thresholded at ``eval.threshold``.

Metrics are the per-image metrics of :mod:`busbench.metrics`, either at each image's own size
(``eval.resolution=original``, the benchmark configs' setting: the probability map is mapped back through the
letterbox - padding cropped, bilinear resize - and compared with the original mask, which is never resampled) or at
the network's input resolution (``eval.resolution=network``, the schema default). At network resolution only the
image content inside the letterbox is scored: the padding is cropped from prediction and ground truth first, so it
never counts as true negatives (specificity) and the worst-case HD95 is the diagonal of the content, not of the
padded square. ``eval.tta`` averages each model's prediction with that of the horizontally flipped image.

Outputs, under the run directory:

* ``test/fold<k>_per_image.csv`` and ``test/ensemble_per_image.csv``: one row per test image, columns
  :data:`PER_IMAGE_COLUMNS` (``patient_id`` and ``group_id`` from the manifest, for patient-aware statistics);
* ``summary.csv``: per test dataset, one row per fold model, ``mean`` and ``std`` rows over the fold models
  (sample standard deviation, ddof=1) and one ``ensemble`` row; columns listed in :data:`SUMMARY_COLUMNS`, among
  them every setting the scores depend on (``image_size``, ``resolution``, ``hd95_mode``, ``tta``, ``threshold``)
  and ``selection_threshold``, the threshold the validation Dice that chose each checkpoint was computed at;
* ``test/excluded.csv``: test images left out because the run learned from them, or from a near-duplicate or the
  same patient, through a dataset sharing images (:mod:`busbench.data.leakage`; e.g. a run fine-tuned from a
  Curated BUSI run and tested on BUSI).

``--tag NAME`` writes everything to ``test_NAME/`` instead (summary included), so results at other settings live
beside the default ones; ``--dataset B`` writes to ``test_on_B/`` (:mod:`busbench.engine.results`).

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

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from busbench.atomic import atomic_write_bytes, atomic_write_text
from busbench.config import Config, config_from_file, deep_merge, parse_override, validate
from busbench.data import leakage
from busbench.data.geometry import LetterboxInfo, restore
from busbench.engine import checkpoint as ckpt
from busbench.engine import results, tasks, trackers
from busbench.engine.inference import amp_dtype, resolve_device
from busbench.engine.runlog import LOG, ensure_console_logging
from busbench.engine.train import CONFIG_FILE, DONE_FILE, build_model, sample_table
from busbench.errors import ConfigError, DataError, ModelError
from busbench.locking import locked
from busbench.metrics import per_image_batch, summarize
from busbench.models.cost import count_macs, count_params

#: the scores of one image; their means lead the summary columns
IMAGE_SCORES = (
    "dice",
    "iou",
    "hd95",
    "precision",
    "recall",
    "specificity",
)
PER_IMAGE_COLUMNS = (
    "sample_id",
    "dataset_key",
    "patient_id",
    "group_id",
    "label",
    *IMAGE_SCORES,
    "penalised",
    "pred_empty",
    "gt_empty",
)
SCORE_COLUMNS = (
    *IMAGE_SCORES,
    "dice_lesion",
    "iou_lesion",
    "hd95_lesion",
    "precision_lesion",
    "recall_lesion",
    "hd95_penalised",
    "normal_fp_rate",
)
SUMMARY_COLUMNS = (
    "experiment",
    "train_data",
    "dataset",
    "model",
    "fold",
    "n_test",
    *SCORE_COLUMNS,
    "n_lesion",
    "n_normal",
    "params_m",
    "gmacs",
    "best_epoch",
    "best_val_dice",
    "train_seconds",
    "image_size",
    "resolution",
    "hd95_mode",
    "tta",
    "threshold",
    "selection_threshold",
    "n_excluded",
    "manifest_sha256",
    "config_hash",
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
            f"{path} not found; --run must be a run folder written by busbench train ({results.RUN_LAYOUT})"
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


def _fold_checkpoints(
    run_dir: Path, cfg: Config, folds: list[int] | None = None
) -> list[tuple[int, Path, dict[str, Any]]]:
    """Best checkpoint and done.json of every fold (or of ``folds``); a missing or unfinished one is an error."""
    missing, unfinished, found = [], [], []
    for k in range(cfg.data.folds) if folds is None else folds:
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
                "selection_threshold": float(payload.get("selection_threshold", math.nan)),
                "train_seconds": float(done.get("train_seconds", math.nan)),
            }
        )
    return models, meta


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


def predict_batch(
    cfg: Config, task: tasks.Task, models: list[nn.Module], images: torch.Tensor, device: torch.device
) -> tasks.Prediction:
    """Probabilities of every fold model and of their ensemble (last) on one batch, post-processed as scored.

    The ensemble averages every probability (lesion, pixel classes, image classes) before post-processing
    (multitask refinement); ``busbench test``, the overlay figures and ``busbench predict`` all go through here.
    """
    dtype = amp_dtype(device, cfg.train.amp)
    predicted = task.predict(
        models, images, device, dtype, tta=cfg.eval.tta, channels_last=cfg.train.channels_last
    )
    return task.finalize(predicted.with_ensemble(), cfg.eval.threshold)


def content(array: np.ndarray, geometry: LetterboxInfo) -> np.ndarray:
    """The image content of a network-resolution array ``(S, S, ...)``: the letterbox padding cropped."""
    h, w = geometry.content_hw
    return array[geometry.pad_top : geometry.pad_top + h, geometry.pad_left : geometry.pad_left + w]


def id_table(ds: Any, indices: list[int]) -> pd.DataFrame:
    """``sample_id, dataset_key, patient_id, group_id, label`` of dataset items ``indices``."""
    ids = sample_table(ds, indices)
    rows = ds.rows.iloc[list(indices)]
    ids.insert(2, "patient_id", rows["patient_id"].astype(str).to_numpy())
    ids.insert(3, "group_id", rows["group_id"].astype(str).to_numpy())
    return ids


def write_mask(path: Path, mask: np.ndarray) -> None:
    """A boolean mask as a 0/255 8-bit PNG, written atomically."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(mask.astype(np.uint8) * np.uint8(255)))
    if not ok:
        raise DataError(f"PNG encoding of {path} failed")
    atomic_write_bytes(path, buf.tobytes())


def _score_dataset(
    cfg: Config,
    key: str,
    models: list[nn.Module],
    device: torch.device,
    trained_on: str | None,
    mask_dirs: list[Path] | None = None,
) -> tuple[list[pd.DataFrame], str]:
    """Per-image tables (fold models..., ensemble) on ``key``'s test split, and the manifest hash.

    ``mask_dirs`` (one folder per source): also write each scored mask there as ``<sample_id>.png`` (0/255)."""
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
    task = tasks.build_task(cfg)
    scorers = [_Scorer(cfg) for _ in range(len(models) + 1)]
    extras: list[list[dict[str, Any]]] = [[] for _ in scorers]  # task-specific columns (per-class, labels)
    indices: list[int] = []
    for batch in tqdm(dl, disable=None, leave=False, desc=f"test {key}"):
        predicted = predict_batch(cfg, task, models, batch["image"], device)
        probs = predicted.lesion.numpy()  # (n_models + 1, B, S, S)
        index = batch["index"].tolist()
        indices += index
        gt_net = batch["mask"][:, 0].numpy() >= 0.5
        gt_classes = batch["class_map"].numpy().astype(np.uint8)
        for j, i in enumerate(index):
            geometry = ds.letterbox_info(i)
            if e.resolution == "original":
                gt = ds.original_mask(i)
                gt_cls = tasks.original_class_map(ds, i) if task.needs_class_map else None

                def back(a: np.ndarray, geometry=geometry, shape=gt.shape) -> np.ndarray:
                    return restore(a, geometry, shape)

            else:
                gt = content(gt_net[j], geometry)
                gt_cls = content(gt_classes[j], geometry)

                def back(a: np.ndarray, geometry=geometry) -> np.ndarray:
                    return content(a, geometry)

            for s, scorer in enumerate(scorers):
                mask = back(probs[s, j]) >= e.threshold
                scorer.add(mask, gt)
                if mask_dirs:
                    write_mask(mask_dirs[s] / f"{ds.rows['sample_id'].iat[i]}.png", mask)
                extras[s].append(task.image_columns(predicted, s, j, e.threshold, gt_cls, back))
    ids = id_table(ds, indices)
    tables = []
    for scorer, extra in zip(scorers, extras, strict=True):
        scorer.flush()
        table = pd.concat([ids, pd.DataFrame(scorer.rows)], axis=1)[list(PER_IMAGE_COLUMNS)]
        tables.append(pd.concat([table, pd.DataFrame(extra, index=table.index)], axis=1))
    return tables, manifest


def _one_value(values: pd.Series) -> float:
    """The value all fold models share (NaN when they differ or none is known)."""
    known = set(values.dropna().astype(float))
    return known.pop() if len(known) == 1 else math.nan


def _summary_rows(
    cfg: Config,
    key: str,
    tables: list[pd.DataFrame],
    meta: list[dict[str, Any]],
    cost: tuple[float, float],
    manifest: str,
    n_excluded: int = 0,
) -> list[dict[str, Any]]:
    params_m, gmacs = cost
    common = {
        "experiment": cfg.experiment.name,
        "train_data": "+".join(cfg.data.datasets),
        "dataset": key,
        "model": cfg.model.name,
        "image_size": cfg.data.image_size,
        "resolution": cfg.eval.resolution,
        "hd95_mode": cfg.eval.hd95_mode,
        "tta": cfg.eval.tta,
        "threshold": cfg.eval.threshold,
        "n_excluded": n_excluded,
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
                "selection_threshold": m["selection_threshold"],
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
        "selection_threshold": _one_value(folds["selection_threshold"]),
    }
    std = {
        **common,
        "fold": "std",
        "n_test": rows[0]["n_test"],
        **{c: float(folds[c].astype(float).std(ddof=1)) if len(folds) > 1 else math.nan for c in numeric},
        "selection_threshold": _one_value(folds["selection_threshold"]),
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
        "selection_threshold": _one_value(folds["selection_threshold"]),
    }
    return [*rows, mean, std, ensemble]


def evaluate_run(
    run_dir: Path,
    overrides: list[str] | None = None,
    dataset: str | None = None,
    tag: str | None = None,
    save_masks: bool = False,
) -> Path:
    """Evaluate a trained run on its test split(s); writes the per-image files and returns ``summary.csv``.

    ``dataset`` (cross-dataset transfer) scores the fold models and their ensemble on that dataset's held-out test
    split instead, with the run's own preprocessing; everything goes to ``test_on_<dataset>/`` (the per-image files
    and ``summary.csv``, same names and columns) and the run's own files are left alone. ``tag`` writes the run's
    own test to ``test_<tag>/`` (e.g. scored with other ``--set eval.*`` settings). Test images the run learned from
    through a dataset sharing images, or a near-duplicate or patient of one, are left out and listed in
    ``excluded.csv`` (:mod:`busbench.data.leakage`). ``save_masks`` also writes every scored mask (at
    ``eval.resolution``) to ``<test folder>/masks/<dataset>/<fold k | ensemble>/<sample_id>.png``, 0/255 PNGs that
    ``busbench score`` reads back.
    """
    ensure_console_logging()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    if dataset is not None:
        results.check_target(cfg, dataset)
    results.output_dirs(run_dir, dataset, tag)  # checks the tag before anything runs
    trackers.check_available(cfg)
    with locked(run_dir, wait=30.0):
        path = _evaluate_locked(run_dir, cfg, dataset, tag, save_masks)
    trackers.log_summary(cfg, path, run_dir)
    return path


def _evaluate_locked(
    run_dir: Path, cfg: Config, dataset: str | None = None, tag: str | None = None, save_masks: bool = False
) -> Path:
    keys = list(cfg.data.datasets) if dataset is None else [dataset]
    out_dir, test_dir = results.output_dirs(run_dir, dataset, tag)
    checkpoints = _fold_checkpoints(run_dir, cfg)
    trained_on = leakage.recorded_manifests(run_dir)
    excluded = {key: leakage.excluded_for_run(cfg, run_dir, key, trained_on) for key in keys}
    device = resolve_device(cfg.train.device)
    models, meta = _load_models(cfg, checkpoints, device)
    trained_threshold = config_from_file(run_dir / CONFIG_FILE).eval.threshold
    for m in meta:  # checkpoints written before the selection threshold was recorded: the run's own setting
        if math.isnan(m["selection_threshold"]):
            m["selection_threshold"] = trained_threshold
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
        sources = [f"fold{m['fold']}" for m in meta] + ["ensemble"]
        mask_dirs = [test_dir / "masks" / key / name for name in sources] if save_masks else None
        tables, manifest = _score_dataset(cfg, key, models, device, trained_on.get(key), mask_dirs)
        left_out = set(excluded[key]["sample_id"])
        if left_out:
            LOG.warning(
                "leaving out %d %s test image(s) the run learned from, or near-copies / same-patient images of "
                "them (see %s)",
                len(left_out),
                key,
                test_dir / results.EXCLUDED,
            )
            tables = [t[~t["sample_id"].astype(str).isin(left_out)].reset_index(drop=True) for t in tables]
            if len(tables[-1]) == 0:
                raise DataError(
                    f"every {key} test image is a training image of the run (or a near-copy of one); "
                    "there is nothing left to score"
                )
        for s, table in enumerate(tables):
            per_source[s].append(table)
        summary_rows += _summary_rows(cfg, key, tables, meta, cost, manifest, len(left_out))

    left_out = [frame.assign(dataset_key=key) for key, frame in excluded.items() if len(frame)]
    if left_out:
        table = pd.concat(left_out, ignore_index=True)[["sample_id", "dataset_key", "reason"]]
        atomic_write_text(test_dir / results.EXCLUDED, table.to_csv(index=False, lineterminator="\n"))
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
    path = out_dir / results.SUMMARY
    atomic_write_text(path, summary.to_csv(index=False, lineterminator="\n"))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        required=True,
        type=Path,
        metavar="DIR",
        help=f"run folder {results.RUN_LAYOUT} written by busbench train",
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
    parser.add_argument(
        "--tag",
        default=None,
        metavar="NAME",
        help="write the results to DIR/test_NAME/ (summary.csv included) instead of DIR/summary.csv and DIR/test/, "
        "e.g. --set eval.tta=true --tag tta",
    )
    parser.add_argument(
        "--save-masks",
        action="store_true",
        help="also write each fold model's and the ensemble's masks to <test folder>/masks/<dataset>/<source>/",
    )


def run(args: argparse.Namespace) -> int:
    path = evaluate_run(args.run, args.set, dataset=args.dataset, tag=args.tag, save_masks=args.save_masks)
    summary = pd.read_csv(path, dtype={"fold": str})
    shown = summary[["dataset", "fold", "n_test", "dice", "iou", "hd95", "hd95_penalised", "normal_fp_rate"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {path} and {results.output_dirs(args.run, args.dataset, args.tag)[1]}/")
    return 0
