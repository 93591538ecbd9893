"""A small prepared dataset (raw PNGs, derived masks, manifest, summary) for the loader and cache tests.

Images come from the synthetic B-mode renderer and are saved in the encodings real archives use (RGB, RGBA, L,
1-bit), at several sizes and aspect ratios; masks are 0/255 L PNGs and class maps 0/1/2, as prepare writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from busbench.config import Config
from busbench.data.manifest import summary_json, write_manifest
from busbench.data.synth import render_bus_image

LABEL_CYCLE = ("benign", "malignant", "normal")
MODE_CYCLE = ("RGB", "L", "RGBA", "1")


def save_image(path: Path, grey: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        rgb = np.repeat(grey[:, :, None], 3, axis=2).copy()
        rgb[:4, :4] = (255, 0, 0)  # a colour mark in the corner, as some BUSI images have
        Image.fromarray(rgb, "RGB").save(path)
    elif mode == "RGBA":
        rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
        Image.fromarray(rgba, "RGBA").save(path)
    elif mode == "L":
        Image.fromarray(grey, "L").save(path)
    elif mode == "1":
        Image.fromarray(grey > 100).convert("1").save(path)
    else:
        raise ValueError(mode)


def write_prepared(
    data_root: Path,
    key: str = "busi",
    n: int = 12,
    folds: int = 3,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((48, 64), (64, 40), (50, 50), (37, 61)),
) -> Path:
    """Write ``n`` samples of dataset ``key`` under ``data_root``; returns the manifest path.

    Every third sample is a test row; dev rows cycle through ``folds`` folds.
    """
    rng = np.random.default_rng(seed)
    raw, derived = data_root / "raw", data_root / "derived"
    rows = []
    dev_count = 0
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        label = LABEL_CYCLE[i % len(LABEL_CYCLE)]
        grey, mask = render_bus_image(rng, h, w, lesion=label != "normal", malignant=label == "malignant")
        sid = f"{key}_{i:03d}"
        image_rel = f"{key}/{label}/{sid}.png"
        save_image(raw / image_rel, grey, MODE_CYCLE[i % len(MODE_CYCLE)])
        mask_rel, class_rel = f"{key}/masks/{sid}.png", f"{key}/class_masks/{sid}.png"
        (derived / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        (derived / class_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(derived / mask_rel)
        code = {"normal": 0, "benign": 1, "malignant": 2}[label]
        Image.fromarray(mask.astype(np.uint8) * code, "L").save(derived / class_rel)
        is_test = i % 3 == 2
        fold = -1 if is_test else dev_count % folds
        dev_count += 0 if is_test else 1
        rows.append(
            {
                "sample_id": sid,
                "dataset": key,
                "patient_id": f"p{i:03d}",
                "group_id": f"g{i:03d}",
                "label": label,
                "image_path": image_rel,
                "mask_path": mask_rel,
                "class_mask_path": class_rel,
                "height": h,
                "width": w,
                "split": "test" if is_test else "dev",
                "fold": fold,
            }
        )
    manifest = data_root / "manifests" / f"{key}.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    sha = write_manifest(manifest, rows)
    summary = {"raw_root": str(raw), "derived_root": str(derived), "manifest_sha256": sha, "folds": folds}
    manifest.with_suffix(".json").write_text(summary_json(summary), encoding="utf-8")
    return manifest


def make_cfg(data_root: Path, **data: object) -> Config:
    """A validated Config with the given ``data.*`` keys (data_root set)."""
    cfg = Config()
    cfg.data.data_root = str(data_root)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg
