"""Deep supervision with per-stage discriminators: the unet_ds model, loss weights, alternating updates."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn import functional as F

from busbench.errors import ModelError
from busbench.methods.adversarial import AdversarialDeepSupervision, StageDiscriminator
from busbench.models import create_model, list_models

SIZE = 32


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("unet_ds", image_size=SIZE, base_width=4)


def _strategy(**kwargs) -> AdversarialDeepSupervision:
    torch.manual_seed(1)
    return AdversarialDeepSupervision(image_channels=1, base_width=4, **kwargs)


def _disk_batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    masks = torch.zeros(n, 1, SIZE, SIZE)
    for i in range(n):
        cy, cx, r = 10 + 3 * i, 12 + 2 * i, 5 + i
        masks[i, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()
    g = torch.Generator().manual_seed(0)
    images = 0.2 + 0.5 * masks + 0.05 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    return images, masks


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_unet_ds_returns_four_stage_outputs_in_training_only() -> None:
    assert "unet_ds" in list_models()
    model = _tiny_model()
    x = torch.randn(2, 1, SIZE, SIZE)
    model.train()
    outs = model(x)
    assert len(outs) == 4 and all(o.shape == (2, 1, SIZE, SIZE) for o in outs)
    model.eval()
    main = model(x)
    assert isinstance(main, torch.Tensor)
    torch.testing.assert_close(main, model.stage_logits(x)[0])
    # the auxiliary outputs come from coarser stages: bilinearly upsampled, hence smoother than the main output
    stages = model.stage_logits(x)
    roughness = [(s[..., 1:, :] - s[..., :-1, :]).abs().mean().item() for s in stages]
    assert roughness[3] < roughness[0]
    assert model.bottleneck_channels == 64
    with pytest.raises(ModelError, match="multiples of 16"):
        model(torch.randn(1, 1, 40, 40))


def test_discriminator_layout_and_minimum_size() -> None:
    d = StageDiscriminator(2, base_width=4)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [7, 5, 4, 4, 4]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 1]
    assert d(torch.randn(3, 2, 64, 64)).shape == (3, 1, 4, 4)
    assert d(torch.randn(1, 2, 16, 16)).shape == (1, 1, 1, 1)
    with pytest.raises(ModelError, match="16x16"):
        d(torch.randn(1, 2, 8, 8))


def _logits_for(mask: torch.Tensor) -> torch.Tensor:
    return (mask * 2 - 1) * 30.0  # sigmoid saturates: a hard prediction equal to `mask`


def test_generator_loss_applies_the_stage_weights_to_known_dice_values() -> None:
    _, masks = _disk_batch(2)
    masks = torch.zeros(2, 1, SIZE, SIZE)
    masks[:, :, 4:12, 4:12] = 1  # 64 pixels per image
    half = torch.zeros_like(masks)
    half[:, :, 4:12, 4:8] = 1  # 32 of them: Dice = 2*32/(32+64) = 2/3
    shifted = torch.zeros_like(masks)
    shifted[:, :, 20:28, 20:28] = 1  # disjoint: Dice 0
    double = masks.clone()
    double[:, :, 12:20, 4:12] = 1  # 128 pixels covering the 64: Dice = 2*64/192 = 2/3
    outputs = [_logits_for(m) for m in (masks, half, shifted, double)]
    dice_losses = [0.0, 1 / 3, 1.0, 1 / 3]
    images = torch.rand(2, 1, SIZE, SIZE)

    plain = _strategy(adv_weight=0.0)
    total, parts = plain.generator_loss(outputs, images, masks)
    expected = 1.0 * 0.0 + 0.1 * (1 / 3) + 0.1 * 1.0 + 0.1 * (1 / 3)
    assert total.item() == pytest.approx(expected, abs=1e-5)
    assert [parts[f"dice_{i}"] for i in range(4)] == pytest.approx(dice_losses, abs=1e-5)

    weighted = _strategy(stage_weights=(0.0, 0.0, 2.0, 0.0), adv_weight=0.0)
    assert weighted.generator_loss(outputs, images, masks)[0].item() == pytest.approx(2.0, abs=1e-5)

    adv = _strategy()
    total, parts = adv.generator_loss(outputs, images, masks)
    bce = 0.0
    for d, out in zip(adv.discriminators, outputs, strict=True):
        logits = d(torch.cat([images, torch.sigmoid(out)], dim=1))
        bce += F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).item()
    assert parts["adv_g"] == pytest.approx(bce, rel=1e-5)
    assert total.item() == pytest.approx(expected + 0.05 * bce, rel=1e-5)


def test_discriminator_input_with_and_without_the_image() -> None:
    images, masks = _disk_batch(2)
    cond = _strategy()
    assert cond.discriminator_input(images, masks).shape == (2, 2, SIZE, SIZE)
    alone = _strategy(condition_on_image=False)
    assert alone.discriminator_input(images, masks).shape == (2, 1, SIZE, SIZE)
    assert alone.discriminators[0].net[0].in_channels == 1
    assert cond.discriminators[0].net[0].in_channels == 2


def test_generator_and_discriminator_updates_alternate() -> None:
    model = _tiny_model()
    strategy = _strategy()
    opts = strategy.build_optimizers(model)
    images, masks = _disk_batch()

    g_before, d_before = _params(model), _params(strategy.discriminators)
    outputs, logs = strategy.generator_step(model, images, masks, opts["generator"])
    assert _changed(g_before, model)
    assert not _changed(d_before, strategy.discriminators)
    assert all(p.grad is None for p in strategy.discriminators.parameters())
    assert all(p.requires_grad for p in strategy.discriminators.parameters())

    g_mid, d_mid = _params(model), _params(strategy.discriminators)
    strategy.discriminator_step(outputs, images, masks, opts["discriminator"])
    assert _changed(d_mid, strategy.discriminators)
    assert not _changed(g_mid, model)

    # training_step does both, in that order, and reports finite losses
    logs = strategy.training_step(model, {"image": images, "mask": masks, "label": torch.zeros(4)}, opts)
    assert {"loss", "loss_g", "loss_d", "adv_g", "dice_0", "dice_3"} <= set(logs)
    assert logs["loss"] == logs["loss_g"]
    assert all(torch.isfinite(v) for v in logs.values())


def test_a_few_iterations_lower_the_main_dice_loss() -> None:
    model = _tiny_model()
    strategy = _strategy(lr=1e-3)
    opts = strategy.build_optimizers(model)
    batch = _disk_batch()
    history = [strategy.training_step(model, batch, opts) for _ in range(8)]
    assert all(torch.isfinite(v) for logs in history for v in logs.values())
    assert history[-1]["dice_0"] < history[0]["dice_0"]


def test_wrong_outputs_are_rejected() -> None:
    images, masks = _disk_batch(2)
    strategy = _strategy()
    with pytest.raises(ModelError, match="expects 4 outputs"):
        strategy.generator_loss(torch.zeros(2, 1, SIZE, SIZE), images, masks)
    with pytest.raises(ModelError, match="one foreground channel"):
        strategy.generator_loss([torch.zeros(2, 3, SIZE, SIZE)] * 4, images, masks)
    model = create_model("unet_ds", image_size=SIZE, base_width=4, deep_supervision=False)
    with pytest.raises(ModelError, match="unet_ds"):
        strategy.training_step(model, (images, masks), strategy.build_optimizers(model))
    with pytest.raises(ModelError, match="'image' and 'mask'"):
        strategy.training_step(model, {"x": images}, {})


def test_state_round_trips_through_a_weights_only_checkpoint() -> None:
    model = _tiny_model()
    strategy = _strategy()
    opts = strategy.build_optimizers(model)
    strategy.training_step(model, _disk_batch(), opts)
    buf = io.BytesIO()
    torch.save({"strategy": strategy.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["strategy"]

    for build_first in (True, False):
        other = AdversarialDeepSupervision(image_channels=1, base_width=4)
        if build_first:
            other_opts = other.build_optimizers(model)
            other.load_state_dict(state)
        else:
            other.load_state_dict(state)
            other_opts = other.build_optimizers(model)
        for a, b in zip(strategy.discriminators.parameters(), other.discriminators.parameters(), strict=True):
            assert torch.equal(a, b)
        restored = other_opts["discriminator"].state_dict()
        original = opts["discriminator"].state_dict()
        assert restored["state"].keys() == original["state"].keys()
        for k in original["state"]:
            assert torch.equal(restored["state"][k]["exp_avg"], original["state"][k]["exp_avg"])
    with pytest.raises(ModelError, match="discriminators"):
        AdversarialDeepSupervision().load_state_dict({})


class _CountingScaler(torch.amp.GradScaler):
    """A CPU gradient scaler that counts its calls."""

    def __init__(self, init_scale: float) -> None:
        super().__init__("cpu", init_scale=init_scale)
        self.calls = {"scale": 0, "unscale_": 0, "step": 0, "update": 0}

    def scale(self, outputs):
        self.calls["scale"] += 1
        return super().scale(outputs)

    def unscale_(self, optimizer):
        self.calls["unscale_"] += 1
        return super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):
        self.calls["step"] += 1
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None):
        self.calls["update"] += 1
        return super().update(new_scale)


def test_float16_updates_go_through_the_gradient_scaler() -> None:
    """Under float16 autocast both updates are scaled, clipped after unscaling, and skipped on overflow; the scale
    is updated once per training step (CPU autocast and GradScaler('cpu') run the CUDA logic)."""
    model = _tiny_model()
    strategy = _strategy(grad_clip=1.0)
    opts = strategy.build_optimizers(model)
    batch = _disk_batch()

    def fp16():
        return torch.autocast("cpu", dtype=torch.float16)

    overflow = _CountingScaler(init_scale=2.0**60)  # scaled float16 gradients overflow: both updates are skipped
    g_before, d_before = _params(model), _params(strategy.discriminators)
    strategy.training_step(model, batch, opts, scaler=overflow, autocast=fp16)
    assert overflow.calls == {"scale": 2, "unscale_": 2, "step": 2, "update": 1}
    assert not _changed(g_before, model) and not _changed(d_before, strategy.discriminators)
    assert overflow.get_scale() == 2.0**59  # backed off once, after both updates

    scaler = _CountingScaler(init_scale=2.0**8)
    logs = strategy.training_step(model, batch, opts, scaler=scaler, autocast=fp16)
    assert _changed(g_before, model) and _changed(d_before, strategy.discriminators)
    assert scaler.get_scale() == 2.0**8 and all(torch.isfinite(v) for v in logs.values())
