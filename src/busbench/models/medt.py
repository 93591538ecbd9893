"""MedT (Valanarasu et al. 2021, "Medical Transformer: Gated Axial-Attention for Medical Image Segmentation").

**Gated axial attention.** Self-attention along one image axis (a column, then a row), with learned relative
position encodings r^q, r^k, r^v added to the query-key logits and to the values, as in axial attention with
position-sensitive terms. MedT multiplies each positional term by a learned scalar gate:

    y_i = sum_j softmax_j(q_i.k_j + G_Q q_i.r^q_(j-i) + G_K k_j.r^k_(j-i)) (G_V1 v_j + G_V2 r^v_(j-i))

so that a network trained on few images can turn down encodings it cannot learn well. The positional gates start
at 0.1 (the encodings are untrained and weakly constrained by small data; they gain weight only if they help) and
G_V1 at 1, so each layer starts close to plain axial self-attention.

**Gated axial transformer layer.** 1x1 conv (halving the width), height attention, width attention, optional 2x
average pooling, 1x1 conv back up, residual connection.

**Local-Global (LoGo) network.** A convolutional stem halves the resolution. The *global* branch runs two gated
axial layers on the whole feature map (to 1/8 resolution) and a two-step decoder. The *local* branch cuts the same
feature map into 4x4 tiles and runs a deeper branch (four gated axial layers, four decoder steps) on each tile as
a separate sample; the tiles are stitched back. The two outputs are added, upsampled to input resolution, and a
3x3 conv and a 1x1 conv give the logits. Decoder steps are 3x3 conv-BN-ReLU, 2x bilinear upsampling where the
encoder pooled, and addition of the encoder feature of that scale.

Input sizes: a positive multiple of 32 (stem /2, tiles /4, two poolings in the local branch), and only the size
the model was built for, because each layer's relative encodings span exactly its axis length.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from busbench.errors import ModelError
from busbench.models.base import SegModel
from busbench.models.registry import register_model

SIZE_MULTIPLE = 32
TILES = 4  # the local branch sees a TILES x TILES grid of patches


class GatedAxialAttention(nn.Module):
    """Multi-head gated self-attention along one axis (``"height"`` or ``"width"``) of a ``(B, C, H, W)`` map."""

    def __init__(self, dim: int, span: int, heads: int, axis: str) -> None:
        super().__init__()
        if axis not in ("height", "width"):
            raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
        if dim % (2 * heads):
            raise ModelError(
                f"medt attention width {dim} must be divisible by 2 x heads ({2 * heads}); fix model.params"
            )
        self.axis, self.span, self.heads = axis, span, heads
        self.head_dim = dim // heads
        self.qk_dim = self.head_dim // 2
        # queries and keys get half a head's channels each, values a full head
        self.qkv = nn.Conv1d(dim, 2 * dim, 1, bias=False)
        self.qkv_norm = nn.BatchNorm1d(2 * dim)
        self.out_norm = nn.BatchNorm1d(dim)
        # one embedding per relative offset j - i in [-(span - 1), span - 1], shared across heads
        self.relative = nn.Parameter(torch.randn(2 * self.head_dim, 2 * span - 1) * self.head_dim**-0.5)
        offsets = torch.arange(span)[None, :] - torch.arange(span)[:, None] + span - 1
        self.register_buffer("offsets", offsets, persistent=False)
        self.gate_q = nn.Parameter(torch.tensor(0.1))
        self.gate_k = nn.Parameter(torch.tensor(0.1))
        self.gate_v_pos = nn.Parameter(torch.tensor(0.1))
        self.gate_v = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # fold the other axis into the batch: (B * W, C, H) for height, (B * H, C, W) for width
        lines = x.permute(0, 3, 1, 2) if self.axis == "height" else x.permute(0, 2, 1, 3)
        n, length = lines.shape[0] * lines.shape[1], lines.shape[-1]
        qkv = self.qkv_norm(self.qkv(lines.reshape(n, c, length)))
        qkv = qkv.reshape(n, self.heads, 2 * self.head_dim, length)
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.head_dim], dim=2)
        rel = self.relative[:, self.offsets]  # (2 * head_dim, L, L), entry [:, i, j] encodes offset j - i
        r_q, r_k, r_v = rel.split([self.qk_dim, self.qk_dim, self.head_dim], dim=0)
        logits = (
            torch.einsum("nhci,nhcj->nhij", q, k)
            + self.gate_q * torch.einsum("nhci,cij->nhij", q, r_q)
            + self.gate_k * torch.einsum("nhcj,cij->nhij", k, r_k)
        )
        attn = torch.softmax(logits * self.qk_dim**-0.5, dim=-1)
        out = self.gate_v * torch.einsum("nhij,nhcj->nhci", attn, v) + self.gate_v_pos * torch.einsum(
            "nhij,cij->nhci", attn, r_v
        )
        out = self.out_norm(out.reshape(n, c, length)).reshape(lines.shape)
        return out.permute(0, 2, 3, 1) if self.axis == "height" else out.permute(0, 2, 1, 3)


class GatedAxialLayer(nn.Module):
    """Gated axial transformer layer: 1x1 conv down, height then width attention, pooling, 1x1 conv up, residual."""

    def __init__(self, in_ch: int, out_ch: int, span: int, heads: int, stride: int) -> None:
        super().__init__()
        width = out_ch // 2
        self.down = nn.Sequential(
            nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.attention = nn.Sequential(
            GatedAxialAttention(width, span, heads, "height"),
            GatedAxialAttention(width, span, heads, "width"),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.up = nn.Sequential(nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            if stride > 1 or in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.up(self.pool(self.attention(self.down(x))))
        return F.relu(y + self.shortcut(x))


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class Branch(nn.Module):
    """Gated axial encoder and convolutional decoder with additive skips, at one input size."""

    def __init__(self, in_ch: int, size: int, stages: list[tuple[int, int]], heads: int) -> None:
        super().__init__()
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.strides = [stride for _, stride in stages]
        channels = [in_ch]
        for out_ch, stride in stages:
            self.encoder.append(GatedAxialLayer(channels[-1], out_ch, size, heads, stride))
            channels.append(out_ch)
            size //= stride
        for i in range(len(stages), 0, -1):
            self.decoder.append(ConvBNReLU(channels[i], channels[i - 1]))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def encode(self, x: Tensor) -> list[Tensor]:
        """The branch input followed by each encoder layer's output, shallow to deep."""
        features = [x]
        for layer in self.encoder:
            features.append(layer(features[-1]))
        return features

    def decode(self, features: list[Tensor]) -> Tensor:
        y = features[-1]
        for step, (conv, stride) in enumerate(zip(self.decoder, reversed(self.strides), strict=True)):
            y = conv(y)
            if stride > 1:
                y = F.interpolate(y, scale_factor=stride, mode="bilinear", align_corners=False)
            y = y + features[-2 - step]
        return y


