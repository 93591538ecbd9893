"""UNet 3+ (Huang et al., ICASSP 2020): full-scale skip connections and full-scale deep supervision.

The encoder is U-Net's (two-convolution stages, widths 64 ... 1024). Every decoder stage ``l`` gathers all five
scales: shallower encoder features max-pooled down to its resolution, the same-level encoder feature, and the
deeper decoder features (and the bottleneck) bilinearly upsampled to it. Each of the five is reduced to
``cat_channels = 64`` by a 3x3 ``conv -> BN -> ReLU``; the concatenation (320 channels) is fused by one more 3x3
``conv -> BN -> ReLU``.

Deep supervision (on by default, as in the paper): every decoder stage and the bottleneck get a 3x3 convolution
head whose logits are bilinearly upsampled to the input size. The main output is the top stage's head. The
classification-guided module of the paper is not included.

Reference count: 26.97M parameters at 1 input and 1 output channel (without the four side heads, which add 18k).
Four poolings: height and width must be multiples of 16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from busbench.models.base import PooledUNet
from busbench.models.blocks import DoubleConv, check_base_width, conv_bn_act, resize_to, supervised_outputs
from busbench.models.registry import register_model

LEVELS = 5


class FullScaleStage(nn.Module):
    """One decoder stage: five scale-matched ``conv -> BN -> ReLU`` branches, concatenated and fused."""

    def __init__(self, level: int, source_channels: list[int], cat_channels: int) -> None:
        super().__init__()
        self.level = level
        self.branches = nn.ModuleList([conv_bn_act(c, cat_channels) for c in source_channels])
        fused = cat_channels * len(source_channels)
        self.fuse = conv_bn_act(fused, fused)

    def forward(self, sources: list[Tensor]) -> Tensor:
        size = sources[self.level].shape[-2:]
        parts = []
        for k, (branch, src) in enumerate(zip(self.branches, sources, strict=True)):
            if k < self.level:  # shallower: max-pool down by 2**(level - k)
                src = F.max_pool2d(src, kernel_size=2 ** (self.level - k))
            elif k > self.level:  # deeper: bilinear up to this stage's size
                src = resize_to(src, size)
            parts.append(branch(src))
        return self.fuse(torch.cat(parts, dim=1))


class UNet3Plus(PooledUNet):
    size_multiple = 16

    def __init__(
        self, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, deep_supervision: bool = True
    ) -> None:
        super().__init__()
        base_width = check_base_width("unet3p", base_width)
        w = [base_width * 2**i for i in range(LEVELS)]
        cat = w[0]
        up = cat * LEVELS
        self.deep_supervision = bool(deep_supervision)
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, w[0])] + [DoubleConv(w[i - 1], w[i]) for i in range(1, 4)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(w[3], w[4])
        self.bottleneck_channels = w[4]
        # stage l sees encoder levels 0..l, then decoder levels l+1..3 (``up`` channels) and the bottleneck
        self.stages = nn.ModuleList(
            [FullScaleStage(lvl, w[: lvl + 1] + [up] * (3 - lvl) + [w[4]], cat) for lvl in reversed(range(4))]
        )
        self.head = nn.Conv2d(up, num_classes, 3, padding=1)
        # side heads on decoder levels 1..3 and the bottleneck
        self.side_heads = (
            nn.ModuleList([nn.Conv2d(c, num_classes, 3, padding=1) for c in [up, up, up, w[4]]])
            if self.deep_supervision
            else None
        )

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        self._check(x)
        size = x.shape[-2:]
        bottom, feats = self.encode(x)
        feats.append(bottom)
        # decoded[l] is decoder level l; level 4 is the bottleneck itself
        decoded: list[Tensor] = [feats[4]] * LEVELS
        for stage in self.stages:  # levels 3, 2, 1, 0
            lvl = stage.level
            decoded[lvl] = stage(feats[: lvl + 1] + decoded[lvl + 1 :])
        main = self.head(decoded[0])
        aux = []
        if self.side_heads is not None and self.training:
            aux = [resize_to(h(d), size) for h, d in zip(self.side_heads, decoded[1:], strict=True)]
        return supervised_outputs(self, main, aux)


@register_model(
    "unet3p", paper="Huang et al., ICASSP 2020 (UNet 3+)", input_sizes="multiple of 16", pretrained=False
)
def build_unet3p(
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    base_width: int = 64,
    deep_supervision: bool = True,
) -> UNet3Plus:
    """UNet 3+; ``base_width`` is the first encoder width and the per-scale width of the decoder's branches."""
    return UNet3Plus(in_channels, num_classes, base_width=base_width, deep_supervision=deep_supervision)
