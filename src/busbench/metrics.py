"""Per-image segmentation metrics with explicit conventions for empty masks.

Every metric is computed per image and only then averaged over images. Empty masks are common in breast
ultrasound (normal images have no lesion; weak models predict nothing), and libraries disagree on them: MONAI's
HD95 returns NaN for a one-sided empty pair and its mean silently drops it, medpy raises. busbench never drops an
image and never returns NaN for a per-image metric:

=========================  ============  =======================================================
case                       Dice, IoU     HD95
=========================  ============  =======================================================
both non-empty             usual         symmetric HD95 (see :func:`hd95`), in pixels or ``spacing`` units
both empty                 1             0
exactly one empty          0             image diagonal ``sqrt(H**2 + W**2)`` (worst case, "penalised")
=========================  ============  =======================================================

Precision, recall and specificity follow the same spirit (no eps smoothing, 0/0 resolved by whether the image
was handled correctly):

* precision = TP / (TP + FP); when the prediction is empty: 1 if the ground truth is empty too, else 0.
* recall = TP / (TP + FN); when the ground truth is empty: 1 if the prediction is empty too, else 0.
* specificity = TN / (TN + FP); when the ground truth has no background pixel: 1 (there is nothing to get wrong).

HD95 follows medpy's definition by default: the boundary of a mask is the mask minus its binary erosion with a
cross (4-connectivity) structuring element, pixels outside the image counting as background; surface distances
are exact Euclidean distances from each boundary pixel of one mask to the nearest boundary pixel of the other.
``mode="pooled"`` (medpy, default) takes the 95th percentile of both directed distance sets concatenated;
``mode="max_directed"`` (MONAI) takes the larger of the two directed 95th percentiles. Percentiles use linear
interpolation between order statistics (``numpy.percentile``'s default, as medpy and MONAI/``torch.quantile`` do).

The fast path works on the union bounding box of both masks only, which gives the same boundaries and the same
distances as the full image (see :func:`hd95`); ``_hd95_reference`` is the plain
full-image computation kept for tests and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

HD95Mode = Literal["pooled", "max_directed"]
HD95_MODES: tuple[str, ...] = ("pooled", "max_directed")

#: Per-image metrics that are averaged over images.
METRIC_KEYS: tuple[str, ...] = ("dice", "iou", "hd95", "precision", "recall", "specificity")
#: Flags returned by :func:`per_image` besides the metrics.
FLAG_KEYS: tuple[str, ...] = ("penalised", "pred_empty", "gt_empty")
#: Image labels, as in the manifests; benign and malignant images contain a lesion.
LABELS: tuple[str, ...] = ("normal", "benign", "malignant")
LESION_LABELS: tuple[str, ...] = ("benign", "malignant")

_CROSS = ndimage.generate_binary_structure(2, 1)
# Above this share of boundary pixels in the cropped box, a distance transform over the box beats a KD-tree
# over the boundary points (measured on 512x512 masks with noisy predictions).
_KDTREE_MAX_BOUNDARY_SHARE = 0.1
# One lesion image costs about 1-2 ms at 512x512, comparable to shipping it to a worker process, so a pool only
# pays off for large batches; below this many images per worker the batch stays in this process.
_MIN_IMAGES_PER_WORKER = 32

Spacing = float | Sequence[float] | None


# --------------------------------------------------------------------------------------------------------------
# input checks


def _as_mask(array: np.ndarray, name: str) -> np.ndarray:
    """Return ``array`` as a 2-D boolean mask; accepts bool, 0/1 and 0/255 encodings, rejects anything else."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask (H, W), got an array of shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be a boolean or integer mask, got dtype {array.dtype}")
    if array.size == 0:
        return array.astype(bool)
    top = array.max()
    foreground = array == top
    if top not in (0, 1, 255) or not np.all(foreground | (array == 0)):
        values = np.unique(array)
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise ValueError(
            f"{name} must be binary (bool, 0/1 or 0/255), got values {{{shown}}}; "
            "threshold probabilities or convert label maps (e.g. mask > 0) first"
        )
    return foreground if top != 0 else np.zeros(array.shape, dtype=bool)


def _as_mask_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred_mask = _as_mask(pred, "pred")
    gt_mask = _as_mask(gt, "gt")
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got pred {pred_mask.shape} and gt {gt_mask.shape}; "
            "resize the prediction to the ground-truth resolution (nearest neighbour) first"
        )
    return pred_mask, gt_mask


