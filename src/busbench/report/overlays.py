"""Test-set cases worth looking at: the best, median and worst lesion images of a run, and a normal image with a
false positive, predicted again.

``busbench test`` keeps per-image scores, not predicted masks (a mask per image, model and run would dwarf the
results). To draw a case, its image is passed once more through the same fold models, the same way the evaluator
does (:func:`busbench.engine.evaluate.predict_batch`): the task's own prediction (the lesion probability
``1 - p(background)`` of a multiclass model, the refined mask of a multitask model), the ensemble's mean of every
probability, post-processing after ensembling. The threshold and test-time augmentation are the ones the scores
were computed with (``summary.csv`` records them, since ``busbench test --set`` may have changed them), so the
drawn mask is the one that was scored. Cases are drawn at the network's input resolution, letterbox padding cropped.

Cases are ranked among lesion images (benign, malignant) only: a correctly empty normal image has Dice 1 and would
always be the "best" case. Normal images are shown separately: the first one (by sample id) on which the model
predicted any lesion pixel.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from busbench.engine import tasks
from busbench.engine.evaluate import _fold_checkpoints, _load_models, content, load_run_config, predict_batch
from busbench.engine.inference import resolve_device
from busbench.errors import DataError
from busbench.metrics import LESION_LABELS


def pick_ranks(n_images: int, n: int) -> list[tuple[str, int]]:
    """``n`` positions spread evenly over ``n_images`` images ranked best first, each with its name.

    The first is ``best``, the last ``worst`` and the middle one ``median`` (rank ``(n_images - 1) / 2``, rounded);
    positions in between are named by their rank. Fewer images than ``n`` give each image once.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n_images == 0:
        return []
    positions = sorted({int(round(p)) for p in np.linspace(0, n_images - 1, min(n, n_images))})
    median = int(round((n_images - 1) / 2))
    named = []
    for p in positions:
        if p == 0:
            kind = "best"
        elif p == n_images - 1:
            kind = "worst"
        elif p == median:
            kind = "median"
        else:
            kind = f"rank {p + 1}/{n_images}"
        named.append((kind, p))
    return named


def _scoring_settings(run_dir: Path, source: str, cfg: Any) -> tuple[float, bool]:
    """Threshold and TTA that ``busbench test`` used for ``source`` (from summary.csv), else the config's."""
    path = run_dir / "summary.csv"
    threshold, tta = float(cfg.eval.threshold), bool(cfg.eval.tta)
    if path.is_file():
        summary = pd.read_csv(path, dtype={"fold": str})
        fold = source.removeprefix("fold") if source != "ensemble" else "ensemble"
        rows = summary[summary["fold"] == fold]
        if len(rows) and {"threshold", "tta"} <= set(rows.columns):
            threshold = float(rows["threshold"].iloc[0])
            tta = str(rows["tta"].iloc[0]).strip().lower() in ("true", "1")
    return threshold, tta


def _chosen(scores: pd.DataFrame, n: int) -> list[tuple[str, pd.Series]]:
    """Ranked lesion cases, then the first normal image with a predicted lesion pixel (if any)."""
    lesion = scores[scores["label"].isin(LESION_LABELS)]
    ranked = lesion.sort_values(["dice", "dataset_key", "sample_id"], ascending=[False, True, True])
    ranked = ranked.reset_index(drop=True)
    chosen = [(kind, ranked.iloc[p]) for kind, p in pick_ranks(len(ranked), n)]
    normal_fp = scores[(scores["label"] == "normal") & ~scores["pred_empty"].astype(bool)]
    if len(normal_fp):
        chosen.append(("normal FP", normal_fp.sort_values(["dataset_key", "sample_id"]).iloc[0]))
    return chosen


def overlay_cases(run_dir: str | Path, source: str = "ensemble", n: int = 3) -> list[dict[str, Any]]:
    """The best, median and worst lesion test images of ``source`` (``ensemble`` or ``fold<k>``), and a normal
    image with a false positive, predicted again.

    Lesion images are ranked by the per-image Dice in ``test/<source>_per_image.csv`` (ties by sample id). Each case
    is ``{"name": "<kind>: <sample_id>", "image": (H, W) uint8 (``(H, W, 3)`` for 3-channel runs), "gt": (H, W) bool,
    "pred": (H, W) bool, "dice": float}`` at the network's input resolution with the letterbox padding cropped
    (what ``eval.resolution=network`` scores); ``dice`` is the score from the CSV (at ``eval.resolution``, so it can
    differ slightly from the drawn masks' Dice for ``original``). The normal false positive is named
    ``normal FP: <sample_id>``.
    """
    run_dir = Path(run_dir)
    if not re.fullmatch(r"ensemble|fold\d+", source):
        raise DataError(f"--source {source!r}: use ensemble or fold<k> (e.g. fold0)")
    csv = run_dir / "test" / f"{source}_per_image.csv"
    if not csv.is_file():
        raise DataError(f"{csv} not found; score the run first: busbench test --run {run_dir}")
    cfg = load_run_config(run_dir)
    threshold, tta = _scoring_settings(run_dir, source, cfg)
    cfg = load_run_config(run_dir, [f"eval.threshold={threshold}", f"eval.tta={str(tta).lower()}"])
    scores = pd.read_csv(csv, dtype={"sample_id": str, "dataset_key": str})
    chosen = _chosen(scores, n)
    if not chosen:
        raise DataError(f"{csv} has no lesion image and no normal false positive to draw")

    checkpoints = _fold_checkpoints(run_dir, cfg)
    if source != "ensemble":
        fold = int(source.removeprefix("fold"))
        checkpoints = [c for c in checkpoints if c[0] == fold]
        if not checkpoints:
            raise DataError(f"{run_dir} has no fold {fold}; data.folds is {cfg.data.folds}")
    device = resolve_device(cfg.train.device)
    models, _ = _load_models(cfg, checkpoints, device)
    task = tasks.build_task(cfg)

    from busbench.data import loader as data_loader

    datasets: dict[str, Any] = {}
    cases = []
    for kind, row in chosen:
        key = str(row["dataset_key"])
        if key not in datasets:
            datasets[key] = data_loader.build_test_dataset(cfg, key)
        ds = datasets[key]
        where = np.flatnonzero(ds.rows["sample_id"].astype(str).to_numpy() == str(row["sample_id"]))
        if where.size != 1:
            raise DataError(
                f"test image {row['sample_id']} of {csv} is not in the current {key} test split; the manifest "
                f"changed since testing. Rerun busbench test --run {run_dir}"
            )
        i = int(where[0])
        item = ds[i]
        predicted = predict_batch(cfg, task, models, item["image"][None], device)
        prob = predicted.lesion[-1, 0].numpy()  # the ensemble (for one fold model: that model)
        geometry = ds.letterbox_info(i)
        pixels, _ = ds.pixels(i)
        image = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        cases.append(
            {
                "name": f"{kind}: {row['sample_id']}",
                "image": np.ascontiguousarray(content(image, geometry), dtype=np.uint8),
                "gt": content(item["mask"][0].numpy() >= 0.5, geometry),
                "pred": content(prob >= threshold, geometry),
                "dice": float(row["dice"]),
            }
        )
    return cases
