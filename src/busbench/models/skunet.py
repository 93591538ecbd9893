"""SK-U-Net (Byra et al., Biomedical Signal Processing and Control 61:102027, 2020, "Breast mass segmentation in
ultrasound with selective kernel U-Net convolutional neural network").

Breast masses vary widely in size, so a fixed receptive field suits some and not others. SK-U-Net replaces the
U-Net's convolutions with selective-kernel (SK) convolutions (Li et al., CVPR 2019) whose two branches see
different receptive fields, a plain 3x3 convolution and a dilated 3x3 convolution (dilation 2), and are fused by
attention:

1. split: both branches (conv-BN-ReLU) process the input;
2. fuse: their sum is global-average pooled to a channel descriptor and squeezed by a fully connected layer
   (``max(C / reduction, min_dim)`` units, ReLU);
3. select: one fully connected layer per branch gives channel-wise logits, a softmax across the two branches turns
   them into attention weights, and the output is the attention-weighted sum of the branches.

The network is the U-Net layout (four poolings; widths ``base_width * (1, 2, 4, 8, 16)``; upsample-then-convolve
decoder with skip concatenation) with every two-convolution stage made of two SK convolutions, so it has about
twice U-Net's convolution weights. ``last_attention`` of each :class:`SKConv` keeps the latest dilated-branch
weights, the quantity the paper relates to mass size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from busbench.models.base import PooledUNet
from busbench.models.blocks import UpConv, check_base_width, conv_bn_act
from busbench.models.registry import register_model

DEPTH = 4


class SKConv(nn.Module):
    """Selective-kernel convolution with a plain and a dilated 3x3 branch."""

    def __init__(
        self, in_channels: int, out_channels: int, dilation: int = 2, reduction: int = 16, min_dim: int = 32
    ) -> None:
        super().__init__()
        self.plain = conv_bn_act(in_channels, out_channels, 3, bias=False)
        self.dilated = conv_bn_act(in_channels, out_channels, 3, dilation=dilation, bias=False)
        hidden = max(out_channels // reduction, min_dim)
        self.squeeze = nn.Sequential(nn.Linear(out_channels, hidden), nn.ReLU(inplace=True))
        self.select = nn.Linear(hidden, 2 * out_channels)
        self.out_channels = out_channels
        self.last_attention: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        a = self.plain(x)
        b = self.dilated(x)
        z = self.squeeze((a + b).mean(dim=(2, 3)))
        weights = torch.softmax(self.select(z).view(-1, 2, self.out_channels), dim=1)
        self.last_attention = weights[:, 1].detach()
        return a * weights[:, 0, :, None, None] + b * weights[:, 1, :, None, None]


class SKStage(nn.Sequential):
    """Two SK convolutions: the SK counterpart of the U-Net two-convolution stage."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 2, reduction: int = 16) -> None:
        super().__init__(
            SKConv(in_channels, out_channels, dilation, reduction),
            SKConv(out_channels, out_channels, dilation, reduction),
        )


class SKUNet(PooledUNet):
    size_multiple = 2**DEPTH

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        base_width: int = 64,
        dilation: int = 2,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        base_width = check_base_width("skunet", base_width)
        w = [base_width * 2**i for i in range(DEPTH + 1)]
        self.encoder = nn.ModuleList(
            [SKStage(in_channels, w[0], dilation, reduction)]
            + [SKStage(w[i - 1], w[i], dilation, reduction) for i in range(1, DEPTH)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = SKStage(w[DEPTH - 1], w[DEPTH], dilation, reduction)
        self.bottleneck_channels = w[DEPTH]
        # decoder stages listed deepest first
        self.up = nn.ModuleList([UpConv(w[i + 1], w[i]) for i in reversed(range(DEPTH))])
        self.decoder = nn.ModuleList(
            [SKStage(2 * w[i], w[i], dilation, reduction) for i in reversed(range(DEPTH))]
        )
        self.head = nn.Conv2d(w[0], num_classes, 1)


@register_model(
    "skunet",
    paper="Byra et al. 2020 (BSPC), Breast mass segmentation in ultrasound with selective kernel U-Net",
    input_sizes="multiple of 16",
)
def build_skunet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    base_width: int = 64,
    dilation: int = 2,
    reduction: int = 16,
) -> SKUNet:
    """SK-U-Net; ``base_width`` is the first stage's width, ``dilation`` the dilated branch's rate."""
    return SKUNet(in_channels, num_classes, base_width=base_width, dilation=dilation, reduction=reduction)
