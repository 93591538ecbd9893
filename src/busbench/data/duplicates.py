"""Near-duplicate detection within one dataset, and grouping of samples that must stay on one side of a split.

Public breast-ultrasound datasets hold the same scan more than once: resized or re-encoded copies, the same image
filed under two labels (BUSI has benign/malignant twins), and consecutive frames of one lesion. Without patient ids
such copies leak between training and test data, so every sample linked to another by a duplicate or a shared
patient goes into one group, and splits keep groups whole.

Every image is reduced to two fingerprints (:func:`image_signature`): a 16x16 grey thumbnail, and a 64x64
thumbnail minus its Gaussian blur (sigma 3 px), which keeps the speckle and tissue texture that two different
scans do not share. Thumbnails are squashed to squares, so resized copies line up whatever their size. What all
images of a dataset share (probe layout, burnt-in logos, the typical depth profile) is removed before comparing:
each fingerprint loses the dataset's mean fingerprint and is renormalised.

Detection then runs in two stages so that it stays fast on thousands of images:

1. *Candidates*: cosine similarities of all 16x16 fingerprints by a blocked matrix product; pairs reaching
   :data:`CANDIDATE_THRESHOLD` go on.
2. *Confirmation*: the correlation of the 64x64 high-pass fingerprints is the pair's score. Resizing (to 0.3x
   or up), JPEG re-encoding down to quality 20, brightness, contrast, gamma and noise keep copies above 0.95;
   unrelated scans stay below about 0.3. A score of at least :data:`DUPLICATE_THRESHOLD` marks a copy of one
   image, at least :data:`NEAR_THRESHOLD` another frame of the same scene; both link the two samples.

Left-right and up-down mirrored copies are found as copies. Crops that remove more than about 2% of each side,
and images without texture (a constant frame), are not detected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

SMALL_SIZE = 16
LARGE_SIZE = 64
HIGHPASS_SIGMA = 3.0
CANDIDATE_THRESHOLD = 0.80
COMMON_PRIOR = 32  # images; the common pattern is weighted n / (n + COMMON_PRIOR)
NEAR_THRESHOLD = 0.40
DUPLICATE_THRESHOLD = 0.70
TRANSFORMS: tuple[str, ...] = ("identity", "hflip", "vflip")


@dataclass(frozen=True)
class Signature:
    """Compact fingerprints of one image: ``small`` for candidate search, ``large`` for confirmation."""

    small: np.ndarray  # float32 (SMALL_SIZE**2,), zero-mean unit-norm (all zero for a constant image)
    large: np.ndarray  # float32 (LARGE_SIZE**2,), high-pass, zero-mean unit-norm


@dataclass(frozen=True)
class DuplicatePair:
    """Two samples showing the same image (``kind="duplicate"``) or the same scene (``kind="near"``)."""

    a: str  # the smaller sample_id
    b: str
    score: float  # high-pass correlation at LARGE_SIZE, in [-1, 1]
    transform: str  # which of TRANSFORMS maps b onto a
    kind: str  # "duplicate" | "near"

    def as_dict(self) -> dict[str, object]:
        return {
            "a": self.a,
            "b": self.b,
            "score": round(self.score, 4),
            "transform": self.transform,
            "kind": self.kind,
        }


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = vector.astype(np.float32).ravel()
    vector = vector - vector.mean()
    norm = float(np.linalg.norm(vector))
    # A constant image has no pattern to compare; a zero vector matches nothing.
    return vector / norm if norm > 1e-6 else np.zeros_like(vector)


def to_grey(image: np.ndarray) -> np.ndarray:
    """uint8 grey view of an (H, W), (H, W, 3) RGB or (H, W, 4) RGBA image."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")