def _as_spacing(spacing: Spacing) -> tuple[float, float] | None:
    """Normalise ``spacing`` to a (row, column) pair of positive finite floats, or None for unit pixels."""
    if spacing is None:
        return None
    try:
        values = (float(spacing),) * 2 if np.ndim(spacing) == 0 else tuple(float(s) for s in spacing)  # type: ignore[arg-type, union-attr]
    except (TypeError, ValueError):
        values = ()
    if len(values) != 2 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(
            f"spacing must be one positive number or a (row, column) pair of positive numbers, got {spacing!r}"
        )
    return values  # type: ignore[return-value]


def _check_mode(mode: str) -> None:
    if mode not in HD95_MODES:
        raise ValueError(f"unknown HD95 mode {mode!r}; choose one of {', '.join(HD95_MODES)}")


def image_diagonal(shape: tuple[int, int], spacing: Spacing = None) -> float:
    """Length of the image diagonal, the worst-case HD95 charged when exactly one mask is empty."""
    rows, cols = shape
    row_step, col_step = _as_spacing(spacing) or (1.0, 1.0)
    return math.hypot(rows * row_step, cols * col_step)


# --------------------------------------------------------------------------------------------------------------
# HD95


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour in the background; pixels outside the array count as background."""
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _union_box(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, slice]:
    union = pred | gt
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances pred->gt and gt->pred of two non-empty masks, on their union bounding box.

    Why this equals the full-image computation: every pixel outside the union box is background in both masks,
    and binary erosion with ``border_value=0`` treats pixels beyond the array edge as background too. So each box
    pixel sees the same 4-neighbourhood in the crop as in the full image (whether the box edge is an image edge
    or not), and erosion and boundaries agree pixel for pixel. All boundary pixels lie in the box, so the nearest
    boundary pixel of the other mask is found inside it as well; distances are exact Euclidean distances between
    the same integer pixel offsets either way.
    """
    box = _union_box(pred, gt)
    pred_edge = _boundary(pred[box])
    gt_edge = _boundary(gt[box])
    pred_points = np.argwhere(pred_edge)
    gt_points = np.argwhere(gt_edge)
    if len(pred_points) + len(gt_points) > _KDTREE_MAX_BOUNDARY_SHARE * pred_edge.size:
        # Dense boundaries (e.g. speckled predictions): one distance transform per direction is cheaper.
        pred_to_gt = ndimage.distance_transform_edt(~gt_edge, sampling=spacing)[pred_edge]
        gt_to_pred = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)[gt_edge]
        return pred_to_gt, gt_to_pred
    pred_xy = pred_points.astype(np.float64)
    gt_xy = gt_points.astype(np.float64)
    if spacing is not None:
        pred_xy *= spacing
        gt_xy *= spacing
    pred_to_gt = cKDTree(gt_xy).query(pred_xy, k=1)[0]
    gt_to_pred = cKDTree(pred_xy).query(gt_xy, k=1)[0]
    return pred_to_gt, gt_to_pred


