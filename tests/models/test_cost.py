"""Parameter and MAC counting, and the ``busbench models`` table."""

from __future__ import annotations

import argparse
import csv
import io

import pytest
import torch
from torch import nn

from busbench.errors import ModelError
from busbench.models import create_model
from busbench.models.cost import count_macs, count_params, profile_forward
from busbench.models.table import add_arguments, format_markdown, models_table, run


class Aliased(nn.Module):
    """A block reachable under two attribute names plus a weight shared with a second layer."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(10, 10)  # 110 parameters
        self.alias = self.block
        self.other = nn.Linear(10, 10, bias=False)
        self.other.weight = self.block.weight  # tied: no new parameters


def test_count_params_counts_aliases_and_tied_weights_once() -> None:
    model = Aliased()
    per_module = sum(
        p.numel() for m in model.modules(remove_duplicate=False) for p in m.parameters(recurse=False)
    )
    assert per_module == 110 + 110 + 100  # what a per-attribute count reports
    assert count_params(model) == 110
    model.block.bias.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 100


def test_count_macs_of_a_convolution_is_exact() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 2, 1))
    assert count_macs(model, in_channels=1, size=224) == 224 * 224 * (8 * 9 + 2 * 8)
    depthwise = nn.Conv2d(6, 6, 7, padding=3, groups=6)
    assert count_macs(depthwise, in_channels=6, size=32) == 32 * 32 * 6 * 49


def hooked_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Independent count: forward hooks on every convolution and linear layer."""
    total = 0

    def conv(mod: nn.Conv2d, args, out) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear(mod: nn.Linear, args, out) -> None:
        nonlocal total
        total += out.numel() * mod.in_features

    handles = [
        m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("attunet", {"base_width": 4}),
        ("unext", {"widths": (4, 8, 16, 24, 32)}),
        ("cmunext", {"widths": (4, 8, 16, 24, 32)}),
        ("unetpp", {"encoder": "resnet18", "decoder_widths": (8, 8, 16, 32)}),
    ],
)
def test_count_macs_agrees_with_layer_hooks_and_scales_with_pixels(name: str, params: dict) -> None:
    model = create_model(name, image_size=64, **params)
    macs = count_macs(model, in_channels=1, size=64)
    assert macs == hooked_macs(model, torch.zeros(1, 1, 64, 64))
    assert count_macs(model, in_channels=1, size=128) == 4 * macs  # fully convolutional: MACs per pixel


def test_profile_forward_restores_mode_and_leaves_no_graph() -> None:
    model = create_model("unet3p", base_width=2, image_size=32).train()
    out, macs = profile_forward(model, torch.zeros(1, 1, 32, 32))
    assert model.training
    assert isinstance(out, torch.Tensor) and not out.requires_grad  # eval mode: main output only, no graph
    assert macs > 0


def test_models_table_rows_match_direct_counts() -> None:
    rows = models_table(["cmunext", "unext", "smp"], size=64)
    assert [r["key"] for r in rows] == ["cmunext", "unext", "smp"]
    for row in rows[:2]:
        model = create_model(row["key"], image_size=64)
        assert row["params_m"] == round(count_params(model) / 1e6, 2)
        assert row["gmacs"] == round(count_macs(model, 1, 64) / 1e9, 2)
        assert row["pretrained"] is False and row["input_sizes"].startswith("multiple of")
        assert row["note"] == ""
    assert rows[2]["params_m"] is None and "needs model.params.arch" in rows[2]["note"]
    table = format_markdown(rows, size=64)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | paper | params (M) | GMACs (1x1x64x64)")
    assert len(lines) == 2 + len(rows)


def test_models_command_markdown_and_csv(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--names", "cmu*", "--size", "32"])) == 0
    md = capsys.readouterr().out
    assert "| cmunet |" in md and "| cmunext |" in md
    assert run(parser.parse_args(["--names", "unext", "--size", "64", "--format", "csv"])) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["key"] for r in rows] == ["unext"]
    assert float(rows[0]["params_m"]) == pytest.approx(1.47, abs=0.01)
    with pytest.raises(ModelError, match="Valid models"):
        run(parser.parse_args(["--names", "no_such_model"]))


def test_fused_attention_is_counted():
    """scaled_dot_product_attention's two matmuls: 2 * B * heads * L * L * d MACs."""
    import torch.nn.functional as F
    from torch import nn

    from busbench.models.cost import profile_forward

    class Attention(nn.Module):
        def forward(self, x):
            q = x.reshape(1, 2, 16, 8)  # 2 heads, 16 tokens, 8 dims
            return F.scaled_dot_product_attention(q, q, q)

    _, macs = profile_forward(Attention(), torch.zeros(1, 256))
    assert macs == 2 * 2 * 16 * 16 * 8
