"""TransUNet (Chen et al. 2021, "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation").

The encoder is the R50+ViT-B/16 hybrid: a ResNet-50 cut after its third stage (output stride 16) whose
1024-channel map is embedded by a 1x1 convolution into 768-d tokens, one per 16x16 image patch, and encoded by
12 ViT-B layers. The network is timm's ``vit_base_r50_s16_224`` built without a class token, so its state dict
names match timm's and pretrained checkpoints load with :func:`busbench.models.weights.load_pretrained`.

The cascaded upsampler (CUP) reshapes the tokens back to an (H/16, W/16) grid, projects them to 512 channels,
and runs four 2x upsampling blocks (256, 128, 64, 16 channels). The first three concatenate the ResNet features
at 1/8 (512 ch), 1/4 (256 ch) and 1/2 (64 ch, the stem before max pooling); the fourth has no skip. A 3x3
convolution maps the 16 channels to class logits at input resolution.

Input sizes: a positive multiple of 16, and only the size the model was built for, because the learned
position embeddings have one entry per patch of that grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from busbench.errors import ModelError
from busbench.models.base import SegModel
from busbench.models.registry import register_model
from busbench.models.weights import PRETRAINED, load_pretrained, load_published

PATCH = 16
SKIP_CHANNELS = (512, 256, 64, 0)  # ResNet features at 1/8, 1/4, 1/2; the last upsampling block has none
IGNORED = ("cls_token",)  # ImageNet ViTs carry a class token; TransUNet's encoder has none


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
        )


class UpBlock(nn.Module):
    """2x bilinear upsampling, concatenation with an encoder skip (if any), two 3x3 conv-BN-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_ch + skip_ch, out_ch)
        self.conv2 = ConvBNReLU(out_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TokenGrid(nn.Module):
    """Reshapes ``(B, N, C)`` tokens of a square patch grid to a ``(B, C, g, g)`` feature map.

    It holds no weights; it exists so that the transformer's output is a named submodule (the bottleneck)
    whose forward hook sees a feature map.
    """

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, tokens: Tensor) -> Tensor:
        b, n, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)


class TransUNet(SegModel):
    size_multiple = PATCH

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        vit_depth: int = 12,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % PATCH:
            raise ModelError(
                f"transunet needs model image_size to be a positive multiple of {PATCH}, got {image_size}; "
                f"set data.image_size to e.g. 224 or 256"
            )
        if len(decoder_channels) != len(SKIP_CHANNELS):
            raise ModelError(
                f"transunet decoder_channels needs {len(SKIP_CHANNELS)} entries, got {list(decoder_channels)}; "
                "set model.params.decoder_channels to e.g. [256, 128, 64, 16]"
            )
        # imported here: timm imports torchvision and takes seconds; the registry imports this module for every model
        import timm

        self.fixed_sizes = (image_size,)
        self.image_size = image_size
        self.encoder = timm.create_model(
            "vit_base_r50_s16_224",
            pretrained=False,
            in_chans=in_channels,
            img_size=image_size,
            depth=vit_depth,
            num_classes=0,
            class_token=False,
            global_pool="",
        )
        hidden = self.encoder.embed_dim
        self.bottleneck = TokenGrid(image_size // PATCH)
        self.bottleneck_channels = hidden
        self.conv_more = ConvBNReLU(hidden, 512)
        ins = (512, *decoder_channels[:-1])
        self.decoder = nn.ModuleList(
            UpBlock(i, s, o) for i, s, o in zip(ins, SKIP_CHANNELS, decoder_channels, strict=True)
        )
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        resnet = self.encoder.patch_embed.backbone
        x = resnet.stem.norm(resnet.stem.conv(x))
        skip_2 = x
        skip_4 = resnet.stages[0](resnet.stem.pool(x))
        skip_8 = resnet.stages[1](skip_4)
        x = resnet.norm(resnet.stages[2](skip_8))
        tokens = self.encoder.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = self.encoder.pos_drop(tokens + self.encoder.pos_embed)
        tokens = self.encoder.norm(self.encoder.blocks(self.encoder.norm_pre(tokens)))
        x = self.conv_more(self.bottleneck(tokens))
        for block, skip in zip(self.decoder, (skip_8, skip_4, skip_2, None), strict=True):
            x = block(x, skip)
        return self.head(x)


@register_model(
    "transunet",
    paper="Chen et al. 2021, TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation",
    input_sizes="multiple of 16; only the built image_size (learned position embeddings)",
    pretrained=True,
)
def build_transunet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    weights: str | None = None,
    vit_depth: int = 12,
    decoder_channels: Sequence[int] = (256, 128, 64, 16),
) -> TransUNet:
    """Build TransUNet; ``weights`` (``pretrained``: the paper's ImageNet-21k R50+ViT-B/16, see
    :func:`busbench.models.weights.load_published`; a file path; or a timm tag) is loaded into the R50+ViT encoder
    with position embeddings resampled to this image size and the checkpoint's class token ignored."""
    model = TransUNet(
        in_channels, num_classes, image_size, vit_depth=vit_depth, decoder_channels=decoder_channels
    )
    if weights == PRETRAINED:
        load_published("transunet", model.encoder, in_channels, ignore=IGNORED)
    elif weights:
        load_pretrained(model.encoder, weights, in_channels, ignore=IGNORED)
    return model