def _surface_distances_reference(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Full-image directed surface distances, step for step as medpy computes them."""
    pred_edge = _boundary(pred)
    gt_edge = _boundary(gt)
    pred_to_gt = ndimage.distance_transform_edt(~gt_edge, sampling=spacing)[pred_edge]
    gt_to_pred = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)[gt_edge]
    return pred_to_gt, gt_to_pred


def _reduce_hd95(pred_to_gt: np.ndarray, gt_to_pred: np.ndarray, mode: str) -> float:
    if mode == "pooled":
        return float(np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95))
    return float(max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95)))


def _hd95_masks(pred: np.ndarray, gt: np.ndarray, mode: str, spacing: Spacing, *, reference: bool) -> float:
    _check_mode(mode)
    steps = _as_spacing(spacing)
    pred_empty = not pred.any()
    gt_empty = not gt.any()
    if pred_empty and gt_empty:
        return 0.0
    if pred_empty or gt_empty:
        return image_diagonal(pred.shape, steps)
    distances = _surface_distances_reference if reference else _surface_distances
    return _reduce_hd95(*distances(pred, gt, steps), mode)


def hd95(pred: np.ndarray, gt: np.ndarray, mode: HD95Mode = "pooled", *, spacing: Spacing = None) -> float:
    """95th-percentile Hausdorff distance between two 2-D binary masks.

    ``mode="pooled"`` (default) is medpy's ``hd95``: the 95th percentile of the pred->gt and gt->pred surface
    distances pooled together. ``mode="max_directed"`` is MONAI's ``compute_hausdorff_distance(percentile=95)``:
    the larger of the two directed 95th percentiles (never smaller than the pooled value). Distances are in pixels,
    or in the units of ``spacing`` (one number, or a (row, column) pair).

    Empty masks never give NaN: both empty -> 0; exactly one empty -> the image diagonal (worst case).
    The computation is restricted to the union bounding box of the masks, which is exact (identical to the full
    image, see ``_surface_distances``) and much faster for lesions that cover a small part of the image.
    """
    pred_mask, gt_mask = _as_mask_pair(pred, gt)
    return _hd95_masks(pred_mask, gt_mask, mode, spacing, reference=False)


def _hd95_reference(
    pred: np.ndarray, gt: np.ndarray, mode: HD95Mode = "pooled", *, spacing: Spacing = None
) -> float:
    """Same as :func:`hd95`, computed on the full image the way medpy does; the yardstick for the fast path."""
    pred_mask, gt_mask = _as_mask_pair(pred, gt)
    return _hd95_masks(pred_mask, gt_mask, mode, spacing, reference=True)


# --------------------------------------------------------------------------------------------------------------
# per image


def _ratio(numerator: int, denominator: int, if_undefined: float) -> float:
    return numerator / denominator if denominator else if_undefined


def _binary_metrics(pred: np.ndarray, gt: np.ndarray, mode: str, spacing: Spacing) -> dict[str, float | bool]:
    tp = int(np.count_nonzero(pred & gt))
    pred_area = int(np.count_nonzero(pred))
    gt_area = int(np.count_nonzero(gt))
    fp = pred_area - tp
    fn = gt_area - tp
    tn = pred.size - tp - fp - fn
    pred_empty = pred_area == 0
    gt_empty = gt_area == 0
    both_empty = pred_empty and gt_empty
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "hd95": _hd95_masks(pred, gt, mode, spacing, reference=False),
        "precision": _ratio(tp, tp + fp, 1.0 if both_empty else 0.0),
        "recall": _ratio(tp, tp + fn, 1.0 if both_empty else 0.0),
        "specificity": _ratio(tn, tn + fp, 1.0),
        "penalised": pred_empty != gt_empty,
        "pred_empty": pred_empty,
        "gt_empty": gt_empty,
    }


def per_image(
    pred: np.ndarray, gt: np.ndarray, *, hd95_mode: HD95Mode = "pooled", spacing: Spacing = None
) -> dict[str, float | bool]:
    """Metrics of one predicted mask against its ground truth, at the resolution the arrays have.

    Returns ``dice, iou, hd95, precision, recall, specificity`` (floats, never NaN) and the flags ``penalised``
    (exactly one mask empty, so HD95 was charged the image diagonal), ``pred_empty`` and ``gt_empty``.
    Masks may be boolean, 0/1 or 0/255 arrays of the same 2-D shape. See the module docstring for how empty
    masks are scored.
    """
    pred_mask, gt_mask = _as_mask_pair(pred, gt)
    return _binary_metrics(pred_mask, gt_mask, hd95_mode, spacing)


def _per_image_pair(
    pair: tuple[np.ndarray, np.ndarray], hd95_mode: str, spacing: Spacing
) -> dict[str, float | bool]:
    return per_image(pair[0], pair[1], hd95_mode=hd95_mode, spacing=spacing)  # type: ignore[arg-type]


def per_image_batch(
    preds: Iterable[np.ndarray],
    gts: Iterable[np.ndarray],
    *,
    hd95_mode: HD95Mode = "pooled",
    spacing: Spacing = None,
    workers: int = 0,
) -> list[dict[str, float | bool]]:
    """:func:`per_image` over paired sequences of masks (lists or (N, H, W) arrays), results in input order.

    With ``workers > 1`` the images are spread over that many processes, but only when each worker gets at least
    ``_MIN_IMAGES_PER_WORKER`` images: per-image HD95 on lesion masks takes about as long as sending the masks to
    another process, so the pool helps only with many images or expensive (large, speckled) masks on idle
    cores. The results are identical either way.
    """
    pred_list = list(preds)
    gt_list = list(gts)
    if len(pred_list) != len(gt_list):
        raise ValueError(
            f"got {len(pred_list)} predictions but {len(gt_list)} ground-truth masks; they must pair up"
        )
    _check_mode(hd95_mode)
    _as_spacing(spacing)
    score = partial(_per_image_pair, hd95_mode=hd95_mode, spacing=spacing)
    pairs = list(zip(pred_list, gt_list, strict=True))
    if workers <= 1 or len(pairs) < workers * _MIN_IMAGES_PER_WORKER:
        return [score(pair) for pair in pairs]
    chunksize = max(1, len(pairs) // (workers * 4))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(score, pairs, chunksize=chunksize))


# --------------------------------------------------------------------------------------------------------------
# multi-class


def _as_label_map(array: np.ndarray, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label map (H, W), got an array of shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(
            f"{name} holds class indices {int(array.min())}..{int(array.max())}, "
            f"outside 0..{num_classes - 1} for num_classes={num_classes}"
        )
    return array


def per_class(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    hd95_mode: HD95Mode = "pooled",
    spacing: Spacing = None,
) -> dict[str, float | bool]:
    """Metrics of a multi-class label map (0 = background, 1..K-1 = lesion classes).

    Returns the binary lesion metrics of :func:`per_image` on ``labels > 0`` under their usual keys, plus, for
    each class c in 1..K-1, ``dice_<name>``, ``iou_<name>``, ``hd95_<name>`` and ``penalised_<name>`` computed on
    ``labels == c`` with the same empty-mask conventions. ``<name>`` is ``class_names[c]`` when given (a name per
    class, background included), else ``class<c>``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an integer >= 2 (background + at least one class), got {num_classes!r}"
        )
    if class_names is None:
        names = [f"class{c}" for c in range(num_classes)]
    else:
        names = [str(n) for n in class_names]
        if len(names) != num_classes or len(set(names)) != num_classes:
            raise ValueError(
                f"class_names must give {num_classes} distinct names (background first), got {list(class_names)!r}"
            )
    pred = _as_label_map(pred_labels, "pred_labels", num_classes)
    gt = _as_label_map(gt_labels, "gt_labels", num_classes)
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred_labels and gt_labels must have the same shape, got {pred.shape} and {gt.shape}; "
            "resize the prediction to the ground-truth resolution (nearest neighbour) first"
        )
    result = _binary_metrics(pred > 0, gt > 0, hd95_mode, spacing)
    for c in range(1, num_classes):
        scores = _binary_metrics(pred == c, gt == c, hd95_mode, spacing)
        for key in ("dice", "iou", "hd95", "penalised"):
            result[f"{key}_{names[c]}"] = scores[key]
    return result


