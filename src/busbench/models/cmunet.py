"""CMU-Net (Tang et al., ISBI 2023) and CMUNeXt (Tang et al., ISBI 2024), two ultrasound segmentation networks.

CMU-Net is U-Net (widths 64 ... 1024, nearest-upsampling "up-convolutions") with two additions:

- a ConvMixer block after the deepest stage: ``depth`` layers of a residual ``k x k`` depthwise convolution
  (-> GELU -> BN) followed by a pointwise convolution (-> GELU -> BN), mixing distant locations and channels;
- a multi-scale attention gate (MSAG) on every skip: pointwise, 3x3 and dilated (rate 2) 3x3 convolutions (each
  with BN) are concatenated, passed through ReLU, fused to one map per channel by a 1x1 convolution, BN and a
  sigmoid, and the skip becomes ``x + x * gate``.

CMUNeXt keeps the U shape but is built from large-kernel depthwise blocks:

- a CMUNeXt block is ``depth`` layers of a residual ``k x k`` depthwise convolution (-> GELU -> BN) and an inverted
  bottleneck of two pointwise convolutions (``C -> 4C -> C``, each -> GELU -> BN), then a 3x3 ``conv -> BN ->
  ReLU`` to the stage's output width;
- the decoder upsamples bilinearly with a 3x3 convolution, and a skip-fusion block merges skip and upsampled
  feature: a 3x3 group convolution with two groups (one per source) then an inverted bottleneck to the width.

Reference counts at 1 input and 1 output channel: CMU-Net 49.93M (ConvMixer depth 7, kernel 7), CMUNeXt 3.15M
(widths 16, 32, 128, 160, 256; depths 1, 1, 1, 3, 1; kernels 3, 3, 7, 7, 7). Four poolings: multiples of 16.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from busbench.errors import ModelError
from busbench.models.base import PooledUNet
from busbench.models.blocks import DoubleConv, Residual, UpConv, check_base_width, check_widths, conv_bn_act
from busbench.models.registry import register_model


def _positive(model: str, key: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelError(f"{model}: model.params.{key} must be a positive integer, got {value!r}")
    return value


def _odd(model: str, key: str, values: tuple[int, ...]) -> tuple[int, ...]:
    if any(k % 2 == 0 for k in values):
        raise ModelError(f"{model}: model.params.{key} must be odd kernel sizes, got {values!r}")
    return values


def depthwise_mixer(channels: int, kernel: int) -> Residual:
    """Residual ``k x k`` depthwise convolution -> GELU -> BN (spatial mixing)."""
    return Residual(
        conv_bn_act(channels, channels, kernel, groups=channels, act=nn.GELU, act_before_norm=True)
    )


def pointwise(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 convolution -> GELU -> BN (channel mixing)."""
    return conv_bn_act(in_channels, out_channels, 1, act=nn.GELU, act_before_norm=True)


class ConvMixer(nn.Sequential):
    """``depth`` ConvMixer layers at constant width."""

    def __init__(self, channels: int, depth: int, kernel: int) -> None:
        super().__init__(
            *[
                nn.Sequential(depthwise_mixer(channels, kernel), pointwise(channels, channels))
                for _ in range(depth)
            ]
        )


