"""Three-class mode: class maps from binary masks, the CE + Dice loss, and the binary view of 3-class logits."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss as MonaiDiceLoss
from PIL import Image
from torch.nn import functional as F

from busbench.errors import DataError, ModelError
from busbench.losses import deep_supervision_weights
from busbench.methods.multiclass import (
    CLASS_NAMES,
    LABEL_TO_CLASS,
    MulticlassLoss,
    class_map_from_binary,
    lesion_probability,
    multiclass_loss,
    predicted_classes,
)
from busbench.metrics import per_class


def _blob(h: int = 12, w: int = 16) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[3:7, 4:10] = 255
    return mask


@pytest.mark.parametrize(("label", "value"), [("benign", 1), ("malignant", 2), ("Malignant", 2)])
def test_class_map_colours_lesion_with_image_label(label: str, value: int) -> None:
    mask = _blob()
    out = class_map_from_binary(mask, label)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) == {0, value}
    np.testing.assert_array_equal(out > 0, mask > 0)


def test_class_map_of_normal_image_is_empty_and_lesion_on_normal_is_an_error() -> None:
    empty = np.zeros((8, 8), dtype=bool)
    assert not class_map_from_binary(empty, "normal").any()
    with pytest.raises(DataError, match="labelled normal"):
        class_map_from_binary(_blob(), "normal")
    with pytest.raises(DataError, match="valid labels"):
        class_map_from_binary(_blob(), "suspicious")
    with pytest.raises(DataError, match="2-D"):
        class_map_from_binary(np.zeros((4, 4, 3)), "benign")


def test_class_indices_agree_with_the_loader() -> None:
    decode = pytest.importorskip("busbench.data.decode")
    assert decode.LABEL_CODES == LABEL_TO_CLASS
    assert CLASS_NAMES[1:] == tuple(decode.LABELS[1:])


@pytest.mark.realdata
def test_class_map_matches_bus_uclm_colour_masks(real_data_root) -> None:
    """BUS-UCLM masks encode the class in colour (green benign, red malignant); colouring the binary lesion with
    the INFO.csv label must reproduce them exactly."""
    folder = real_data_root / "BUS-UCLM"
    with open(folder / "INFO.csv", encoding="utf-8-sig", newline="") as fh:
        rows = sorted(csv.DictReader(fh, delimiter=";"), key=lambda r: r["Image"])
    seen = set()
    for row in rows:
        rgb = np.asarray(Image.open(folder / "masks" / row["Image"]).convert("RGB"))
        expected = np.zeros(rgb.shape[:2], dtype=np.uint8)
        expected[(rgb == (0, 255, 0)).all(axis=-1)] = 1
        expected[(rgb == (255, 0, 0)).all(axis=-1)] = 2
        binary = rgb.any(axis=-1)
        np.testing.assert_array_equal(class_map_from_binary(binary, row["Label"]), expected)
        seen.add(row["Label"].lower())
    assert seen == {"normal", "benign", "malignant"}


def _targets(b: int = 2, h: int = 8, w: int = 8) -> torch.Tensor:
    t = torch.zeros(b, h, w, dtype=torch.long)
    t[0, 1:4, 1:5] = 1
    t[1, 4:7, 2:6] = 2
    t[1, 0, 0] = 1
    return t


def test_multiclass_loss_is_weighted_cross_entropy_plus_dice_matching_monai() -> None:
    torch.manual_seed(0)
    target = _targets()
    logits = torch.randn(2, 3, 8, 8)
    ce = F.cross_entropy(logits, target)
    # MONAI's soft Dice over the batch, every class present: the same quantity as smp's multi-class Dice
    monai_dice = MonaiDiceLoss(
        include_background=True, to_onehot_y=True, softmax=True, batch=True, smooth_nr=0.0, smooth_dr=1e-7
    )(logits, target[:, None])
    for w in (0.0, 0.3, 0.5, 1.0):
        expected = w * ce + (1 - w) * monai_dice
        assert multiclass_loss(logits, target, ce_weight=w).item() == pytest.approx(expected.item(), abs=1e-5)


def test_multiclass_loss_near_zero_for_confident_correct_logits_and_accepts_channel_dim() -> None:
    target = _targets()
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 30.0
    assert multiclass_loss(logits, target).item() < 1e-6
    wrong = F.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).float() * 30.0
    assert multiclass_loss(wrong, target).item() > 10
    # (B, 1, H, W) float targets, as a loader may deliver them
    assert multiclass_loss(logits, target[:, None].float()).item() < 1e-6


def test_multiclass_loss_rejects_bad_targets() -> None:
    logits = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ModelError, match="fractional"):
        multiclass_loss(logits, torch.full((2, 8, 8), 0.5))
    with pytest.raises(ModelError, match="outside 0..2"):
        multiclass_loss(logits, torch.full((2, 8, 8), 3))
    with pytest.raises(ModelError, match="disagree"):
        multiclass_loss(logits, torch.zeros(2, 4, 4, dtype=torch.long))


def test_deep_supervision_outputs_weighted_like_binary_losses() -> None:
    torch.manual_seed(1)
    target = _targets()
    outs = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    weights = deep_supervision_weights(3, None)
    expected = sum(w * multiclass_loss(o, target) for w, o in zip(weights, outs, strict=True))
    assert MulticlassLoss()(outs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    custom = MulticlassLoss(ds_weights=[2.0, 1.0, 1.0])(outs, target)
    expected = (
        2 * multiclass_loss(outs[0], target)
        + multiclass_loss(outs[1], target)
        + multiclass_loss(outs[2], target)
    ) / 4
    assert custom.item() == pytest.approx(expected.item(), rel=1e-6)


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(probs)).view(1, 3, 1, 1)


def test_lesion_probability_and_label_map_agree_with_the_binary_decision() -> None:
    logits = _logits_from_probs([0.4, 0.25, 0.35])
    assert lesion_probability(logits).item() == pytest.approx(0.6)
    # background is the single most likely class, but the lesion as a whole is more likely: malignant
    assert predicted_classes(logits).item() == 2
    assert torch.argmax(logits, dim=1).item() == 0
    assert predicted_classes(_logits_from_probs([0.7, 0.2, 0.1])).item() == 0
    assert predicted_classes(logits, threshold=0.65).item() == 0


def test_label_map_scores_per_class_with_busbench_metrics() -> None:
    gt = torch.zeros(16, 16, dtype=torch.long)
    gt[1:4, 1:5] = 1  # a 12-pixel benign lesion
    pred = gt.clone()
    pred[1:4, 1:3] = 2  # half of the benign lesion called malignant
    logits = F.one_hot(pred, 3).permute(2, 0, 1)[None].float() * 10
    labels = predicted_classes(logits)[0].numpy()
    np.testing.assert_array_equal(labels, pred.numpy())
    scores = per_class(labels, gt.numpy(), 3, class_names=CLASS_NAMES)
    assert scores["dice"] == pytest.approx(1.0)  # the binary lesion mask is perfect
    assert scores["dice_benign"] == pytest.approx(2 * 6 / (12 + 6))
    assert scores["dice_malignant"] == 0.0  # predicted malignant where the truth has none


def test_tiny_network_learns_three_classes() -> None:
    """A few optimiser steps on synthetic benign / malignant blobs lower the loss."""
    from busbench.models import create_model

    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, image_size=32, base_width=4)
    images = torch.rand(4, 1, 32, 32) * 0.2
    target = torch.zeros(4, 32, 32, dtype=torch.long)
    for i in range(4):
        cls = 1 + i % 2
        target[i, 8 + i : 20 + i, 6:18] = cls
        images[i, 0][target[i] > 0] += 0.4 * cls
    criterion = MulticlassLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = criterion(model(images), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]
