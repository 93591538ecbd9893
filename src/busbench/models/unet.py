"""U-Net (Ronneberger et al., MICCAI 2015) and Attention U-Net (Oktay et al., MIDL 2018).

U-Net: a contracting path of two-convolution stages with 2x2 max pooling (widths 64, 128, 256, 512, 1024) and
an expanding path that doubles the resolution, halves the channels, concatenates the skip feature and applies
two convolutions. Padded convolutions and batch norm are used so the logits come out at the input size. The
paper's "up-convolution" is realised as nearest-neighbour upsampling followed by a 3x3 convolution, the variant
behind the reference count (34.53M parameters at 1 input and 1 output channel).

Attention U-Net adds an additive attention gate on every skip connection: the skip feature ``x`` and the gating
signal ``g`` (the upsampled decoder feature) are projected to ``F_int = C/2`` channels by 1x1 convolutions,
summed, passed through ReLU, a 1x1 convolution to one channel and a sigmoid; the skip is scaled by the result.

Four poolings: height and width must be multiples of 16.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from busbench.models.base import SegModel
from busbench.models.blocks import DoubleConv, UpConv, check_base_width
from busbench.models.registry import register_model


class AttentionGate(nn.Module):
    """Additive attention gate: ``x * sigmoid(psi(relu(W_g g + W_x x)))``."""

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(gate_channels, inter_channels, 1), nn.BatchNorm2d(inter_channels))
        self.w_x = nn.Sequential(nn.Conv2d(skip_channels, inter_channels, 1), nn.BatchNorm2d(inter_channels))
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: Tensor, x: Tensor) -> Tensor:
        return x * self.psi(self.relu(self.w_g(g) + self.w_x(x)))


class UNet(SegModel):
    """U-Net with optional attention gates on the skips (``attention=True`` gives Attention U-Net)."""

    size_multiple = 16

    def __init__(
        self, in_channels: int = 1, num_classes: int = 1, base_width: int = 64, attention: bool = False
    ):
        super().__init__()
        base_width = check_base_width(
            "attunet" if attention else "unet", base_width, minimum=2 if attention else 1
        )
        w = [base_width * 2**i for i in range(5)]
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, w[0])] + [DoubleConv(w[i - 1], w[i]) for i in range(1, 4)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(w[3], w[4])
        self.bottleneck_channels = w[4]
        # decoder stages listed deepest first
        self.up = nn.ModuleList([UpConv(w[i + 1], w[i]) for i in reversed(range(4))])
        self.gates = (
            nn.ModuleList([AttentionGate(w[i], w[i], w[i] // 2) for i in reversed(range(4))])
            if attention
            else None
        )
        self.decoder = nn.ModuleList([DoubleConv(2 * w[i], w[i]) for i in reversed(range(4))])
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder, self.bottleneck]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        x = self.bottleneck(self.pool(x))
        for k, (up, dec) in enumerate(zip(self.up, self.decoder, strict=True)):
            x = up(x)
            skip = skips[-1 - k]
            if self.gates is not None:
                skip = self.gates[k](x, skip)
            x = dec(torch.cat((skip, x), dim=1))
        return self.head(x)


@register_model(
    "unet", paper="Ronneberger et al., MICCAI 2015 (U-Net)", input_sizes="multiple of 16", pretrained=False
)
def build_unet(in_channels: int, num_classes: int, image_size: int, *, base_width: int = 64) -> UNet:
    """U-Net; ``base_width`` is the first stage's width (64 in the paper), doubled at each pooling."""
    return UNet(in_channels, num_classes, base_width=base_width, attention=False)


@register_model(
    "attunet",
    paper="Oktay et al., MIDL 2018 (Attention U-Net)",
    input_sizes="multiple of 16",
    pretrained=False,
)
def build_attunet(in_channels: int, num_classes: int, image_size: int, *, base_width: int = 64) -> UNet:
    """Attention U-Net: U-Net with additive attention gates on the four skips."""
    return UNet(in_channels, num_classes, base_width=base_width, attention=True)
