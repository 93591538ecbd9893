"""What ``task.mode`` and ``train.strategy`` change in training and evaluation.

The trainer and the evaluator are written for binary lesion segmentation; a *task* supplies the few pieces that
differ for the methods of :mod:`busbench.methods`:

==============  ==================================================================================================
``binary``      one output channel, ``train.loss`` on the lesion mask (the default). Models with
                ``returns_loss_dict = True`` (Mask R-CNN) compute their own losses: the training loss is the sum of
                ``model(images, masks)``'s dictionary.
``multiclass``  three output channels (background, benign, malignant), :class:`~busbench.methods.multiclass.
                MulticlassLoss` on ``batch["class_map"]``: ``w * CE + (1 - w) * Dice`` with ``w`` from
                ``train.loss`` (``bce_dice``: ``train.bce_weight``; ``bce``: 1, cross-entropy only; ``dice``: 0).
                The lesion probability is ``1 - p(background)``, so the binary metrics are those of a one-channel
                model; per-class Dice, IoU and HD95 are added (:func:`busbench.metrics.per_class`).
``multitask``   the segmentation model wrapped in :class:`~busbench.methods.multitask.MultiTaskModel` (a
                classification head on its bottleneck, dropout ``task.cls_dropout``), trained with
                ``task.multitask_lambda * Dice + (1 - lambda) * Focal(task.focal_gamma)`` on the mask and the image
                label (``train.loss`` is not used). At inference, ``task.refine`` makes the two outputs agree
                (normal => empty mask, non-empty mask => not normal); accuracy, macro F1, per-class recall and the
                confusion matrix are reported.
==============  ==================================================================================================

``task.oversample`` (any mode) repeats each training image a whole number of times by its label's share
(:func:`~busbench.methods.multitask.oversample_indices`); the validation fold and the test split are never
oversampled. ``train.strategy: adversarial_ds`` trains with a discriminator per deep-supervision stage
(:class:`AdversarialTraining`).

Model selection is the same in every mode: the checkpoint with the best *binary* lesion Dice on the validation fold
(thresholded lesion probability, after refinement in multitask mode), so runs of different modes are chosen by the
same rule and compare on the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from busbench.atomic import atomic_write_text
from busbench.config import Config
from busbench.data.loader import network_input
from busbench.engine.checkpoint import unwrap
from busbench.engine.inference import autocast, main_output, predict_probabilities
from busbench.errors import ConfigError, ModelError
from busbench.losses import build_loss
from busbench.methods.adversarial import STAGE_WEIGHTS, AdversarialDeepSupervision
from busbench.methods.multiclass import CLASS_NAMES, NUM_CLASSES, MulticlassLoss, check_class_target
from busbench.methods.multitask import (
    CLASS_LABELS,
    MultiTaskLoss,
    MultiTaskModel,
    classification_metrics,
    oversample_indices,
    refine,
)
from busbench.metrics import per_class
from busbench.models import create_model
from busbench.models.weights import builder_params

#: ``train.loss`` -> weight of cross-entropy in the multi-class loss (the rest is Dice)
MULTICLASS_CE_WEIGHTS = {"bce": 1.0, "dice": 0.0}
LESION_CLASSES = CLASS_NAMES[1:]
CLASSIFICATION_FILE = "classification.json"


# --------------------------------------------------------------------------------------------------------------
# predictions


@dataclass
class Prediction:
    """Probabilities of ``S`` sources (fold models, then optionally their ensemble) on one batch, on the CPU.

    ``lesion`` ``(S, B, H, W)`` is the foreground probability every mode has; ``pixel`` ``(S, B, K, H, W)`` the
    per-pixel class probabilities (multiclass, background first); ``image`` ``(S, B, K)`` the image-level class
    probabilities (multitask).
    """

    lesion: Tensor
    pixel: Tensor | None = None
    image: Tensor | None = None

    def with_ensemble(self) -> Prediction:
        """The same sources plus one more: the mean of every probability over the sources."""

        def add(t: Tensor | None) -> Tensor | None:
            return None if t is None else torch.cat([t, t.mean(dim=0, keepdim=True)])

        return Prediction(add(self.lesion), add(self.pixel), add(self.image))


def _threshold_below(threshold: float) -> float:
    """The largest float32 below ``threshold``: ``p > that`` is the evaluator's ``p >= threshold``."""
    return float(np.nextafter(np.float32(threshold), np.float32(-1.0)))


