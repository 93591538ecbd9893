"""Tests for busbench.metrics: empty-mask conventions, HD95 against medpy/MONAI/brute force, summaries.

MONAI (1.3+) computes boundaries like medpy: it crops to the union bounding box with a one-pixel margin (zero
padded beyond the image), erodes with scipy's default cross structuring element and XORs. Its Euclidean surface
distances come back as float32 and its percentile is ``torch.quantile`` (linear) in float32, so MONAI is compared
with a relative tolerance of 1e-6; medpy works in float64 and is compared to 1e-9.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from busbench import metrics
from busbench.metrics import hd95, per_class, per_image, per_image_batch, summarize

# --------------------------------------------------------------------------------------------------------------
# realistic masks


def ellipse(shape, center, radii, angle=0.0):
    """Filled rotated ellipse, the usual shape of a benign lesion."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    cos, sin = math.cos(angle), math.sin(angle)
    dy, dx = rows - center[0], cols - center[1]
    u = (dy * cos + dx * sin) / radii[0]
    v = (-dy * sin + dx * cos) / radii[1]
    return u * u + v * v <= 1.0


def lobulated(shape, center, radius, rng, lobes=5, depth=0.25):
    """Star-shaped blob with a wavy margin, like an irregular (often malignant) lesion."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    theta = np.arctan2(rows - center[0], cols - center[1])
    wobble = sum(
        rng.uniform(0, depth) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(2, 2 + lobes)
    )
    return np.hypot(rows - center[0], cols - center[1]) <= radius * (1.0 + wobble)


def random_lesion(shape, rng):
    h, w = shape
    center = (rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w)
    if rng.random() < 0.5:
        mask = ellipse(
            shape, center, (rng.uniform(0.08, 0.3) * h, rng.uniform(0.08, 0.3) * w), rng.uniform(0, np.pi)
        )
    else:
        mask = lobulated(shape, center, rng.uniform(0.1, 0.3) * min(h, w), rng)
    if not mask.any():
        mask[int(center[0]), int(center[1])] = True
    return mask


def perturb(mask, rng):
    """A plausible prediction: shifted, grown or shrunk, sometimes with a spurious islet."""
    out = np.roll(mask, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
    steps = int(rng.integers(0, 3))
    if steps:
        op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
        out = op(out, iterations=steps)
    if rng.random() < 0.3:
        h, w = mask.shape
        out |= ellipse(mask.shape, (rng.uniform(0, h), rng.uniform(0, w)), (2 + rng.uniform(0, 3), 3.0))
    if not out.any():
        out = mask.copy()
    return out


def smooth_noise_mask(shape, rng):
    """Random multi-component mask, often touching the image border."""
    field = ndimage.gaussian_filter(rng.random(shape), rng.uniform(1.0, 4.0))
    mask = field > np.quantile(field, rng.uniform(0.5, 0.9))
    if not mask.any():
        mask[0, 0] = True
    return mask


def mask_pairs(seed, count=12, sizes=((32, 32), (64, 48), (96, 128))):
    """Non-empty (pred, gt) pairs: lesions, blobs, and masks cut by the image border."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        shape = sizes[i % len(sizes)]
        kind = i % 4
        if kind == 0:
            gt = random_lesion(shape, rng)
            pred = perturb(gt, rng)
        elif kind == 1:
            gt, pred = smooth_noise_mask(shape, rng), smooth_noise_mask(shape, rng)
        elif kind == 2:  # lesion centred on an edge or a corner: cut by the border
            corner = (rng.choice([0, shape[0] - 1]), rng.uniform(0, shape[1]))
            gt = ellipse(shape, corner, (shape[0] * 0.3, shape[1] * 0.25), rng.uniform(0, np.pi))
            pred = perturb(gt, rng)
        else:  # masks filling almost everything, boundaries on all four image edges
            gt = np.ones(shape, dtype=bool)
            gt[rng.integers(0, shape[0]), :] = False
            pred = ~ellipse(shape, (shape[0] / 2, shape[1] / 2), (shape[0] / 5, shape[1] / 6))
        pairs.append((pred, gt))
    return pairs


