"""What the U-shaped networks with tokenised deep stages (UNeXt, U-KAN) share.

Both have three convolution stages (each ending in a 2x2 max pool), a tokenised encoder stage and a tokenised
bottleneck; a tokenised stage embeds its input with an overlapping 3x3 stride-2 convolution and layer norm, runs one
token block (shifted MLP for UNeXt, KAN for U-KAN) and layer-normalises the tokens. The decoder upsamples five times,
adds the matching encoder feature after each of the first four, and runs a token block + layer norm after the two
deepest. Only the token block differs, so it is passed in as a factory ``block(dim)`` taking and returning tokens
``(B, H*W, C)`` with a ``forward(tokens, h, w)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn


def to_image(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens ``(B, H*W, C)`` as a feature map ``(B, C, H, W)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def to_tokens(x: Tensor) -> Tensor:
    """A feature map ``(B, C, H, W)`` as tokens ``(B, H*W, C)``."""
    return x.flatten(2).transpose(1, 2)


class TokenisedStage(nn.Module):
    """Encoder stage: overlapping patch embedding (3x3, stride 2) + LN, a token block, LN; image in, image out."""

    def __init__(self, in_channels: int, dim: int, block: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, 3, stride=2, padding=1)
        self.embed_norm = nn.LayerNorm(dim)
        self.block = block(dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        h, w = x.shape[-2:]
        return to_image(self.norm(self.block(self.embed_norm(to_tokens(x)), h, w)), h, w)


class TokenisedDecoderBlock(nn.Module):
    """A token block + LN applied to a decoder feature map."""

    def __init__(self, dim: int, block: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.block = block(dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        return to_image(self.norm(self.block(to_tokens(x), h, w)), h, w)


def tokenised_unet(
    x: Tensor,
    conv_stages: Sequence[nn.Module],
    token_stage: nn.Module,
    bottleneck: nn.Module,
    up: Sequence[nn.Module],
    token_decoders: Sequence[nn.Module],
) -> Tensor:
    """The encoder-decoder walk: the last decoder stage's output (the head's input).

    The convolution stages and the tokenised stage give the skips; decoder stage k upsamples with ``up[k]``, adds
    skip ``-1 - k`` while skips remain, then runs ``token_decoders[k]`` while those remain.
    """
    skips = []
    for stage in conv_stages:
        x = stage(x)
        skips.append(x)
    x = token_stage(x)
    skips.append(x)
    x = bottleneck(x)
    for k, stage in enumerate(up):
        x = stage(x)
        if k < len(skips):
            x = x + skips[-1 - k]
        if k < len(token_decoders):
            x = token_decoders[k](x)
    return x
