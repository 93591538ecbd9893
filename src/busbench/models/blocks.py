"""Building blocks shared by the CNN models.

The U-shaped networks in the zoo are assembled from a handful of layers: a convolution with batch norm and an
activation, the two-convolution U-Net stage, an upsample-then-convolve step and a residual wrapper. Keeping them
here lets each model file read as its paper's figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from busbench.errors import ModelError


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = True,
    act: type[nn.Module] = nn.ReLU,
    act_before_norm: bool = False,
) -> nn.Sequential:
    """``conv -> BN -> act`` with 'same' padding (``conv -> act -> BN`` for ConvMixer-style blocks)."""
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        padding=dilation * (kernel_size // 2),
        dilation=dilation,
        groups=groups,
        bias=bias,
    )
    norm = nn.BatchNorm2d(out_channels)
    activation = act(inplace=True) if act is nn.ReLU else act()
    return nn.Sequential(conv, activation, norm) if act_before_norm else nn.Sequential(conv, norm, activation)


class DoubleConv(nn.Sequential):
    """The U-Net stage: two 3x3 ``conv -> BN -> ReLU`` layers."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(conv_bn_act(in_channels, out_channels), conv_bn_act(out_channels, out_channels))


class UpConv(nn.Sequential):
    """Doubles the resolution, then one 3x3 ``conv -> BN -> ReLU`` sets the channel count."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "nearest") -> None:
        up = nn.Upsample(scale_factor=2, mode=mode, align_corners=False if mode == "bilinear" else None)
        super().__init__(up, conv_bn_act(in_channels, out_channels))


class Residual(nn.Module):
    """``x + fn(x)``."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(x)


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of logits or features to ``size`` (no-op when already there)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def supervised_outputs(model: nn.Module, main: Tensor, aux: Sequence[Tensor]) -> Tensor | list[Tensor]:
    """``[main, *aux]`` while training with deep supervision on; the main logits otherwise."""
    if getattr(model, "deep_supervision", False) and model.training:
        return [main, *aux]
    return main


def check_widths(model: str, key: str, widths: Sequence[int], length: int) -> tuple[int, ...]:
    """Validate a channel-width list from ``model.params`` and return it as a tuple."""
    values = tuple(widths) if isinstance(widths, (list, tuple)) else (widths,)
    if len(values) != length or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in values
    ):
        raise ModelError(
            f"{model}: model.params.{key} must be {length} positive integers, got {widths!r}; "
            f"fix model.params.{key} in the config"
        )
    return values


def check_base_width(model: str, base_width: int, minimum: int = 1) -> int:
    """Validate a ``base_width`` from ``model.params``."""
    if not isinstance(base_width, int) or isinstance(base_width, bool) or base_width < minimum:
        raise ModelError(
            f"{model}: model.params.base_width must be an integer >= {minimum}, got {base_width!r}; "
            "fix model.params.base_width in the config"
        )
    return base_width