def image_signature(image: np.ndarray) -> Signature:
    """Fingerprints of one decoded image (any size; squashed to squares so resized copies line up)."""
    grey = np.ascontiguousarray(to_grey(image))
    small = cv2.resize(grey, (SMALL_SIZE, SMALL_SIZE), interpolation=cv2.INTER_AREA)
    large = cv2.resize(grey, (LARGE_SIZE, LARGE_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    highpass = large - cv2.GaussianBlur(large, (0, 0), HIGHPASS_SIGMA)
    return Signature(small=_unit(small), large=_unit(highpass))


def _flip(matrix: np.ndarray, size: int, transform: str) -> np.ndarray:
    """Apply ``transform`` to every row of ``matrix`` (rows are flattened size x size thumbnails)."""
    if transform == "identity":
        return matrix
    square = matrix.reshape(-1, size, size)
    square = square[:, :, ::-1] if transform == "hflip" else square[:, ::-1, :]
    return np.ascontiguousarray(square.reshape(matrix.shape))


def _centred(matrix: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Rows minus the dataset's common pattern, renormalised to unit length (zero rows stay zero)."""
    out = matrix - common
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 1e-6)


def _candidate_pairs(small: np.ndarray, other: np.ndarray, threshold: float, block: int) -> np.ndarray:
    """Index pairs (i < j) with ``small[i] . other[j] >= threshold``; blocked so memory stays O(block * n)."""
    n = small.shape[0]
    found = [np.zeros((0, 2), dtype=np.int64)]
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = small[start:stop] @ other[start:].T  # only columns j >= start can satisfy i < j
        rows, cols = np.nonzero(sims >= threshold)
        rows = rows + start
        cols = cols + start
        keep = rows < cols
        found.append(np.stack([rows[keep], cols[keep]], axis=1))
    return np.concatenate(found)


def find_duplicates(
    sample_ids: Sequence[str],
    signatures: Sequence[Signature],
    *,
    threshold: float = NEAR_THRESHOLD,
    duplicate_threshold: float = DUPLICATE_THRESHOLD,
    candidate_threshold: float = CANDIDATE_THRESHOLD,
    mirror: bool = True,
    block: int = 1024,
) -> list[DuplicatePair]:
    """All pairs scoring at least ``threshold``, sorted by (a, b); each pair listed once with its best transform.

    Before comparing, the dataset's common pattern (the mean fingerprint, shrunk towards zero for small
    datasets) is removed from every fingerprint: probe layout, burnt-in logos and the typical depth profile are
    shared by unrelated scans of one dataset and would otherwise make them look alike. A mirrored match counts
    only as a copy (score of at least ``duplicate_threshold``), never as another frame.

    Cost: one (n x n x 256) matrix product per transform for the candidates, then one 4096-long dot product
    per candidate; 3,000 images take about a second.
    """
    if len(sample_ids) != len(signatures):
        raise ValueError("sample_ids and signatures differ in length")
    n = len(sample_ids)
    if n < 2:
        return []
    # Canonical order first, so that floating-point sums, and hence scores, do not depend on the input order.
    order = sorted(range(n), key=lambda i: sample_ids[i])
    sample_ids = [sample_ids[i] for i in order]
    signatures = [signatures[i] for i in order]
    small_raw = np.stack([s.small for s in signatures]).astype(np.float32)
    large_raw = np.stack([s.large for s in signatures]).astype(np.float32)
    weight = n / (n + COMMON_PRIOR)
    small_common = weight * small_raw.mean(axis=0)
    large_common = weight * large_raw.mean(axis=0)
    small = _centred(small_raw, small_common)
    large = _centred(large_raw, large_common)
    best: dict[tuple[int, int], tuple[float, str]] = {}
    for transform in TRANSFORMS if mirror else ("identity",):
        if transform == "identity":
            small_t, large_t = small, large
        else:
            small_t = _centred(_flip(small_raw, SMALL_SIZE, transform), small_common)
            large_t = _centred(_flip(large_raw, LARGE_SIZE, transform), large_common)
        candidates = _candidate_pairs(small, small_t, candidate_threshold, block)
        if len(candidates) == 0:
            continue
        scores = np.einsum("ij,ij->i", large[candidates[:, 0]], large_t[candidates[:, 1]])
        keep = scores >= (threshold if transform == "identity" else max(threshold, duplicate_threshold))
        for (i, j), score in zip(candidates[keep].tolist(), scores[keep].tolist(), strict=True):
            if score > best.get((i, j), (-2.0, ""))[0]:
                best[(i, j)] = (score, transform)
    pairs = []
    for (i, j), (score, transform) in best.items():
        a, b = sorted((sample_ids[i], sample_ids[j]))
        kind = "duplicate" if score >= duplicate_threshold else "near"
        pairs.append(DuplicatePair(a=a, b=b, score=float(score), transform=transform, kind=kind))
    return sorted(pairs, key=lambda p: (p.a, p.b))


def group_samples(
    sample_ids: Sequence[str], patient_ids: Sequence[str], pairs: Sequence[DuplicatePair]
) -> dict[str, str]:
    """sample_id -> group_id: connected components of same-patient and duplicate links.

    Ids are ``g0001``, ``g0002``, ... numbered in order of each group's smallest sample_id, so they depend only
    on the links, never on input order.
    """
    if len(sample_ids) != len(patient_ids):
        raise ValueError("sample_ids and patient_ids differ in length")
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError("sample_ids are not unique")
    order = sorted(range(len(sample_ids)), key=lambda i: sample_ids[i])
    ids = [sample_ids[i] for i in order]
    index = {sid: k for k, sid in enumerate(ids)}
    rows: list[int] = []
    cols: list[int] = []
    first_of_patient: dict[str, int] = {}
    for k, i in enumerate(order):
        head = first_of_patient.setdefault(patient_ids[i], k)
        rows.append(head)
        cols.append(k)
    for pair in pairs:
        rows.append(index[pair.a])
        cols.append(index[pair.b])
    n = len(ids)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    # ids are sorted, so the first time a component appears is at its smallest sample_id.
    names: dict[int, str] = {}
    width = max(4, len(str(n)))
    for c in component.tolist():
        if c not in names:
            names[c] = f"g{len(names) + 1:0{width}d}"
    return {sid: names[c] for sid, c in zip(ids, component.tolist(), strict=True)}


def label_conflicts(pairs: Sequence[DuplicatePair], labels: Mapping[str, str]) -> list[DuplicatePair]:
    """Duplicate pairs whose two samples carry different labels (one image filed under two classes)."""
    return [p for p in pairs if labels[p.a] != labels[p.b]]


def mixed_label_groups(group_ids: Mapping[str, str], labels: Mapping[str, str]) -> dict[str, list[str]]:
    """group_id -> sorted distinct labels, for groups holding more than one label."""
    seen: dict[str, set[str]] = {}
    for sid, gid in group_ids.items():
        seen.setdefault(gid, set()).add(labels[sid])
    return {gid: sorted(found) for gid, found in sorted(seen.items()) if len(found) > 1}
