"""Model cost: parameter count and multiply-accumulates.

Parameters are counted once per tensor, however many attributes point at the module holding it; counting per
attribute (as per-module profilers do) inflates models that keep aliases. MACs come from PyTorch's own
``FlopCounterMode``, which counts the matrix products and convolutions a forward pass runs; MACs = FLOPs / 2.
Normalisation, activations and resampling are not counted, so numbers sit slightly below per-module profilers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters, each parameter tensor counted once (by identity)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
    return total


def profile_forward(model: nn.Module, x: Tensor) -> tuple[Tensor | list[Tensor], float]:
    """Run ``model(x)`` once in eval mode without gradients; return the output and the MACs it took.

    The model's train/eval mode is restored afterwards. Attention runs through the plain math kernel here, because
    the fused CPU kernels are invisible to ``FlopCounterMode`` and would drop attention from the count.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = model(x)
    finally:
        model.train(was_training)
    return out, counter.get_total_flops() / 2


def count_macs(model: nn.Module, in_channels: int = 1, size: int = 224) -> float:
    """Multiply-accumulates of one forward pass on a ``1 x in_channels x size x size`` input.

    Returns the raw count; divide by 1e9 for GMACs.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, in_channels, size, size, device=device)
    return profile_forward(model, x)[1]
