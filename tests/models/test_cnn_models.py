"""CNN model zoo: full-size parameter/MAC counts against the published references, shapes, sizes, gradients,
deep supervision, the bottleneck/encoder conventions, and the smp family."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from zoo_testdata import TINY_CNN

from busbench.errors import ModelError
from busbench.models import create_model
from busbench.models.cost import count_params, profile_forward
from busbench.models.unetpp import UNetPlusPlus
from busbench.models.unext import shift_groups

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"

# published counts at 1x1x224x224 with one output channel, from the BUSI table of Awesome_Segmentation_in_Medical
# (github.com/Jonghwan-dev/Awesome_Segmentation_in_Medical; labelled GFLOPs there, MACs here): (params in M, GMACs)
REFERENCE = {
    "unet": (34.53, 50.11),
    "attunet": (34.88, 50.96),
    "unetpp": (26.90, 28.73),
    "unet3p": (26.97, 152.87),
    "unext": (1.47, 0.42),
    "cmunet": (49.93, 69.81),
    "cmunext": (3.15, 5.66),
}
TINY = TINY_CNN
SIZE_MULTIPLE = {
    "unet": 16,
    "attunet": 16,
    "unetpp": 32,
    "unet3p": 16,
    "unext": 32,
    "cmunet": 16,
    "cmunext": 16,
}
# number of outputs in training mode with deep supervision on (main first)
DEEP_SUPERVISION = {"unetpp": 4, "unet3p": 5}


def config_params(name: str) -> dict:
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert data["model"]["name"] == name
    return data["model"].get("params", {})


def first_conv(model: nn.Module) -> nn.Conv2d:
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return conv


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_full_size_matches_reference_params_and_macs(name: str) -> None:
    """The config file's model at 224 px: logits shape, params within 2% and GMACs within 5% of the reference."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=1, image_size=224, **config_params(name))
    out, macs = profile_forward(model, torch.randn(1, 1, 224, 224))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 1, 224, 224)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    ref_params, ref_gmacs = REFERENCE[name]
    params_m = count_params(model) / 1e6
    assert params_m == pytest.approx(ref_params, rel=0.02), f"{name}: {params_m:.3f}M vs {ref_params}M"
    assert macs / 1e9 == pytest.approx(ref_gmacs, rel=0.05), f"{name}: {macs / 1e9:.2f} vs {ref_gmacs} GMACs"


def test_unetpp_decoder_count_follows_stated_derivation() -> None:
    """Nested decoder of the reference configuration, counted from the derivation in the module docstring."""
    enc = [64, 64, 128, 256, 512]  # ResNet34 stem and layer1..4 widths
    widths = [64, 64, 128, 256]  # node X[i, j] takes widths[i + j - 1]
    width = {(i, 0): enc[i] for i in range(5)}
    expected = 0
    for j in range(1, 5):
        for i in range(5 - j):
            c_in = sum(width[i, k] for k in range(j)) + width[i + 1, j - 1]
            w = width[i, j] = widths[i + j - 1]
            h = w // 2
            expected += 9 * (c_in * h + h * h + h * w) + 2 * (h + h + w)  # bias-free convs + BN affine
    model = create_model("unetpp", in_channels=1, num_classes=1, image_size=224)
    assert isinstance(model, UNetPlusPlus)
    assert count_params(model.nodes) == expected
    assert count_params(model.heads) == sum(width[0, j] + 1 for j in range(1, 5))


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_shapes_channels_and_classes(name: str) -> None:
    """RGB input, three classes, at 64 (batch 2), 256 and a non-square size: logits at input resolution."""
    model = create_model(name, in_channels=3, num_classes=3, image_size=64, **TINY[name]).eval()
    for b, h, w in [(2, 64, 64), (1, 256, 256), (1, 64, 96)]:
        with torch.no_grad():
            out = model(torch.randn(b, 3, h, w))
        assert isinstance(out, torch.Tensor)
        assert out.shape == (b, 3, h, w)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_backward_reaches_first_conv(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=1, image_size=64, **TINY[name]).train()
    out = model(torch.randn(2, 1, 64, 64))
    outputs = out if isinstance(out, list) else [out]
    sum(o.square().mean() for o in outputs).backward()
    conv = first_conv(model)
    assert conv.in_channels == 1
    assert conv.weight.grad is not None
    assert torch.isfinite(conv.weight.grad).all()
    assert conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(TINY))