# --------------------------------------------------------------------------------------------------------------
# an independent brute-force HD95: explicit 4-neighbour boundary and all pairwise distances


def brute_force_hd95(pred, gt, mode):
    def boundary(mask):
        padded = np.pad(mask, 1)
        interior = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
        return np.argwhere(mask & ~interior).astype(float)

    a, b = boundary(pred), boundary(gt)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    a_to_b, b_to_a = pairwise.min(axis=1), pairwise.min(axis=0)
    if mode == "pooled":
        return float(np.percentile(np.concatenate([a_to_b, b_to_a]), 95))
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


# --------------------------------------------------------------------------------------------------------------
# empty-mask conventions (README, Metrics: an empty pair scores Dice 1 and HD95 0; exactly one empty mask scores
# Dice 0 and the worst-case HD95, the diagonal)

H, W = 48, 64  # diagonal 80


def test_both_empty_is_a_perfect_score():
    empty = np.zeros((H, W), dtype=bool)
    for mode in metrics.HD95_MODES:
        result = per_image(empty, empty, hd95_mode=mode)
        assert result == {
            "dice": 1.0,
            "iou": 1.0,
            "hd95": 0.0,
            "precision": 1.0,
            "recall": 1.0,
            "specificity": 1.0,
            "penalised": False,
            "pred_empty": True,
            "gt_empty": True,
        }


@pytest.mark.parametrize("mode", metrics.HD95_MODES)
def test_missed_lesion_gets_zero_overlap_and_diagonal_hd95(mode):
    gt = ellipse((H, W), (20, 30), (8, 12))
    result = per_image(np.zeros_like(gt), gt, hd95_mode=mode)
    assert result["dice"] == 0.0 and result["iou"] == 0.0
    assert result["hd95"] == 80.0
    assert result["precision"] == 0.0 and result["recall"] == 0.0
    assert result["specificity"] == 1.0
    assert result["penalised"] and result["pred_empty"] and not result["gt_empty"]


@pytest.mark.parametrize("mode", metrics.HD95_MODES)
def test_false_positive_on_normal_image_is_penalised(mode):
    pred = np.zeros((H, W), dtype=bool)
    pred[10:14, 5:10] = True  # 20 pixels
    result = per_image(pred, np.zeros_like(pred), hd95_mode=mode)
    assert result["dice"] == 0.0 and result["iou"] == 0.0
    assert result["hd95"] == 80.0
    assert result["precision"] == 0.0 and result["recall"] == 0.0
    assert result["specificity"] == pytest.approx((H * W - 20) / (H * W), abs=1e-15)
    assert result["penalised"] and not result["pred_empty"] and result["gt_empty"]


def test_penalty_is_the_diagonal_in_spacing_units():
    gt = np.zeros((30, 40), dtype=bool)
    gt[5, 5] = True
    assert hd95(np.zeros_like(gt), gt) == 50.0
    assert hd95(np.zeros_like(gt), gt, spacing=0.5) == 25.0
    assert hd95(gt, np.zeros_like(gt), spacing=(2.0, 0.75)) == pytest.approx(math.hypot(60, 30), abs=1e-12)


def test_no_metric_is_ever_nan():
    rng = np.random.default_rng(3)
    shape = (24, 24)
    masks = [
        np.zeros(shape, bool),
        np.ones(shape, bool),
        random_lesion(shape, rng),
        smooth_noise_mask(shape, rng),
    ]
    for pred in masks:
        for gt in masks:
            for mode in metrics.HD95_MODES:
                values = per_image(pred, gt, hd95_mode=mode)
                assert all(math.isfinite(values[k]) for k in metrics.METRIC_KEYS), (
                    values,
                    pred.sum(),
                    gt.sum(),
                )


def test_specificity_is_one_when_ground_truth_covers_the_image():
    gt = np.ones((16, 16), dtype=bool)
    pred = np.zeros_like(gt)
    pred[4:8, 4:8] = True
    result = per_image(pred, gt)
    assert result["specificity"] == 1.0
    assert result["recall"] == 16 / 256 and result["precision"] == 1.0


