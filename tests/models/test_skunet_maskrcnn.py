"""SK-U-Net and the Mask R-CNN wrapper (instances <-> semantic masks)."""

from __future__ import annotations

import pytest
import torch

from busbench.errors import ModelError
from busbench.models import create_model, list_models
from busbench.models.maskrcnn import instances_to_semantic, maskrcnn_targets_from_masks
from busbench.models.skunet import SKConv

# ---------------------------------------------------------------------------------------------------- SK-U-Net


def test_skconv_is_an_attention_weighted_sum_of_plain_and_dilated_branches() -> None:
    torch.manual_seed(0)
    sk = SKConv(3, 8, dilation=2, reduction=4, min_dim=4).eval()
    x = torch.randn(2, 3, 12, 12)
    out = sk(x)
    a, b = sk.plain(x), sk.dilated(x)
    z = sk.squeeze((a + b).mean(dim=(2, 3)))
    w = torch.softmax(sk.select(z).view(2, 2, 8), dim=1)
    torch.testing.assert_close(out, a * w[:, 0, :, None, None] + b * w[:, 1, :, None, None])
    torch.testing.assert_close(sk.last_attention, w[:, 1])
    assert sk.plain[0].dilation == (1, 1) and sk.dilated[0].dilation == (2, 2)
    assert sk.dilated[0].padding == (2, 2)  # size kept


def test_skunet_forward_backward_tiny() -> None:
    assert "skunet" in list_models()
    torch.manual_seed(0)
    model = create_model("skunet", image_size=64, base_width=4)
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, 1, 64, 64)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.bottleneck_channels == 64
    assert len(model.encoder_modules()) == 2
    rgb = create_model("skunet", in_channels=3, num_classes=3, image_size=32, base_width=2)
    assert rgb(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ModelError, match="multiples of 16"):
        create_model("skunet", image_size=60, base_width=4)
    with pytest.raises(ModelError, match="base_width"):
        create_model("skunet", base_width=0)


# ---------------------------------------------------------------------------------------------------- Mask R-CNN


def test_targets_from_masks_one_instance_per_component() -> None:
    masks = torch.zeros(3, 1, 20, 30)
    masks[0, 0, 2:6, 3:9] = 1  # rows 2..5, cols 3..8
    masks[0, 0, 10:18, 20:22] = 1  # rows 10..17, cols 20..21
    masks[1, 0, 5, 5] = 1
    masks[1, 0, 6, 6] = 1  # touches diagonally: one 8-connected lesion
    targets = maskrcnn_targets_from_masks(masks)
    assert len(targets) == 3
    t0 = targets[0]
    assert t0["boxes"].tolist() == [[3.0, 2.0, 9.0, 6.0], [20.0, 10.0, 22.0, 18.0]]
    assert t0["labels"].tolist() == [1, 1]
    assert t0["masks"].dtype == torch.uint8 and t0["masks"].shape == (2, 20, 30)
    assert t0["masks"][0].sum() == 24 and t0["masks"][1].sum() == 16
    torch.testing.assert_close(t0["masks"].sum(0).float(), masks[0, 0])
    assert targets[1]["boxes"].tolist() == [[5.0, 5.0, 7.0, 7.0]]
    empty = targets[2]
    assert (
        empty["boxes"].shape == (0, 4)
        and empty["labels"].shape == (0,)
        and empty["masks"].shape == (0, 20, 30)
    )
    # tiny specks can be dropped; (B, H, W) input works
    assert len(maskrcnn_targets_from_masks(masks[:, 0], min_area=3)[1]["boxes"]) == 0


def _detections(h: int = 16, w: int = 16) -> dict[str, torch.Tensor]:
    masks = torch.zeros(3, 1, h, w)
    masks[0, 0, 2:8, 2:8] = 0.9
    masks[0, 0, 8, 2:8] = 0.3  # soft edge below the mask threshold
    masks[1, 0, 5:12, 5:12] = 0.7  # overlaps the first instance
    masks[2, 0, 12:16, 0:4] = 0.95  # a confident mask from a low-scoring detection
    return {
        "boxes": torch.tensor([[2, 2, 8, 9], [5, 5, 12, 12], [0, 12, 4, 16]], dtype=torch.float32),
        "labels": torch.ones(3, dtype=torch.int64),
        "scores": torch.tensor([0.9, 0.6, 0.2]),
        "masks": masks,
    }


def test_instances_to_semantic_merges_kept_instances() -> None:
    det = _detections()
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 1, 16, 16),
    }
    prob = instances_to_semantic([det, empty], score_threshold=0.5, mask_threshold=0.5)
    assert prob.shape == (2, 1, 16, 16)
    expected = torch.zeros(16, 16)
    expected[5:12, 5:12] = 0.7
    expected[2:8, 2:8] = 0.9  # pixelwise max where the two kept instances overlap
    torch.testing.assert_close(prob[0, 0], expected)
    assert not prob[1].any()
    # a lower score threshold brings the third instance in
    low = instances_to_semantic([det], score_threshold=0.1)
    assert low[0, 0, 12:16, 0:4].eq(0.95).all()
    # keeping soft edges when the mask threshold is lowered
    soft = instances_to_semantic([det], mask_threshold=0.2)
    assert soft[0, 0, 8, 2:5].tolist() == pytest.approx([0.3, 0.3, 0.3])
    # explicit output size resamples
    assert instances_to_semantic([det], size=(32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises(ModelError, match="scores"):
        instances_to_semantic([{"masks": det["masks"]}])


def test_maskrcnn_interface_errors() -> None:
    with pytest.raises(ModelError, match="num_classes"):
        create_model("maskrcnn", num_classes=2, image_size=64)


@pytest.mark.slow
def test_maskrcnn_tiny_eval_forward_and_training_losses() -> None:
    torch.manual_seed(0)
    model = create_model(
        "maskrcnn",
        image_size=64,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        box_detections_per_img=20,
    )
    assert model.returns_loss_dict
    assert model.bottleneck_channels == 2048
    x = torch.rand(2, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 1, 64, 64) and torch.isfinite(logits).all()
    prob = torch.sigmoid(logits)
    assert ((prob < 1e-5) | (prob >= 0.5 - 1e-5)).all()  # zeroed below the mask threshold

    model.train()
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 10:30, 12:40] = 1
    losses = model.compute_loss(x, masks)  # the second image is normal: an empty target
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(
        losses
    )
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.net.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None
    with pytest.raises(ModelError, match="compute_loss"):
        model(x)
    model.eval()
    with pytest.raises(ModelError, match="training mode"):
        model.compute_loss(x, masks)