# --------------------------------------------------------------------------------------------------------------
# summary over images


def summarize(df: pd.DataFrame) -> dict[str, float | int]:
    """Summary of a per-image table (one row per image, as produced by :func:`per_image` plus a ``label`` column).

    Returns:

    * ``dice, iou, hd95, precision, recall, specificity``: means over all images. ``hd95`` includes the
      worst-case penalties, so false positives on normal images and missed lesions are not hidden.
    * ``<metric>_lesion``: the same means over lesion images (label benign or malignant) only.
    * ``hd95_penalised``: the COUNT of images whose HD95 was the worst-case penalty (exactly one mask empty).
    * ``normal_fp_rate``: share of normal images with any predicted pixel.
    * ``n_images``, ``n_lesion``, ``n_normal``: row counts.

    The only NaN values are lesion means when there is no lesion image and ``normal_fp_rate`` when there is no
    normal image: an average over nothing, reported as such instead of a made-up number.
    """
    required = (*METRIC_KEYS, *FLAG_KEYS, "label")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"per-image table lacks column(s) {', '.join(missing)}; expected {', '.join(required)}"
        )
    if len(df) == 0:
        raise ValueError("per-image table is empty; there is nothing to summarise")
    bad_labels = sorted(set(df["label"].astype(str)) - set(LABELS))
    if bad_labels:
        raise ValueError(f"column 'label' holds {bad_labels}; expected only {', '.join(LABELS)}")
    metrics = df[list(METRIC_KEYS)].astype(np.float64)
    holes = [c for c in METRIC_KEYS if metrics[c].isna().any()]
    if holes:
        raise ValueError(
            f"column(s) {', '.join(holes)} hold NaN; per-image metrics must be defined for every image"
        )

    lesion = df["label"].isin(LESION_LABELS).to_numpy()
    normal = (df["label"] == "normal").to_numpy()
    summary: dict[str, float | int] = {}
    for key in METRIC_KEYS:
        summary[key] = float(metrics[key].mean())
    for key in METRIC_KEYS:
        summary[f"{key}_lesion"] = float(metrics[key][lesion].mean()) if lesion.any() else math.nan
    summary["hd95_penalised"] = int(df["penalised"].astype(bool).sum())
    predicted_any = ~df["pred_empty"].astype(bool).to_numpy()
    summary["normal_fp_rate"] = float(predicted_any[normal].mean()) if normal.any() else math.nan
    summary["n_images"] = len(df)
    summary["n_lesion"] = int(lesion.sum())
    summary["n_normal"] = int(normal.sum())
    return summary
