"""TransUNet, MedT and Swin-Unet: shapes, sizes, parameter counts, gradients and the gated axial attention maths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from busbench.errors import ModelError
from busbench.models import create_model, get_spec
from busbench.models.medt import GatedAxialAttention, from_tiles, to_tiles

torch.set_num_threads(2)

# small configurations that keep each architecture's structure (all stages, both MedT branches)
TINY = {
    "transunet": {"vit_depth": 1, "decoder_channels": (32, 16, 8, 4)},
    "swinunet": {
        "embed_dim": 12,
        "encoder_depths": (1, 1, 1, 1),
        "decoder_depths": (1, 1, 1),
        "num_heads": (1, 1, 2, 2),
    },
    "medt": {"width": 4, "heads": 2},
}
FIRST_LAYER = {
    "transunet": "encoder.patch_embed.backbone.stem.conv.weight",
    "swinunet": "encoder.patch_embed.proj.weight",
    "medt": "stem.0.0.weight",
}
# published parameter counts at 224 px and the tolerance we hold our build to (see docs/models.md)
REFERENCE_PARAMS_M = {"transunet": (105.3, 0.02), "swinunet": (27.17, 0.02), "medt": (1.37, 0.10)}


@pytest.fixture(scope="module")
def tiny_64() -> dict[str, nn.Module]:
    """One tiny 1-channel, 2-class model per architecture at 64 px, shared by the cheap checks below."""
    torch.manual_seed(0)
    return {
        name: create_model(name, in_channels=1, num_classes=2, image_size=64, **TINY[name]) for name in TINY
    }


def unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("name", [pytest.param("transunet", marks=pytest.mark.slow), "swinunet", "medt"])
def test_full_size_forward_and_parameter_count(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=1, image_size=224).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 224, 224))
    assert out.shape == (1, 1, 224, 224)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    reference, tolerance = REFERENCE_PARAMS_M[name]
    millions = unique_params(model) / 1e6
    assert abs(millions - reference) / reference < tolerance, f"{name}: {millions:.3f}M vs {reference}M"


def test_transunet_parameter_count_at_256_matches_reference() -> None:
    # the 105.3M reference was counted at 256 px; only the position-embedding table grows with the size
    with torch.device("meta"):  # counting only: skip allocating and initialising 2 x 105M weights
        small = create_model("transunet", image_size=224)
        large = create_model("transunet", image_size=256)
    assert unique_params(large) - unique_params(small) == (256 - 196) * 768
    assert unique_params(large) / 1e6 == pytest.approx(105.3, abs=0.05)


@pytest.mark.parametrize("name", ["transunet", "swinunet", "medt"])
def test_tiny_forward_at_256(name: str) -> None:
    model = create_model(name, in_channels=1, num_classes=1, image_size=256, **TINY[name]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 256, 256))
    assert out.shape == (1, 1, 256, 256)


@pytest.mark.parametrize("name", ["transunet", "swinunet", "medt"])
def test_three_channels_three_classes(name: str) -> None:
    model = create_model(name, in_channels=3, num_classes=3, image_size=64, **TINY[name]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("name", ["transunet", "swinunet", "medt"])
def test_input_size_other_than_built_is_refused(name: str, tiny_64: dict[str, nn.Module]) -> None:
    model = tiny_64[name]
    with pytest.raises(ModelError, match="64"):
        model(torch.randn(1, 1, 96, 96))
    with pytest.raises(ModelError):
        model(torch.randn(1, 1, 64, 32))
    with pytest.raises(ModelError, match=r"\(B, C, H, W\)"):
        model(torch.randn(1, 64, 64))


@pytest.mark.parametrize(("name", "bad_size"), [("transunet", 200), ("swinunet", 240), ("medt", 48)])
def test_unsupported_build_size_is_refused(name: str, bad_size: int) -> None:
    with pytest.raises(ModelError, match=rf"multiple of .*{bad_size}.*data\.image_size"):
        create_model(name, image_size=bad_size, **TINY[name])


def test_sizes_are_stated_in_registry() -> None:
    assert "16" in get_spec("transunet").input_sizes
    assert "32" in get_spec("swinunet").input_sizes
    assert "32" in get_spec("medt").input_sizes
    assert get_spec("transunet").pretrained and get_spec("swinunet").pretrained


@pytest.mark.parametrize("name", ["transunet", "swinunet", "medt"])
def test_backward_reaches_first_layer(name: str, tiny_64: dict[str, nn.Module]) -> None:
    model = tiny_64[name].train()
    model.zero_grad()
    out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 2, 64, 64)  # no deep-supervision list for these models
    out.square().mean().backward()
    grad = dict(model.named_parameters())[FIRST_LAYER[name]].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["transunet", "swinunet", "medt"])
def test_encoder_and_bottleneck_conventions(name: str, tiny_64: dict[str, nn.Module]) -> None:
    model = tiny_64[name].eval()
    model_params = {id(p) for p in model.parameters()}
    encoder_params = {id(p) for module in model.encoder_modules() for p in module.parameters()}
    assert encoder_params and encoder_params < model_params
    assert FIRST_LAYER[name] in {n for n, p in model.named_parameters() if id(p) in encoder_params}
    seen = []
    model.bottleneck.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(1, 1, 64, 64))
    assert len(seen) == 1
    assert seen[0].ndim == 4 and seen[0].shape[1] == model.bottleneck_channels


@pytest.mark.parametrize("name", ["transunet", "swinunet", "medt"])
def test_no_tensor_is_registered_twice(name: str, tiny_64: dict[str, nn.Module]) -> None:
    # aliased submodules double parameter counts and checkpoint sizes
    state = tiny_64[name].state_dict()
    assert len({t.data_ptr() for t in state.values() if t.numel()}) == len(
        [t for t in state.values() if t.numel()]
    )


def test_same_seed_builds_identical_models() -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        states.append(create_model("medt", image_size=32, **TINY["medt"]).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_swinunet_full_swin_t_encoder_is_larger() -> None:
    # encoder_depths (2, 2, 6, 2) adds four Swin blocks of width 384 (about 1.77M parameters each)
    with torch.device("meta"):
        lite = create_model("swinunet", image_size=224)
        full = create_model("swinunet", image_size=224, encoder_depths=(2, 2, 6, 2))
    added = (unique_params(full) - unique_params(lite)) / 4
    assert (
        added
        == 2 * 384
        + (384 * 3 * 384 + 3 * 384)
        + (384 * 384 + 384)
        + 2 * 384
        + 2 * (384 * 1536)
        + 1536
        + 384
        + 169 * 12
    )


def reference_gated_axial_attention(module: GatedAxialAttention, line: torch.Tensor) -> torch.Tensor:
    """The paper's formula written with explicit loops for one line ``(C, L)`` of a height-attention layer."""
    heads, dh, dq = module.heads, module.head_dim, module.qk_dim
    length = line.shape[-1]
    qkv = module.qkv_norm(module.qkv(line[None]))[0].reshape(heads, 2 * dh, length)
    out = torch.zeros(heads, dh, length)
    for h in range(heads):
        q, k, v = qkv[h, :dq], qkv[h, dq : 2 * dq], qkv[h, 2 * dq :]
        for i in range(length):
            logits = torch.zeros(length)
            for j in range(length):
                r = module.relative[:, j - i + length - 1]
                r_q, r_k = r[:dq], r[dq : 2 * dq]
                logits[j] = (
                    q[:, i] @ k[:, j] + module.gate_q * (q[:, i] @ r_q) + module.gate_k * (k[:, j] @ r_k)
                )
            weights = torch.softmax(logits * dq**-0.5, dim=0)
            for j in range(length):
                r_v = module.relative[2 * dq :, j - i + length - 1]
                out[h, :, i] += weights[j] * (module.gate_v * v[:, j] + module.gate_v_pos * r_v)
    return module.out_norm(out.reshape(1, heads * dh, length))[0]


