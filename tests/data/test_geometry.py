"""Letterbox / resize to the network square and restore back to the original grid."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from busbench.data.geometry import (
    MASK_INTERPOLATION,
    LetterboxInfo,
    geometry_for,
    letterbox,
    resize,
    restore,
    to_square,
)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


@pytest.mark.parametrize(
    ("hw", "size", "content", "pads"),
    [
        ((300, 400), 224, (168, 224), (28, 0)),  # landscape: padded top and bottom equally
        ((400, 300), 224, (224, 168), (0, 28)),  # portrait: padded left and right
        ((37, 61), 32, (19, 32), (6, 0)),  # odd padding: the extra row goes to the bottom
        ((64, 64), 32, (32, 32), (0, 0)),  # square: no padding
        ((10, 1000), 64, (1, 64), (31, 0)),  # extreme aspect keeps at least one row
    ],
)
def test_letterbox_geometry(hw, size, content, pads):
    img = np.full((*hw, 3), 200, np.uint8)
    out, info = letterbox(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert info.content_hw == content and (info.pad_top, info.pad_left) == pads
    assert info.pad_bottom - info.pad_top in (0, 1) and info.pad_right - info.pad_left in (0, 1)
    inside = np.zeros((size, size), bool)
    inside[pads[0] : pads[0] + content[0], pads[1] : pads[1] + content[1]] = True
    assert (out[inside] == 200).all()  # content is where the info says
    assert (out[~inside] == 0).all()  # and everything else is zero padding
    assert info == geometry_for(hw, size, "letterbox")


def test_letterbox_content_is_the_resized_image():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (90, 120), dtype=np.uint8)
    out, info = letterbox(img, 60)
    top, left = info.pad_top, info.pad_left
    h, w = info.content_hw
    expected = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)  # shrinking uses area averaging
    np.testing.assert_array_equal(out[top : top + h, left : left + w], expected)
    up, up_info = letterbox(img, 240)  # enlarging uses bilinear
    h, w = up_info.content_hw
    np.testing.assert_array_equal(
        up[up_info.pad_top : up_info.pad_top + h], cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    )


def test_single_channel_axis_is_kept():
    out, _ = letterbox(np.zeros((30, 50, 1), np.uint8), 16)
    assert out.shape == (16, 16, 1)
    out, _ = resize(np.zeros((30, 50, 1), np.uint8), 16)
    assert out.shape == (16, 16, 1)


def test_resize_stretches_without_padding():
    img = np.full((30, 90), 7, np.uint8)
    out, info = resize(img, 32)
    assert out.shape == (32, 32) and (out == 7).all()
    assert info.content_hw == (32, 32) and info.pad_top == info.pad_left == 0 and info.mode == "resize"
    with pytest.raises(ValueError, match="resize mode"):
        to_square(img, 32, "crop")


def test_mask_nearest_keeps_labels_and_flip_symmetry():
    cls = np.zeros((41, 67), np.uint8)
    cls[5:20, 3:30] = 1
    cls[22:38, 40:60] = 2
    out, _ = letterbox(cls, 50, MASK_INTERPOLATION)
    assert set(np.unique(out)) <= {0, 1, 2}
    # the centre-aligned nearest neighbour commutes with a horizontal flip (the corner-aligned one shifts)
    flipped, _ = letterbox(cls[:, ::-1].copy(), 50, MASK_INTERPOLATION)
    np.testing.assert_array_equal(flipped, out[:, ::-1])


@pytest.mark.parametrize("mode", ["letterbox", "resize"])
@pytest.mark.parametrize(("hw", "size"), [((471, 563), 224), ((300, 180), 256), ((40, 70), 96)])
def test_mask_round_trip_through_network_resolution(mode, hw, size):
    mask = _ellipse(*hw, cy=hw[0] * 0.55, cx=hw[1] * 0.45, ry=hw[0] * 0.2, rx=hw[1] * 0.25)
    net, info = to_square(mask.astype(np.uint8), size, mode, MASK_INTERPOLATION)
    prob = net.astype(np.float32)  # a perfect network's probabilities
    back = restore(prob, info, hw)
    assert back.shape == hw and back.dtype == np.float32
    restored = back > 0.5
    dice = 2 * (restored & mask).sum() / (restored.sum() + mask.sum())
    assert dice > 0.97
    # disagreement only next to the boundary, within the scale factor of one network pixel
    scale = max(hw[0] / info.content_hw[0], hw[1] / info.content_hw[1])
    boundary_distance = np.minimum(
        ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask)
    )
    assert boundary_distance[restored != mask].max(initial=0.0) <= scale + 1
    # integer masks come back with nearest neighbour and keep their values
    back_int = restore(net, info)
    assert back_int.dtype == np.uint8 and set(np.unique(back_int)) <= {0, 1}
    assert restore(net.astype(bool), info).dtype == np.bool_


def test_restore_crops_the_padding_away():
    hw = (120, 200)
    info = geometry_for(hw, 100, "letterbox")
    prob = np.ones((100, 100), np.float32)  # confident everywhere in the padding ...
    t, left = info.pad_top, info.pad_left
    h, w = info.content_hw
    prob[t : t + h, left : left + w] = 0.25  # ... and 0.25 on the image
    back = restore(prob, info)
    assert back.shape == hw
    np.testing.assert_allclose(back, 0.25)  # nothing of the padding leaks into the original grid


def test_restore_checks_shape_and_info_serialises():
    info = geometry_for((50, 80), 32, "letterbox")
    with pytest.raises(ValueError, match="32x32"):
        restore(np.zeros((16, 16), np.float32), info)
    assert LetterboxInfo.from_dict(info.to_dict()) == info


def test_image_round_trip_is_close():
    # smooth content survives letterbox + linear restore up to interpolation error
    yy, xx = np.mgrid[0:180, 0:260]
    img = (127 + 100 * np.sin(xx / 23.0) * np.cos(yy / 31.0)).astype(np.float32)
    net, info = letterbox(img, 128)
    back = restore(net, info)
    assert np.abs(back - img)[2:-2, 2:-2].mean() < 1.5
