"""Synthetic breast-ultrasound datasets written in the exact raw layouts of the six public datasets.

The images are built the way B-mode ultrasound forms an image, so that segmentation models and duplicate
detectors see something BUS-like rather than noise:

- a layered tissue map (bright skin line, darker subcutaneous fat, heterogeneous glandular tissue, dark chest
  wall), with large-scale texture;
- hypoechoic lesions: smooth or lobulated ellipses for benign, irregular, angular, taller-than-wide outlines for
  malignant; posterior acoustic shadowing below malignant lesions and posterior enhancement below cyst-like benign
  ones;
- depth attenuation partly compensated by time-gain compensation, a bright near-field band at the top;
- multiplicative fully developed speckle (Rayleigh amplitude), smoothed anisotropically like a real point-spread
  function, then log compression to 8 bits.

Each layout reproduces the facts recorded in :mod:`busbench.data.layouts` (shared with the adapters): file names, folder nesting, metadata tables
(encodings, BOMs, separators, header spellings), mask encodings (1-bit, L, RGB, RGBA, colour-coded) and the
known quirks (BUSI multi-mask cases, colour overlays and duplicate images across classes; BUSBRA -l/-r pairs and
a Height that disagrees with the pixels; BUS-UC's 1-px image/mask mismatch; BUS-UCLM's BOM-prefixed INFO.csv,
stray ``Y`` and RGBA HESN images of another size than their masks; Yap2018's text ids and legend columns).

Output is deterministic: the same layout, ``n`` and seed give byte-identical files (PNG carries no timestamps,
and the xlsx zip is rewritten with fixed entry dates and document properties).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import math
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from busbench.atomic import replace_dir, staging_dir
from busbench.data import layouts as L
from busbench.errors import ConfigError, DataError

MIN_N: dict[str, int] = {
    "busi": 16,  # enough images per class for every BUSI quirk
    "curated_busi": 6,
    "busbra": 20,  # at least 10 patients, so that every fold of 10-fold-cv.csv has a test patient
    "bus_uc": 4,
    "bus_uclm": 12,
    "yap2018": 4,
}

FIXED_TIME = datetime(2020, 1, 1, 0, 0, 0)


# ----------------------------------------------------------------------------------------------- image model


@dataclass(frozen=True)
class _Lesion:
    cy: float
    cx: float
    ry: float
    rx: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase) of the boundary radius
    malignant: bool
    echo: float  # interior echogenicity relative to the surrounding tissue
    posterior: float  # < 1 shadowing, > 1 enhancement


def _make_lesion(rng: np.random.Generator, h: int, w: int, malignant: bool) -> _Lesion:
    ry = rng.uniform(0.09, 0.17) * h
    if malignant:
        rx = ry * rng.uniform(0.75, 1.15)  # taller-than-wide or round
        # Irregular, angular margin: many harmonics with amplitudes decaying slowly with order.
        orders = np.arange(2, 18)
        amps = rng.normal(0.0, 0.11, size=orders.size) / orders**0.6
        harmonics = tuple(
            (int(k), float(abs(a)), float(rng.uniform(0, 2 * math.pi)))
            for k, a in zip(orders, amps, strict=True)
        )
        echo = rng.uniform(0.1, 0.25)
        posterior = rng.uniform(0.3, 0.6)
    else:
        rx = ry * rng.uniform(1.2, 1.9)  # wider-than-tall, parallel to the skin
        if rng.random() < 0.5:  # gently lobulated
            harmonics = (
                (int(rng.integers(2, 5)), float(rng.uniform(0.06, 0.12)), float(rng.uniform(0, 6.28))),
            )
        else:
            harmonics = ((2, float(rng.uniform(0.0, 0.05)), float(rng.uniform(0, 6.28))),)
        cyst = rng.random() < 0.4
        echo = rng.uniform(0.03, 0.1) if cyst else rng.uniform(0.2, 0.4)
        posterior = rng.uniform(1.3, 1.7) if cyst else rng.uniform(0.9, 1.1)
    rx = min(rx, 0.3 * w)
    cy = rng.uniform(0.3 * h + ry, 0.75 * h)
    cy = min(cy, 0.8 * h - ry)
    cx = rng.uniform(rx + 0.08 * w, w - rx - 0.08 * w)
    return _Lesion(cy, cx, ry, rx, float(rng.uniform(-0.3, 0.3)), harmonics, malignant, echo, posterior)


def _lesion_mask(lesion: _Lesion, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - lesion.cy, xx - lesion.cx
    c, s = math.cos(lesion.angle), math.sin(lesion.angle)
    u, v = (c * dx + s * dy) / lesion.rx, (-s * dx + c * dy) / lesion.ry
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    rho = np.ones_like(r)
    for order, amp, phase in lesion.harmonics:
        rho += amp * np.cos(order * theta + phase)
    mask = r <= np.maximum(rho, 0.4)
    return ndimage.binary_fill_holes(mask)


def _render_scene(
    rng: np.random.Generator, h: int, w: int, lesions: list[_Lesion]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Grey uint8 image with the given lesions, and one boolean mask per lesion."""
    y = np.arange(h, dtype=np.float64)[:, None] / h
    x = np.arange(w, dtype=np.float64)[None, :] / w

    def undulation(scale: float) -> np.ndarray:
        phase, freq = rng.uniform(0, 2 * math.pi, 2), rng.uniform(0.5, 2.5, 2)
        return scale * (
            np.sin(2 * math.pi * freq[0] * x + phase[0]) + 0.5 * np.sin(2 * math.pi * freq[1] * x + phase[1])
        )

    skin = rng.uniform(0.04, 0.07) + undulation(0.005)
    fat_end = rng.uniform(0.18, 0.32) + undulation(0.03)
    gland_end = rng.uniform(0.72, 0.88) + undulation(0.03)
    echo = np.where(y < skin, 1.0, np.where(y < fat_end, 0.35, np.where(y < gland_end, 0.7, 0.22)))
    echo = ndimage.gaussian_filter(echo, sigma=1.0)
    texture = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=(h / 30, w / 15))
    echo = echo * np.exp(0.9 * texture / (texture.std() + 1e-9) * 0.35)

    masks = []
    for lesion in lesions:
        mask = _lesion_mask(lesion, h, w)
        masks.append(mask)
        soft = ndimage.gaussian_filter(mask.astype(np.float64), sigma=0.8)
        echo = echo * (1 - soft * (1 - lesion.echo))
        # Posterior acoustic feature: a column below the lesion, fading with depth and at its sides.
        cols = mask.any(axis=0).astype(np.float64)
        if cols.any():
            cols = ndimage.gaussian_filter1d(cols, sigma=max(1.0, 0.03 * w))
            rows_any = np.nonzero(mask.any(axis=1))[0]
            bottom = rows_any.max() / h
            ramp = np.clip((y - bottom) * 10, 0, 1)
            # Shadowing persists to the bottom of the image; enhancement fades with depth.
            below = ramp if lesion.posterior < 1 else ramp * np.exp(-np.clip(y - bottom, 0, None) * 2.0)
            echo = echo * (1 + (lesion.posterior - 1) * below * cols[None, :])

    # Near-field reverberation band, depth attenuation with partial time-gain compensation.
    echo = echo + 0.5 * np.exp(-y / 0.03)
    attenuation = np.exp(-rng.uniform(1.2, 2.0) * y) * (1 + rng.uniform(0.3, 0.7) * y)
    intensity = echo * attenuation
    speckle = rng.rayleigh(scale=1.0, size=(h, w)) / math.sqrt(math.pi / 2)
    speckle = ndimage.gaussian_filter(speckle, sigma=(0.45, 0.9))
    speckle = speckle / speckle.mean()
    intensity = intensity * speckle
    gain = rng.uniform(6.0, 10.0)
    img = np.log1p(gain * intensity) / math.log1p(gain * 1.6)
    img = np.clip(img * rng.uniform(215, 245), 0, 255)
    return np.round(img).astype(np.uint8), masks


def render_bus_image(
    rng: np.random.Generator, height: int, width: int, lesion: bool, *, malignant: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic B-mode image (uint8, H x W) and its lesion mask (bool, H x W; empty when ``lesion`` is False).

    ``malignant`` selects an irregular outline with posterior shadowing instead of a smooth or lobulated one.
    """
    if height < 16 or width < 16:
        raise ConfigError(f"synthetic images must be at least 16x16 pixels, got {height}x{width}")
    lesions = [_make_lesion(rng, height, width, malignant)] if lesion else []
    img, masks = _render_scene(rng, height, width, lesions)
    mask = masks[0] if masks else np.zeros((height, width), dtype=bool)
    return img, mask


def _two_lesions(
    rng: np.random.Generator, h: int, w: int, malignant: bool, overlap: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image with two lesions and their two masks: disjoint, or overlapping (a second outline on the same mass)."""
    first = _make_lesion(rng, h, w, malignant)
    for _ in range(50):
        if overlap:
            second = _Lesion(
                first.cy + rng.uniform(-0.3, 0.3) * first.ry,
                first.cx + rng.uniform(0.4, 0.8) * first.rx,
                first.ry * rng.uniform(0.6, 0.9),
                first.rx * rng.uniform(0.5, 0.8),
                first.angle,
                first.harmonics,
                malignant,
                first.echo,
                first.posterior,
            )
        else:
            second = _make_lesion(rng, h, w, malignant)
        m1, m2 = _lesion_mask(first, h, w), _lesion_mask(second, h, w)
        inter = (m1 & m2).sum()
        if (overlap and 0 < inter < min(m1.sum(), m2.sum())) or (not overlap and inter == 0 and m2.sum() > 0):
            break
    else:  # pragma: no cover - geometry always allows one of the 50 tries
        raise RuntimeError("could not place two lesions")
    img, masks = _render_scene(rng, h, w, [first, second])
    return img, masks[0], masks[1]


def _grey_to_rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[..., None], 3, axis=2)


