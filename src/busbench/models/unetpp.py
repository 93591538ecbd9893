"""UNet++ (Zhou et al., DLMIA 2018) on a ResNet34 encoder.

UNet++ replaces U-Net's plain skips with nested dense skip pathways. Node ``X[i, j]`` sits at encoder depth ``i``
(resolution ``1 / 2**(i + 1)`` here, the ResNet stem being level 0) and column ``j``; column 0 is the encoder.
Each node concatenates every earlier node of its row with the upsampled node below-left:

    X[i, j] = H([X[i, 0], ..., X[i, j-1], Up(X[i+1, j-1])])

Deep supervision attaches a 1x1 head to every top-row node ``X[0, 1..4]``. The main output is the full network's
``X[0, 4]`` head; in training mode with ``deep_supervision`` on, the heads of ``X[0, 1..3]`` follow it.
All heads run at half resolution (the stem's) and are upsampled bilinearly to the input size.

Configuration behind the reference count (26.90M parameters at 1 input and 1 output channel): the encoder is
ResNet34 without its classifier (21.28M); each node ``H`` is three 3x3 ``conv -> BN -> ReLU`` layers going
``in -> w/2 -> w/2 -> w`` (bias-free); node ``X[i, j]`` has the width of encoder level ``i + j - 1``, i.e.
``decoder_widths[i + j - 1]`` with ``decoder_widths = (64, 64, 128, 256)`` for ResNet34; upsampling is nearest.
This nested decoder has 5.62M parameters; the four heads add 516.

Five poolings: height and width must be multiples of 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from busbench.models.base import SegModel
from busbench.models.blocks import check_widths, conv_bn_act, resize_to, supervised_outputs
from busbench.models.registry import register_model
from busbench.models.smp_family import FeatureTap, load_weights_file, make_encoder, split_encoder_weights

DEPTH = 4  # encoder levels below the top row


class NestedNode(nn.Sequential):
    """Node ``H``: three 3x3 ``conv -> BN -> ReLU`` layers, ``in -> w/2 -> w/2 -> w``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        mid = max(out_channels // 2, 1)
        super().__init__(
            conv_bn_act(in_channels, mid, bias=False),
            conv_bn_act(mid, mid, bias=False),
            conv_bn_act(mid, out_channels, bias=False),
        )


class UNetPlusPlus(SegModel):
    size_multiple = 32

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        encoder: str = "resnet34",
        encoder_weights: str | None = None,
        decoder_widths: tuple[int, ...] | None = None,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = make_encoder(encoder, in_channels, encoder_weights, depth=DEPTH + 1)
        # smp encoders return the input first, then levels 0 (stride 2) .. 4 (stride 32)
        enc = [int(c) for c in self.encoder.out_channels[1:]]
        widths = check_widths(
            "unetpp", "decoder_widths", enc[:DEPTH] if decoder_widths is None else decoder_widths, 4
        )
        self.bottleneck = FeatureTap()
        self.bottleneck_channels = enc[-1]
        self.deep_supervision = bool(deep_supervision)

        width = {(i, 0): enc[i] for i in range(DEPTH + 1)}
        self.nodes = nn.ModuleDict()
        for j in range(1, DEPTH + 1):
            for i in range(DEPTH + 1 - j):
                in_ch = sum(width[i, k] for k in range(j)) + width[i + 1, j - 1]
                width[i, j] = widths[i + j - 1]
                self.nodes[f"x{i}_{j}"] = NestedNode(in_ch, width[i, j])
        head_cols = range(1, DEPTH + 1) if self.deep_supervision else [DEPTH]
        self.heads = nn.ModuleDict({f"x0_{j}": nn.Conv2d(width[0, j], num_classes, 1) for j in head_cols})
        _, weights_file = split_encoder_weights(encoder_weights)
        if weights_file is not None:
            load_weights_file(self.encoder, weights_file, in_channels)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        self._check(x)
        size = x.shape[-2:]
        feats = list(self.encoder(x)[1:])
        feats[-1] = self.bottleneck(feats[-1])
        grid: dict[tuple[int, int], Tensor] = {(i, 0): f for i, f in enumerate(feats)}
        for j in range(1, DEPTH + 1):
            for i in range(DEPTH + 1 - j):
                below = F.interpolate(grid[i + 1, j - 1], scale_factor=2.0, mode="nearest")
                grid[i, j] = self.nodes[f"x{i}_{j}"](
                    torch.cat([*(grid[i, k] for k in range(j)), below], dim=1)
                )
        logits = {name: resize_to(head(grid[0, int(name[-1])]), size) for name, head in self.heads.items()}
        main = logits.pop(f"x0_{DEPTH}")
        return supervised_outputs(self, main, list(logits.values()))


@register_model(
    "unetpp",
    paper="Zhou et al., DLMIA 2018 (UNet++), ResNet34 encoder",
    input_sizes="multiple of 32",
    pretrained=True,
)
def build_unetpp(
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    encoder: str = "resnet34",
    encoder_weights: str | None = None,
    decoder_widths: tuple[int, ...] | None = None,
    deep_supervision: bool = True,
) -> UNetPlusPlus:
    """UNet++; ``encoder`` is any smp encoder name, ``decoder_widths`` the widths by diagonal ``i + j - 1``."""
    return UNetPlusPlus(in_channels, num_classes, encoder, encoder_weights, decoder_widths, deep_supervision)
