"""Swin-Unet (Cao et al. 2022, "Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation").

Encoder: timm's Swin-T (``swin_tiny_patch4_window7_224``: 4x4 patch embedding to 96 channels, window 7, stages of
96/192/384/768 channels at 1/4, 1/8, 1/16, 1/32). Its first three stages are the encoder; the fourth (patch
merging + Swin blocks at 1/32) is Swin-Unet's bottleneck. The decoder mirrors the encoder: each stage starts with a
*patch expanding* layer (a linear layer doubling the channels, rearranged into a 2x larger grid with half the
channels of its input), concatenates the encoder tokens of that scale, projects back with a linear layer and
runs Swin blocks. A last patch expanding layer upsamples 4x to full resolution before a 1x1 projection to logits.

Depths: Swin-Unet's published ~27M-parameter model uses encoder depths (2, 2, 2, 2) and two Swin blocks per
decoder stage; that is the default here (``encoder_depths=(2, 2, 6, 2)`` gives the full Swin-T encoder, ~34M).
ImageNet Swin-T weights load into it with the third stage's extra blocks reported as unexpected.

Input sizes: a positive multiple of 32 (a 4x4 patch embedding followed by three 2x patch mergings), and only
the size the model was built for (timm fixes attention masks and the patch grid at construction). At multiples of
224 (= 32 x window 7) every stage tiles exactly into 7x7 windows, as in the paper; at other multiples of 32 (e.g.
256) timm zero-pads each feature map to a multiple of 7 inside its window attention, and a stage smaller than a
window attends over the whole stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from busbench.errors import ModelError
from busbench.models.base import SegModel
from busbench.models.registry import register_model
from busbench.models.weights import PRETRAINED, load_pretrained, load_published

PATCH = 4
SIZE_MULTIPLE = 32
IGNORED = ("head.",)  # the ImageNet classifier


class PatchExpand(nn.Module):
    """Linear layer to ``scale**2 * out_dim`` channels, rearranged to a ``scale`` times larger grid, LayerNorm.

    Works on channels-last maps ``(B, H, W, C)``, the layout of timm's Swin stages.
    """

    def __init__(self, dim: int, out_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).reshape(b, h, w, s, s, self.out_dim)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, self.out_dim)
        return self.norm(x)


class DecoderStage(nn.Module):
    """Patch expanding, concatenation with the encoder skip, linear projection, Swin blocks."""

    def __init__(
        self, dim: int, resolution: int, depth: int, num_heads: int, window: int, drop_path: Sequence[float]
    ) -> None:
        # imported here: timm imports torchvision and takes seconds; the registry imports this module for every model
        from timm.models.swin_transformer import SwinTransformerBlock

        super().__init__()
        self.expand = PatchExpand(2 * dim, dim, scale=2)
        self.fuse = nn.Linear(2 * dim, dim)
        self.blocks = nn.Sequential(
            *(
                SwinTransformerBlock(
                    dim,
                    input_resolution=(resolution, resolution),
                    num_heads=num_heads,
                    window_size=window,
                    shift_size=0 if i % 2 == 0 else window // 2,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            )
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.fuse(torch.cat([self.expand(x), skip], dim=-1))
        return self.blocks(x)


class ChannelsFirst(nn.Module):
    """``(B, H, W, C)`` -> ``(B, C, H, W)``; marks the bottleneck output as a feature map for forward hooks."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


@register_model(
    "swinunet",
    paper="Cao et al. 2022, Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation",
    input_sizes="multiple of 32; only the built image_size (exact 7x7 windows at multiples of 224)",
    pretrained=True,
)
class SwinUNet(SegModel):
    """Swin-Unet; ``weights`` (``pretrained``: the ImageNet-1k Swin-T, see :func:`busbench.models.weights.load_published`;
    a file path; or a timm tag) is loaded into the Swin encoder, the checkpoint's classifier ignored."""

    size_multiple = SIZE_MULTIPLE

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        weights: str | None = None,
        embed_dim: int = 96,
        encoder_depths: Sequence[int] = (2, 2, 2, 2),
        decoder_depths: Sequence[int] = (2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % SIZE_MULTIPLE:
            raise ModelError(
                f"swinunet needs model image_size to be a positive multiple of {SIZE_MULTIPLE}, got {image_size}; "
                "set data.image_size to e.g. 224"
            )
        if len(encoder_depths) != 4 or len(num_heads) != 4 or len(decoder_depths) != 3:
            raise ModelError(
                "swinunet needs 4 encoder_depths, 4 num_heads and 3 decoder_depths, got "
                f"{list(encoder_depths)}, {list(num_heads)}, {list(decoder_depths)}; fix model.params"
            )
        import timm  # imported here, like SwinTransformerBlock above

        self.fixed_sizes = (image_size,)
        self.encoder = timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            in_chans=in_channels,
            img_size=image_size,
            num_classes=0,
            embed_dim=embed_dim,
            depths=tuple(encoder_depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            drop_path_rate=drop_path_rate,
        )
        dims = [embed_dim * 2**i for i in range(4)]
        self.bottleneck = ChannelsFirst()
        self.bottleneck_channels = dims[3]
        # stochastic depth mirrors the encoder's: highest next to the bottleneck, falling towards the output
        total = sum(decoder_depths)
        rates = [drop_path_rate * (total - 1 - i) / max(total - 1, 1) for i in range(total)]
        self.decoder = nn.ModuleList()
        for i, stage in enumerate((2, 1, 0)):
            depth = decoder_depths[i]
            start = sum(decoder_depths[:i])
            resolution = image_size // (PATCH * 2**stage)
            self.decoder.append(
                DecoderStage(
                    dims[stage],
                    resolution,
                    depth,
                    num_heads[stage],
                    window_size,
                    rates[start : start + depth],
                )
            )
        self.decoder_norm = nn.LayerNorm(embed_dim)
        self.final_expand = PatchExpand(embed_dim, embed_dim, scale=PATCH)
        self.head = nn.Conv2d(embed_dim, num_classes, 1)
        if weights == PRETRAINED:
            load_published("swinunet", self.encoder, in_channels, ignore=IGNORED)
        elif weights:
            load_pretrained(self.encoder, weights, in_channels, ignore=IGNORED)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        x = self.encoder.patch_embed(x)
        skips = []
        for stage in self.encoder.layers[:3]:
            x = stage(x)
            skips.append(x)
        x = self.bottleneck(self.encoder.norm(self.encoder.layers[3](x)))
        x = x.permute(0, 2, 3, 1)
        for stage, skip in zip(self.decoder, reversed(skips), strict=True):
            x = stage(x, skip)
        x = self.final_expand(self.decoder_norm(x))
        return self.head(x.permute(0, 3, 1, 2))