def _label_map(lesion: np.ndarray, lesion_class_probs: np.ndarray, threshold: float) -> np.ndarray:
    """Class map from a lesion probability ``(H, W)`` and lesion-class probabilities ``(H, W, K-1)``.

    A pixel is lesion exactly where the binary metrics see lesion (``lesion >= threshold``), and then takes its most
    probable lesion class, so the per-class masks always partition the binary one.
    """
    classes = lesion_class_probs.argmax(axis=-1).astype(np.uint8) + 1
    return np.where(lesion >= threshold, classes, 0).astype(np.uint8)


def original_class_map(ds: Any, index: int) -> np.ndarray:
    """Ground-truth class map of dataset item ``index`` at the image's own size (0 bg, 1 benign, 2 malignant)."""
    from busbench.data.decode import read_class_map
    from busbench.methods.multiclass import class_map_from_binary

    row = ds.rows.iloc[index]
    path = row.get("class_mask_path")
    if isinstance(path, str) and path and path.lower() != "nan":
        return read_class_map(path)
    return class_map_from_binary(ds.original_mask(index), str(row["label"]))


# --------------------------------------------------------------------------------------------------------------
# tasks


class Task:
    """Binary lesion segmentation; the base of the other modes (see the module docstring)."""

    mode = "binary"
    out_channels = 1
    #: columns this task adds to ``summary.csv`` (after the binary ones)
    summary_columns: tuple[str, ...] = ()
    #: whether :meth:`image_columns` scores against the ground-truth class map
    needs_class_map = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ---- training

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        try:
            return create_model(
                cfg.model.name,
                in_channels=cfg.data.channels,
                num_classes=self.out_channels,
                image_size=cfg.data.image_size,
                **builder_params(cfg.model.name, cfg.model.params, cfg.model.pretrained),
            )
        except ModelError as exc:
            if self.out_channels == 1:
                raise
            raise ConfigError(
                f"task.mode={self.mode} needs a model with {self.out_channels} output channels, and "
                f"{cfg.model.name!r} cannot be built so: {exc}. Choose another model.name or task.mode=binary"
            ) from None

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model this task and ``train.strategy`` cannot train, before anything is written."""
        cfg = self.cfg
        inner = unwrap(model)
        inner = inner.seg if isinstance(inner, MultiTaskModel) else inner
        if getattr(inner, "returns_loss_dict", False) and (
            self.mode != "binary" or cfg.train.strategy != "standard"
        ):
            raise ConfigError(
                f"model {cfg.model.name!r} computes its own losses, so it trains with task.mode=binary and "
                f"train.strategy=standard only (got {self.mode} / {cfg.train.strategy}); change one of them"
            )
        if cfg.train.strategy == "adversarial_ds":
            n = _count_training_outputs(model, cfg)
            stages = _stage_weights(cfg)
            if n != len(stages):
                raise ConfigError(
                    f"train.strategy=adversarial_ds supervises {len(stages)} decoder stages, but model "
                    f"{cfg.model.name!r} returns {n} output(s) in training mode; use a model with deep supervision "
                    "at every decoder stage (model.name=unet_ds), or train.strategy=standard"
                )

    def criterion(self, binary_loss: Any = build_loss) -> nn.Module:
        """The training criterion; ``binary_loss(cfg.train)`` builds the binary one (the trainer passes its own)."""
        return binary_loss(self.cfg.train)

    def outputs(
        self, forward: nn.Module, x: Tensor, y: Tensor, batch: Mapping[str, Any] | None = None
    ) -> Any:
        """The network's training outputs on images ``x`` (called under autocast); ``y``: the masks on the device.

        Models with ``returns_loss_dict`` take the masks to compute their own losses; they get the batch's masks
        as loaded (on the host), where Mask R-CNN finds the lesion instances, rather than a copy read back from
        the GPU."""
        if getattr(unwrap(forward), "returns_loss_dict", False):
            return forward(x, batch["mask"] if batch is not None else y)
        return forward(x)

    def loss(self, criterion: nn.Module, outputs: Any, batch: Mapping[str, Any], y: Tensor) -> Tensor:
        """Training loss of one batch (in float32, outside autocast); ``y``: the masks on the device."""
        if isinstance(outputs, Mapping):
            return sum((v.float() for v in outputs.values()), start=y.new_zeros((), dtype=torch.float32))
        return criterion(outputs, y)

    def train_indices(self, train_ds: Any) -> list[int] | None:
        """The training items of one epoch, with repeats (``task.oversample``), or None for each item once."""
        if not self.cfg.task.oversample:
            return None
        return oversample_indices([int(v) for v in train_ds.labels])

    # ---- inference

    def predict(
        self,
        models: Sequence[nn.Module],
        images: Tensor,
        device: torch.device,
        dtype: torch.dtype | None,
        tta: bool = False,
        channels_last: bool = False,
    ) -> Prediction:
        """Probabilities of every model on one batch of ``(B, C, S, S)`` uint8 images as loaded; they are normalised
        on ``device`` (:func:`busbench.data.loader.network_input`, ``data.normalize``). :meth:`probabilities` reads
        one model's output, :meth:`prediction` assembles the stacked result."""
        x = network_input(images, self.cfg.data.normalize, device, channels_last)
        pixel, image = predict_probabilities(models, x, device, dtype, self.probabilities, tta)
        return self.prediction(pixel, image)

    def probabilities(self, out: Any) -> tuple[Tensor, Tensor | None]:
        """One model's output -> (per-pixel probabilities, per-image probabilities or None); binary: the
        foreground probability ``(B, H, W)``, the sigmoid of the main output's channel."""
        return torch.sigmoid(main_output(out).float())[:, 0], None

    def prediction(self, pixel: Tensor, image: Tensor | None) -> Prediction:
        """:class:`Prediction` from :meth:`probabilities` stacked over the models."""
        return Prediction(pixel)

    def finalize(self, pred: Prediction, threshold: float) -> Prediction:
        """Post-processing applied to every source after ensembling (multitask: refinement)."""
        return pred

    def image_columns(
        self,
        pred: Prediction,
        source: int,
        item: int,
        threshold: float,
        gt_class_map: np.ndarray | None,
        restore_fn: Any = None,
    ) -> dict[str, Any]:
        """Extra per-image columns of one image (``item`` in the batch) predicted by ``source``.

        ``restore_fn`` maps a network-resolution float map ``(S, S)`` or ``(S, S, C)`` back to the ground truth's
        resolution (``eval.resolution=original``); ``gt_class_map`` is at that resolution.
        """
        return {}

    def image_outputs(
        self, pred: Prediction, source: int, item: int, threshold: float, restore_fn: Any = None
    ) -> dict[str, Any]:
        """What the task predicts for one image besides the lesion mask, at the resolution ``restore_fn`` maps to:
        ``classes`` (multiclass: class map, 0 background, 1 benign, 2 malignant) or ``label`` and
        ``prob_<class>`` (multitask). :meth:`image_columns` scores these; ``busbench predict`` writes them."""
        return {}

    def batch_columns(
        self, pred: Prediction, source: int, batch: Mapping[str, Any], threshold: float
    ) -> pd.DataFrame:
        """:meth:`image_columns` of every image of a batch at network resolution (one row per image)."""
        if not self.summary_columns:
            return pd.DataFrame(index=range(pred.lesion.shape[1]))
        gts = batch["class_map"].numpy()
        rows = [
            self.image_columns(pred, source, j, threshold, gts[j].astype(np.uint8)) for j in range(len(gts))
        ]
        return pd.DataFrame(rows)

    def summary_scores(self, table: pd.DataFrame) -> dict[str, float]:
        """Extra summary columns of one source's per-image table on one dataset."""
        return {}

    def write_reports(self, folder: Path, sources: Mapping[str, Mapping[str, pd.DataFrame]]) -> None:
        """Task-specific files under the run's ``test/`` folder; ``sources[name][dataset]`` are per-image tables."""


