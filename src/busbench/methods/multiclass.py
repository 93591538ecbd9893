"""Three-class lesion segmentation: background, benign lesion, malignant lesion.

BUS-UCLM (Vallez et al., Scientific Data 12:242, 2025) annotates each lesion with its diagnosis (green benign, red
malignant), so a network can be trained to label every pixel as background, benign or malignant instead of
lesion/no lesion. The other datasets ship binary masks plus an image-level label; :func:`class_map_from_binary`
colours their lesion pixels with the image's label so that every dataset can be trained the same way.

Class indices are fixed: 0 background, 1 benign, 2 malignant (:data:`CLASS_NAMES`). A normal image has an all-zero
map. The network outputs 3-channel logits; :func:`lesion_probability` turns them into the foreground probability
the binary metrics need (``1 - p(background)``), and :func:`predicted_classes` into the label map that
:func:`busbench.metrics.per_class` scores per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from busbench.errors import DataError, ModelError
from busbench.losses import deep_supervision_weights, smp_losses

CLASS_NAMES = ("background", "benign", "malignant")
NUM_CLASSES = len(CLASS_NAMES)
#: image label -> class index given to its lesion pixels (normal images have no lesion pixels)
LABEL_TO_CLASS = {"normal": 0, "benign": 1, "malignant": 2}


def class_map_from_binary(mask: np.ndarray, label: str) -> np.ndarray:
    """Class map ``uint8 (H, W)`` of a binary lesion mask: lesion pixels get the class of the image ``label``.

    ``mask`` is 2-D, boolean or 0/1 / 0/255 integers (any non-zero pixel is lesion). A ``normal`` image must have
    an empty mask: a lesion on an image labelled normal is a data error, not something to guess a class for.
    """
    key = str(label).strip().lower()
    if key not in LABEL_TO_CLASS:
        raise DataError(
            f"image label {label!r} has no lesion class; valid labels: {', '.join(LABEL_TO_CLASS)} "
            "(check the manifest's label column)"
        )
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"a binary mask must be 2-D (H, W), got shape {mask.shape}; convert RGB masks first")
    lesion = mask != 0
    cls = LABEL_TO_CLASS[key]
    if cls == 0 and lesion.any():
        raise DataError(
            f"an image labelled normal has {int(lesion.sum())} lesion pixels in its mask; "
            "fix the label or the mask in the manifest"
        )
    return (lesion * cls).astype(np.uint8)


def check_class_target(target: Tensor, num_classes: int) -> None:
    """Refuse a class map with fractional or out-of-range class indices (a ModelError naming them).

    This reads the values, so the trainer calls it on the batch as loaded, on the host: on a GPU tensor the read
    would make every training step wait for the GPU. The loss checks CPU targets itself.
    """
    if target.is_floating_point() and not torch.equal(target.round(), target):
        raise ModelError("a multi-class target must hold whole class indices, got fractional values")
    if target.numel():
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            raise ModelError(f"a multi-class target holds classes {low}..{high}, outside 0..{num_classes - 1}")


def _as_class_target(target: Tensor, num_classes: int) -> Tensor:
    """``(B, H, W)`` int64 class indices; values are checked when they are on the host (:func:`check_class_target`)."""
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != 3:
        raise ModelError(
            f"a multi-class target must be a (B, H, W) map of class indices, got shape {tuple(target.shape)}"
        )
    if target.device.type == "cpu":
        check_class_target(target, num_classes)
    return (target.round() if target.is_floating_point() else target).long()


def multiclass_loss(logits: Tensor, target: Tensor, ce_weight: float = 0.5) -> Tensor:
    """``ce_weight * CE + (1 - ce_weight) * Dice`` of ``(B, K, H, W)`` logits against ``(B, H, W)`` class indices.

    Cross-entropy is softmax cross-entropy averaged over pixels; Dice is segmentation_models_pytorch's multi-class
    soft Dice (mean over the classes present in the batch). The weighting mirrors ``train.bce_weight`` of the binary
    ``bce_dice`` loss, so the default trains with half of each. Computed in float32.
    """
    if logits.ndim != 4:
        raise ModelError(f"multi-class logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ModelError(f"ce_weight must lie in [0, 1], got {ce_weight}")
    target = _as_class_target(target, logits.shape[1])
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ModelError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on batch or image size"
        )
    logits = logits.float()
    total = logits.new_zeros(())
    if ce_weight:
        total = total + ce_weight * F.cross_entropy(logits, target)
    if ce_weight < 1.0:
        smp = smp_losses()
        dice = smp.DiceLoss(smp.MULTICLASS_MODE, from_logits=True)
        total = total + (1.0 - ce_weight) * dice(logits, target)
    return total


class MulticlassLoss(nn.Module):
    """:func:`multiclass_loss` on one output or on a deep-supervision list ``[main, aux_1, ...]``.

    Deep-supervision outputs are weighted as in :mod:`busbench.losses` (``ds_weights`` main first, or the
    default main 1 + auxiliaries sharing 1), so a multi-class run weights its outputs like a binary one.
    """

    def __init__(self, ce_weight: float = 0.5, ds_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.ce_weight = float(ce_weight)
        self.ds_weights = None if ds_weights is None else [float(w) for w in ds_weights]

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return multiclass_loss(outputs, target, self.ce_weight)
        weights = deep_supervision_weights(len(outputs), self.ds_weights)
        total = target.new_zeros((), dtype=torch.float32)
        for weight, out in zip(weights, outputs, strict=True):
            if weight:
                total = total + weight * multiclass_loss(out, target, self.ce_weight)
        return total


def lesion_probability(logits: Tensor) -> Tensor:
    """Foreground probability ``(B, 1, H, W)`` = ``1 - softmax(logits)[:, background]``.

    This is the probability that a pixel belongs to any lesion class, so thresholding it gives the binary lesion
    mask scored by the binary metrics, exactly as for a one-channel model.
    """
    if logits.ndim != 4 or logits.shape[1] < 2:
        raise ModelError(f"multi-class logits must be (B, K>=2, H, W), got shape {tuple(logits.shape)}")
    return 1.0 - torch.softmax(logits.float(), dim=1)[:, :1]


def predicted_classes(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Label map ``(B, H, W)`` (int64) consistent with the binary decision.

    A pixel is lesion when :func:`lesion_probability` exceeds ``threshold`` (the evaluator's ``eval.threshold``),
    and then takes the most probable lesion class; otherwise it is background. A plain argmax would disagree with
    the binary mask where the background is the single most likely class yet below one half (e.g. 0.4 / 0.3 / 0.3),
    and the per-class and binary metrics of one prediction would then describe different masks.
    """
    lesion = lesion_probability(logits)[:, 0] > threshold
    lesion_class = logits[:, 1:].argmax(dim=1) + 1
    return torch.where(lesion, lesion_class, torch.zeros_like(lesion_class))