def test_hand_computed_overlap():
    gt = np.zeros((10, 10), dtype=bool)
    gt[0:4, 0:5] = True  # 20 px
    pred = np.zeros_like(gt)
    pred[2:6, 0:5] = True  # 20 px, 10 shared
    result = per_image(pred, gt)
    assert result["dice"] == 0.5
    assert result["iou"] == 10 / 30
    assert result["precision"] == 0.5 and result["recall"] == 0.5
    assert result["specificity"] == 70 / 80


# --------------------------------------------------------------------------------------------------------------
# input handling


def test_accepts_bool_01_and_0255_encodings_identically():
    rng = np.random.default_rng(4)
    gt = random_lesion((40, 40), rng)
    pred = perturb(gt, rng)
    expected = per_image(pred, gt)
    for encode in (
        lambda m: m.astype(np.uint8),
        lambda m: m.astype(np.uint8) * 255,
        lambda m: m.astype(np.int64),
        lambda m: m.astype(np.float32),
    ):
        assert per_image(encode(pred), encode(gt)) == expected
    assert per_image(pred.astype(np.uint8) * 255, gt) == expected


def test_rejects_shape_mismatch_naming_both_shapes():
    with pytest.raises(ValueError, match=r"pred \(32, 32\) and gt \(32, 40\)"):
        per_image(np.zeros((32, 32), bool), np.zeros((32, 40), bool))
    with pytest.raises(ValueError, match=r"pred \(32, 32\) and gt \(32, 40\)"):
        hd95(np.zeros((32, 32), bool), np.zeros((32, 40), bool))


@pytest.mark.parametrize("shape", [(1, 32, 32), (32,), ()])
def test_rejects_non_2d_masks(shape):
    with pytest.raises(ValueError, match=rf"2-D mask.*shape {re_shape(shape)}"):
        per_image(np.zeros(shape, bool), np.zeros(shape, bool))


def re_shape(shape):
    return str(shape).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize(
    "values",
    [np.array([[0, 1], [255, 0]], np.uint8), np.array([[0.0, 0.3], [0.9, 1.0]]), np.array([[0, 2], [2, 0]])],
)
def test_rejects_non_binary_values(values):
    with pytest.raises(ValueError, match="must be binary"):
        per_image(values, np.zeros((2, 2), bool))


