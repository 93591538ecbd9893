"""Mask R-CNN (He et al., ICCV 2017) as a semantic lesion segmenter, one of the BUS-UCLM baselines.

The network is torchvision's ``maskrcnn_resnet50_fpn`` with two classes (background, lesion), built without
downloading anything. Mask R-CNN is an instance model, so this wrapper translates at both ends:

- training: the binary masks busbench trains on are split into connected components, each one lesion instance
  with its bounding box (:func:`maskrcnn_targets_from_masks`); the network returns its own loss dictionary
  (RPN objectness and box regression, box classification and regression, mask BCE). Because the loss comes from
  the model, the trainer calls ``model.compute_loss(images, masks)`` for models with ``returns_loss_dict = True``
  and sums the dictionary, instead of applying its criterion to ``model(images)``;
- inference: the kept instances (score >= ``score_threshold``) are merged into one foreground probability map,
  the pixelwise maximum of their mask probabilities (:func:`instances_to_semantic`), returned as logits
  ``(B, 1, H, W)`` like every other model, so the evaluator scores it unchanged. An image without a kept instance
  gets an empty map, which is what a normal image should get.

Grey inputs are repeated to three channels. torchvision's internal resize is pinned to the configured image size
and its normalisation is the identity, because busbench's loader already resizes and normalises.

Mixed precision: only the backbone (ResNet-50 + FPN, most of the computation) runs under the caller's autocast.
The RPN and the ROI heads run in float32, because torchvision decodes boxes in the dtype of the regression output:
in bfloat16 (8 mantissa bits) box coordinates of a 224-512 px image snap to a grid of 1-2 px, which moves every
proposal, every detection and the masks pasted into them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn
from torch.nn import functional as F

from busbench.errors import ModelError
from busbench.models.base import SegModel
from busbench.models.registry import register_model

# logits of probabilities 0 and 1 are infinite; clamp so sigmoid(logit(p)) round-trips within 1e-6
_PROB_EPS = 1e-6
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def maskrcnn_targets_from_masks(
    masks: Tensor, min_area: int = 1, device: torch.device | None = None
) -> list[dict[str, Tensor]]:
    """One Mask R-CNN target per image: each 8-connected lesion component is an instance.

    ``masks`` is ``(B, 1, H, W)`` or ``(B, H, W)``, foreground where > 0.5. A component's box is
    ``[x0, y0, x1, y1]`` in pixel-edge coordinates (``x1 = last column + 1``), so a one-pixel lesion still has a
    box of positive size. Components smaller than ``min_area`` pixels are dropped. Images without lesions get
    empty targets, which torchvision trains on as pure background.

    The components are found on the host: pass the masks as loaded (CPU) to avoid reading them back from the GPU;
    the targets are made on ``device`` (default: the masks' device).
    """
    if masks.ndim == 4:
        if masks.shape[1] != 1:
            raise ModelError(f"masks must have one channel, got shape {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ModelError(f"masks must be (B, 1, H, W) or (B, H, W), got shape {tuple(masks.shape)}")
    device = masks.device if device is None else device
    binary = (masks.numpy() if masks.device.type == "cpu" else masks.cpu().numpy()) > 0.5
    h, w = binary.shape[1:]
    targets = []
    for mask in binary:
        components, _ = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        boxes, instance_masks = [], []
        for index, (rows, cols) in enumerate(ndimage.find_objects(components), start=1):
            instance = components == index
            if instance.sum() < min_area:
                continue
            boxes.append([cols.start, rows.start, cols.stop, rows.stop])
            instance_masks.append(instance)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4),
                "labels": torch.ones(len(boxes), dtype=torch.int64, device=device),
                "masks": torch.from_numpy(np.asarray(instance_masks, dtype=np.uint8).reshape(-1, h, w)).to(
                    device
                ),
            }
        )
    return targets


def instances_to_semantic(
    outputs: Sequence[dict[str, Tensor]],
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """Foreground probability ``(B, 1, H, W)`` from Mask R-CNN detections.

    For each image, instances scoring at least ``score_threshold`` are kept; their mask probabilities below
    ``mask_threshold`` are zeroed (Mask R-CNN's own binarisation point) and the map is the pixelwise maximum over
    the kept instances, so thresholding it at ``mask_threshold`` gives the union of the binarised instance masks.
    No kept instance gives an all-zero map. ``size`` is the output ``(H, W)``; by default the masks' own size.
    """
    if not outputs:
        raise ModelError("instances_to_semantic needs one detection dictionary per image, got none")
    maps = []
    for out in outputs:
        if "masks" not in out or "scores" not in out:
            raise ModelError(f"a Mask R-CNN output needs 'masks' and 'scores', got {sorted(out)}")
        masks, scores = out["masks"], out["scores"]
        if masks.ndim == 3:
            masks = masks[:, None]
        hw = tuple(size) if size is not None else tuple(masks.shape[-2:])
        if not masks.shape[0]:
            maps.append(masks.new_zeros((1, *hw), dtype=torch.float32))
            continue
        # instances below the score threshold are zeroed rather than selected, which would read `keep` back
        kept = masks.float() * (scores >= score_threshold).float().view(-1, 1, 1, 1)
        if tuple(kept.shape[-2:]) != hw:
            kept = F.interpolate(kept, size=hw, mode="bilinear", align_corners=False)
        kept = torch.where(kept >= mask_threshold, kept, torch.zeros_like(kept))
        maps.append(kept.amax(dim=0))
    return torch.stack(maps)


class MaskRCNNSeg(SegModel):
    """torchvision Mask R-CNN behind busbench's segmentation interface (see the module docstring)."""

    #: the trainer must call ``compute_loss(images, masks)`` and sum the returned dictionary
    returns_loss_dict = True

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        image_size: int = 224,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        min_area: int = 1,
        **detector_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_classes != 1:
            raise ModelError(
                f"maskrcnn segments one foreground class (lesion), got num_classes={num_classes}; "
                "use it for binary segmentation only"
            )
        self.in_channels = in_channels
        self.score_threshold = float(score_threshold)
        self.mask_threshold = float(mask_threshold)
        self.min_area = int(min_area)
        # imported here: torchvision takes seconds to import; the registry imports this module for every model
        from torchvision.models.detection import maskrcnn_resnet50_fpn

        try:
            self.net = maskrcnn_resnet50_fpn(
                weights=None,
                weights_backbone=None,
                num_classes=2,
                min_size=image_size,
                max_size=image_size,
                image_mean=[0.0, 0.0, 0.0],
                image_std=[1.0, 1.0, 1.0],
                **detector_kwargs,
            )
        except TypeError as exc:
            raise ModelError(
                f"torchvision's Mask R-CNN does not accept these model.params ({exc}); remove or rename them"
            ) from None
        self.bottleneck_channels = 2048

    @property
    def bottleneck(self) -> nn.Module:  # type: ignore[override]
        """ResNet-50's last stage (2048 channels at 1/32 of the input)."""
        return self.net.backbone.body.layer4

    def encoder_modules(self) -> list[nn.Module]:
        return [self.net.backbone.body]

    def _rgb(self, x: Tensor) -> list[Tensor]:
        self._check(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ModelError(f"maskrcnn takes 1 or 3 input channels, got {x.shape[1]}")
        return list(x)

    def compute_loss(self, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """Mask R-CNN's training losses on a batch of images and binary masks (the module must be training)."""
        if not self.training:
            raise ModelError("maskrcnn computes its losses in training mode only; call model.train() first")
        targets = maskrcnn_targets_from_masks(masks, self.min_area, device=images.device)
        return self._detect(self._rgb(images), targets)

    def _detect(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """torchvision's detector forward (losses in training mode, detections in eval mode), with only the
        backbone under the caller's autocast: resizing, the RPN, the ROI heads and the pasting of masks run in
        float32 (see the module docstring)."""
        net, device_type = self.net, images[0].device.type
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        with torch.autocast(device_type, enabled=False):
            batch, targets = net.transform([img.float() for img in images], targets)
        features = net.backbone(batch.tensors)
        with torch.autocast(device_type, enabled=False):
            features = OrderedDict((name, f.float()) for name, f in features.items())
            proposals, proposal_losses = net.rpn(batch, features, targets)
            detections, detector_losses = net.roi_heads(features, proposals, batch.image_sizes, targets)
            if self.training:
                return {**detector_losses, **proposal_losses}
            return net.transform.postprocess(detections, batch.image_sizes, sizes)

    def forward(self, x: Tensor, masks: Tensor | None = None) -> Any:
        if self.training:
            if masks is None:
                raise ModelError(
                    "maskrcnn returns its own losses in training mode: call model.compute_loss(images, masks) "
                    "(models with returns_loss_dict = True), or switch to eval mode for predictions"
                )
            return self.compute_loss(x, masks)
        detections = self._detect(self._rgb(x))
        prob = instances_to_semantic(
            detections, self.score_threshold, self.mask_threshold, size=tuple(x.shape[-2:])
        )
        # float32 logits: in bfloat16, 1 - 1e-6 rounds to 1 and its logit is infinite
        return torch.logit(prob, eps=_PROB_EPS)


@register_model(
    "maskrcnn",
    paper="He et al. 2017 (ICCV), Mask R-CNN; torchvision maskrcnn_resnet50_fpn, instances merged into one mask",
    input_sizes="any (torchvision pads to a multiple of 32 internally)",
    pretrained=True,
)
def build_maskrcnn(
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    weights: str | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    min_area: int = 1,
    **detector_kwargs: Any,
) -> MaskRCNNSeg:
    """Mask R-CNN (ResNet-50 FPN). ``weights`` is a local torchvision Mask R-CNN checkpoint file (e.g. the COCO
    one); its class-specific heads do not match two classes and are skipped, the rest is loaded. Other keywords
    (``box_detections_per_img``, ``rpn_post_nms_top_n_test``, ...) go to torchvision's MaskRCNN."""
    model = MaskRCNNSeg(
        in_channels,
        num_classes,
        image_size,
        score_threshold=score_threshold,
        mask_threshold=mask_threshold,
        min_area=min_area,
        **detector_kwargs,
    )
    if weights:
        from busbench.models.weights import load_pretrained

        load_pretrained(model.net, weights, 3)
    return model
