"""UNeXt (Valanarasu and Patel, MICCAI 2022): convolutional stages followed by tokenized MLP stages.

Encoder: three convolution stages (3x3 conv -> BN -> ReLU -> 2x2 max pool) and two tokenized-MLP stages. A
tokenized-MLP stage embeds its input with an overlapping 3x3 stride-2 convolution and layer norm, runs a shifted
MLP block on the tokens and layer-normalises them. Decoder: five stages of 3x3 conv (-> BN) -> bilinear x2 ->
ReLU, each added to the matching encoder feature; the two deepest decoder stages are followed by a shifted MLP
block and layer norm, as in the encoder. A 1x1 convolution gives the logits.

Shifted MLP block (pre-norm, residual): the channels are split into five groups that are shifted by -2 ... 2
pixels along the width (zero fill), tokenised and projected by a linear layer; a 3x3 depthwise convolution encodes
position, then GELU; the result is shifted the same way along the height, tokenised and projected back.

Widths ``(16, 32, 128, 160, 256)`` give the reference count (1.47M parameters at 1 input and 1 output channel).
Five halvings: height and width must be multiples of 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from busbench.models.base import SegModel
from busbench.models.blocks import check_widths
from busbench.models.registry import register_model
from busbench.models.tokenised import (
    TokenisedDecoderBlock,
    TokenisedStage,
    to_image,
    to_tokens,
    tokenised_unet,
)

SHIFTS = (-2, -1, 0, 1, 2)


def shift_groups(x: Tensor, dim: int, shifts: tuple[int, ...] = SHIFTS) -> Tensor:
    """Split the channels of ``(B, C, H, W)`` into ``len(shifts)`` groups and shift each along ``dim``.

    Vacated positions are zero (no wrap-around), so each group sees a neighbour's content at its offset.
    """
    groups = torch.chunk(x, len(shifts), dim=1)
    out = []
    for g, s in zip(groups, shifts, strict=False):
        n = g.shape[dim]
        s = max(-n, min(n, s))
        if s == 0:
            out.append(g)
            continue
        pad_shape = list(g.shape)
        pad_shape[dim] = abs(s)
        zeros = g.new_zeros(pad_shape)
        kept = g.narrow(dim, 0, n - s) if s > 0 else g.narrow(dim, -s, n + s)
        out.append(torch.cat([zeros, kept] if s > 0 else [kept, zeros], dim=dim))
    return torch.cat(out, dim=1)


class ShiftedMLP(nn.Module):
    """``x + MLP_shifted(LN(x))`` on tokens ``(B, H*W, C)``; hidden width equals ``C`` (MLP ratio 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        y = self.norm(tokens)
        y = to_tokens(shift_groups(to_image(y, h, w), dim=3))  # shift along the width
        y = self.fc1(y)
        y = self.act(self.dwconv(to_image(y, h, w)))
        y = to_tokens(shift_groups(y, dim=2))  # shift along the height
        return tokens + self.fc2(y)


class UpStage(nn.Module):
    """3x3 conv (-> BN) -> bilinear x2 -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(self.norm(self.conv(x)), scale_factor=2.0, mode="bilinear", align_corners=False)
        return F.relu(x)


class UNeXt(SegModel):
    size_multiple = 32

    def __init__(
        self, in_channels: int = 1, num_classes: int = 1, widths: tuple[int, ...] = (16, 32, 128, 160, 256)
    ) -> None:
        super().__init__()
        w = check_widths("unext", "widths", widths, 5)
        chans = [in_channels, *w[:3]]
        self.conv_stages = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(chans[i], chans[i + 1], 3, padding=1),
                    nn.BatchNorm2d(chans[i + 1]),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
                for i in range(3)
            ]
        )
        self.tok_stage = TokenisedStage(w[2], w[3], ShiftedMLP)
        self.bottleneck = TokenisedStage(w[3], w[4], ShiftedMLP)
        self.bottleneck_channels = w[4]
        # decoder, deepest first: 4->3, 3->2, 2->1, 1->0, 0->0 (the last without BN)
        self.up = nn.ModuleList(
            [UpStage(w[4], w[3]), UpStage(w[3], w[2]), UpStage(w[2], w[1]), UpStage(w[1], w[0])]
            + [UpStage(w[0], w[0], norm=False)]
        )
        self.dec_tok = nn.ModuleList(
            [TokenisedDecoderBlock(w[3], ShiftedMLP), TokenisedDecoderBlock(w[2], ShiftedMLP)]
        )
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.conv_stages, self.tok_stage, self.bottleneck]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        x = tokenised_unet(x, self.conv_stages, self.tok_stage, self.bottleneck, self.up, self.dec_tok)
        return self.head(x)


@register_model(
    "unext", paper="Valanarasu and Patel, MICCAI 2022 (UNeXt)", input_sizes="multiple of 32", pretrained=False
)
def build_unext(
    in_channels: int, num_classes: int, image_size: int, *, widths: tuple[int, ...] = (16, 32, 128, 160, 256)
) -> UNeXt:
    """UNeXt; ``widths`` are the three convolution stages' and the two tokenized stages' widths."""
    return UNeXt(in_channels, num_classes, widths=widths)
