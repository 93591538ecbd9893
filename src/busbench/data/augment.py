"""Training augmentation presets (``data.augment``), applied jointly to the image and its class map.

Presets work on the uint8 network-size image before normalisation:

* ``none``  - nothing;
* ``light`` - horizontal flip;
* ``bus``   - horizontal flip, a small affine (scale 0.9-1.1, shift up to 5 %, rotation up to 10 degrees), brightness
  and contrast jitter, speckle-like multiplicative noise (one factor per pixel, the same for every channel so grey
  stays grey) and, rarely, CLAHE. No vertical flip: the skin line of an ultrasound image is always at the top.

The class map travels as albumentations' ``mask`` (nearest-neighbour in the affine, padding 0 = background), so the
binary mask derived from it stays aligned with the image.

Randomness. albumentations 2.x ignores the global ``random``/``numpy`` state: a ``Compose`` draws from generators it
owns. ``Compose.set_random_seed`` gives every child transform its *own* generator with the *same* seed, so all their
"apply or not" decisions coincide (flip implies jitter implies noise ...). :func:`seed_augment` instead hands one shared
pair of generators to the whole pipeline, so successive decisions are independent draws from one reproducible stream.
"""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

AUGMENT_PRESETS: tuple[str, ...] = ("none", "light", "bus")


def build_augment(name: str, seed: int | None = None) -> A.Compose | None:
    """The ``data.augment`` preset ``name`` as a ``Compose`` (``None`` for ``none``), seeded with :func:`seed_augment`."""
    if name == "none":
        return None
    if name == "light":
        transforms: list[A.BasicTransform] = [A.HorizontalFlip(p=0.5)]
    elif name == "bus":
        transforms = [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.05, 0.05),
                rotate=(-10.0, 10.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.5,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.MultiplicativeNoise(multiplier=(0.85, 1.15), per_channel=False, elementwise=True, p=0.3),
            A.CLAHE(clip_limit=(1.0, 2.0), tile_grid_size=(8, 8), p=0.1),
        ]
    else:
        raise ValueError(f"data.augment must be one of {AUGMENT_PRESETS}, got {name!r}")
    compose = A.Compose(transforms, is_check_shapes=True)
    seed_augment(compose, seed)
    return compose


def seed_augment(compose: A.BaseCompose, seed: int | None) -> None:
    """Make ``compose``'s next draws a function of ``seed`` alone (``None``: fresh OS entropy).

    One ``numpy`` and one ``random`` generator are shared by every transform in the pipeline, which keeps their
    decisions independent of one another (see the module docstring).
    """
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


def apply_augment(
    compose: A.BaseCompose | None, image: np.ndarray, class_map: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``compose`` on an ``(S, S, C)`` uint8 image and its ``(S, S)`` uint8 class map together."""
    if compose is None:
        return image, class_map
    out = compose(image=image, mask=class_map)
    aug_image = out["image"]
    if aug_image.ndim == 2:  # some cv2 paths drop a single channel axis
        aug_image = aug_image[:, :, None]
    return aug_image, out["mask"]