class MSAG(nn.Module):
    """Multi-scale attention gate: ``x + x * sigmoid(BN(conv1x1(relu([pw(x), conv3(x), dilconv3(x)]))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pointwise = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.ordinary = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.dilated = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2), nn.BatchNorm2d(channels)
        )
        self.vote = nn.Sequential(
            nn.Conv2d(3 * channels, channels, 1), nn.BatchNorm2d(channels), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        multi = torch.relu(torch.cat([self.pointwise(x), self.ordinary(x), self.dilated(x)], dim=1))
        return x + x * self.vote(multi)


class CMUNet(PooledUNet):
    size_multiple = 16

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        base_width: int = 64,
        mixer_depth: int = 7,
        mixer_kernel: int = 7,
    ) -> None:
        super().__init__()
        base_width = check_base_width("cmunet", base_width)
        mixer_depth = _positive("cmunet", "mixer_depth", mixer_depth)
        mixer_kernel = _odd("cmunet", "mixer_kernel", (_positive("cmunet", "mixer_kernel", mixer_kernel),))[0]
        w = [base_width * 2**i for i in range(5)]
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, w[0])] + [DoubleConv(w[i - 1], w[i]) for i in range(1, 4)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(DoubleConv(w[3], w[4]), ConvMixer(w[4], mixer_depth, mixer_kernel))
        self.bottleneck_channels = w[4]
        self.gates = nn.ModuleList([MSAG(w[i]) for i in range(4)])
        # decoder stages listed deepest first
        self.up = nn.ModuleList([UpConv(w[i + 1], w[i]) for i in reversed(range(4))])
        self.decoder = nn.ModuleList([DoubleConv(2 * w[i], w[i]) for i in reversed(range(4))])
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        x, skips = self.encode(x)
        skips = [gate(s) for gate, s in zip(self.gates, skips, strict=True)]
        return self.head(self.decode(x, skips)[-1])


class CMUNeXtBlock(nn.Sequential):
    """``depth`` x (residual large-kernel depthwise, pointwise C -> 4C -> C), then 3x3 conv to ``out``."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, kernel: int) -> None:
        layers = [
            nn.Sequential(
                depthwise_mixer(in_channels, kernel),
                pointwise(in_channels, 4 * in_channels),
                pointwise(4 * in_channels, in_channels),
            )
            for _ in range(depth)
        ]
        super().__init__(*layers, conv_bn_act(in_channels, out_channels))


class SkipFusion(nn.Sequential):
    """3x3 group convolution over [skip, upsampled] (two groups), then pointwise ``2C -> 4C_out -> C_out``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            conv_bn_act(in_channels, in_channels, 3, groups=2, act=nn.GELU, act_before_norm=True),
            pointwise(in_channels, 4 * out_channels),
            pointwise(4 * out_channels, out_channels),
        )


class CMUNeXt(PooledUNet):
    size_multiple = 16
    decoder_attr = "fusion"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        widths: tuple[int, ...] = (16, 32, 128, 160, 256),
        depths: tuple[int, ...] = (1, 1, 1, 3, 1),
        kernels: tuple[int, ...] = (3, 3, 7, 7, 7),
    ) -> None:
        super().__init__()
        w = check_widths("cmunext", "widths", widths, 5)
        depths = check_widths("cmunext", "depths", depths, 5)
        kernels = _odd("cmunext", "kernels", check_widths("cmunext", "kernels", kernels, 5))
        self.stem = conv_bn_act(in_channels, w[0])
        chans = [w[0], *w]
        self.encoder = nn.ModuleList(
            [CMUNeXtBlock(chans[i], chans[i + 1], depths[i], kernels[i]) for i in range(4)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = CMUNeXtBlock(w[3], w[4], depths[4], kernels[4])
        self.bottleneck_channels = w[4]
        # decoder stages listed deepest first
        self.up = nn.ModuleList([UpConv(w[i + 1], w[i], mode="bilinear") for i in reversed(range(4))])
        self.fusion = nn.ModuleList([SkipFusion(2 * w[i], w[i]) for i in reversed(range(4))])
        self.head = nn.Conv2d(w[0], num_classes, 1)


@register_model(
    "cmunet", paper="Tang et al., ISBI 2023 (CMU-Net)", input_sizes="multiple of 16", pretrained=False
)
def build_cmunet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    base_width: int = 64,
    mixer_depth: int = 7,
    mixer_kernel: int = 7,
) -> CMUNet:
    """CMU-Net; ``mixer_depth``/``mixer_kernel`` set the ConvMixer block (7 and 7 in the paper)."""
    return CMUNet(in_channels, num_classes, base_width, mixer_depth, mixer_kernel)


@register_model(
    "cmunext", paper="Tang et al., ISBI 2024 (CMUNeXt)", input_sizes="multiple of 16", pretrained=False
)
def build_cmunext(
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    widths: tuple[int, ...] = (16, 32, 128, 160, 256),
    depths: tuple[int, ...] = (1, 1, 1, 3, 1),
    kernels: tuple[int, ...] = (3, 3, 7, 7, 7),
) -> CMUNeXt:
    """CMUNeXt; ``widths``, ``depths`` and ``kernels`` are per encoder stage (the paper's base model by default)."""
    return CMUNeXt(in_channels, num_classes, widths, depths, kernels)
