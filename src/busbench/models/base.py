"""The interface every busbench model follows.

- ``forward(x)`` takes ``(B, C, H, W)`` with C in {1, 3} and returns logits ``(B, num_classes, H, W)``.
- Deep supervision: when ``deep_supervision`` is on and the module is in training mode, ``forward`` returns a
  list ``[main, aux_1, ..., aux_n]`` of logits, all at input resolution, main first. In eval mode it returns the
  main logits only, so inference code never sees the extra outputs.
- ``check_input_size(h, w)`` raises :class:`ModelError` for sizes the architecture cannot take (never resizes).
- ``encoder_modules()`` names the encoder, so that transfer learning can freeze it for every model.
- ``bottleneck`` is the submodule whose output is the deepest feature map ``(B, C, h, w)`` (or tokens ``(B, N, C)``)
  and ``bottleneck_channels`` its channel count, so that a classification head can be attached with a forward hook.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from busbench.errors import ModelError


class SegModel(nn.Module):
    """Base class holding the shared conventions; subclasses set the attributes in ``__init__``."""

    #: input height and width must be a multiple of this
    size_multiple: int = 1
    #: if set, the only input sizes accepted (e.g. models with fixed position embeddings)
    fixed_sizes: tuple[int, ...] | None = None
    deep_supervision: bool = False
    bottleneck: nn.Module
    bottleneck_channels: int

    def check_input_size(self, h: int, w: int) -> None:
        name = type(self).__name__
        if self.fixed_sizes is not None and (
            h not in self.fixed_sizes or w not in self.fixed_sizes or h != w
        ):
            sizes = ", ".join(str(s) for s in self.fixed_sizes)
            raise ModelError(
                f"{name} accepts square inputs of size {sizes} only, got {h}x{w}; set data.image_size accordingly"
            )
        m = self.size_multiple
        if h % m or w % m or h <= 0 or w <= 0:
            raise ModelError(
                f"{name} needs input height and width that are positive multiples of {m}, got {h}x{w}; "
                f"set data.image_size to a multiple of {m}"
            )

    def encoder_modules(self) -> list[nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} does not define its encoder")

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ModelError(
                f"{type(self).__name__} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}"
            )
        self.check_input_size(x.shape[-2], x.shape[-1])


class PooledUNet(SegModel):
    """U-shaped models whose encoder is ``encoder`` stages joined by ``pool``, then ``bottleneck``.

    Subclasses set ``encoder`` (a ``ModuleList``, shallowest first), ``pool`` and ``bottleneck``, optionally a
    ``stem`` run before the first stage, for :meth:`decode` the lists ``up`` and ``decoder`` (deepest first), and
    ``head``, the 1x1 convolution :meth:`forward` applies to the last decoder stage's output.
    """

    encoder: nn.ModuleList
    pool: nn.Module
    #: attributes holding the decoder stages and the optional skip gates that :meth:`forward` hands to :meth:`decode`
    #: (named per model, as its checkpoints' state_dict keys are)
    decoder_attr: str = "decoder"
    gates_attr: str | None = None

    def encoder_modules(self) -> list[nn.Module]:
        stem = getattr(self, "stem", None)
        return [m for m in (stem, self.encoder, self.bottleneck) if m is not None]

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The bottleneck's output and every encoder stage's output (the skips), shallowest first."""
        stem = getattr(self, "stem", None)
        if stem is not None:
            x = stem(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        return self.bottleneck(self.pool(x)), skips

    def decode(
        self,
        x: Tensor,
        skips: list[Tensor],
        decoder: nn.ModuleList | None = None,
        gates: nn.ModuleList | None = None,
    ) -> list[Tensor]:
        """Every decoder stage's output, deepest first. A stage upsamples with ``up[k]``, passes its skip through
        ``gates[k](upsampled, skip)`` when gates are given, and fuses ``cat(skip, upsampled)`` with
        ``decoder[k]`` (``self.decoder`` by default)."""
        outputs = []
        stages = self.decoder if decoder is None else decoder
        for k, (up, dec) in enumerate(zip(self.up, stages, strict=True)):
            x = up(x)
            skip = skips[-1 - k]
            if gates is not None:
                skip = gates[k](x, skip)
            x = dec(torch.cat((skip, x), dim=1))
            outputs.append(x)
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        x, skips = self.encode(x)
        gates = getattr(self, self.gates_attr) if self.gates_attr else None
        return self.head(self.decode(x, skips, getattr(self, self.decoder_attr), gates)[-1])