def test_rejects_unknown_mode_and_bad_spacing():
    mask = np.eye(8, dtype=bool)
    with pytest.raises(ValueError, match="unknown HD95 mode 'mean'"):
        hd95(mask, mask, mode="mean")
    with pytest.raises(ValueError, match="spacing"):
        hd95(mask, mask, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(mask, mask, spacing=(1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------------------------
# Dice / IoU / precision / recall / specificity against scikit-learn


def test_overlap_metrics_match_sklearn():
    from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

    for pred, gt in mask_pairs(seed=5, count=16):
        result = per_image(pred, gt)
        y_pred, y_true = pred.ravel(), gt.ravel()
        assert result["dice"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
        assert result["iou"] == pytest.approx(jaccard_score(y_true, y_pred), abs=1e-12)
        assert result["precision"] == pytest.approx(precision_score(y_true, y_pred), abs=1e-12)
        assert result["recall"] == pytest.approx(recall_score(y_true, y_pred), abs=1e-12)
        assert result["specificity"] == pytest.approx(
            recall_score(y_true, y_pred, pos_label=0, zero_division=1.0), abs=1e-12
        )


# --------------------------------------------------------------------------------------------------------------
# HD95


def test_hd95_of_two_points_is_their_distance():
    pred = np.zeros((20, 20), dtype=bool)
    gt = np.zeros_like(pred)
    pred[2, 3] = True
    gt[5, 7] = True
    for mode in metrics.HD95_MODES:
        assert hd95(pred, gt, mode=mode) == 5.0
        assert hd95(pred, gt, mode=mode, spacing=(2.0, 1.0)) == math.hypot(6.0, 4.0)


def test_identical_masks_have_zero_hd95():
    for _, gt in mask_pairs(seed=6, count=8):
        for mode in metrics.HD95_MODES:
            assert hd95(gt, gt, mode=mode) == 0.0


@pytest.mark.parametrize("mode", metrics.HD95_MODES)
def test_hd95_matches_brute_force(mode):
    for pred, gt in mask_pairs(seed=7, count=12, sizes=((24, 24), (32, 20), (40, 36))):
        assert hd95(pred, gt, mode=mode) == pytest.approx(brute_force_hd95(pred, gt, mode), abs=1e-9)


def test_pooled_is_symmetric_and_never_above_max_directed():
    for pred, gt in mask_pairs(seed=8, count=16):
        pooled = hd95(pred, gt, mode="pooled")
        assert pooled == hd95(gt, pred, mode="pooled")
        assert pooled <= hd95(pred, gt, mode="max_directed") + 1e-12


@pytest.mark.parametrize("share", [0.0, 1.0], ids=["distance-transform", "kd-tree"])
@pytest.mark.parametrize("spacing", [None, (0.6, 1.7)])
def test_fast_path_equals_full_image_reference(monkeypatch, share, spacing):
    # share 0.0 forces the cropped distance transform, 1.0 the KD-tree; both must equal the full image.
    monkeypatch.setattr(metrics, "_KDTREE_MAX_BOUNDARY_SHARE", share)
    for pred, gt in mask_pairs(seed=9, count=16):
        for mode in metrics.HD95_MODES:
            fast = hd95(pred, gt, mode=mode, spacing=spacing)
            full = metrics._hd95_reference(pred, gt, mode=mode, spacing=spacing)
            assert abs(fast - full) <= 1e-9, (mode, fast, full)


def test_fast_path_handles_masks_on_every_border_and_single_pixels():
    shape = (16, 20)
    cases = []
    for r, c in [(0, 0), (0, 19), (15, 0), (15, 19), (0, 7), (9, 0), (15, 11), (4, 19)]:
        single = np.zeros(shape, bool)
        single[r, c] = True
        cases.append(single)
    full_rows = np.zeros(shape, bool)
    full_rows[:, 3:9] = True  # touches top and bottom edges
    cases += [full_rows, np.ones(shape, bool), ~full_rows]
    for pred in cases:
        for gt in cases:
            for mode in metrics.HD95_MODES:
                assert hd95(pred, gt, mode=mode) == pytest.approx(brute_force_hd95(pred, gt, mode), abs=1e-9)
                assert hd95(pred, gt, mode=mode) == metrics._hd95_reference(pred, gt, mode=mode)


def test_pooled_matches_medpy():
    medpy_binary = pytest.importorskip("medpy.metric.binary")
    for pred, gt in mask_pairs(seed=10, count=24, sizes=((32, 32), (64, 64), (128, 96), (60, 200))):
        assert hd95(pred, gt) == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-9)
        assert hd95(pred, gt, spacing=(0.5, 1.25)) == pytest.approx(
            medpy_binary.hd95(pred, gt, voxelspacing=(0.5, 1.25)), abs=1e-9
        )


def monai_hd95(pred, gt, spacing=None):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")

    def one_hot(mask):
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = monai_metrics.compute_hausdorff_distance(
            one_hot(pred), one_hot(gt), include_background=False, percentile=95, spacing=spacing
        )
    return float(value[0, 0])


def test_max_directed_matches_monai():
    for pred, gt in mask_pairs(seed=11, count=24, sizes=((32, 32), (64, 64), (128, 96), (60, 200))):
        assert hd95(pred, gt, mode="max_directed") == pytest.approx(monai_hd95(pred, gt), rel=1e-6, abs=1e-6)
        assert hd95(pred, gt, mode="max_directed", spacing=(0.5, 1.25)) == pytest.approx(
            monai_hd95(pred, gt, spacing=(0.5, 1.25)), rel=1e-6, abs=1e-6
        )


@pytest.mark.realdata
def test_hd95_on_real_lesion_masks_matches_medpy_and_monai(real_data_root):
    from PIL import Image

    medpy_binary = pytest.importorskip("medpy.metric.binary")
    mask_dir = real_data_root / "BUSBRA" / "Masks"
    files = sorted(mask_dir.glob("*.png"))[:8]
    if not files:
        pytest.skip(f"no BUSBRA masks under {mask_dir}")
    rng = np.random.default_rng(12)
    for path in files:
        gt = np.asarray(Image.open(path)) > 0
        pred = perturb(gt, rng)
        pooled = hd95(pred, gt)
        assert pooled == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-9), path.name
        assert hd95(pred, gt, mode="max_directed") == pytest.approx(monai_hd95(pred, gt), rel=1e-6), path.name


# --------------------------------------------------------------------------------------------------------------
# multi-class


def test_per_class_on_constructed_label_maps():
    shape = (40, 50)
    gt = np.zeros(shape, np.uint8)
    gt[5:15, 5:15] = 1  # class 1 lesion, 100 px
    gt[25:35, 30:45] = 2  # class 2 lesion, 150 px
    pred = gt.copy()
    pred[25:35, 30:45] = 1  # class 2 lesion found but called class 1
    pred[5:15, 5:10] = 0  # half of the class 1 lesion missed

    result = per_class(pred, gt, num_classes=3)
    # binary lesion metrics ignore the class swap
    binary = per_image(pred > 0, gt > 0)
    for key in (*metrics.METRIC_KEYS, *metrics.FLAG_KEYS):
        assert result[key] == binary[key]
    assert result["dice"] == 2 * 200 / (200 + 250)
    # class 1: pred 50 + 150 px, gt 100 px, overlap 50
    assert result["dice_class1"] == 2 * 50 / 300
    assert result["iou_class1"] == 50 / 250
    assert result["hd95_class1"] == hd95(pred == 1, gt == 1)
    assert not result["penalised_class1"]
    # class 2 never predicted: worst case
    assert result["dice_class2"] == 0.0 and result["iou_class2"] == 0.0
    assert result["hd95_class2"] == math.hypot(*shape)
    assert result["penalised_class2"]


def test_per_class_names_and_absent_classes():
    gt = np.zeros((20, 20), np.int64)
    gt[2:6, 2:6] = 1
    result = per_class(gt, gt, 3, class_names=["background", "benign", "malignant"])
    assert result["dice_benign"] == 1.0 and result["hd95_benign"] == 0.0
    # a class absent from both maps is a correct "nothing there"
    assert result["dice_malignant"] == 1.0 and result["hd95_malignant"] == 0.0
    assert not result["penalised_malignant"]


def test_per_class_rejects_bad_labels():
    labels = np.zeros((8, 8), np.uint8)
    labels[0, 0] = 3
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        per_class(labels, np.zeros_like(labels), 3)
    with pytest.raises(ValueError, match="integer class indices"):
        per_class(labels.astype(float), labels.astype(float), 4)
    with pytest.raises(ValueError, match="distinct names"):
        per_class(labels, labels, 4, class_names=["bg", "a", "b"])
    with pytest.raises(ValueError, match=r"same shape, got \(8, 8\) and \(8, 9\)"):
        per_class(labels, np.zeros((8, 9), np.uint8), 4)


# --------------------------------------------------------------------------------------------------------------
# summary over images


def constructed_table():
    rows = [
        # label,      dice, iou,  hd95, prec, rec,  spec, penalised, pred_empty, gt_empty
        ("normal", 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, False, True, True),
        ("normal", 0.0, 0.0, 80.0, 0.0, 0.0, 0.9, True, False, True),
        ("normal", 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, False, True, True),
        ("benign", 0.8, 0.6, 10.0, 0.9, 0.7, 0.99, False, False, False),
        ("malignant", 0.4, 0.25, 30.0, 0.5, 0.3, 0.95, False, False, False),
        ("malignant", 0.0, 0.0, 80.0, 0.0, 0.0, 1.0, True, True, False),
    ]
    columns = ["label", *metrics.METRIC_KEYS, *metrics.FLAG_KEYS]
    return pd.DataFrame(rows, columns=columns)


def test_summarize_constructed_table(tmp_path):
    summary = summarize(constructed_table())
    expected = {
        "dice": 3.2 / 6,
        "iou": 2.85 / 6,
        "hd95": 200.0 / 6,
        "precision": 3.4 / 6,
        "recall": 3.0 / 6,
        "specificity": 5.84 / 6,
        "dice_lesion": 1.2 / 3,
        "iou_lesion": 0.85 / 3,
        "hd95_lesion": 120.0 / 3,
        "precision_lesion": 1.4 / 3,
        "recall_lesion": 1.0 / 3,
        "specificity_lesion": 2.94 / 3,
        "hd95_penalised": 2,
        "normal_fp_rate": 1 / 3,
        "n_images": 6,
        "n_lesion": 3,
        "n_normal": 3,
    }
    assert summary.keys() == expected.keys()
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, abs=1e-12), key
    # a per-image CSV read back summarises the same
    path = tmp_path / "per_image.csv"
    constructed_table().to_csv(path, index=False)
    assert summarize(pd.read_csv(path)) == pytest.approx(summary, abs=1e-12)


def test_summarize_matches_per_image_results():
    rng = np.random.default_rng(13)
    rows = []
    for i in range(9):
        gt = random_lesion((32, 32), rng) if i % 3 else np.zeros((32, 32), bool)
        pred = perturb(gt, rng) if gt.any() else (smooth_noise_mask((32, 32), rng) if i == 3 else gt)
        rows.append(
            {**per_image(pred, gt), "label": "normal" if i % 3 == 0 else ("benign", "malignant")[i % 2]}
        )
    table = pd.DataFrame(rows)
    summary = summarize(table)
    assert summary["dice"] == pytest.approx(np.mean([r["dice"] for r in rows]), abs=1e-12)
    assert summary["hd95_penalised"] == 1  # the one normal image with a predicted blob
    assert summary["normal_fp_rate"] == pytest.approx(1 / 3, abs=1e-12)


def test_summarize_without_normal_images_reports_nan_rate():
    table = constructed_table()
    table = table[table["label"] != "normal"]
    summary = summarize(table)
    assert math.isnan(summary["normal_fp_rate"]) and summary["n_normal"] == 0
    assert summary["dice"] == pytest.approx(1.2 / 3, abs=1e-12)


def test_summarize_rejects_broken_tables():
    table = constructed_table()
    with pytest.raises(ValueError, match="lacks column.*hd95"):
        summarize(table.drop(columns=["hd95"]))
    broken = table.copy()
    broken.loc[0, "dice"] = np.nan
    with pytest.raises(ValueError, match="dice hold NaN"):
        summarize(broken)
    broken = table.copy()
    broken.loc[0, "label"] = "cyst"
    with pytest.raises(ValueError, match="cyst"):
        summarize(broken)
    with pytest.raises(ValueError, match="empty"):
        summarize(table.iloc[:0])


# --------------------------------------------------------------------------------------------------------------
# batches


def test_batch_matches_single_images_in_order_with_and_without_workers(monkeypatch):
    pairs = mask_pairs(seed=14, count=20, sizes=((32, 32), (40, 24)))
    preds, gts = [p for p, _ in pairs], [g for _, g in pairs]
    expected = [per_image(p, g, hd95_mode="max_directed") for p, g in pairs]

    assert per_image_batch(preds, gts, hd95_mode="max_directed") == expected

    pools = []

    class RecordingPool(metrics.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(metrics, "ProcessPoolExecutor", RecordingPool)
    monkeypatch.setattr(metrics, "_MIN_IMAGES_PER_WORKER", 8)
    assert per_image_batch(preds, gts, hd95_mode="max_directed", workers=2) == expected
    assert pools == [{"max_workers": 2}]
    # too few images for two workers: stays in this process
    assert per_image_batch(preds[:3], gts[:3], hd95_mode="max_directed", workers=2) == expected[:3]
    assert len(pools) == 1


def test_batch_accepts_stacked_arrays_and_rejects_unpaired_lists():
    pairs = mask_pairs(seed=15, count=4, sizes=((24, 24),))
    preds = np.stack([p for p, _ in pairs])
    gts = np.stack([g for _, g in pairs])
    assert per_image_batch(preds, gts) == [per_image(p, g) for p, g in pairs]
    with pytest.raises(ValueError, match="4 predictions but 3"):
        per_image_batch(preds, gts[:3])
