"""U-Net with a prediction at every decoder stage (Li et al., MICCAI 2023, "Developing Large Pre-trained Model
for Breast Tumor Segmentation from Ultrasound Images").

The backbone is the U-Net of :mod:`busbench.models.unet` (Ronneberger et al. 2015, widths ``base_width * (1, 2,
4, 8, 16)``, upsample-then-convolve decoder, built from the same blocks), so ``unet_ds`` is exactly ``unet`` plus
three extra heads. Each of the four decoder stages has its own 1x1 convolution head; its logits are upsampled
bilinearly to the input size. The paper supervises every stage with Dice and with a stage-specific discriminator
(see :mod:`busbench.methods.adversarial`).

In training mode with ``deep_supervision`` on, ``forward`` returns ``[main, aux_1, aux_2, aux_3]``: ``main`` is the
last (full-resolution) stage and ``aux_k`` the stage k steps coarser (1/2, 1/4, 1/8 of the input before upsampling).
In eval mode it returns ``main`` only.
"""

from __future__ import annotations

from torch import Tensor, nn

from busbench.models.base import PooledUNet
from busbench.models.blocks import DoubleConv, UpConv, check_base_width, resize_to
from busbench.models.registry import register_model

DEPTH = 4


class UNetDS(PooledUNet):
    size_multiple = 2**DEPTH

    def __init__(
        self, in_channels: int, num_classes: int, base_width: int = 64, deep_supervision: bool = True
    ) -> None:
        super().__init__()
        base_width = check_base_width("unet_ds", base_width)
        w = [base_width * 2**i for i in range(DEPTH + 1)]
        self.deep_supervision = deep_supervision
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, w[0])] + [DoubleConv(w[i - 1], w[i]) for i in range(1, DEPTH)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(w[DEPTH - 1], w[DEPTH])
        self.bottleneck_channels = w[DEPTH]
        # decoder stages and their heads listed deepest first
        self.up = nn.ModuleList([UpConv(w[i + 1], w[i]) for i in reversed(range(DEPTH))])
        self.decoder = nn.ModuleList([DoubleConv(2 * w[i], w[i]) for i in reversed(range(DEPTH))])
        self.heads = nn.ModuleList([nn.Conv2d(w[i], num_classes, 1) for i in reversed(range(DEPTH))])

    def stage_logits(self, x: Tensor) -> list[Tensor]:
        """Logits of the four decoder stages at input resolution, finest first ``[main, aux_1, aux_2, aux_3]``."""
        self._check(x)
        size = x.shape[-2:]
        x, skips = self.encode(x)
        stages = self.decode(x, skips)
        return [resize_to(head(s), size) for head, s in zip(self.heads, stages, strict=True)][::-1]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        outputs = self.stage_logits(x)
        if self.training and self.deep_supervision:
            return outputs
        return outputs[0]


@register_model(
    "unet_ds",
    paper="Li et al. 2023 (MICCAI), Developing Large Pre-trained Model for Breast Tumor Segmentation from "
    "Ultrasound Images: U-Net with deep supervision at every decoder stage",
    input_sizes="multiple of 16",
)
def build_unet_ds(
    in_channels: int, num_classes: int, image_size: int, base_width: int = 64, deep_supervision: bool = True
) -> UNetDS:
    """U-Net (widths ``base_width`` x 1..16) with a 1x1 prediction head on each of its four decoder stages."""
    return UNetDS(in_channels, num_classes, base_width=base_width, deep_supervision=deep_supervision)