class MulticlassTask(Task):
    mode = "multiclass"
    out_channels = NUM_CLASSES
    needs_class_map = True
    summary_columns = tuple(
        f"{metric}_{name}{suffix}"
        for name in LESION_CLASSES
        for suffix in ("", "_only")
        for metric in ("dice", "iou", "hd95")
    ) + tuple(f"hd95_penalised_{name}" for name in LESION_CLASSES)

    def criterion(self, binary_loss: Any = build_loss) -> nn.Module:
        t = self.cfg.train
        ce_weight = MULTICLASS_CE_WEIGHTS.get(t.loss, t.bce_weight)
        return MulticlassLoss(ce_weight=ce_weight, ds_weights=t.deep_supervision_weights)

    def loss(self, criterion: nn.Module, outputs: Any, batch: Mapping[str, Any], y: Tensor) -> Tensor:
        target = batch["class_map"]
        if y.device.type != "cpu":
            check_class_target(target, NUM_CLASSES)  # on the host copy: the loss does not read device values
        return criterion(outputs, target.to(y.device, non_blocking=True))

    def probabilities(self, out: Any) -> tuple[Tensor, Tensor | None]:
        return torch.softmax(main_output(out).float(), dim=1), None

    def prediction(self, pixel: Tensor, image: Tensor | None) -> Prediction:
        return Prediction(lesion=1.0 - pixel[:, :, 0], pixel=pixel)

    def image_outputs(self, pred, source, item, threshold, restore_fn=None):
        lesion = pred.lesion[source, item].numpy()
        classes = pred.pixel[source, item, 1:].numpy().transpose(1, 2, 0)  # (S, S, K-1)
        if restore_fn is not None:
            lesion, classes = restore_fn(lesion), restore_fn(np.ascontiguousarray(classes))
            if classes.ndim == 2:
                classes = classes[..., None]
        return {"classes": _label_map(lesion, classes, threshold)}

    def image_columns(self, pred, source, item, threshold, gt_class_map, restore_fn=None):
        labels = self.image_outputs(pred, source, item, threshold, restore_fn)["classes"]
        scores = per_class(
            labels, gt_class_map, NUM_CLASSES, class_names=CLASS_NAMES, hd95_mode=self.cfg.eval.hd95_mode
        )
        return {
            f"{metric}_{name}": scores[f"{metric}_{name}"]
            for name in LESION_CLASSES
            for metric in ("dice", "iou", "hd95", "penalised")
        }

    def summary_scores(self, table: pd.DataFrame) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in LESION_CLASSES:
            own = table[table["label"] == name]
            for metric in ("dice", "iou", "hd95"):
                column = table[f"{metric}_{name}"].astype(float)
                out[f"{metric}_{name}"] = float(column.mean()) if len(column) else math.nan
                out[f"{metric}_{name}_only"] = (
                    float(own[f"{metric}_{name}"].astype(float).mean()) if len(own) else math.nan
                )
            out[f"hd95_penalised_{name}"] = float(table[f"penalised_{name}"].astype(bool).sum())
        return out


