"""Deep supervision with a multi-scale adversarial loss (Li et al., MICCAI 2023, "Developing Large Pre-trained
Model for Breast Tumor Segmentation from Ultrasound Images").

The segmentation network (the generator, e.g. ``unet_ds``) predicts a mask at each of its four decoder stages.
Every stage is supervised twice: by a Dice loss against the ground truth, and by a discriminator of its own that
learns to tell the stage's predicted masks from real ones, which penalises predictions whose shape statistics
differ from real lesion masks at that stage's scale. The losses are

- generator: ``sum_i alpha_i * Dice_i + beta * sum_i adv_i`` with ``alpha = (1, 0.1, 0.1, 0.1)`` (main stage
  first) and ``beta = 0.05``; ``adv_i`` is the non-saturating GAN loss ``BCE(D_i(fake_i), real)``;
- discriminator i: ``(BCE(D_i(real), 1) + BCE(D_i(fake_i), 0)) / 2``.

Each iteration updates the generator first, then the discriminators on the same (detached) predictions, both with
Adam at lr 1e-4.

Choices where the paper leaves room, stated so they can be changed:

- discriminator: five convolutions with kernels 7, 5, 4, 4, 4; strides 2, 2, 2, 2, 1; widths 64, 128, 256, 512, 1;
  LeakyReLU(0.2) after the first four and no normalisation layer (batches of ultrasound images are small). The
  output is a map of patch logits, each judging one receptive field, averaged in the BCE;
- discriminator input: the stage's predicted probability (sigmoid of its logits, upsampled to the input size),
  concatenated with the image (a conditional discriminator judges whether a mask fits *this* image, which a
  mask-only discriminator cannot). ``condition_on_image=False`` feeds the mask alone. Real inputs are the ground
  truth mask with the same image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from busbench.errors import ModelError
from busbench.losses import smp_losses

STAGE_WEIGHTS = (1.0, 0.1, 0.1, 0.1)
ADV_WEIGHT = 0.05
LR = 1e-4
KERNELS = (7, 5, 4, 4, 4)
STRIDES = (2, 2, 2, 2, 1)


class StageDiscriminator(nn.Module):
    """Five-convolution patch discriminator (kernels 7, 5, 4, 4, 4): ``(B, C, H, W)`` -> ``(B, 1, h, w)`` logits.

    Needs inputs of at least 16x16 (four stride-2 convolutions).
    """

    def __init__(self, in_channels: int, base_width: int = 64, negative_slope: float = 0.2) -> None:
        super().__init__()
        widths = [base_width, base_width * 2, base_width * 4, base_width * 8, 1]
        layers: list[nn.Module] = []
        ch = in_channels
        for i, (k, s, out) in enumerate(zip(KERNELS, STRIDES, widths, strict=True)):
            if s > 1:
                layers.append(nn.Conv2d(ch, out, k, stride=s, padding=(k - 1) // 2))
            else:
                # keep the size: an even kernel needs one more pixel of padding after than before
                layers += [nn.ZeroPad2d(((k - 1) // 2, k // 2, (k - 1) // 2, k // 2)), nn.Conv2d(ch, out, k)]
            if i < len(KERNELS) - 1:
                layers.append(nn.LeakyReLU(negative_slope, inplace=True))
            ch = out
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < 16:
            raise ModelError(
                f"the stage discriminator needs inputs of at least 16x16, got {tuple(x.shape[-2:])}"
            )
        return self.net(x)


def _bce(logits: Tensor, real: bool) -> Tensor:
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        if "image" not in batch or "mask" not in batch:
            raise ModelError(
                f"a training batch mapping needs 'image' and 'mask' entries, got {sorted(batch)}"
            )
        return batch["image"], batch["mask"]
    if isinstance(batch, Sequence) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ModelError("a training batch must be (images, masks, ...) or a mapping with 'image' and 'mask'")


class AdversarialDeepSupervision:
    """Training strategy: Dice + adversarial loss on every deep-supervision output, alternating G and D updates.

    It owns the discriminators and their optimiser; the trainer owns the segmentation model. Usage::

        strategy = AdversarialDeepSupervision(image_channels=1).to(device)
        optimizers = strategy.build_optimizers(model)   # {"generator": ..., "discriminator": ...}
        for batch in loader:
            logs = strategy.training_step(model, batch, optimizers)   # 0-d tensors, "loss" = generator total
        checkpoint["strategy"] = strategy.state_dict()                # discriminators + their optimiser

    The model must return ``len(stage_weights)`` outputs ``[main, aux...]`` at input resolution in training mode
    (``unet_ds`` does) and one foreground channel.
    """

    name = "adversarial_ds"

    def __init__(
        self,
        image_channels: int = 1,
        stage_weights: Sequence[float] = STAGE_WEIGHTS,
        adv_weight: float = ADV_WEIGHT,
        lr: float = LR,
        condition_on_image: bool = True,
        base_width: int = 64,
        grad_clip: float | None = None,
    ) -> None:
        if not stage_weights or any(w < 0 for w in stage_weights):
            raise ModelError(f"stage weights must be non-negative, one per output, got {list(stage_weights)}")
        if adv_weight < 0 or lr <= 0:
            raise ModelError(f"adv_weight must be >= 0 and lr > 0, got {adv_weight} and {lr}")
        self.stage_weights = [float(w) for w in stage_weights]
        self.adv_weight = float(adv_weight)
        self.lr = float(lr)
        self.condition_on_image = condition_on_image
        self.grad_clip = grad_clip
        in_ch = (image_channels if condition_on_image else 0) + 1
        self.discriminators = nn.ModuleList(StageDiscriminator(in_ch, base_width) for _ in self.stage_weights)
        smp = smp_losses()
        self.dice = smp.DiceLoss(smp.BINARY_MODE, from_logits=True)
        self._d_optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer_state: dict[str, Any] | None = None

    @property
    def n_stages(self) -> int:
        return len(self.stage_weights)

    def to(self, device: torch.device | str) -> AdversarialDeepSupervision:
        self.discriminators.to(device)
        return self

    # ---------------------------------------------------------------------------------------------------------
    # optimisers and checkpoints

    def build_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """Adam (lr ``self.lr``) for the model and for the discriminators."""
        generator = torch.optim.Adam(model.parameters(), lr=self.lr)
        self._d_optimizer = torch.optim.Adam(self.discriminators.parameters(), lr=self.lr)
        if self._pending_optimizer_state is not None:
            self._d_optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None
        return {"generator": generator, "discriminator": self._d_optimizer}

    def state_dict(self) -> dict[str, Any]:
        """Discriminator weights and optimiser state (tensors and primitives only, for ``weights_only`` loading)."""
        return {
            "discriminators": self.discriminators.state_dict(),
            "discriminator_optimizer": None if self._d_optimizer is None else self._d_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "discriminators" not in state:
            raise ModelError(
                "the checkpoint's strategy state has no 'discriminators'; it was not saved by adversarial_ds"
            )
        self.discriminators.load_state_dict(state["discriminators"])
        opt_state = state.get("discriminator_optimizer")
        if opt_state is not None:
            if self._d_optimizer is None:
                self._pending_optimizer_state = dict(opt_state)
            else:
                self._d_optimizer.load_state_dict(opt_state)

    # ---------------------------------------------------------------------------------------------------------
    # losses

    def _stage_outputs(self, outputs: Tensor | Sequence[Tensor], masks: Tensor) -> list[Tensor]:
        if isinstance(outputs, Tensor):
            outputs = [outputs]
        outputs = list(outputs)
        if len(outputs) != self.n_stages:
            raise ModelError(
                f"adversarial deep supervision expects {self.n_stages} outputs [main, aux...] in training mode, got "
                f"{len(outputs)}; use a model with deep supervision at every decoder stage (e.g. unet_ds)"
            )
        for out in outputs:
            if out.shape[1] != 1 or out.shape[-2:] != masks.shape[-2:]:
                raise ModelError(
                    f"each output must be one foreground channel at mask size {tuple(masks.shape[-2:])}, "
                    f"got {tuple(out.shape)}"
                )
        return outputs

    def discriminator_input(self, images: Tensor, mask_prob: Tensor) -> Tensor:
        """What ``D_i`` judges: the mask (probabilities or ground truth), with the image when conditioned."""
        mask_prob = mask_prob.to(images.dtype)
        return torch.cat([images, mask_prob], dim=1) if self.condition_on_image else mask_prob

    def dice_terms(self, outputs: Sequence[Tensor], masks: Tensor) -> list[Tensor]:
        """Soft Dice loss of each stage (batch-wise, so empty masks of normal images are defined)."""
        return [self.dice(out.float(), masks.float()) for out in outputs]

    def generator_loss(
        self, outputs: Tensor | Sequence[Tensor], images: Tensor, masks: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``sum_i alpha_i Dice_i + beta sum_i BCE(D_i(fake_i), 1)`` and its parts (detached 0-d tensors, read by
        the caller when it logs, so that a training step does not wait for the GPU)."""
        outputs = self._stage_outputs(outputs, masks)
        dice = self.dice_terms(outputs, masks)
        total = sum((w * d for w, d in zip(self.stage_weights, dice, strict=True)), start=masks.new_zeros(()))
        adv = masks.new_zeros(())
        if self.adv_weight:
            for disc, out in zip(self.discriminators, outputs, strict=True):
                adv = adv + _bce(disc(self.discriminator_input(images, torch.sigmoid(out))), real=True)
            total = total + self.adv_weight * adv
        parts = {f"dice_{i}": d.detach() for i, d in enumerate(dice)}
        parts["adv_g"] = adv.detach()
        return total, parts

    def discriminator_loss(
        self, outputs: Sequence[Tensor], images: Tensor, masks: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``sum_i (BCE(D_i(real), 1) + BCE(D_i(fake_i), 0)) / 2`` on detached predictions."""
        outputs = self._stage_outputs(outputs, masks)
        real_in = self.discriminator_input(images, masks.float())
        total = masks.new_zeros(())
        for disc, out in zip(self.discriminators, outputs, strict=True):
            fake_in = self.discriminator_input(images, torch.sigmoid(out.detach()))
            total = total + 0.5 * (_bce(disc(real_in), real=True) + _bce(disc(fake_in), real=False))
        return total, {"loss_d": total.detach()}

    # ---------------------------------------------------------------------------------------------------------
    # updates

    def _set_discriminators_trainable(self, flag: bool) -> None:
        for p in self.discriminators.parameters():
            p.requires_grad_(flag)

    def generator_step(
        self,
        model: nn.Module,
        images: Tensor,
        masks: Tensor,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One update of the model; the discriminators are frozen. Returns the (detached) outputs and the losses.

        ``autocast`` makes the context of the forward pass (mixed precision); ``scaler`` scales the loss before the
        backward pass and skips the update on overflow (float16). The backward pass runs outside autocast."""
        model.train()
        self._set_discriminators_trainable(False)
        try:
            with autocast():
                outputs = self._stage_outputs(model(images), masks)
                total, parts = self.generator_loss(outputs, images, masks)
            optimizer.zero_grad(set_to_none=True)
            _update(total, optimizer, model.parameters(), self.grad_clip, scaler)
        finally:
            self._set_discriminators_trainable(True)
        parts["loss_g"] = total.detach()
        return [o.detach() for o in outputs], parts

    def discriminator_step(
        self,
        outputs: Sequence[Tensor],
        images: Tensor,
        masks: Tensor,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> dict[str, Tensor]:
        """One update of the discriminators on detached predictions; the model is not touched."""
        self.discriminators.train()
        with autocast():
            total, parts = self.discriminator_loss(outputs, images, masks)
        optimizer.zero_grad(set_to_none=True)
        _update(total, optimizer, self.discriminators.parameters(), self.grad_clip, scaler)
        return parts

    def training_step(
        self,
        model: nn.Module,
        batch: Any,
        optimizers: Mapping[str, torch.optim.Optimizer],
        scaler: torch.amp.GradScaler | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> dict[str, Tensor]:
        """Generator update, then discriminator update, on one batch. Returns the losses as detached 0-d tensors
        on the batch's device; ``loss`` is the generator's total (the number to log as the training loss).

        With a ``scaler`` (float16) both updates go through it and its scale is updated once, after both."""
        images, masks = _unpack(batch)
        if masks.ndim == 3:
            masks = masks.unsqueeze(1)
        device = images.device
        if next(self.discriminators.parameters()).device != device:
            self.to(device)
        outputs, logs = self.generator_step(model, images, masks, optimizers["generator"], scaler, autocast)
        logs.update(
            self.discriminator_step(outputs, images, masks, optimizers["discriminator"], scaler, autocast)
        )
        if scaler is not None:
            scaler.update()
        logs["loss"] = logs["loss_g"]
        return logs


def _update(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    grad_clip: float | None,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Backward pass and optimiser step, through ``scaler`` when given (its ``update`` is the caller's)."""
    if scaler is None:
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