def to_tiles(x: Tensor, tiles: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B * tiles**2, C, H / tiles, W / tiles)``, tiles in row-major order."""
    b, c, h, w = x.shape
    th, tw = h // tiles, w // tiles
    x = x.reshape(b, c, tiles, th, tiles, tw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * tiles * tiles, c, th, tw)


def from_tiles(x: Tensor, tiles: int) -> Tensor:
    """Inverse of :func:`to_tiles`."""
    n, c, th, tw = x.shape
    b = n // (tiles * tiles)
    x = x.reshape(b, tiles, tiles, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, tiles * th, tiles * tw)


class MedT(SegModel):
    size_multiple = SIZE_MULTIPLE

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, width: int = 32, heads: int = 8
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % SIZE_MULTIPLE:
            raise ModelError(
                f"medt needs model image_size to be a positive multiple of {SIZE_MULTIPLE}, got {image_size}; "
                "set data.image_size to e.g. 224 or 128"
            )
        self.fixed_sizes = (image_size,)
        c = width
        half = image_size // 2
        self.stem = nn.Sequential(ConvBNReLU(in_channels, c, stride=2), ConvBNReLU(c, c))
        self.global_branch = Branch(c, half, [(2 * c, 2), (4 * c, 2)], heads)
        self.local_branch = Branch(c, half // TILES, [(2 * c, 1), (4 * c, 2), (8 * c, 2), (8 * c, 1)], heads)
        # a weightless tap on the global branch's deepest features, so that no layer is registered twice
        self.bottleneck = nn.Identity()
        self.bottleneck_channels = 4 * c
        self.refine = ConvBNReLU(c, c)
        self.head = nn.Conv2d(c, num_classes, 1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.stem, self.global_branch.encoder, self.local_branch.encoder]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        x = self.stem(x)
        features = self.global_branch.encode(x)
        features[-1] = self.bottleneck(features[-1])
        fused = self.global_branch.decode(features) + from_tiles(self.local_branch(to_tiles(x, TILES)), TILES)
        fused = F.interpolate(fused, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(self.refine(fused))


@register_model(
    "medt",
    paper="Valanarasu et al. 2021, Medical Transformer: Gated Axial-Attention for Medical Image Segmentation",
    input_sizes="multiple of 32; only the built image_size (relative encodings span each axis)",
    pretrained=False,
)
def build_medt(in_channels: int, num_classes: int, image_size: int, width: int = 32, heads: int = 8) -> MedT:
    """Build MedT; ``width`` is the stem's channel count (branches use 2x, 4x, 8x), ``heads`` the attention heads."""
    return MedT(in_channels, num_classes, image_size, width=width, heads=heads)
