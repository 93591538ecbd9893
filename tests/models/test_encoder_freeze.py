"""``encoder_modules()`` and ``train.freeze_encoder`` on every registered model.

Each model is built small (the narrow settings the zoo tests use), frozen with :func:`busbench.engine.finetune.
freeze_encoder` and trained for two optimiser steps: the encoder's parameters *and* buffers (BatchNorm running
statistics) must be bit-identical afterwards, the encoder must still be in eval mode after ``model.train()``, and
the rest of the network must have moved. A model registered later without an entry below is built with its defaults.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from busbench.engine.finetune import encoder_modules, freeze_encoder
from busbench.models import create_model, list_models

# timm's test ResNet (2.3M parameters, all five stages) instead of a full ResNet under every smp decoder
TINY_ENCODER = "tu-test_resnet"
# name -> (image size, builder keywords): small versions that keep every part of each architecture
SMALL: dict[str, tuple[int, dict]] = {
    "unet": (32, {"base_width": 4}),
    "attunet": (32, {"base_width": 4}),
    "unet_ds": (32, {"base_width": 4}),
    "unet3p": (32, {"base_width": 4}),
    "skunet": (32, {"base_width": 4}),
    "unetpp": (64, {"encoder": "tu-test_resnet", "decoder_widths": (8, 8, 16, 32)}),
    "unext": (32, {"widths": (4, 8, 16, 24, 32)}),
    "ukan": (32, {"embed_dims": (16, 24, 32)}),
    "cmunet": (32, {"base_width": 4, "mixer_depth": 1}),
    "cmunext": (32, {"widths": (4, 8, 16, 24, 32), "depths": (1, 1, 1, 1, 1)}),
    "medt": (32, {"width": 4, "heads": 2}),
    "transunet": (64, {"vit_depth": 1, "decoder_channels": (32, 16, 8, 4)}),
    "swinunet": (
        64,
        {
            "embed_dim": 12,
            "encoder_depths": (1, 1, 1, 1),
            "decoder_depths": (1, 1, 1),
            "num_heads": (1, 1, 2, 2),
        },
    ),
    "smp": (64, {"arch": "Unet", "encoder": TINY_ENCODER}),
    "smp_unet": (64, {"encoder": TINY_ENCODER}),
    "smp_unetpp": (64, {"encoder": TINY_ENCODER}),
    "smp_fpn": (64, {"encoder": TINY_ENCODER}),
    "smp_linknet": (64, {"encoder": TINY_ENCODER}),
    "smp_manet": (64, {"encoder": TINY_ENCODER}),
    "smp_pspnet": (64, {"encoder": TINY_ENCODER}),
    "smp_deeplabv3": (64, {"encoder": TINY_ENCODER}),
    "smp_deeplabv3p": (64, {"encoder": TINY_ENCODER}),
    "smp_pan": (128, {"encoder": TINY_ENCODER}),
    "smp_upernet": (64, {"encoder": TINY_ENCODER}),
    "smp_segformer": (64, {"encoder": TINY_ENCODER}),
    "smp_dpt": (160, {"encoder": "tu-test_vit.r160_in1k"}),
    "maskrcnn": (
        64,
        {"rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 20, "box_detections_per_img": 10},
    ),
}
SLOW = {"smp_dpt", "maskrcnn", "transunet"}


def _params(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


def _build(name: str) -> tuple[nn.Module, int]:
    size, kwargs = SMALL.get(name, (64, {}))
    torch.manual_seed(0)
    return create_model(name, in_channels=1, num_classes=1, image_size=size, **kwargs), size


def _loss(model: nn.Module, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, size, size, generator=g)
    masks = torch.zeros(2, 1, size, size)
    masks[0, 0, size // 4 : size // 2, size // 4 : size // 2] = 1
    if getattr(model, "returns_loss_dict", False):
        return sum(model.compute_loss(x, masks).values())
    out = model(x)
    outputs = out if isinstance(out, list | tuple) else [out]
    return sum(nn.functional.binary_cross_entropy_with_logits(o, masks) for o in outputs)


def _encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for i, module in enumerate(encoder_modules(model)):
        for key, value in module.state_dict().items():
            state[f"{i}.{key}"] = value.detach().clone()
    return state


def test_every_registered_model_is_covered():
    assert set(list_models()) <= set(SMALL), "give new models a small configuration in SMALL"


@pytest.mark.parametrize("name", [_params(n) for n in list_models()])
def test_encoder_modules_are_named_and_freezing_keeps_them_fixed(name: str):
    model, size = _build(name)
    modules = encoder_modules(model)
    assert modules and all(isinstance(m, nn.Module) for m in modules)
    encoder_ids = {id(p) for m in modules for p in m.parameters()}
    all_params = {id(p): p for p in model.parameters()}
    assert 0 < len(encoder_ids) < len(all_params), "the encoder must be a proper, non-empty part of the model"

    before = _encoder_state(model)
    rest_before = {k: p.detach().clone() for k, p in model.named_parameters() if id(p) not in encoder_ids}
    frozen = freeze_encoder(model)
    assert frozen == sum(all_params[i].numel() for i in encoder_ids)
    assert all(not p.requires_grad for m in modules for p in m.parameters())

    model.train()
    assert all(not sub.training for m in modules for sub in m.modules()), "the encoder left eval mode"
    assert model.training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model, size).backward()
        optimizer.step()

    after = _encoder_state(model)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen encoder tensors changed: {changed[:5]}"
    moved = [
        k for k, p in model.named_parameters() if k in rest_before and not torch.equal(p, rest_before[k])
    ]
    assert moved, "nothing outside the encoder was trained"
    model.eval()
    model.train(True)
    assert all(not sub.training for m in modules for sub in m.modules())
