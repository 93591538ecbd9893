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

Optional dropout (``dropout`` of the ``unet`` builder, off by default) sits between the two convolutions of every
stage, the layout of the common Keras U-Net (convolution, dropout, convolution): one rate for all stages, or a pair
``[shallow, deep]`` whose first rate applies to the two outer stages of the encoder and of the decoder (the widest
feature maps, ``base_width`` and ``2 * base_width`` channels) and whose second applies to the two inner stages and
the bottleneck. Cheng, Illanko and Khan describe a U-Net of 32...512 filters with dropout 0.1 / 0.2; this placement
is busbench's reading, not taken from their code. Dropout layers hold no weights, so parameter counts and
checkpoints do not change with the rate.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from busbench.errors import ModelError
from busbench.models.base import PooledUNet
from busbench.models.blocks import DoubleConv, UpConv, check_base_width
from busbench.models.registry import register_model


def stage_dropout_rates(dropout: float | Sequence[float]) -> list[float]:
    """Dropout rate of the five depths (outermost first, bottleneck last) from one rate or ``[shallow, deep]``."""
    rates = [dropout] if isinstance(dropout, int | float) else list(dropout)
    if len(rates) not in (1, 2) or not all(
        isinstance(r, int | float) and not isinstance(r, bool) and 0.0 <= r < 1.0 for r in rates
    ):
        raise ModelError(
            f"unet: model.params.dropout must be a rate in [0, 1) or a pair [shallow, deep] of rates, got {dropout!r}"
        )
    shallow, deep = (rates[0], rates[0]) if len(rates) == 1 else rates
    return [float(shallow)] * 2 + [float(deep)] * 3


class DropoutDoubleConv(DoubleConv):
    """The U-Net stage with dropout between its two convolutions (same weights and names as :class:`DoubleConv`)."""

    def __init__(self, in_channels: int, out_channels: int, rate: float) -> None:
        super().__init__(in_channels, out_channels)
        self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        return self[1](F.dropout(self[0](x), self.rate, self.training))


def _stage(in_channels: int, out_channels: int, rate: float) -> DoubleConv:
    return (
        DropoutDoubleConv(in_channels, out_channels, rate)
        if rate > 0
        else DoubleConv(in_channels, out_channels)
    )


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


class UNet(PooledUNet):
    """U-Net with optional attention gates on the skips (``attention=True`` gives Attention U-Net)."""

    size_multiple = 16
    gates_attr = "gates"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        base_width: int = 64,
        attention: bool = False,
        dropout: float | Sequence[float] = 0.0,
    ):
        super().__init__()
        p = stage_dropout_rates(dropout)  # per depth, outermost first; p[4] is the bottleneck's
        base_width = check_base_width(
            "attunet" if attention else "unet", base_width, minimum=2 if attention else 1
        )
        w = [base_width * 2**i for i in range(5)]
        self.encoder = nn.ModuleList(
            [_stage(in_channels, w[0], p[0])] + [_stage(w[i - 1], w[i], p[i]) for i in range(1, 4)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _stage(w[3], w[4], p[4])
        self.bottleneck_channels = w[4]
        # decoder stages listed deepest first
        self.up = nn.ModuleList([UpConv(w[i + 1], w[i]) for i in reversed(range(4))])
        self.gates = (
            nn.ModuleList([AttentionGate(w[i], w[i], w[i] // 2) for i in reversed(range(4))])
            if attention
            else None
        )
        self.decoder = nn.ModuleList([_stage(2 * w[i], w[i], p[i]) for i in reversed(range(4))])
        self.head = nn.Conv2d(w[0], num_classes, 1)


@register_model(
    "unet", paper="Ronneberger et al., MICCAI 2015 (U-Net)", input_sizes="multiple of 16", pretrained=False
)
def build_unet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    base_width: int = 64,
    dropout: float | Sequence[float] = 0.0,
) -> UNet:
    """U-Net; ``base_width`` is the first stage's width (64 in the paper), doubled at each pooling. ``dropout``: one
    rate, or ``[shallow, deep]`` rates, between the two convolutions of each stage (see the module docstring)."""
    return UNet(in_channels, num_classes, base_width=base_width, attention=False, dropout=dropout)


@register_model(
    "attunet",
    paper="Oktay et al., MIDL 2018 (Attention U-Net)",
    input_sizes="multiple of 16",
    pretrained=False,
)
def build_attunet(in_channels: int, num_classes: int, image_size: int, *, base_width: int = 64) -> UNet:
    """Attention U-Net: U-Net with additive attention gates on the four skips."""
    return UNet(in_channels, num_classes, base_width=base_width, attention=True)
