"""U-KAN: the published size and cost, the KAN layer against an independent B-spline implementation, shapes,
gradients, refused sizes and options, 1 and 3 channels, and the encoder/bottleneck conventions.

Full-size counts run on the meta device (shapes only, no arithmetic), so they cost no real forward pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.interpolate import BSpline
from torch import nn

from busbench.errors import ModelError
from busbench.models import create_model, get_spec
from busbench.models.cost import count_params, profile_forward
from busbench.models.ukan import UKAN, KANLinear, bspline_basis

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "models" / "ukan.yaml"
TINY = {"embed_dims": (16, 24, 32)}


def config_params() -> dict:
    data = yaml.safe_load(CONFIG.read_text())
    assert data["model"]["name"] == "ukan"
    return data["model"]["params"]


@pytest.mark.parametrize(
    ("in_channels", "size", "ref_gmacs"),
    [(1, 224, 8.02), (3, 256, 10.52)],  # public reference implementation, FlopCounterMode FLOPs / 2
)
def test_full_size_params_and_macs_match_reference(in_channels: int, size: int, ref_gmacs: float) -> None:
    with torch.device("meta"):
        model = create_model("ukan", in_channels=in_channels, num_classes=1, image_size=size, **config_params())
        out, macs = profile_forward(model, torch.zeros(1, in_channels, size, size))
    assert out.shape == (1, 1, size, size)
    params_m = count_params(model) / 1e6
    assert params_m == pytest.approx(25.36, rel=0.02)
    assert macs / 1e9 == pytest.approx(ref_gmacs, rel=0.02)


def test_registered_with_paper_and_size_rule() -> None:
    spec = get_spec("ukan")
    assert "AAAI 2025" in spec.paper and spec.input_sizes == "multiple of 32" and not spec.pretrained


def test_bspline_basis_matches_scipy_and_sums_to_one_on_the_grid() -> None:
    order, grid = 3, 5
    step = 2.0 / grid
    knots = -1.0 + step * torch.arange(-order, grid + order + 1, dtype=torch.float64)
    x = torch.linspace(-2.6, 2.6, 105, dtype=torch.float64)  # knots span [-2.2, 2.2]
    ours = bspline_basis(x, knots, order)
    assert ours.shape == (105, grid + order)
    t = knots.numpy()
    for j in range(grid + order):
        element = BSpline.basis_element(t[j : j + order + 2], extrapolate=False)
        expected = np.nan_to_num(element(x.numpy()))
        # scipy's element includes its right end knot; ours is half-open like the degree-0 indicator
        inner = (x.numpy() != t[j + order + 1])
        np.testing.assert_allclose(ours[:, j].numpy()[inner], expected[inner], atol=1e-12)
    inside = (x >= -1) & (x < 1)
    torch.testing.assert_close(ours[inside].sum(-1), torch.ones(int(inside.sum()), dtype=torch.float64))
    beyond = (x < t[0]) | (x >= t[-1])
    assert beyond.any() and (ours[beyond] == 0).all()


def test_kan_linear_is_a_sum_of_learnable_edge_functions() -> None:
    """Each output is sum_i w_b silu(x_i) + w_s sum_k c_k B_k(x_i), written out per edge."""
    torch.manual_seed(0)
    layer = KANLinear(4, 3).double()
    with torch.no_grad():
        layer.spline_weight.normal_()
        layer.spline_scaler.uniform_(0.5, 2.0)
    x = torch.rand(6, 4, dtype=torch.float64) * 2.4 - 1.2
    with torch.no_grad():
        out = layer(x)
    t = layer.knots.double().numpy()
    elements = [BSpline.basis_element(t[k : k + 5], extrapolate=False) for k in range(8)]
    for n in range(6):
        for j in range(3):
            total = 0.0
            for i in range(4):
                xi = float(x[n, i])
                coeffs = (layer.spline_weight[j, i] * layer.spline_scaler[j, i]).detach().tolist()
                spline = sum(c * float(np.nan_to_num(element(xi))) for c, element in zip(coeffs, elements, strict=True))
                total += layer.base_weight[j, i].item() * xi / (1 + np.exp(-xi)) + spline
            assert float(out[n, j]) == pytest.approx(total, abs=1e-9)
    assert count_params(layer) == 10 * 4 * 3  # base + scaler + 8 spline coefficients per edge, no bias


@pytest.mark.parametrize("in_channels", [1, 3])
def test_tiny_shapes_for_one_and_three_channels(in_channels: int) -> None:
    model = create_model("ukan", in_channels=in_channels, num_classes=3, image_size=64, **TINY).eval()
    for b, h, w in [(2, 64, 64), (1, 64, 96)]:
        with torch.no_grad():
            out = model(torch.randn(b, in_channels, h, w))
        assert out.shape == (b, 3, h, w) and torch.isfinite(out).all()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == in_channels


def test_tiny_backward_reaches_first_conv_and_every_kan_layer() -> None:
    torch.manual_seed(0)
    model = create_model("ukan", image_size=32, **TINY).train()
    model(torch.randn(2, 1, 32, 32)).square().mean().backward()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    kans = [m for m in model.modules() if isinstance(m, KANLinear)]
    assert len(kans) == 12  # 3 per tokenised block, 2 encoder + 2 decoder blocks
    for kan in kans:
        for p in (kan.base_weight, kan.spline_weight, kan.spline_scaler):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_refused_sizes_and_options() -> None:
    with pytest.raises(ModelError, match="multiples of 32"):
        create_model("ukan", image_size=48, **TINY)
    model = create_model("ukan", image_size=32, **TINY).eval()
    with pytest.raises(ModelError, match="data.image_size"), torch.no_grad():
        model(torch.zeros(1, 1, 32, 80))
    with pytest.raises(ModelError, match=r"\(B, C, H, W\)"):
        model(torch.zeros(1, 32, 32))
    with pytest.raises(ModelError, match=r"model.params.embed_dims"):
        create_model("ukan", image_size=32, embed_dims=(16, 24))
    with pytest.raises(ModelError, match=r"model.params.embed_dims\[0\] must be a multiple of 8"):
        create_model("ukan", image_size=32, embed_dims=(20, 24, 32))
    with pytest.raises(ModelError, match="model.params.grid_size"):
        create_model("ukan", image_size=32, grid_size=0, **TINY)
    with pytest.raises(ModelError, match="in_channels=2"):
        create_model("ukan", in_channels=2, image_size=32, **TINY)


def test_bottleneck_and_encoder_conventions() -> None:
    model = create_model("ukan", image_size=64, **TINY).eval()
    assert isinstance(model, UKAN)
    seen = []
    model.bottleneck.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.zeros(1, 1, 64, 128))
    assert seen == [(1, model.bottleneck_channels, 2, 4)] and model.bottleneck_channels == 32
    encoder = model.encoder_modules()
    encoder_ids = {id(p) for m in encoder for p in m.parameters()}
    encoder_kans = [k for m in encoder for k in m.modules() if isinstance(k, KANLinear)]
    assert len(encoder_kans) == 6  # both tokenised KAN stages belong to the encoder
    decoder = [p for n, p in model.named_parameters() if n.startswith(("up.", "dec_kan.", "head."))]
    assert decoder and not any(id(p) in encoder_ids for p in decoder)
    assert len(encoder_ids) + len(decoder) == len(list(model.parameters()))