def _draw_markers(
    rng: np.random.Generator, rgb: np.ndarray, colour: tuple[int, int, int], count: int = 3
) -> None:
    """Caliper crosses and a short measurement line in colour, as scanners burn into exported frames."""
    h, w = rgb.shape[:2]
    for _ in range(count):
        cy, cx = int(rng.integers(4, h - 4)), int(rng.integers(4, w - 4))
        rgb[cy, cx - 3 : cx + 4] = colour
        rgb[cy - 3 : cy + 4, cx] = colour
    row = int(rng.integers(2, max(3, h // 6)))
    rgb[row, w // 4 : w // 2 : 2] = colour


def _doppler_blob(rng: np.random.Generator, rgb: np.ndarray) -> None:
    """A colour-Doppler box with red and blue flow patches."""
    h, w = rgb.shape[:2]
    y0, x0 = int(rng.integers(h // 5, h // 2)), int(rng.integers(w // 5, w // 2))
    bh, bw = h // 4, w // 4
    flow = ndimage.gaussian_filter(rng.standard_normal((bh, bw)), sigma=2)
    flow = flow / (np.abs(flow).max() + 1e-9)
    patch = rgb[y0 : y0 + bh, x0 : x0 + bw]
    red, blue = flow > 0.35, flow < -0.35
    patch[red] = (
        np.stack([200 + 55 * flow[red], 30 * np.ones(red.sum()), 20 * np.ones(red.sum())], -1)
    ).astype(np.uint8)
    patch[blue] = (
        np.stack([20 * np.ones(blue.sum()), 60 * np.ones(blue.sum()), 200 - 55 * flow[blue]], -1)
    ).astype(np.uint8)
    rgb[y0, x0 : x0 + bw] = rgb[y0 + bh - 1, x0 : x0 + bw] = (230, 230, 230)
    rgb[y0 : y0 + bh, x0] = rgb[y0 : y0 + bh, x0 + bw - 1] = (230, 230, 230)


# ---------------------------------------------------------------------------------------------- file writers


def _save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    """PNG without timestamps: PIL writes none unless asked, so the bytes depend only on the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    image.save(path, format="PNG")


def _mask_as(mask: np.ndarray, mode: str) -> Image.Image:
    """A boolean mask in one of the encodings found in the wild: 1-bit, L/RGB/RGBA 0/255 (alpha all-on)."""
    if mode == "1":
        return Image.fromarray(mask)
    grey = mask.astype(np.uint8) * 255
    if mode == "L":
        return Image.fromarray(grey)
    if mode == "RGB":
        return Image.fromarray(_grey_to_rgb(grey))
    if mode == "RGBA":
        return Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)]))
    raise ValueError(mode)


def _save_mask(path: Path, mask: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _mask_as(mask, mode).save(path, format="PNG")


def _write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))


def _csv_text(rows: list[list[str]], delimiter: str = ",", newline: str = "\n") -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator=newline, quoting=csv.QUOTE_MINIMAL)
    writer.writerows(rows)
    return buf.getvalue()


def _split_counts(n: int, weights: tuple[float, ...], minimum: tuple[int, ...]) -> list[int]:
    """Counts per class proportional to ``weights``, each at least its minimum, summing to ``n``."""
    total = sum(weights)
    counts = [max(m, round(n * w / total)) for w, m in zip(weights, minimum, strict=True)]
    counts[0] += n - sum(counts)
    if counts[0] < minimum[0]:  # pragma: no cover - guarded by MIN_N
        raise ConfigError(f"--n {n} is too small for this layout")
    return counts


def _size(rng: np.random.Generator, h_range: tuple[int, int], w_range: tuple[int, int]) -> tuple[int, int]:
    return int(rng.integers(h_range[0], h_range[1] + 1)), int(rng.integers(w_range[0], w_range[1] + 1))


# BUSI ---------------------------------------------------------------------------------------------------------


def _write_busi(root: Path, rng: np.random.Generator, n: int) -> Path:
    """Dataset_BUSI_with_GT/{benign,malignant,normal}/ with every quirk of the real download.

    benign 2: two disjoint lesions, ``_mask_1`` stored RGBA (like benign 4 and 54);
    benign 3: three masks, ``_mask_1`` overlapping ``_mask`` (like benign 195);
    benign 4 and malignant 2 and normal 1: colour overlays; benign 5: an L-mode mask;
    malignant 1: ``_mask_1`` overlapping ``_mask`` (like malignant 53);
    malignant 3: byte-identical copy of benign 7 (image and mask) -> a cross-label duplicate;
    the last benign image: benign 6 resized by about 0.9 and re-encoded through JPEG -> a near duplicate.
    """
    base = root / L.BUSI_ARCHIVE_DIR
    n_benign, n_malignant, n_normal = _split_counts(n, (437, 210, 133), (8, 4, 3))

    def size() -> tuple[int, int]:
        return _size(rng, (96, 180), (110, 200))

    images: dict[tuple[str, int], np.ndarray] = {}
    masks: dict[tuple[str, int], list[tuple[np.ndarray, str]]] = {}
    for cls, count in (("benign", n_benign), ("malignant", n_malignant), ("normal", n_normal)):
        for i in range(1, count + 1):
            h, w = size()
            if cls == "normal":
                img, mask = render_bus_image(rng, h, w, lesion=False)
                masks[cls, i] = [(mask, "RGB")]
            elif (cls, i) in (("benign", 2),):
                img, m0, m1 = _two_lesions(rng, h, w, malignant=False, overlap=False)
                masks[cls, i] = [(m0, "1"), (m1, "RGBA")]
            elif (cls, i) == ("benign", 3):
                img, m0, m1 = _two_lesions(rng, h, w, malignant=False, overlap=True)
                other = _make_lesion(rng, h, w, malignant=False)
                m2 = _lesion_mask(other, h, w) & ~(m0 | m1)
                masks[cls, i] = [(m0, "1"), (m1, "1"), (m2, "1")]
            elif (cls, i) == ("malignant", 1):
                img, m0, m1 = _two_lesions(rng, h, w, malignant=True, overlap=True)
                masks[cls, i] = [(m0, "1"), (m1, "1")]
            else:
                img, mask = render_bus_image(rng, h, w, lesion=True, malignant=cls == "malignant")
                masks[cls, i] = [(mask, "L" if (cls, i) == ("benign", 5) else "1")]
            rgb = _grey_to_rgb(img)
            if (cls, i) in (("benign", 4), ("malignant", 2), ("normal", 1)):
                _draw_markers(rng, rgb, colour=(255, 255, 0) if cls != "normal" else (0, 255, 255))
            images[cls, i] = rgb

    # Duplicates: an exact cross-label copy and a resized, re-encoded same-label copy.
    images["malignant", 3] = images["benign", 7].copy()
    masks["malignant", 3] = [(m.copy(), mode) for m, mode in masks["benign", 7]]
    src = images["benign", 6]
    h, w = src.shape[:2]
    nh, nw = round(h * 0.9), round(w * 0.9)
    small = Image.fromarray(src).resize((nw, nh), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=90)
    images["benign", n_benign] = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    masks["benign", n_benign] = [
        (np.array(Image.fromarray(m).resize((nw, nh), Image.Resampling.NEAREST)), mode)
        for m, mode in masks["benign", 6]
    ]

    for (cls, i), rgb in images.items():
        _save_png(base / cls / L.busi_image_name(cls, i), rgb)
        for k, (mask, mode) in enumerate(masks[cls, i]):
            _save_mask(base / cls / L.busi_mask_name(cls, i, k), mask, mode)
    return base


# Curated BUSI (Zenodo) ------------------------------------------------------------------------------------------


def _keep_list() -> dict[str, list[int]]:
    """The published Curated BUSI keep-list shipped in the package: class -> sorted BUSI ids."""
    text = (Path(__file__).parent / L.CURATED_KEEP_LIST).read_text(encoding="utf-8")
    ids: dict[str, list[int]] = {}
    for row in list(csv.reader(io.StringIO(text), delimiter=";"))[1:]:
        ids.setdefault(row[0], []).append(int(row[1]))
    return {cls: sorted(v) for cls, v in ids.items()}


def _write_curated_busi(root: Path, rng: np.random.Generator, n: int) -> Path:
    """Curated BUSI/{images,masks}/ at 128x128 grey, ids taken from the published keep-list.

    Masks are L; one benign mask holds the published script's uint8-sum overlap value 254 beside 255.
    """
    base = root / L.CURATED_ARCHIVE_DIR
    keep = _keep_list()
    counts = _split_counts(n, (222, 164, 64), (2, 2, 2))
    size = L.CURATED_SIZE
    for (cls, ids), count in zip(
        (("benign", keep["benign"]), ("malignant", keep["malignant"]), ("normal", keep["normal"])),
        counts,
        strict=True,
    ):
        for j, busi_id in enumerate(ids[:count]):
            if cls == "benign" and j == 1:
                img, m0, m1 = _two_lesions(rng, size, size, malignant=False, overlap=True)
                mask = (m0.astype(np.uint16) * 255 + m1.astype(np.uint16) * 255) % 256
                mask = mask.astype(np.uint8)
            else:
                img, m = render_bus_image(
                    rng, size, size, lesion=cls != "normal", malignant=cls == "malignant"
                )
                mask = m.astype(np.uint8) * 255
            _save_png(base / "images" / L.curated_image_name(cls, busi_id), img)
            _save_png(base / "masks" / L.curated_mask_name(cls, busi_id), mask)
    return base


# BUS-BRA -----------------------------------------------------------------------------------------------------------

_BUSBRA_HISTOLOGY = {
    "benign": (
        "fibroadenoma",
        "fibroadenoma",
        "cyst",
        "sclerosing adenosis",
        "fibrocystic changes",
        "lipoma",
    ),
    "malignant": (
        "invasive ductal carcinoma",
        "invasive ductal carcinoma",
        "invasive lobular carcinoma",
        "papillary carcinoma",
    ),
}
_BUSBRA_DEVICES = ("GE Logiq 7 @10-14MHz", "GE Logiq 7 @10-14MHz", "Toshiba Aplio 300 @7-14MHz")


def _fold_assignment(rng: np.random.Generator, cases: dict[int, str], k: int) -> dict[int, int]:
    """Patient -> test fold 1..k, stratified by pathology (deal shuffled patients of each class round-robin)."""
    folds: dict[int, int] = {}
    offset = 0
    for pathology in ("benign", "malignant"):
        group = sorted(c for c, p in cases.items() if p == pathology)
        order = rng.permutation(len(group))
        for j, idx in enumerate(order):
            folds[group[idx]] = (j + offset) % k + 1
        offset += len(group)
    return folds


def _fold_csv(
    rng: np.random.Generator, rows: list[tuple[str, int, str]], folds: dict[int, int], k: int
) -> str:
    """``ID,Pathology,kFold,valid_1..valid_k``; 1 train, 0 validation (image-level), literal NaN for test rows."""
    table = [["ID", "Pathology", "kFold"] + [f"valid_{j}" for j in range(1, k + 1)]]
    for sample_id, case, pathology in rows:
        fold = folds[case]
        flags = ["NaN" if j == fold else ("0" if rng.random() < 0.2 else "1") for j in range(1, k + 1)]
        table.append([sample_id, pathology, str(fold), *flags])
    return _csv_text(table)


def _write_busbra(root: Path, rng: np.random.Generator, n: int) -> Path:
    """BUSBRA/{Images,Masks,bus_data.csv,5-fold-cv.csv,10-fold-cv.csv,LICENSE.txt}.

    Patients have either an -l/-r pair or one -s image; grey 8-bit images, 1-bit masks; the third row of
    bus_data.csv states a Height 3 px off the pixels, like the real table's disagreements.
    """
    base = root / L.BUSBRA_ARCHIVE_DIR
    n_patients = max(10, round(n / 1.76))  # real ratio: 1875 images / 1064 patients
    n_pairs = n - n_patients
    singles = set((rng.permutation(n_patients)[: n_patients - n_pairs] + 1).tolist())
    pathology = {c: ("malignant" if rng.random() < 0.32 else "benign") for c in range(1, n_patients + 1)}
    pathology[1], pathology[2] = "malignant", "benign"
    data = [list(L.BUSBRA_COLUMNS)]
    ids: list[tuple[str, int, str]] = []
    for case in range(1, n_patients + 1):
        path = pathology[case]
        sides = ["s"] if case in singles else ["l", "r"]
        h, w = _size(rng, (100, 160), (90, 140))
        histology = str(rng.choice(_BUSBRA_HISTOLOGY[path]))
        birads = str(rng.choice([4, 5] if path == "malignant" else [2, 3, 4]))
        device = str(rng.choice(_BUSBRA_DEVICES))
        for side in sides:
            sample_id = f"bus_{case:04d}-{side}"
            sw = w + int(rng.integers(-2, 3))
            img, mask = render_bus_image(rng, h, sw, lesion=True, malignant=path == "malignant")
            _save_png(base / "Images" / f"{sample_id}.png", img)
            _save_mask(base / "Masks" / L.busbra_mask_name(sample_id), mask, "1")
            ys, xs = np.nonzero(mask)
            bbox = f"[{xs.min() + 1},{ys.min() + 1},{xs.max() - xs.min()},{ys.max() - ys.min()}]"
            height = h + 3 if len(ids) == 2 else h
            data.append(
                [
                    sample_id,
                    str(case),
                    histology,
                    path,
                    birads,
                    device,
                    str(sw),
                    str(height),
                    L.BUSBRA_SIDES[side],
                    bbox,
                ]
            )
            ids.append((sample_id, case, path))
    _write_text(base / L.BUSBRA_DATA_CSV, _csv_text(data))
    for k, name in L.BUSBRA_FOLD_FILES.items():
        folds = _fold_assignment(rng, pathology, k)
        _write_text(base / name, _fold_csv(rng, ids, folds, k))
    _write_text(
        base / "LICENSE.txt",
        "Synthetic data written by busbench in the BUS-BRA layout; it holds no patient data and may be used freely.\n"
        "The real BUS-BRA dataset ships its own LICENSE.txt here, which asks users to cite the BUS-BRA paper.\n",
    )
    return base


# BUS-UC -------------------------------------------------------------------------------------------------------------


def _write_bus_uc(root: Path, rng: np.random.Generator, n: int) -> Path:
    """BUS_UC/BUS_UC/{All,Benign,Malignant}/{images,masks}/ with names "0"+number, L images, 0/255 masks.

    One malignant mask is one pixel wider than its image, as in a published mirror.
    """
    base = root.joinpath(*L.BUS_UC_ARCHIVE_DIRS)
    n_benign, n_malignant = _split_counts(n, (358, 453), (2, 2))
    number = 0
    for folder, count in (("Benign", n_benign), ("Malignant", n_malignant)):
        for i in range(count):
            number += 1
            name = f"0{number}.png"
            h, w = _size(rng, (118, 136), (118, 136))
            img, mask = render_bus_image(rng, h, w, lesion=True, malignant=folder == "Malignant")
            grey = mask.astype(np.uint8) * 255
            if folder == "Malignant" and i == 0:
                grey = np.concatenate([grey, grey[:, -1:]], axis=1)
            for sub in (folder, L.BUS_UC_UNION):
                _save_png(base / sub / "images" / name, img)
                _save_png(base / sub / "masks" / name, grey)
    return base


# BUS-UCLM ----------------------------------------------------------------------------------------------------------


def _patient_codes(rng: np.random.Generator, count: int, reserved: set[str]) -> list[str]:
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    codes: set[str] = set()
    while len(codes) < count:
        code = "".join(rng.choice(letters, 4))
        if code not in reserved:
            codes.add(code)
    return sorted(codes)


def _write_bus_uclm(root: Path, rng: np.random.Generator, n: int) -> Path:
    """BUS-UCLM.../BUS-UCLM/{images,masks,INFO.csv}: blue-tinted RGB images, exact-colour RGB masks.

    INFO.csv is UTF-8 with BOM, ';'-separated, LF, capitalised labels, one stray "Y" in Doppler. The HESN
    patient's images are RGBA and smaller than their masks, while INFO.csv gives the standard Resolution.
    """
    base = root.joinpath(*L.UCLM_ARCHIVE_DIRS)
    std_h, std_w = 113, 160  # 606 x 856 scaled down, same aspect
    n_hesn = 3
    n_other = n - n_hesn
    n_patients = max(
        3, n_other // 3
    )  # a few images per patient, so patient-grouped splits have groups to use
    codes = _patient_codes(rng, n_patients, {"HESN"})
    per_patient = [n_other // n_patients + (1 if j < n_other % n_patients else 0) for j in range(n_patients)]
    plan: list[tuple[str, int, str]] = []  # (patient, index, label)
    for code, count in zip(codes, per_patient, strict=True):
        for idx in range(count):
            plan.append((code, idx, str(rng.choice(["normal", "benign", "malignant"], p=[0.6, 0.26, 0.14]))))
    # Every label present, and the first patient with both benign and malignant images.
    plan[0] = (plan[0][0], 0, "benign")
    plan[1] = (plan[1][0], 1, "malignant")
    plan[2] = (plan[2][0], 2, "normal")
    plan += [("HESN", idx, lab) for idx, lab in enumerate(["benign", "normal", "malignant"])]
    plan.sort()

    rows = [list(L.UCLM_COLUMNS)]
    colour = {"benign": (0, 255, 0), "malignant": (255, 0, 0)}
    lesion_rows = [j for j, p in enumerate(plan) if p[2] != "normal" and p[0] != "HESN"]
    doppler_rows = set(lesion_rows[:2])
    stray_y = lesion_rows[1]
    combined_row = lesion_rows[0]
    for j, (code, idx, label) in enumerate(plan):
        name = f"{code}_{idx:03d}.png"
        hesn = code == "HESN"
        h, w = (int(rng.integers(88, 93)), int(rng.integers(114, 149))) if hesn else (std_h, std_w)
        img, mask = render_bus_image(rng, h, w, lesion=label != "normal", malignant=label == "malignant")
        rgb = np.dstack([img * 0.92, img * 0.97, np.minimum(img * 1.08 + 4, 255)]).round().astype(np.uint8)
        doppler = j in doppler_rows
        marks = doppler or (label != "normal" and rng.random() < 0.4)
        if doppler:
            _doppler_blob(rng, rgb)
        if marks:
            _draw_markers(rng, rgb, colour=(255, 255, 120))
        if hesn:
            rgb = np.dstack([rgb, np.full((h, w), 255, np.uint8)])
            mask = np.array(Image.fromarray(mask).resize((std_w, std_h), Image.Resampling.NEAREST))
        coded = np.zeros((std_h, std_w, 3), np.uint8)
        if label != "normal":
            coded[mask] = colour[label]
        _save_png(base / "images" / name, rgb)
        _save_png(base / "masks" / name, coded)
        doppler_text = ("Y" if j == stray_y else "Yes") if doppler else "No"
        rows.append(
            [
                name,
                f"{std_w}x{std_h}",
                label.capitalize(),
                doppler_text,
                "Yes" if marks else "No",
                "Yes" if j == combined_row else "No",
            ]
        )
    _write_text(base / L.UCLM_INFO, _csv_text(rows, delimiter=";"), encoding="utf-8-sig")
    return base


# Yap2018 ----------------------------------------------------------------------------------------------------------

_YAP_DIAGNOSIS = {
    "benign": ("CYST", "CYST", "FA", "FA", "UNK", "LN", "PAP", "LP"),
    "malignant": ("IDC", "IDC", "IDC", "DCIS", "ILC", "UNK"),
}
_YAP_LEGEND = (
    ("CYST", "Cyst"),
    ("FA", "Fibroadenoma"),
    ("IDC", "Invasive ductal carcinoma"),
    ("DCIS", "Ductal carcinoma in situ"),
    ("ILC", "Invasive lobular carcinoma"),
    ("LN", "Lymph node"),
    ("PAP", "Papilloma"),
    ("LP", "Lipoma"),
    ("UNK", "Unknown"),
)
_YAP_L_MODE_GT = {295, 297, 302}  # plus 1..20: the ground truths stored as L 0/255 instead of 1-bit


def _deterministic_xlsx(data: bytes) -> bytes:
    """Rewrite an xlsx zip with fixed entry dates and fixed core-document timestamps."""
    stamp = FIXED_TIME.strftime("%Y-%m-%dT%H:%M:%SZ")
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            content = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                text = content.decode("utf-8")
                text = re.sub(
                    r"(<dcterms:(?:created|modified)[^>]*>)[^<]*(</dcterms)", rf"\g<1>{stamp}\g<2>", text
                )
                content = text.encode("utf-8")
            entry = zipfile.ZipInfo(info.filename, date_time=FIXED_TIME.timetuple()[:6])
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o600 << 16
            dst.writestr(entry, content)
    return out.getvalue()


def _write_yap2018(root: Path, rng: np.random.Generator, n: int) -> Path:
    """BUS/{original,GT}/NNNNNN.png and BUS/DatasetB.xlsx (sheet Hoja1, text ids, legend in columns F-G)."""
    from openpyxl import Workbook

    base = root / L.YAP_ARCHIVE_DIR
    n_low = max(1, round(n * 147 / 163))
    numbers = list(range(1, n_low + 1)) + list(range(295, 295 + n - n_low))
    types = ["malignant" if rng.random() < 54 / 163 else "benign" for _ in numbers]
    types[0], types[-1] = "benign", "malignant"
    wb = Workbook()
    ws = wb.active
    ws.title = L.YAP_SHEET
    ws.append(["Image", "Type", "Diagnosis"])
    for number, kind in zip(numbers, types, strict=True):
        name = f"{number:06d}"
        h, w = _size(rng, (96, 150), (96, 180))
        img, mask = render_bus_image(rng, h, w, lesion=True, malignant=kind == "malignant")
        _save_png(base / L.YAP_IMAGE_DIR / f"{name}.png", img)
        _save_mask(
            base / L.YAP_MASK_DIR / f"{name}.png",
            mask,
            "L" if number <= 20 or number in _YAP_L_MODE_GT else "1",
        )
        ws.append([name, kind.capitalize(), str(rng.choice(_YAP_DIAGNOSIS[kind]))])
    ws["F1"] = "Llegend"
    for j, (code, meaning) in enumerate(_YAP_LEGEND, start=2):
        ws.cell(row=j, column=6, value=code)
        ws.cell(row=j, column=7, value=meaning)
    wb.properties.created = FIXED_TIME
    wb.properties.modified = FIXED_TIME
    wb.properties.creator = "busbench synth"
    buf = io.BytesIO()
    wb.save(buf)
    (base / L.YAP_XLSX).write_bytes(_deterministic_xlsx(buf.getvalue()))
    return base


_WRITERS: dict[str, Callable[[Path, np.random.Generator, int], Path]] = {
    "busi": _write_busi,
    "curated_busi": _write_curated_busi,
    "busbra": _write_busbra,
    "bus_uc": _write_bus_uc,
    "bus_uclm": _write_bus_uclm,
    "yap2018": _write_yap2018,
}


# ------------------------------------------------------------------------------------------------------- entry


def synthesize(layout: str, out: Path, n: int = 30, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``n`` synthetic images in ``layout``'s raw layout under ``out`` and return the dataset's own folder.

    ``out`` plays the folder an archive is unpacked into (e.g. ``data/raw/BUSI``); the archive's own nesting is
    reproduced below it, so the return value is e.g. ``out/Dataset_BUSI_with_GT``. The tree is built in a
    temporary folder beside ``out`` and moved into place in one rename, so a failure leaves nothing behind.
    An existing non-empty ``out`` is refused unless ``overwrite`` is set.
    """
    if layout not in _WRITERS:
        close = difflib.get_close_matches(str(layout), L.LAYOUT_KEYS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown layout {layout!r}.{hint} Valid layouts: {', '.join(L.LAYOUT_KEYS)}")
    if n < MIN_N[layout]:
        raise ConfigError(
            f"--n {n} is too small for layout {layout!r}: it needs at least {MIN_N[layout]} images"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(
            f"{out} already holds files; choose an empty or new --out, or pass --overwrite to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        dataset_dir = _WRITERS[layout](tmp, np.random.default_rng(seed), n)
        relative = dataset_dir.relative_to(tmp)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out / relative


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``busbench synth``."""
    parser.add_argument(
        "--layout", required=True, choices=L.LAYOUT_KEYS, help="dataset key whose raw layout to write"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="folder to unpack into, e.g. data/raw/BUSI (created; must be empty)",
    )
    parser.add_argument("--n", type=int, default=30, help="number of images (default 30)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed -> byte-identical files (default 0)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")


def run(args: argparse.Namespace) -> int:
    """Run ``busbench synth``."""
    dataset_dir = synthesize(
        args.layout, args.out, n=args.n, seed=args.seed, overwrite=getattr(args, "overwrite", False)
    )
    print(f"wrote {args.n} synthetic images in the {args.layout} layout: {dataset_dir}")
    return 0