def test_gated_axial_attention_matches_paper_formula() -> None:
    torch.manual_seed(0)
    attention = GatedAxialAttention(dim=8, span=5, heads=2, axis="height").eval()
    with torch.no_grad():
        for gate, value in zip(
            (attention.gate_q, attention.gate_k, attention.gate_v_pos, attention.gate_v),
            (0.7, -0.4, 1.3, 0.9),
            strict=True,
        ):
            gate.fill_(value)
        x = torch.randn(2, 8, 5, 3)
        out = attention(x)
        for b in range(2):
            for col in range(3):
                expected = reference_gated_axial_attention(attention, x[b, :, :, col])
                torch.testing.assert_close(out[b, :, :, col], expected, atol=1e-5, rtol=1e-5)


def test_gates_control_position_sensitivity() -> None:
    torch.manual_seed(0)
    attention = GatedAxialAttention(dim=8, span=6, heads=2, axis="width").eval()
    x = torch.randn(1, 8, 4, 6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        # closing the positional gates leaves content-only attention, which is permutation-equivariant along the axis
        for gate in (attention.gate_q, attention.gate_k, attention.gate_v_pos):
            gate.zero_()
        torch.testing.assert_close(attention(x[..., perm]), attention(x)[..., perm])
        attention.gate_q.fill_(1.0)
        assert not torch.allclose(attention(x[..., perm]), attention(x)[..., perm], atol=1e-4)
        # attention along the width never mixes rows
        changed = x.clone()
        changed[:, :, 2] += 1.0
        diff = (attention(changed) - attention(x)).abs().sum(dim=(0, 1, 3))
        assert diff[2] > 0 and diff[[0, 1, 3]].max() == 0


def test_local_tiles_round_trip_in_row_major_order() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tiles = to_tiles(x, 4)
    assert tiles.shape == (32, 3, 2, 2)
    torch.testing.assert_close(tiles[1], x[0, :, 0:2, 2:4])  # first image, top row, second tile
    torch.testing.assert_close(tiles[16 + 4], x[1, :, 2:4, 0:2])  # second image, second row, first tile
    torch.testing.assert_close(from_tiles(tiles, 4), x)
