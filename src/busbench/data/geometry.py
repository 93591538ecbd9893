"""Square network inputs from images of any size, and the way back.

Two modes map an ``H x W`` image to ``S x S``:

* ``letterbox`` keeps the aspect ratio: the longest side is scaled to ``S`` and the short side is padded with zeros,
  split evenly (the extra pixel, if any, goes to the bottom/right);
* ``resize`` stretches both sides to ``S``.

Both return a :class:`LetterboxInfo` that records where the image content sits in the square, so that
:func:`restore` can map a network-resolution prediction back onto the original image grid (crop the padding, resize).

Interpolation is fixed per kind of array, the same for the cache and for on-the-fly loading:

* images: ``INTER_AREA`` when shrinking (it averages, so speckle does not alias), ``INTER_LINEAR`` when enlarging;
* masks and class maps: ``INTER_NEAREST_EXACT``, i.e. the source pixel whose centre is nearest. OpenCV's older
  ``INTER_NEAREST`` samples at the pixel corner and so shifts masks by up to half a source pixel towards the
  top-left; the exact variant is symmetric, which keeps a flipped mask the flip of the resized mask;
* probability maps on the way back: ``INTER_LINEAR`` (then threshold), which gives smooth original-size contours.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import cv2
import numpy as np

ResizeMode = Literal["letterbox", "resize"]
RESIZE_MODES: tuple[str, ...] = ("letterbox", "resize")

MASK_INTERPOLATION = cv2.INTER_NEAREST_EXACT


@dataclass(frozen=True)
class LetterboxInfo:
    """Where an ``original_hw`` image lies inside its ``size x size`` network input.

    The content occupies rows ``pad_top : pad_top + content_hw[0]`` and columns ``pad_left : pad_left + content_hw[1]``;
    everything else is zero padding. In ``resize`` mode the content fills the square and the pads are 0.
    """

    mode: str
    size: int
    original_hw: tuple[int, int]
    content_hw: tuple[int, int]
    pad_top: int
    pad_left: int

    @property
    def pad_bottom(self) -> int:
        return self.size - self.pad_top - self.content_hw[0]

    @property
    def pad_right(self) -> int:
        return self.size - self.pad_left - self.content_hw[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (tuples become lists)."""
        d = asdict(self)
        d["original_hw"] = list(self.original_hw)
        d["content_hw"] = list(self.content_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LetterboxInfo:
        return cls(
            mode=str(d["mode"]),
            size=int(d["size"]),
            original_hw=(int(d["original_hw"][0]), int(d["original_hw"][1])),
            content_hw=(int(d["content_hw"][0]), int(d["content_hw"][1])),
            pad_top=int(d["pad_top"]),
            pad_left=int(d["pad_left"]),
        )


def geometry_for(original_hw: tuple[int, int], size: int, mode: str) -> LetterboxInfo:
    """The placement of an ``original_hw`` image in a ``size`` square, without touching pixels.

    It depends only on the two sizes, so datasets can answer "where is image i" from the manifest's height and width.
    """
    h, w = int(original_hw[0]), int(original_hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if size <= 0:
        raise ValueError(f"target size must be positive, got {size}")
    if mode == "resize":
        return LetterboxInfo("resize", size, (h, w), (size, size), 0, 0)
    if mode != "letterbox":
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    scale = size / max(h, w)
    new_h = min(size, max(1, round(h * scale)))
    new_w = min(size, max(1, round(w * scale)))
    return LetterboxInfo("letterbox", size, (h, w), (new_h, new_w), (size - new_h) // 2, (size - new_w) // 2)


def image_interpolation(original_hw: tuple[int, int], content_hw: tuple[int, int]) -> int:
    """``INTER_AREA`` when the image shrinks overall, ``INTER_LINEAR`` when it grows."""
    shrinking = content_hw[0] * content_hw[1] < original_hw[0] * original_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def _resize_hw(img: np.ndarray, hw: tuple[int, int], interpolation: int) -> np.ndarray:
    if img.shape[:2] == tuple(hw):
        return img.copy()
    out = cv2.resize(img, (hw[1], hw[0]), interpolation=interpolation)
    if img.ndim == 3 and out.ndim == 2:  # cv2 drops a trailing channel axis of length 1
        out = out[:, :, None]
    return out


def place(img: np.ndarray, info: LetterboxInfo, interpolation: int) -> np.ndarray:
    """Resize ``img`` to ``info.content_hw`` and put it into a zero ``size x size`` canvas at ``info``'s offset."""
    if img.shape[:2] != info.original_hw:
        raise ValueError(f"array is {img.shape[:2]}, the geometry was computed for {info.original_hw}")
    content = _resize_hw(img, info.content_hw, interpolation)
    if info.content_hw == (info.size, info.size):
        return np.ascontiguousarray(content)
    out = np.zeros((info.size, info.size, *img.shape[2:]), dtype=img.dtype)
    h, w = info.content_hw
    out[info.pad_top : info.pad_top + h, info.pad_left : info.pad_left + w] = content
    return out


def letterbox(
    img: np.ndarray, size: int, interpolation: int | None = None
) -> tuple[np.ndarray, LetterboxInfo]:
    """Scale the longest side to ``size`` keeping the aspect ratio, pad the rest with 0 symmetrically.

    ``interpolation`` defaults to the image rule (area when shrinking, linear when enlarging); pass
    ``MASK_INTERPOLATION`` for masks. Works on ``(H, W)`` and ``(H, W, C)`` arrays of any dtype cv2 resizes.
    """
    info = geometry_for(img.shape[:2], size, "letterbox")
    if interpolation is None:
        interpolation = image_interpolation(info.original_hw, info.content_hw)
    return place(img, info, interpolation), info


def resize(img: np.ndarray, size: int, interpolation: int | None = None) -> tuple[np.ndarray, LetterboxInfo]:
    """Stretch both sides to ``size`` (aspect ratio not kept); same interpolation defaults as :func:`letterbox`."""
    info = geometry_for(img.shape[:2], size, "resize")
    if interpolation is None:
        interpolation = image_interpolation(info.original_hw, info.content_hw)
    return place(img, info, interpolation), info


def to_square(
    img: np.ndarray, size: int, mode: str, interpolation: int | None = None
) -> tuple[np.ndarray, LetterboxInfo]:
    """:func:`letterbox` or :func:`resize` by name (``data.resize``)."""
    if mode == "letterbox":
        return letterbox(img, size, interpolation)
    if mode == "resize":
        return resize(img, size, interpolation)
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def restore(
    prob_or_mask: np.ndarray, info: LetterboxInfo, original_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Map a network-resolution map back onto the original image grid.

    The padding is cropped away, then the content is resized to ``original_hw`` (default ``info.original_hw``):
    floating-point input (probabilities, logits) with ``INTER_LINEAR`` and keeps its dtype; boolean or integer input
    (masks, class maps) with nearest-neighbour, keeping its values. Accepts ``(S, S)`` or ``(S, S, C)`` arrays.
    """
    arr = np.asarray(prob_or_mask)
    if arr.shape[:2] != (info.size, info.size):
        raise ValueError(f"expected a {info.size}x{info.size} map, got shape {arr.shape}")
    target = tuple(int(v) for v in (original_hw or info.original_hw))
    h, w = info.content_hw
    content = arr[info.pad_top : info.pad_top + h, info.pad_left : info.pad_left + w]
    if arr.dtype == np.bool_:
        return _resize_hw(content.astype(np.uint8), target, MASK_INTERPOLATION).astype(bool)
    if np.issubdtype(arr.dtype, np.floating):
        work = content.astype(np.float32, copy=False)
        return _resize_hw(work, target, cv2.INTER_LINEAR).astype(arr.dtype, copy=False)
    if arr.dtype in (np.uint8, np.uint16, np.int16, np.int32):
        return _resize_hw(np.ascontiguousarray(content), target, MASK_INTERPOLATION)
    work = np.ascontiguousarray(content).astype(np.int32)
    return _resize_hw(work, target, MASK_INTERPOLATION).astype(arr.dtype)
