"""U-KAN (Li et al., "U-KAN Makes Strong Backbone for Medical Image Segmentation and Generation", AAAI 2025).

Encoder: three convolution stages (two 3x3 conv -> BN -> ReLU, then 2x2 max pool) of widths ``e0/8, e0/4, e0``,
then two tokenised KAN stages. A tokenised KAN stage embeds its input with an overlapping 3x3 stride-2 convolution
and layer norm, runs one tokenised KAN block on the tokens and layer-normalises them. The embedding widths
``(e0, e1, e2)`` are ``(256, 320, 512)`` in the published configuration; ``e1`` and ``e2`` are the two KAN stages.

Tokenised KAN block (pre-norm, residual): ``x + L(LN(x))`` where ``L`` is three rounds of a KAN layer on the tokens
followed by a 3x3 depth-wise convolution -> BN -> ReLU on the token grid.

KAN layer (Liu et al., "KAN: Kolmogorov-Arnold Networks", 2024): every input-output edge carries a learnable
function ``phi(x) = w_b * silu(x) + w_s * sum_i c_i B_i(x)`` with cubic B-splines ``B_i`` on a uniform grid of
5 intervals over [-1, 1] (extended by 3 knots each side, so 8 basis functions); a layer has ``base_weight`` (w_b),
``spline_weight`` (c_i) and ``spline_scaler`` (w_s), i.e. ``10 * in * out`` parameters for grid 5 / order 3 and no
bias. Outside the grid the spline part is zero and the base branch carries the signal. The grid is fixed (the KAN
paper's grid refinement is not used in U-KAN training).

Decoder, deepest first: five stages of (3x3 conv -> BN -> ReLU, 3x3 conv -> BN -> ReLU) -> bilinear x2 -> ReLU,
each added to the matching encoder feature; the two deepest are followed by a tokenised KAN block and layer norm,
as in the encoder. A 1x1 convolution gives the logits.

The published configuration has 25.36M parameters at 1 input and 1 output channel. Five halvings: height and
width must be multiples of 32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from busbench.errors import ModelError
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


def bspline_basis(x: Tensor, knots: Tensor, order: int) -> Tensor:
    """B-spline basis functions of degree ``order`` on ``knots`` evaluated at ``x``: shape ``x.shape + (n,)``.

    Cox-de Boor recursion; ``n = len(knots) - order - 1``. Degree 0 is the indicator of ``[t_j, t_{j+1})``.
    """
    x = x.unsqueeze(-1)
    basis = ((x >= knots[:-1]) & (x < knots[1:])).to(x.dtype)
    for p in range(1, order + 1):
        left = (x - knots[: -p - 1]) / (knots[p:-1] - knots[: -p - 1])
        right = (knots[p + 1 :] - x) / (knots[p + 1 :] - knots[1:-p])
        basis = left * basis[..., :-1] + right * basis[..., 1:]
    return basis


class KANLinear(nn.Module):
    """A KAN layer ``(..., in) -> (..., out)``: ``silu`` base branch plus a B-spline branch on each edge.

    Initialisation: ``base_weight`` as ``nn.Linear`` (Kaiming uniform), ``spline_scaler`` = 1 and spline
    coefficients drawn from ``N(0, (0.1 / sqrt(in))^2)``, so the spline branch starts as small noise around the
    base branch, as in the KAN paper (whose 0.1 is divided by the fan-in here to keep wide layers' outputs bounded).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spline_order = spline_order
        n_basis = grid_size + spline_order
        step = (grid_range[1] - grid_range[0]) / grid_size
        knots = grid_range[0] + step * torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32)
        self.register_buffer("knots", knots)
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, n_basis))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        nn.init.normal_(self.spline_weight, std=0.1 / math.sqrt(in_features))
        nn.init.ones_(self.spline_scaler)

    def forward(self, x: Tensor) -> Tensor:
        base = F.linear(F.silu(x), self.base_weight)
        basis = bspline_basis(x, self.knots.to(x.dtype), self.spline_order).flatten(-2)
        weight = (self.spline_weight * self.spline_scaler.unsqueeze(-1)).flatten(1)
        return base + F.linear(basis, weight)


class DepthwiseBNReLU(nn.Module):
    """3x3 depth-wise convolution -> BN -> ReLU on tokens ``(B, H*W, C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        return to_tokens(F.relu(self.norm(self.conv(to_image(tokens, h, w)))))


class TokenizedKANBlock(nn.Module):
    """``x + (KAN -> DW conv) x 3 (LN(x))`` on tokens ``(B, H*W, C)``."""

    def __init__(self, dim: int, grid_size: int, spline_order: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.kans = nn.ModuleList([KANLinear(dim, dim, grid_size, spline_order) for _ in range(3)])
        self.dwconvs = nn.ModuleList([DepthwiseBNReLU(dim) for _ in range(3)])

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        y = self.norm(tokens)
        for kan, dwconv in zip(self.kans, self.dwconvs, strict=True):
            y = dwconv(kan(y), h, w)
        return tokens + y


def _double_conv(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UpStage(nn.Module):
    """Double conv (the first keeps the input width) -> bilinear x2 -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _double_conv(in_channels, in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.interpolate(self.conv(x), scale_factor=2.0, mode="bilinear", align_corners=False))


class UKAN(SegModel):
    size_multiple = 32

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        embed_dims: tuple[int, ...] = (256, 320, 512),
        grid_size: int = 5,
        spline_order: int = 3,
    ) -> None:
        super().__init__()
        e0, e1, e2 = check_widths("ukan", "embed_dims", embed_dims, 3)
        if e0 % 8:
            raise ModelError(
                f"ukan: model.params.embed_dims[0] must be a multiple of 8 (the convolution stages are "
                f"embed_dims[0] / 8 and / 4 wide), got {e0}; fix model.params.embed_dims"
            )
        for key, value, low in (("grid_size", grid_size, 1), ("spline_order", spline_order, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ModelError(f"ukan: model.params.{key} must be an integer >= {low}, got {value!r}")
        conv = [in_channels, e0 // 8, e0 // 4, e0]
        self.conv_stages = nn.ModuleList(
            [nn.Sequential(_double_conv(conv[i], conv[i + 1], conv[i + 1]), nn.MaxPool2d(2)) for i in range(3)]
        )
        kan_block = functools.partial(TokenizedKANBlock, grid_size=grid_size, spline_order=spline_order)
        self.kan_stage = TokenisedStage(e0, e1, kan_block)
        self.bottleneck = TokenisedStage(e1, e2, kan_block)
        self.bottleneck_channels = e2
        # decoder, deepest first: e2->e1, e1->e0, e0->e0/4, e0/4->e0/8, e0/8->e0/8
        self.up = nn.ModuleList(
            [
                UpStage(e2, e1),
                UpStage(e1, e0),
                UpStage(e0, e0 // 4),
                UpStage(e0 // 4, e0 // 8),
                UpStage(e0 // 8, e0 // 8),
            ]
        )
        self.dec_kan = nn.ModuleList(
            [TokenisedDecoderBlock(e1, kan_block), TokenisedDecoderBlock(e0, kan_block)]
        )
        self.head = nn.Conv2d(e0 // 8, num_classes, 1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.conv_stages, self.kan_stage, self.bottleneck]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        x = tokenised_unet(x, self.conv_stages, self.kan_stage, self.bottleneck, self.up, self.dec_kan)
        return self.head(x)


@register_model(
    "ukan", paper="Li et al., AAAI 2025 (U-KAN)", input_sizes="multiple of 32", pretrained=False
)
def build_ukan(
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    embed_dims: tuple[int, ...] = (256, 320, 512),
    grid_size: int = 5,
    spline_order: int = 3,
) -> UKAN:
    """U-KAN; ``embed_dims`` are the third convolution stage's and the two KAN stages' widths."""
    return UKAN(in_channels, num_classes, embed_dims=embed_dims, grid_size=grid_size, spline_order=spline_order)
