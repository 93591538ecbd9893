"""Device choice, mixed precision and batched prediction, shared by validation and testing.

Mixed precision runs on CUDA only: ``bf16`` autocast (no gradient scaling needed) where the GPU computes bfloat16
natively (Ampere and newer), else ``fp16`` with a gradient scaler (V100, T4: their bfloat16 is emulated). On the
CPU everything runs in float32; the ``train.amp`` setting is then ignored, so the same config trains on a laptop
and on a GPU node.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from busbench.errors import ConfigError

LOG = logging.getLogger("busbench")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when visible, else CPU; ``cuda`` without a GPU is a config error."""
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise ConfigError(
            "config key 'train.device' is 'cuda' but no CUDA device is visible; set train.device=auto or cpu"
        )
    return torch.device("cpu")


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``; None means float32."""
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "bf16":
        # emulated bf16 (V100, T4, ...) computes in float32 at bfloat16's precision: slower and less accurate
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        LOG.warning("this GPU has no native bfloat16; using float16 with gradient scaling instead")
        return torch.float16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for ``dtype``, or a no-op for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def main_output(out: Tensor | Sequence[Tensor]) -> Tensor:
    """A model's main output: the first of a deep-supervision list (which eval mode should not return)."""
    return out[0] if isinstance(out, list | tuple) else out


def hflip(t: Tensor) -> Tensor:
    """Horizontal flip of an image batch or a probability map (the last axis)."""
    return torch.flip(t, dims=[-1])


#: output of one model -> (per-pixel probabilities ``(B, ..., H, W)``, per-image probabilities ``(B, K)`` or None)
Probabilities = Callable[[Any], tuple[Tensor, Tensor | None]]


@torch.inference_mode()
def predict_probabilities(
    models: Sequence[nn.Module],
    images: Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    probabilities: Probabilities,
    tta: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``probabilities`` of every model's output on one batch, stacked per model, in float32 on the CPU.

    ``images`` is the network input as :func:`busbench.data.loader.network_input` returns it: on ``device``,
    normalised, in the memory layout the models run in. With ``tta`` each model also sees the horizontally flipped
    batch: its per-pixel probabilities are flipped back and averaged with the plain ones, its per-image
    probabilities averaged as they are.
    """
    maps, per_image = [], []
    with autocast(device, dtype):
        for model in models:
            pixel, image = probabilities(model(images))
            if tta:
                pixel_f, image_f = probabilities(model(hflip(images)))
                pixel = 0.5 * (pixel + hflip(pixel_f))
                if image is not None:
                    image = 0.5 * (image + image_f)
            maps.append(pixel)
            per_image.append(image)
    images_out = torch.stack(per_image).cpu() if per_image and per_image[0] is not None else None
    return torch.stack(maps).cpu(), images_out