def test_wrong_input_size_is_a_model_error(name: str) -> None:
    m = SIZE_MULTIPLE[name]
    bad = 64 + m // 2
    with pytest.raises(ModelError, match=f"multiples of {m}"):
        create_model(name, image_size=bad, **TINY[name])
    model = create_model(name, image_size=64, **TINY[name]).eval()
    assert model.size_multiple == m
    with pytest.raises(ModelError, match="data.image_size"), torch.no_grad():
        model(torch.zeros(1, 1, bad, 64))
    with pytest.raises(ModelError, match=r"\(B, C, H, W\)"):
        model(torch.zeros(1, 64, 64))


@pytest.mark.parametrize("name", sorted(TINY))
def test_deep_supervision_only_in_training_mode(name: str) -> None:
    model = create_model(name, in_channels=1, num_classes=2, image_size=64, **TINY[name])
    x = torch.randn(2, 1, 64, 64)
    model.train()
    out = model(x)
    if name in DEEP_SUPERVISION:
        assert isinstance(out, list) and len(out) == DEEP_SUPERVISION[name]
        assert all(o.shape == (2, 2, 64, 64) for o in out)
        # main output first: it is what eval mode returns (BN frozen to the same statistics in both passes)
        model.eval()
        with torch.no_grad():
            main = model(x)
            model.train()
            for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.eval()
            train_main = model(x)[0]
        assert isinstance(main, torch.Tensor)
        torch.testing.assert_close(main, train_main)
        flat = create_model(name, num_classes=2, image_size=64, deep_supervision=False, **TINY[name]).train()
        assert isinstance(flat(x), torch.Tensor)
        assert count_params(flat) < count_params(model)  # the side heads are not built
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 64, 64)
    model.eval()
    with torch.no_grad():
        assert isinstance(model(x), torch.Tensor)


