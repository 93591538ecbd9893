"""Training losses for binary lesion segmentation, built from segmentation_models_pytorch.

``train.loss`` picks the criterion; every one takes logits ``(B, 1, H, W)`` and a 0/1 target of the same shape:

==========  ==============================================================================================
bce_dice    ``bce_weight * BCE + (1 - bce_weight) * Dice``; the default 0.5 / 0.5 is the loss the public
            Awesome_Segmentation_in_Medical benchmark code trains its BUSI, BUS-UCLM and BUSBRA baselines with
bce         binary cross-entropy on logits
dice        soft Dice over the whole batch (so batches of normal images with empty masks stay defined)
focal       focal loss, gamma 2
lovasz      Lovasz hinge (a surrogate of IoU)
tversky     Tversky loss with alpha 0.3 (false positives) and beta 0.7 (false negatives): small lesions are
            missed more often than over-segmented, so misses cost more
==========  ==============================================================================================

Deep supervision. Models with deep supervision return ``[main, aux_1, ..., aux_n]`` in training mode. The loss is
the weighted mean ``sum(w_i * L(out_i)) / sum(w_i)``. By default the main output has weight 1 and the auxiliary
outputs share a weight of 1 equally (``1 / n`` each), so the main output always carries half of the signal however
deep the decoder is, and the loss stays on the scale of a single-output model. ``train.deep_supervision_weights``
replaces the weights (one per output, main first); they are normalised the same way.

Losses are computed in float32 even under mixed precision: Dice and log-sigmoid lose too much in bfloat16.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor, nn

from busbench.config import TrainConfig
from busbench.errors import ConfigError, ModelError

LOSS_NAMES = ("bce_dice", "bce", "dice", "focal", "lovasz", "tversky")
TVERSKY_ALPHA = 0.3
TVERSKY_BETA = 0.7


class WeightedSum(nn.Module):
    """``sum(w_i * loss_i(logits, target))``: combines criteria such as BCE and Dice."""

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)
        self.weights = [float(w) for w in weights]

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        for weight, loss in zip(self.weights, self.losses, strict=True):
            if weight:
                total = total + weight * loss(logits, target)
        return total


def smp_losses() -> ModuleType:
    """``segmentation_models_pytorch.losses``, imported on first use.

    Importing it imports all of segmentation_models_pytorch, timm and torchvision (about 3 s on a CPU), which
    evaluation and prediction of busbench's own models never need.
    """
    import segmentation_models_pytorch.losses as losses

    return losses


def build_criterion(name: str, bce_weight: float = 0.5) -> nn.Module:
    """The single-output criterion named ``name`` (one of :data:`LOSS_NAMES`)."""
    smp = smp_losses()
    mode = smp.BINARY_MODE
    if name == "bce_dice":
        return WeightedSum(
            [smp.SoftBCEWithLogitsLoss(), smp.DiceLoss(mode, from_logits=True)],
            [bce_weight, 1.0 - bce_weight],
        )
    if name == "bce":
        return smp.SoftBCEWithLogitsLoss()
    if name == "dice":
        return smp.DiceLoss(mode, from_logits=True)
    if name == "focal":
        return smp.FocalLoss(mode, gamma=2.0)
    if name == "lovasz":
        return smp.LovaszLoss(mode, from_logits=True)
    if name == "tversky":
        return smp.TverskyLoss(mode, from_logits=True, alpha=TVERSKY_ALPHA, beta=TVERSKY_BETA)
    raise ConfigError(f"config key 'train.loss' is {name!r}; valid losses: {', '.join(LOSS_NAMES)}")


def deep_supervision_weights(n_outputs: int, weights: Sequence[float] | None) -> list[float]:
    """Normalised weights of ``[main, aux_1, ..., aux_n]`` (see the module docstring)."""
    if weights is None:
        if n_outputs == 1:
            return [1.0]
        raw = [1.0] + [1.0 / (n_outputs - 1)] * (n_outputs - 1)
    else:
        if len(weights) != n_outputs:
            raise ConfigError(
                f"config key 'train.deep_supervision_weights' has {len(weights)} weights but the model returns "
                f"{n_outputs} outputs (main first); give {n_outputs} weights or set it to null for the default"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(
                f"config key 'train.deep_supervision_weights' must be non-negative with a positive sum, got {list(weights)}"
            )
        raw = [float(w) for w in weights]
    total = sum(raw)
    return [w / total for w in raw]


class SegmentationLoss(nn.Module):
    """Criterion applied to one output or to every deep-supervision output, in float32."""

    def __init__(self, criterion: nn.Module, ds_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.criterion = criterion
        self.ds_weights = None if ds_weights is None else list(ds_weights)

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        target = target.float()
        if isinstance(outputs, Tensor):
            return self.criterion(outputs.float(), target)
        weights = deep_supervision_weights(len(outputs), self.ds_weights)
        total = target.new_zeros(())
        for weight, out in zip(weights, outputs, strict=True):
            if out.shape[-2:] != target.shape[-2:]:
                raise ModelError(
                    f"a deep-supervision output has size {tuple(out.shape[-2:])}, the mask {tuple(target.shape[-2:])}; "
                    "models must return every output at input resolution"
                )
            if weight:
                total = total + weight * self.criterion(out.float(), target)
        return total


def build_loss(cfg: TrainConfig) -> SegmentationLoss:
    """The training loss described by ``cfg`` (``loss``, ``bce_weight``, ``deep_supervision_weights``)."""
    return SegmentationLoss(build_criterion(cfg.loss, cfg.bce_weight), cfg.deep_supervision_weights)