class MultitaskTask(Task):
    mode = "multitask"
    summary_columns = ("accuracy", "macro_f1", *(f"recall_{name}" for name in CLASS_LABELS))

    def build_model(self) -> nn.Module:
        seg = super().build_model()
        try:
            return MultiTaskModel(seg, num_classes=len(CLASS_LABELS), dropout=self.cfg.task.cls_dropout)
        except ModelError as exc:
            raise ConfigError(
                f"task.mode=multitask attaches a classification head to the model's bottleneck, which "
                f"{self.cfg.model.name!r} does not offer ({exc}); choose another model.name"
            ) from None

    def criterion(self, binary_loss: Any = build_loss) -> nn.Module:
        t = self.cfg.task
        return MultiTaskLoss(
            lam=t.multitask_lambda, gamma=t.focal_gamma, ds_weights=self.cfg.train.deep_supervision_weights
        )

    def loss(self, criterion: nn.Module, outputs: Any, batch: Mapping[str, Any], y: Tensor) -> Tensor:
        labels = torch.as_tensor(batch["label"]).to(y.device, non_blocking=True)
        return criterion(outputs, y, labels)

    def probabilities(self, out: Any) -> tuple[Tensor, Tensor | None]:
        seg, cls = out
        return torch.sigmoid(main_output(seg).float())[:, 0], torch.softmax(cls.float(), dim=1)

    def prediction(self, pixel: Tensor, image: Tensor | None) -> Prediction:
        return Prediction(lesion=pixel, image=image)

    def finalize(self, pred: Prediction, threshold: float) -> Prediction:
        if not self.cfg.task.refine:
            return pred
        below = _threshold_below(threshold)
        pairs = [refine(pred.lesion[s], pred.image[s], threshold=below) for s in range(pred.lesion.shape[0])]
        return Prediction(
            lesion=torch.stack([seg for seg, _ in pairs]),
            pixel=pred.pixel,
            image=torch.stack([cls for _, cls in pairs]),
        )

    def image_outputs(self, pred, source, item, threshold, restore_fn=None):
        probs = pred.image[source, item]
        row: dict[str, Any] = {"label": CLASS_LABELS[int(probs.argmax())]}
        for name, p in zip(CLASS_LABELS, probs.tolist(), strict=True):
            row[f"prob_{name}"] = p
        return row

    def image_columns(self, pred, source, item, threshold, gt_class_map, restore_fn=None):
        row = self.image_outputs(pred, source, item, threshold, restore_fn)
        return {"pred_label": row.pop("label"), **row}

    def summary_scores(self, table: pd.DataFrame) -> dict[str, float]:
        scores = classification_metrics(table["label"].tolist(), table["pred_label"].tolist())
        return {k: float(v) for k, v in scores.items() if k != "confusion"}

    def write_reports(self, folder: Path, sources: Mapping[str, Mapping[str, pd.DataFrame]]) -> None:
        import json

        report: dict[str, Any] = {
            "classes": list(CLASS_LABELS),
            "refine": self.cfg.task.refine,
            "confusion": "rows: true class, columns: predicted class, in the order of 'classes'",
            "sources": {},
        }
        for name, per_dataset in sources.items():
            report["sources"][name] = {
                key: _json_safe(classification_metrics(t["label"].tolist(), t["pred_label"].tolist()))
                for key, t in per_dataset.items()
            }
        atomic_write_text(folder / CLASSIFICATION_FILE, json.dumps(report, indent=2) + "\n")


