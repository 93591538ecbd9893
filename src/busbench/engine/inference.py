"""Device choice, mixed precision and batched prediction, shared by validation and testing.

Mixed precision runs on CUDA only: ``bf16`` autocast (no gradient scaling needed) where the GPU computes bfloat16
natively (Ampere and newer), else ``fp16`` with a gradient scaler (V100, T4: their bfloat16 is emulated). On the
CPU everything runs in float32; the ``train.amp`` setting is then ignored, so the same config trains on a laptop
and on a GPU node.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

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


def foreground_probability(model: nn.Module, images: Tensor, tta: bool = False) -> Tensor:
    """Sigmoid of the model's main output ``(B, 1, H, W)`` in float32, optionally averaged with the h-flip."""
    out = model(images)
    if isinstance(out, list | tuple):  # deep supervision in eval mode should not happen, but main comes first
        out = out[0]
    prob = torch.sigmoid(out.float())
    if tta:
        flipped = model(torch.flip(images, dims=[-1]))
        if isinstance(flipped, list | tuple):
            flipped = flipped[0]
        prob = 0.5 * (prob + torch.flip(torch.sigmoid(flipped.float()), dims=[-1]))
    return prob


@torch.inference_mode()
def predict(
    models: Sequence[nn.Module],
    images: Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    tta: bool = False,
    channels_last: bool = False,
) -> Tensor:
    """Foreground probabilities of every model on one batch: ``(n_models, B, H, W)`` float32 on the CPU.

    ``images`` is the network input, already normalised (:func:`busbench.data.loader.network_input`).
    """
    x = images.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    probs = []
    with autocast(device, dtype):
        for model in models:
            probs.append(foreground_probability(model, x, tta)[:, 0])
    return torch.stack(probs).cpu()