@pytest.mark.parametrize("name", sorted(TINY))
def test_bottleneck_and_encoder_conventions(name: str) -> None:
    model = create_model(name, in_channels=1, num_classes=1, image_size=64, **TINY[name]).eval()
    seen = []
    model.bottleneck.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.zeros(1, 1, 64, 128))
    deepest = 32 if name in ("unetpp", "unext") else 16
    assert seen == [(1, model.bottleneck_channels, 64 // deepest, 128 // deepest)]
    # freezing the encoder leaves a trainable decoder, and the encoder holds the input convolution
    encoder = model.encoder_modules()
    assert encoder and all(any(e is m for m in model.modules()) for e in encoder)
    for module in encoder:
        module.requires_grad_(False)
    trainable = count_params(model, trainable_only=True)
    assert 0 < trainable < count_params(model)
    assert not first_conv(model).weight.requires_grad


@pytest.mark.parametrize("name", sorted(TINY))
def test_state_dict_has_no_aliased_entries(name: str) -> None:
    model = create_model(name, image_size=64, **TINY[name])
    tensors = list(model.state_dict().values())
    assert len({(t.data_ptr(), t.shape) for t in tensors if t.numel()}) == len(
        [t for t in tensors if t.numel()]
    )


def test_same_seed_same_model() -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = create_model("cmunext", image_size=64, **TINY["cmunext"]).eval()
        with torch.no_grad():
            outs.append(model(torch.ones(1, 1, 64, 64)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("unet", {"base_width": 0}),
        ("attunet", {"base_width": 1}),
        ("unext", {"widths": (4, 8, 16)}),
        ("cmunext", {"kernels": (3, 3, 6, 7, 7)}),
        ("cmunet", {"mixer_depth": 0}),
        ("unetpp", {"decoder_widths": (8, 8, 16)}),
        ("unetpp", {"encoder": "resnet35"}),
    ],
)
def test_bad_params_are_model_errors_naming_the_key(name: str, params: dict) -> None:
    key = next(iter(params))
    with pytest.raises(ModelError, match=f"model.params.{key}"):
        create_model(name, image_size=64, **params)


def test_unext_shift_moves_each_channel_group_with_zero_fill() -> None:
    x = torch.arange(1, 5 * 6 + 1, dtype=torch.float32).reshape(1, 5, 1, 6)  # one channel per group
    y = shift_groups(x, dim=3)
    for group, s in enumerate((-2, -1, 0, 1, 2)):
        row, out = x[0, group, 0], y[0, group, 0]
        for i in range(6):
            src = i - s
            assert out[i] == (row[src] if 0 <= src < 6 else 0)


# ----------------------------------------------------------------------------------------------- smp family


@pytest.mark.parametrize("name", ["smp_unet", "smp_unetpp", "smp_fpn", "smp_deeplabv3p"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_smp_family_forward_and_conventions(name: str, in_channels: int) -> None:
    model = create_model(
        name, in_channels=in_channels, num_classes=2, image_size=64, encoder="resnet18", encoder_weights=None
    ).eval()
    seen = []
    model.bottleneck.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 64, 64))
    assert out.shape == (2, 2, 64, 64)
    stride = model.size_multiple  # 16 for the dilated DeepLabV3+ encoder, 32 otherwise
    assert seen == [(2, 512, 64 // stride, 64 // stride)] and model.bottleneck_channels == 512
    assert model.encoder_modules() == [model.net.encoder]
    assert first_conv(model).in_channels == in_channels


def test_smp_resnet34_backward_and_train_mode_output() -> None:
    model = create_model("smp_unet", in_channels=1, num_classes=1, image_size=64).train()
    out = model(torch.randn(2, 1, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 64, 64)
    out.mean().backward()
    assert first_conv(model).weight.grad.abs().sum() > 0


def test_generic_smp_resolver_matches_named_entry() -> None:
    generic = create_model("smp", arch="Linknet", encoder="resnet18", image_size=64)
    named = create_model("smp_linknet", encoder="resnet18", image_size=64)
    assert type(generic.net) is type(named.net)
    assert type(generic.net).__name__ == "Linknet"
    assert count_params(generic) == count_params(named)
    assert list(generic.state_dict()) == list(named.state_dict())
    assert type(create_model("smp", arch="deeplabv3p", encoder="resnet18").net).__name__ == "DeepLabV3Plus"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"arch": "Linknt"}, "valid architectures: .*Linknet"),
        ({}, "needs model.params.arch"),
        ({"arch": "Unet", "encoder": "resnet35"}, "unknown smp encoder 'resnet35'"),
        ({"arch": "Unet", "decoder_chanels": (8, 8, 8, 8, 8)}, "no option 'decoder_chanels'"),
        ({"arch": "Unet", "activation": "sigmoid"}, "logits"),
        ({"arch": "Unet", "encoder_weights": "missing/resnet34.pth"}, "does not exist"),
    ],
)
def test_smp_errors_are_model_errors(params: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        create_model("smp", image_size=64, **params)


def test_smp_input_size_rules() -> None:
    with pytest.raises(ModelError, match="multiples of 32"):
        create_model("smp_unet", encoder="resnet18", image_size=80)
    assert create_model("smp_deeplabv3p", encoder="resnet18", image_size=80).size_multiple == 16
    with pytest.raises(ModelError, match="at least 128"):
        create_model("smp_pan", encoder="resnet18", image_size=64)


def test_smp_bottleneck_hook_survives_deepcopy() -> None:
    model = create_model("smp_fpn", encoder="resnet18", image_size=64).eval()
    clone = copy.deepcopy(model)
    seen = []
    clone.bottleneck.register_forward_hook(lambda mod, args, out: seen.append("clone"))
    model.bottleneck.register_forward_hook(lambda mod, args, out: seen.append("original"))
    with torch.no_grad():
        clone(torch.zeros(1, 1, 64, 64))
    assert seen == ["clone"]


def test_smp_local_encoder_weights_file(tmp_path: Path) -> None:
    """A torchvision ResNet18 checkpoint loads into the smp encoder; RGB first-layer kernels are fitted to grey."""
    pytest.importorskip("busbench.models.weights")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = create_model(
        "smp_unet", in_channels=1, encoder="resnet18", encoder_weights=str(path), image_size=64
    )
    encoder = model.net.encoder.state_dict()
    torch.testing.assert_close(encoder["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    torch.testing.assert_close(encoder["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    unetpp = create_model(
        "unetpp", in_channels=3, encoder="resnet18", encoder_weights=str(path), image_size=64
    )
    torch.testing.assert_close(unetpp.encoder.state_dict()["conv1.weight"], state["conv1.weight"])