def _json_safe(scores: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scores.items()}


TASKS: dict[str, type[Task]] = {"binary": Task, "multiclass": MulticlassTask, "multitask": MultitaskTask}


def build_task(cfg: Config) -> Task:
    """The task of ``cfg.task.mode``."""
    return TASKS[cfg.task.mode](cfg)


def build_model(cfg: Config) -> nn.Module:
    """The network ``cfg`` trains: ``model.name`` with the task's output channels (and head, for multitask)."""
    return build_task(cfg).build_model()


# --------------------------------------------------------------------------------------------------------------
# adversarial deep supervision


def _stage_weights(cfg: Config) -> list[float]:
    weights = cfg.train.deep_supervision_weights
    return list(STAGE_WEIGHTS) if weights is None else [float(w) for w in weights]


def _count_training_outputs(model: nn.Module, cfg: Config) -> int:
    """Number of outputs ``model`` returns in training mode (one small forward pass on a throwaway model)."""
    was_training = model.training
    size = cfg.data.image_size
    model.train()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, cfg.data.channels, size, size))
    finally:
        model.train(was_training)
    return len(out) if isinstance(out, list | tuple) else 1


class AdversarialTraining:
    """``train.strategy: adversarial_ds`` inside the trainer (Li et al., MICCAI 2023; see
    :mod:`busbench.methods.adversarial`).

    The generator (the segmentation model) is updated by the trainer's own optimiser, so ``train.optimizer``,
    ``train.lr``, ``train.weight_decay`` and the schedule apply to it as to any run; the discriminators get Adam at
    ``train.lr`` (constant). Stage weights are ``train.deep_supervision_weights`` (default 1, 0.1, 0.1, 0.1, main
    first), the adversarial weight ``train.adv_weight``, the discriminators' width ``train.adv_disc_width``.
    Gradients are clipped at ``train.grad_clip`` when set.
    """

    def __init__(
        self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> None:
        t = cfg.train
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                "train.strategy=adversarial_ds trains in one process only (its discriminators are not "
                "synchronised across processes); run it without torchrun"
            )
        self.strategy = AdversarialDeepSupervision(
            image_channels=cfg.data.channels,
            stage_weights=_stage_weights(cfg),
            adv_weight=t.adv_weight,
            lr=t.lr,
            condition_on_image=t.adv_condition_on_image,
            base_width=t.adv_disc_width,
            grad_clip=t.grad_clip,
        ).to(device)
        discriminator = self.strategy.build_optimizers(model)["discriminator"]
        self.optimizers = {"generator": optimizer, "discriminator": discriminator}
        self.last_logs: dict[str, Tensor] = {}

    def step(
        self,
        forward: nn.Module,
        x: Tensor,
        y: Tensor,
        device: torch.device,
        dtype: torch.dtype | None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """One generator and one discriminator update (forward passes under autocast, backward passes through the
        trainer's gradient scaler); returns the generator's loss, on the device (for the training log)."""
        self.last_logs = self.strategy.training_step(
            forward,
            {"image": x, "mask": y},
            self.optimizers,
            scaler=scaler,
            autocast=lambda: autocast(device, dtype),
        )
        return self.last_logs["loss"]

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | None, path: Path) -> None:
        if state is None:
            raise ModelError(
                f"{path} holds no discriminator state, so it was not written by train.strategy=adversarial_ds; "
                "rerun with --no-resume to train the fold from scratch"
            )
        self.strategy.load_state_dict(state)


def build_strategy(
    cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> AdversarialTraining | None:
    """The training strategy of ``train.strategy``; None for ``standard`` (one criterion, one optimiser)."""
    if cfg.train.strategy == "adversarial_ds":
        return AdversarialTraining(cfg, model, optimizer, device)
    return None
