"""Decoding one manifest row into network-size uint8 arrays.

This is the single definition of "the pixels a model sees before augmentation": the on-the-fly loader calls it for
every sample and the cache stores exactly its output, so the two paths cannot drift apart.

Images are read with OpenCV as stored (``IMREAD_UNCHANGED``) and brought to 8-bit RGB whatever the file holds:
grey or 1-bit PNGs are replicated to three channels, alpha (RGBA, grey+alpha) is dropped, palette PNGs are expanded,
16-bit files are rescaled to 8 bits. For ``channels=1`` the RGB image is converted with OpenCV's BT.601 grey weights,
so colour overlays present in a few BUSI images become grey like the rest.

Masks are the manifest's derived 0/255 binary PNGs; the class map (0 background, 1 benign lesion, 2 malignant) comes
from ``class_mask_path`` when the manifest has it, otherwise from the binary mask and the row's label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from busbench.data.geometry import MASK_INTERPOLATION, LetterboxInfo, geometry_for, image_interpolation, place
from busbench.errors import DataError

LABELS: tuple[str, ...] = ("normal", "benign", "malignant")
LABEL_CODES: dict[str, int] = {name: i for i, name in enumerate(LABELS)}


def _imread(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; re-run `busbench prepare` or point data.data_root at the right folder"
        )
    # imdecode of the bytes instead of imread(path): works for non-ASCII paths on every platform
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise DataError(
            f"{path} could not be decoded as an image; replace the file or re-run `busbench prepare`"
        )
    return img


def _to_uint8(img: np.ndarray, path: str | Path) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return np.round(img.astype(np.float32) / 257.0).astype(np.uint8)
    raise DataError(f"{path} has pixel type {img.dtype}; expected 8- or 16-bit PNG")


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """Read an image file as ``(H, W, channels)`` uint8: RGB for 3, BT.601 grey for 1 (see module docstring)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = _to_uint8(_imread(path), path)
    if img.ndim == 2:
        grey = img
        return grey[:, :, None] if channels == 1 else np.repeat(grey[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise DataError(f"{path} has an unsupported channel layout {img.shape}; expected grey, RGB or RGBA")
    if img.shape[2] == 1:
        grey = img[:, :, 0]
        return grey[:, :, None] if channels == 1 else np.repeat(grey[:, :, None], 3, axis=2)
    bgr = img[:, :, :3]  # alpha carries no image content in ultrasound exports
    if channels == 1:
        return cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2GRAY)[:, :, None]
    return cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2RGB)


def _read_single_channel(path: str | Path) -> np.ndarray:
    img = _to_uint8(_imread(path), path)
    if img.ndim == 3:
        img = img[:, :, :3].max(axis=2) if img.shape[2] >= 3 else img[:, :, 0]
    return img


def read_label_image(path: str | Path) -> np.ndarray:
    """A mask or label map as uint8 ``(H, W)``, whatever its encoding (grey, RGB: the channel maximum; 16-bit)."""
    return _read_single_channel(path)


def read_mask(path: str | Path) -> np.ndarray:
    """A derived binary mask as a boolean ``(H, W)`` array (stored 0/255; any colour channel counts)."""
    raw = _read_single_channel(path)
    peak = int(raw.max())
    if 0 < peak < 128:
        raise DataError(
            f"{path} holds values up to {peak}, not a 0/255 mask; re-run `busbench prepare` to regenerate the derived masks"
        )
    return raw > 127


def read_class_map(path: str | Path) -> np.ndarray:
    """A derived class map (0 background, 1 benign, 2 malignant) as uint8 ``(H, W)``."""
    raw = _read_single_channel(path)
    if int(raw.max()) > 2:
        raise DataError(
            f"{path} holds value {int(raw.max())}; a class map must hold 0/1/2 only. Re-run `busbench prepare`"
        )
    return raw


def _present(value: Any) -> bool:
    return isinstance(value, (str, Path)) and str(value) != "" and str(value).lower() != "nan"


def decode_row(row: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(H, W, C)`` uint8 and class map ``(H, W)`` uint8 of one manifest row with absolute paths.

    Checks what a stale or hand-edited manifest would break: image, mask and class map must share the manifest's
    ``height``/``width``, and the class map's lesion pixels must be exactly the binary mask's.
    """
    image = read_image(row["image_path"], channels)
    mask = read_mask(row["mask_path"])
    expected = (int(row["height"]), int(row["width"]))
    for name, arr, path in (("image", image, row["image_path"]), ("mask", mask, row["mask_path"])):
        if arr.shape[:2] != expected:
            raise DataError(
                f"{path}: {name} is {arr.shape[0]}x{arr.shape[1]} but the manifest says {expected[0]}x{expected[1]} "
                f"for sample {row['sample_id']}; re-run `busbench prepare` to rebuild the manifest"
            )
    class_path = row.get("class_mask_path") if hasattr(row, "get") else None
    if _present(class_path):
        class_map = read_class_map(class_path)
        if class_map.shape != mask.shape or not np.array_equal(class_map > 0, mask):
            raise DataError(
                f"{class_path} does not match the binary mask {row['mask_path']} (lesion pixels differ); "
                "re-run `busbench prepare` to regenerate both"
            )
    else:
        label = str(row["label"])
        if label not in LABEL_CODES:
            raise DataError(
                f"sample {row['sample_id']} has label {label!r}; expected one of {', '.join(LABELS)}"
            )
        code = LABEL_CODES[label]
        if code == 0 and mask.any():
            raise DataError(
                f"{row['mask_path']}: sample {row['sample_id']} is labelled normal but its mask has lesion pixels; "
                "fix the label or the mask and re-run `busbench prepare`"
            )
        class_map = mask.astype(np.uint8) * np.uint8(code)
    return image, class_map


def square_row(row: Any, size: int, mode: str, channels: int) -> tuple[np.ndarray, np.ndarray, LetterboxInfo]:
    """``(S, S, C)`` image, ``(S, S)`` class map and placement of one row: the pre-augmentation network input."""
    image, class_map = decode_row(row, channels)
    image_sq, info = square_image(image, size, mode)
    class_sq = place(class_map, info, MASK_INTERPOLATION)
    return image_sq, class_sq, info


def square_image(image: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, LetterboxInfo]:
    """A decoded ``(H, W, C)`` image as the ``(S, S, C)`` network input (``data.resize`` mode) and its placement."""
    info = geometry_for(image.shape[:2], size, mode)
    return place(image, info, image_interpolation(info.original_hw, info.content_hw)), info
