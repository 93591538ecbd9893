"""Joint lesion segmentation and image classification (normal / benign / malignant).

After Aumente-Maestro, Díez and Remeseiro, "A multi-task framework for breast cancer segmentation and
classification in ultrasound imaging", Computer Methods and Programs in Biomedicine (2025), the paper that also
introduced Curated BUSI. Its pieces, each usable on its own:

- a classification branch on the shared encoder features: :class:`ClassificationHead` reads the deepest feature
  map of any :class:`~busbench.models.base.SegModel` through a forward hook on ``model.bottleneck``, and
  :class:`MultiTaskModel` wraps a segmentation model so that ``forward`` returns ``(seg_logits, cls_logits)``;
- a multi-task loss ``lambda * Dice(seg) + (1 - lambda) * Focal(cls)`` (:class:`MultiTaskLoss`): lambda weights the
  segmentation task against the classification task;
- deterministic oversampling (:func:`oversampling_factors`, :func:`oversample_indices`): each training image is
  repeated a whole number of times derived from its class's share, instead of random resampling, so two runs
  see the same epochs;
- prediction refinement (:func:`refine`): the two outputs are made consistent at inference;
- image-level scores (:func:`classification_metrics`).

Class indices: 0 normal, 1 benign, 2 malignant (:data:`CLASS_LABELS`), the same order as the multi-class pixel
classes of :mod:`busbench.methods.multiclass` (0 there is background, which is what a normal image holds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from busbench.errors import ModelError
from busbench.losses import SegmentationLoss, build_criterion
from busbench.models.base import SegModel

CLASS_LABELS = ("normal", "benign", "malignant")
NORMAL = 0


# --------------------------------------------------------------------------------------------------------------
# classification branch


def pool_features(features: Tensor) -> Tensor:
    """``(B, C)`` descriptor of a feature map ``(B, C, h, w)`` (global average pool) or tokens ``(B, N, C)`` (mean)."""
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    if features.ndim == 3:
        return features.mean(dim=1)
    if features.ndim == 2:
        return features
    raise ModelError(
        f"cannot pool bottleneck features of shape {tuple(features.shape)}; expected (B, C, h, w) or (B, N, C)"
    )


class ClassificationHead(nn.Module):
    """Global pooling, dropout and one linear layer: image-level logits from the deepest shared features.

    Kept deliberately small, so that the classification task shapes the shared encoder rather than a head of
    its own.
    """

    def __init__(self, in_channels: int, num_classes: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ModelError(
                f"a classification head needs in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}"
            )
        self.in_channels = in_channels
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        pooled = pool_features(features)
        if pooled.shape[1] != self.in_channels:
            raise ModelError(
                f"the classification head expects {self.in_channels} bottleneck channels, got {pooled.shape[1]}; "
                "check the model's bottleneck_channels"
            )
        return self.fc(self.dropout(pooled))


class MultiTaskModel(SegModel):
    """A segmentation model plus a classification head on its bottleneck.

    ``forward(x)`` returns ``(seg, cls_logits)``: ``seg`` is whatever the wrapped model returns (logits, or the
    deep-supervision list ``[main, aux...]`` in training mode) and ``cls_logits`` is ``(B, num_classes)``. The
    wrapped model's conventions (input sizes, encoder, bottleneck) are delegated, not copied, so its parameters are
    counted once.
    """

    def __init__(self, seg_model: SegModel, num_classes: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        bottleneck = getattr(seg_model, "bottleneck", None)
        channels = getattr(seg_model, "bottleneck_channels", None)
        if not isinstance(bottleneck, nn.Module) or not isinstance(channels, int):
            raise ModelError(
                f"{type(seg_model).__name__} does not expose bottleneck / bottleneck_channels, so no classification "
                "head can be attached; choose a model that follows the SegModel interface"
            )
        self.seg = seg_model
        self.head = ClassificationHead(channels, num_classes, dropout)
        self.size_multiple = getattr(seg_model, "size_multiple", 1)
        self.fixed_sizes = getattr(seg_model, "fixed_sizes", None)
        self._features: Tensor | None = None
        self._hook = bottleneck.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._features = output[0] if isinstance(output, tuple | list) else output

    @property
    def bottleneck(self) -> nn.Module:  # type: ignore[override]
        return self.seg.bottleneck

    @property
    def bottleneck_channels(self) -> int:  # type: ignore[override]
        return self.seg.bottleneck_channels

    @property
    def deep_supervision(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.seg, "deep_supervision", False))

    def check_input_size(self, h: int, w: int) -> None:
        if hasattr(self.seg, "check_input_size"):
            self.seg.check_input_size(h, w)

    def encoder_modules(self) -> list[nn.Module]:
        return self.seg.encoder_modules()

    def forward(self, x: Tensor) -> tuple[Tensor | list[Tensor], Tensor]:
        self._features = None
        seg = self.seg(x)
        features, self._features = self._features, None
        if features is None:
            raise ModelError(
                f"{type(self.seg).__name__}.bottleneck was not called during forward, so the classification head "
                "got no features; the model's bottleneck attribute must name a submodule used in forward"
            )
        return seg, self.head(features)


# --------------------------------------------------------------------------------------------------------------
# loss


def multiclass_focal_loss(
    logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: Tensor | None = None
) -> Tensor:
    """Softmax focal loss (Lin et al. 2017), mean over the batch: ``-alpha_t (1 - p_t)^gamma log p_t``.

    ``p_t`` is the softmax probability of the true class, so this is cross-entropy with easy images
    down-weighted; ``gamma = 0`` gives plain cross-entropy. ``alpha`` is an optional per-class weight vector.
    A softmax (one class per image) rather than torchvision's one-vs-rest sigmoid focal loss, because an image is
    exactly one of normal, benign or malignant.
    """
    if logits.ndim != 2 or target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ModelError(
            f"focal loss takes logits (B, K) and class indices (B,), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    logits = logits.float()
    target = target.long()
    ce = F.cross_entropy(logits, target, reduction="none")
    p_t = torch.exp(-ce)
    loss = (1.0 - p_t).pow(gamma) * ce
    if alpha is not None:
        loss = alpha.to(loss)[target] * loss
    return loss.mean()


class MultiTaskLoss(nn.Module):
    """``lam * Dice(seg, mask) + (1 - lam) * Focal(cls_logits, label)``.

    The Dice term is segmentation_models_pytorch's binary soft Dice over the whole batch (defined on batches of
    normal images with empty masks) and accepts deep-supervision lists, weighted as in
    :mod:`busbench.losses`. ``forward`` returns the total; ``last_parts`` holds the two terms of the latest
    call as detached 0-d tensors, for logging (read them when logging, not every step: a read waits for the GPU).
    """

    def __init__(
        self, lam: float = 0.5, gamma: float = 2.0, ds_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ModelError(f"the multi-task weight lambda must lie in [0, 1], got {lam}")
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.seg_loss = SegmentationLoss(build_criterion("dice"), ds_weights)
        self.last_parts: dict[str, Tensor] = {}

    def forward(
        self, outputs: tuple[Tensor | Sequence[Tensor], Tensor], masks: Tensor, labels: Tensor
    ) -> Tensor:
        seg, cls_logits = outputs
        seg_term = self.seg_loss(seg, masks)
        cls_term = multiclass_focal_loss(cls_logits, labels, self.gamma)
        self.last_parts = {"seg": seg_term.detach(), "cls": cls_term.detach()}
        return self.lam * seg_term + (1.0 - self.lam) * cls_term


# --------------------------------------------------------------------------------------------------------------
# deterministic oversampling


def oversampling_factors(labels: Sequence[Hashable]) -> dict[Hashable, int]:
    """Whole replication factor per class: ``max_count / count`` rounded half up (at least 1).

    The largest class keeps factor 1 and every other class is repeated until it is about as large, e.g. counts
    normal 50, benign 200, malignant 100 give factors 4, 1, 2. Keys are sorted.
    """
    counts = Counter(labels)
    if not counts:
        raise ModelError("cannot compute oversampling factors of an empty training set")
    largest = max(counts.values())
    return {label: max(1, math.floor(largest / counts[label] + 0.5)) for label in sorted(counts)}


def oversample_indices(labels: Sequence[Hashable]) -> list[int]:
    """Indices of the oversampled training set: each index repeated its class's factor times, in order.

    No randomness: the same labels always give the same list (the DataLoader's seeded shuffle then orders it).
    """
    factors = oversampling_factors(labels)
    return [i for i, label in enumerate(labels) for _ in range(factors[label])]


# --------------------------------------------------------------------------------------------------------------
# refinement


def refine(
    seg_prob: Tensor, cls_probs: Tensor, threshold: float = 0.5, normal_index: int = NORMAL
) -> tuple[Tensor, Tensor]:
    """Make a segmentation and a classification of the same images agree.

    Two rules, applied in this order to ``seg_prob`` (``(B, 1, H, W)`` or ``(B, H, W)`` lesion probabilities) and
    ``cls_probs`` (``(B, K)`` class probabilities):

    1. an image classified normal (``normal_index`` is its most probable class) gets an empty mask;
    2. an image whose (refined) mask has a pixel above ``threshold`` cannot be normal: its normal probability is
       set to 0 and the others renormalised.

    Afterwards "normal => empty mask" and "non-empty mask => not normal" both hold. The order lets the image-level
    decision, which sees the whole image, overrule scattered false-positive pixels on normal images; a lesion
    class with an empty mask is left as it is (the classifier may see a lesion the segmentation missed).
    Returns new tensors; the inputs are not modified.
    """
    if cls_probs.ndim != 2 or cls_probs.shape[0] != seg_prob.shape[0]:
        raise ModelError(
            f"refine needs class probabilities (B, K) for the B masks, got {tuple(cls_probs.shape)} "
            f"and masks {tuple(seg_prob.shape)}"
        )
    if seg_prob.ndim not in (3, 4):
        raise ModelError(f"refine needs masks (B, 1, H, W) or (B, H, W), got {tuple(seg_prob.shape)}")
    is_normal = cls_probs.argmax(dim=1) == normal_index
    seg = seg_prob.clone()
    seg[is_normal] = 0
    has_lesion = (seg > threshold).flatten(1).any(dim=1)
    cls = cls_probs.clone()
    if has_lesion.any():
        rows = cls[has_lesion]
        rows[:, normal_index] = 0
        cls[has_lesion] = rows / rows.sum(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    return seg, cls


# --------------------------------------------------------------------------------------------------------------
# metrics


def _as_class_indices(values: Sequence, names: Sequence[str], what: str) -> np.ndarray:
    out = []
    for v in values:
        if isinstance(v, str):
            key = v.strip().lower()
            if key not in names:
                raise ValueError(f"{what} holds unknown class {v!r}; valid classes: {', '.join(names)}")
            out.append(names.index(key))
        else:
            i = int(v)
            if not 0 <= i < len(names):
                raise ValueError(f"{what} holds class index {i}, outside 0..{len(names) - 1}")
            out.append(i)
    return np.asarray(out, dtype=np.int64)


def classification_metrics(
    y_true: Sequence, y_pred: Sequence, class_names: Sequence[str] = CLASS_LABELS
) -> dict[str, float | list[list[int]]]:
    """Image-level scores: ``accuracy``, ``macro_f1``, ``recall_<class>`` and ``confusion`` (rows true, cols pred).

    Labels may be class names or indices into ``class_names``. ``macro_f1`` averages over the classes that occur in
    either list (sklearn's convention); a class absent from ``y_true`` has an undefined recall, reported as NaN.
    """
    names = [n.lower() for n in class_names]
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if not len(y_true):
        raise ValueError("classification metrics need at least one image")
    # imported here: scikit-learn takes a second to import, and only multi-task runs score image labels
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    t = _as_class_indices(y_true, names, "y_true")
    p = _as_class_indices(y_pred, names, "y_pred")
    labels = list(range(len(names)))
    recalls = recall_score(t, p, labels=labels, average=None, zero_division=np.nan)
    result: dict[str, float | list[list[int]]] = {
        "accuracy": float(accuracy_score(t, p)),
        "macro_f1": float(f1_score(t, p, average="macro", zero_division=0.0)),
    }
    for name, r in zip(names, recalls, strict=True):
        result[f"recall_{name}"] = float(r)
    result["confusion"] = confusion_matrix(t, p, labels=labels).tolist()
    return result
