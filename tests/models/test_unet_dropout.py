"""U-Net dropout (``model.params.dropout``): where it sits, what it leaves unchanged."""

from __future__ import annotations

import pytest
import torch

from busbench.errors import ModelError
from busbench.methods.multitask import MultiTaskModel
from busbench.models import create_model


def unet(dropout=0.0, width: int = 4):
    torch.manual_seed(0)
    return create_model(
        "unet", in_channels=1, num_classes=1, image_size=32, base_width=width, dropout=dropout
    )


def test_dropout_leaves_weights_and_eval_outputs_unchanged() -> None:
    plain, dropped = unet(), unet([0.1, 0.2])
    assert list(plain.state_dict()) == list(dropped.state_dict())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in dropped.parameters())
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(plain.eval()(x), dropped.eval()(x), rtol=0, atol=0)
    # in training mode the dropped network differs, the plain one is deterministic
    torch.manual_seed(1)
    assert not torch.equal(plain.train()(x), dropped.train()(x))


def _between_convs(stage: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of the stage's first convolution, input of its second) in one training-mode pass."""
    seen = {}
    h1 = stage[0].register_forward_hook(lambda m, i, o: seen.__setitem__("first", o.detach().clone()))
    h2 = stage[1].register_forward_pre_hook(lambda m, i: seen.__setitem__("second", i[0].detach().clone()))
    try:
        stage(x)
    finally:
        h1.remove()
        h2.remove()
    return seen["first"], seen["second"]


@pytest.mark.parametrize(
    ("where", "rate"),
    [
        ("encoder0", 0.1),
        ("encoder1", 0.1),
        ("encoder2", 0.2),
        ("encoder3", 0.2),
        ("bottleneck", 0.2),
        ("decoder0", 0.2),
        ("decoder3", 0.1),
    ],
)
def test_rates_sit_between_the_two_convolutions_shallow_then_deep(where: str, rate: float) -> None:
    model = unet([0.1, 0.2], width=16).train()
    stage = (
        model.bottleneck
        if where == "bottleneck"
        else getattr(model, where[:-1])[int(where[-1])]  # decoder0 is the deepest decoder stage
    )
    channels = stage[0][0].in_channels
    torch.manual_seed(2)
    first, second = _between_convs(stage, torch.randn(4, channels, 16, 16))
    kept = first != 0
    dropped = kept & (second == 0)
    # survivors are scaled by 1 / (1 - rate), the rest zeroed; the dropped share matches the rate
    torch.testing.assert_close(second[kept & ~dropped], first[kept & ~dropped] / (1 - rate))
    share = dropped.sum().item() / kept.sum().item()
    assert abs(share - rate) < 0.03, share


def test_single_rate_applies_everywhere_and_zero_adds_nothing() -> None:
    model = unet(0.3, width=8).train()
    assert {s.rate for s in [*model.encoder, model.bottleneck, *model.decoder]} == {0.3}
    plain = unet(0.0, width=8).train()
    x = torch.randn(2, 8, 8, 8)
    first, second = _between_convs(plain.encoder[1], x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_the_bottleneck_hook_still_fires_so_a_classification_head_can_attach() -> None:
    model = MultiTaskModel(unet([0.1, 0.2], width=4)).train()
    seg, cls = model(torch.rand(2, 1, 32, 32))
    assert seg.shape == (2, 1, 32, 32) and cls.shape == (2, 3)


@pytest.mark.parametrize("bad", [1.0, -0.1, [0.1, 0.2, 0.3], "0.1", [True, 0.1]])
def test_bad_rates_are_refused(bad) -> None:
    with pytest.raises(ModelError, match="model.params.dropout"):
        unet(bad)
