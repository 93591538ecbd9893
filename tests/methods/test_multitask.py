"""Multi-task segmentation + classification: head on the bottleneck, loss, oversampling, refinement, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import FocalLoss as MonaiFocalLoss
from torch import nn
from torch.nn import functional as F

from busbench.errors import ModelError
from busbench.losses import build_criterion
from busbench.methods.multitask import (
    ClassificationHead,
    MultiTaskLoss,
    MultiTaskModel,
    classification_metrics,
    multiclass_focal_loss,
    oversample_indices,
    oversampling_factors,
    refine,
)
from busbench.models import create_model
from busbench.models.base import SegModel


class TokenSegModel(SegModel):
    """A minimal model whose bottleneck emits transformer tokens (B, N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, 8, 4, stride=4)
        self.bottleneck = nn.Linear(8, 8)
        self.bottleneck_channels = 8
        self.head = nn.Conv2d(8, 1, 1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.embed, self.bottleneck]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.embed(x)
        b, c, h, w = f.shape
        tokens = self.bottleneck(f.flatten(2).transpose(1, 2))
        f = tokens.transpose(1, 2).reshape(b, c, h, w)
        return F.interpolate(self.head(f), size=x.shape[-2:])


def test_head_pools_feature_maps_and_tokens() -> None:
    torch.manual_seed(0)
    head = ClassificationHead(6, 3).eval()
    fmap = torch.randn(2, 6, 5, 7)
    expected = head.fc(fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(head(fmap), expected)
    tokens = torch.randn(2, 11, 6)
    torch.testing.assert_close(head(tokens), head.fc(tokens.mean(dim=1)))
    with pytest.raises(ModelError, match="expects 6 bottleneck channels"):
        head(torch.randn(2, 5, 3, 3))


def test_multitask_wraps_a_deep_supervision_model() -> None:
    seg = create_model("unet_ds", image_size=32, base_width=4)
    model = MultiTaskModel(seg, num_classes=3)
    x = torch.randn(2, 1, 32, 32)
    model.train()
    seg_out, cls = model(x)
    assert isinstance(seg_out, list) and len(seg_out) == 4
    assert cls.shape == (2, 3)
    model.eval()
    seg_out, cls = model(x)
    assert seg_out.shape == (2, 1, 32, 32) and cls.shape == (2, 3)
    # the head sees exactly the bottleneck output: recompute it by hand
    feats = seg.bottleneck(
        seg.pool(
            seg.encoder[3](seg.pool(seg.encoder[2](seg.pool(seg.encoder[1](seg.pool(seg.encoder[0](x)))))))
        )
    )
    torch.testing.assert_close(cls, model.head(feats))
    # delegated, not copied: parameters counted once, conventions forwarded
    n_seg = sum(p.numel() for p in seg.parameters())
    n_head = sum(p.numel() for p in model.head.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_seg + n_head
    assert model.bottleneck is seg.bottleneck and model.bottleneck_channels == 64
    assert model.encoder_modules() == seg.encoder_modules()
    with pytest.raises(ModelError):
        model.check_input_size(30, 30)


def test_multitask_on_token_bottleneck_and_missing_bottleneck_call() -> None:
    model = MultiTaskModel(TokenSegModel()).eval()
    seg_out, cls = model(torch.randn(3, 1, 16, 16))
    assert seg_out.shape == (3, 1, 16, 16) and cls.shape == (3, 3)

    class Skips(TokenSegModel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(self.head(self.embed(x)), size=x.shape[-2:])

    with pytest.raises(ModelError, match="bottleneck was not called"):
        MultiTaskModel(Skips())(torch.randn(1, 1, 16, 16))
    with pytest.raises(ModelError, match="bottleneck"):
        MultiTaskModel(nn.Conv2d(1, 1, 1))  # type: ignore[arg-type]


def test_focal_loss_reduces_to_cross_entropy_and_matches_monai() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(
        multiclass_focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target)
    )
    monai = MonaiFocalLoss(gamma=2.0, use_softmax=True, to_onehot_y=True, reduction="sum")
    expected = monai(logits[:, :, None], target[:, None, None]) / len(target)
    assert multiclass_focal_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    # one image by hand: p_t = 0.5 -> 0.25 * ln 2
    two = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert multiclass_focal_loss(two, torch.tensor([0])).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_multitask_loss_weights_segmentation_against_classification() -> None:
    torch.manual_seed(0)
    seg = torch.randn(2, 1, 8, 8)
    masks = (torch.rand(2, 1, 8, 8) > 0.5).float()
    cls = torch.randn(2, 3, requires_grad=True)
    labels = torch.tensor([1, 2])
    dice = build_criterion("dice")(seg, masks).item()
    focal = multiclass_focal_loss(cls, labels).item()
    for lam in (0.0, 0.35, 1.0):
        loss = MultiTaskLoss(lam=lam)
        value = loss((seg, cls), masks, labels)
        assert value.item() == pytest.approx(lam * dice + (1 - lam) * focal, rel=1e-5)
        parts = {k: v.item() for k, v in loss.last_parts.items()}
        assert parts == pytest.approx({"seg": dice, "cls": focal}, rel=1e-5)
    # lambda = 1: classification carries no gradient
    MultiTaskLoss(lam=1.0)((seg, cls), masks, labels).backward()
    assert cls.grad is None or torch.count_nonzero(cls.grad) == 0
    with pytest.raises(ModelError, match="lambda"):
        MultiTaskLoss(lam=1.5)


def test_oversampling_factors_from_class_proportions() -> None:
    labels = ["normal"] * 50 + ["benign"] * 200 + ["malignant"] * 100
    assert oversampling_factors(labels) == {"benign": 1, "malignant": 2, "normal": 4}
    # Curated BUSI (64 normal, 222 benign, 164 malignant): 3.47 -> 3, 1.35 -> 1
    curated = [0] * 64 + [1] * 222 + [2] * 164
    assert oversampling_factors(curated) == {0: 3, 1: 1, 2: 1}
    # halves round up (Python's round would give 2 for 2.5)
    assert oversampling_factors(["a"] * 5 + ["b"] * 2) == {"a": 1, "b": 3}
    with pytest.raises(ModelError):
        oversampling_factors([])


def test_oversample_indices_are_deterministic_and_in_order() -> None:
    labels = ["benign", "normal", "benign", "malignant", "benign", "benign"]
    # counts 4 / 1 / 1 -> factors benign 1, normal 4, malignant 4
    expected = [0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 5]
    assert oversample_indices(labels) == expected
    assert oversample_indices(list(labels)) == expected
    counts = np.bincount([["benign", "normal", "malignant"].index(labels[i]) for i in expected])
    assert counts.tolist() == [4, 4, 4]


def test_refine_makes_segmentation_and_classification_consistent() -> None:
    seg = torch.zeros(3, 1, 4, 4)
    seg[0, 0, 1, 1] = 0.9  # a false-positive speck on an image classified normal
    seg[1, 0, :2, :2] = 0.8  # a lesion on an image whose normal probability is not negligible
    cls = torch.tensor([[0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.2, 0.1, 0.7]])
    seg_in, cls_in = seg.clone(), cls.clone()
    out_seg, out_cls = refine(seg, cls, threshold=0.5)
    assert not out_seg[0].any()  # normal -> empty mask
    torch.testing.assert_close(out_cls[0], cls[0])
    torch.testing.assert_close(out_seg[1], seg[1])  # lesion kept
    torch.testing.assert_close(out_cls[1], torch.tensor([0.0, 0.5 / 0.7, 0.2 / 0.7]))
    torch.testing.assert_close(out_seg[2], seg[2])  # malignant with an empty mask: untouched
    torch.testing.assert_close(out_cls[2], cls[2])
    torch.testing.assert_close(seg, seg_in)
    torch.testing.assert_close(cls, cls_in)
    # invariants after refinement
    normal = out_cls.argmax(1) == 0
    has_lesion = (out_seg > 0.5).flatten(1).any(1)
    assert not (normal & has_lesion).any()
    # (B, H, W) masks work too
    out2, _ = refine(seg[:, 0], cls)
    torch.testing.assert_close(out2, out_seg[:, 0])


def test_classification_metrics_against_hand_counts() -> None:
    y_true = ["normal", "benign", "benign", "malignant", "malignant", "malignant"]
    y_pred = ["normal", "benign", "malignant", "malignant", "benign", "malignant"]
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 1, 2]]
    assert m["recall_normal"] == 1.0
    assert m["recall_benign"] == pytest.approx(0.5)
    assert m["recall_malignant"] == pytest.approx(2 / 3)
    f1 = [1.0, 2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * (2 / 3) / (4 / 3)]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    # indices work, an absent class has an undefined recall
    m2 = classification_metrics([1, 1, 2], [1, 2, 2])
    assert math.isnan(m2["recall_normal"])
    assert m2["confusion"][0] == [0, 0, 0]
    with pytest.raises(ValueError, match="unknown class"):
        classification_metrics(["cyst"], ["benign"])
