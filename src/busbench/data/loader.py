"""From prepared manifests to batches: row selection, the segmentation dataset and seeded DataLoaders.

Flow: :func:`load_dataset_rows` reads ``<data_root>/manifests/<key>.csv`` and resolves its paths;
:func:`fold_rows` / :func:`test_rows` pick the rows of a run; :class:`SegmentationDataset` turns a row into tensors
(from the PNG files, or from the preprocessed cache, which holds the very same uint8 pixels); :func:`make_loader`
batches them reproducibly. :func:`build_datasets` and :func:`build_test_dataset` do all of it from a config.

Per sample: decode -> square (letterbox or resize, see :mod:`busbench.data.geometry`) -> augmentation on uint8
(:mod:`busbench.data.augment`) -> uint8 tensors. Normalisation happens after the batch has reached its device:
:func:`network_input` is the one place where uint8 images become the network's float input, for training, testing
and prediction alike (:func:`device_batch` adds the float lesion masks for the loss).

Reproducibility. :func:`make_loader` draws, for every epoch, the order of the samples and one augmentation seed per
sample from ``(seed, epoch)``; the dataset reseeds its augmentation pipeline with that seed before transforming the
sample. A batch is therefore a function of ``(seed, epoch, position)`` alone: the same with 0, 1 or 8 workers, with
or without the cache, and after a resume that calls ``loader.sampler.set_epoch(epoch)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from busbench.data.augment import apply_augment, build_augment, seed_augment
from busbench.data.cache import ArrayCache, CacheSettings, ensure_cache
from busbench.data.decode import LABEL_CODES, LABELS, read_mask, square_row
from busbench.data.geometry import LetterboxInfo, geometry_for
from busbench.data.manifest import (
    DataRoots,
    manifest_sha256,
    read_manifest,
    read_summary,
    resolve_paths,
    summary_path,
)
from busbench.errors import DataError

NORMALIZE_MODES: tuple[str, ...] = ("unit", "per_image", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# grey input under "imagenet": the channel averages, so a grey image replicated to RGB sees the same shift and scale
IMAGENET_GREY_MEAN = (sum(IMAGENET_MEAN) / 3,)
IMAGENET_GREY_STD = (sum(IMAGENET_STD) / 3,)
_SEED_MASK = 2**64 - 1


# ------------------------------------------------------------------------------------------------ manifests → rows


def data_root_of(cfg: Any) -> Path:
    """``data.data_root``, else ``$BUSBENCH_DATA``, else ``data``."""
    return DataRoots.resolve(cfg.data.data_root).data_root


def _root_from_summary(summary: dict[str, Any], name: str, default: Path) -> Path:
    """The recorded root when it exists here; else the default under the data root (a moved data folder)."""
    recorded = summary.get(name)
    if isinstance(recorded, str) and recorded and Path(recorded).is_dir():
        return Path(recorded)
    return default


def load_dataset_rows(cfg: Any, dataset_key: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """All manifest rows of ``dataset_key`` with absolute paths, and facts about the manifest.

    The info dict holds ``dataset``, ``data_root``, ``manifest`` (CSV path), ``summary`` (JSON path),
    ``manifest_sha256`` (of the CSV bytes as they are now), ``summary_sha256`` (what prepare recorded, or None),
    ``raw_root``, ``derived_root`` and ``folds`` (sorted dev fold numbers).
    """
    roots = DataRoots.resolve(cfg.data.data_root)
    csv_path = roots.manifest_dir / f"{dataset_key}.csv"
    if not csv_path.is_file():
        raise DataError(
            f"manifest {csv_path} not found; run `busbench prepare --datasets {dataset_key} --data-root {roots.data_root}` "
            "or set data.data_root to the folder that holds manifests/"
        )
    df = read_manifest(csv_path)
    json_path = summary_path(csv_path)
    summary = read_summary(json_path) if json_path.is_file() else {}
    raw_root = _root_from_summary(summary, "raw_root", roots.raw_root)
    derived_root = _root_from_summary(summary, "derived_root", roots.derived_root)
    datasets = sorted(set(df["dataset"]))
    if datasets != [dataset_key]:
        raise DataError(
            f"manifest {csv_path} holds dataset {datasets[0]!r}, not {dataset_key!r}; re-run prepare"
        )
    rows = resolve_paths(df, raw_root, derived_root).reset_index(drop=True)
    info = {
        "dataset": dataset_key,
        "data_root": str(roots.data_root),
        "manifest": str(csv_path),
        "summary": str(json_path) if json_path.is_file() else None,
        "manifest_sha256": manifest_sha256(csv_path),
        "summary_sha256": summary.get("manifest_sha256", summary.get("sha256")),
        "raw_root": str(raw_root),
        "derived_root": str(derived_root),
        "folds": sorted(int(f) for f in set(rows.loc[rows["split"] == "dev", "fold"])),
    }
    return rows, info


def fold_rows(df: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Dev rows of fold ``fold`` (validation) and the other dev rows (training); test rows are in neither.

    Works on unions: each dataset's rows keep their own fold numbers. Both frames are re-indexed from 0.
    """
    dev = df[df["split"] == "dev"]
    folds = sorted(int(f) for f in set(dev["fold"]))
    if int(fold) not in folds:
        raise DataError(
            f"fold {fold} does not exist; the manifest's dev rows have folds {folds} (use --fold 0..k-1)"
        )
    for key, rows in dev.groupby("dataset", sort=True):
        if int(fold) not in set(rows["fold"].astype(int)):
            raise DataError(
                f"fold {fold} does not exist in dataset {key!r}; prepare every dataset of a union with the same --folds"
            )
    is_val = dev["fold"].astype(int) == int(fold)
    return dev[~is_val].reset_index(drop=True), dev[is_val].reset_index(drop=True)


def test_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The held-out test rows, re-indexed from 0."""
    return df[df["split"] == "test"].reset_index(drop=True)


test_rows.__test__ = False  # type: ignore[attr-defined]  # a row selector, not a pytest test, when imported into tests


# ------------------------------------------------------------------------------------------------ normalisation


def _check_mode(mode: str) -> None:
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")


def normalize_images(images: torch.Tensor, mode: str) -> torch.Tensor:
    """``(B, C, S, S)`` uint8 images -> float32 network input, on the images' device.

    ``unit``: x / 255. ``per_image``: zero mean and unit standard deviation over each whole image (all channels,
    padding included; statistics in float64; a constant image becomes all zeros). ``imagenet``: (x / 255 - mean) /
    std with ImageNet's RGB statistics, or their channel averages for grey input.
    """
    _check_mode(mode)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError(
            f"normalize_images takes a (B, C, S, S) uint8 batch as the dataset returns it, got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    x = images.to(torch.float32) * torch.tensor(1.0 / 255.0, dtype=torch.float32, device=images.device)
    if mode == "per_image":
        flat = x.flatten(1).to(torch.float64)
        shape = (-1, 1, 1, 1)
        mean = flat.mean(dim=1)
        std = flat.std(dim=1, correction=0)
        scale = torch.where(std > 1e-6, 1.0 / std, torch.ones_like(std))
        x = (x - mean.to(torch.float32).view(shape)) * scale.to(torch.float32).view(shape)
    elif mode == "imagenet":
        c = x.shape[1]
        mean = torch.tensor(IMAGENET_MEAN if c == 3 else IMAGENET_GREY_MEAN * c, dtype=torch.float32)
        std = torch.tensor(IMAGENET_STD if c == 3 else IMAGENET_GREY_STD * c, dtype=torch.float32)
        x = (x - mean.to(x.device).view(1, c, 1, 1)) / std.to(x.device).view(1, c, 1, 1)
    return x


def network_input(
    images: torch.Tensor,
    normalize: str,
    device: torch.device | str | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """A loaded ``(B, C, S, S)`` uint8 image batch as the network takes it: moved to ``device`` as uint8 (a quarter
    of float32's bytes), then normalised there (:func:`normalize_images`), optionally in channels-last layout.

    The trainer, the evaluator and ``busbench predict`` all go through here, so the network sees the same input
    in training, testing and prediction.
    """
    _check_mode(normalize)
    x = images if device is None else images.to(device, non_blocking=True)
    x = normalize_images(x, normalize)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def device_batch(
    batch: dict[str, Any], normalize: str, device: torch.device | str, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network input (:func:`network_input`) and the float32 ``(B, 1, S, S)`` lesion masks of a loaded batch,
    on ``device``: what the training step feeds the model and the loss."""
    x = network_input(batch["image"], normalize, device, channels_last)
    y = batch["mask"].to(device, non_blocking=True).to(torch.float32)
    return x, y


# ------------------------------------------------------------------------------------------------ dataset


class SegmentationDataset(Dataset):
    """Manifest rows (absolute paths) as network-size samples.

    ``dataset[i]`` is a dict: ``image`` uint8 ``(C, S, S)`` (augmented, not normalised), ``mask`` uint8 ``(1, S, S)``
    in {0, 1}, ``class_map`` uint8 ``(S, S)`` (0 background, 1 benign, 2 malignant), ``label`` int (0 normal,
    1 benign, 2 malignant) and ``index`` int (the row's position in :attr:`rows`). Everything stays uint8 so that a
    sample crosses from a DataLoader worker in a fifth of the bytes of float32/int64 tensors; the consumer
    normalises on its device with :func:`network_input` (mode :attr:`normalize`) and casts the targets there.

    ``augment`` is a preset name (``none``/``light``/``bus``), a ready albumentations ``Compose`` or None. ``cache``, when
    given, must hold every row at the same ``(image_size, resize, channels)``; pixels then come from it instead of
    the PNGs, identical either way. Indexing with ``(i, seed)`` (what :func:`make_loader` does) reseeds the
    augmentation for that sample; a plain ``i`` continues the pipeline's own stream, seeded once from ``seed``.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        image_size: int,
        resize: str = "letterbox",
        channels: int = 1,
        normalize: str = "unit",
        augment: str | A.BaseCompose | None = None,
        cache: ArrayCache | None = None,
        seed: int = 0,
    ):
        _check_mode(normalize)
        self.settings = CacheSettings(int(image_size), resize, int(channels))
        missing = [
            c
            for c in ("sample_id", "dataset", "label", "image_path", "mask_path", "height", "width")
            if c not in rows
        ]
        if missing:
            raise DataError(
                f"dataset rows lack columns {', '.join(missing)}; build them with load_dataset_rows"
            )
        self.rows = rows.reset_index(drop=True)
        self.image_size = int(image_size)
        self.resize = resize
        self.channels = int(channels)
        self.normalize = normalize
        self.augment = build_augment(augment, seed) if isinstance(augment, str) else augment
        unknown = sorted(set(self.rows["label"]) - set(LABELS))
        if unknown:
            raise DataError(f"dataset rows have label(s) {unknown}; expected {', '.join(LABELS)}")
        self.labels = self.rows["label"].map(LABEL_CODES).to_numpy(dtype=np.int64)
        self.cache = cache
        self._where: list[tuple[int, int]] | None = None
        if cache is not None:
            if cache.settings != self.settings:
                raise ValueError(f"cache holds {cache.settings}, the dataset needs {self.settings}")
            self._where = [
                cache.locate(ds, sid)
                for ds, sid in zip(self.rows["dataset"], self.rows["sample_id"], strict=True)
            ]
        self._records = self.rows.to_dict("records")

    def __len__(self) -> int:
        return len(self.rows)

    def pixels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pre-augmentation ``(S, S, C)`` uint8 image and ``(S, S)`` uint8 class map of row ``index``."""
        if self._where is not None and self.cache is not None:
            return self.cache.read(self._where[index])
        image, class_map, _ = square_row(self._records[index], self.image_size, self.resize, self.channels)
        return image, class_map

    def letterbox_info(self, index: int) -> LetterboxInfo:
        """Where row ``index``'s original image lies in the network input (for :func:`geometry.restore`)."""
        rec = self._records[index]
        return geometry_for((int(rec["height"]), int(rec["width"])), self.image_size, self.resize)

    def original_mask(self, index: int) -> np.ndarray:
        """Row ``index``'s ground-truth binary mask at the image's original size (bool ``(H, W)``)."""
        return read_mask(self._records[index]["mask_path"])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(item, tuple):
            index, sample_seed = int(item[0]), int(item[1])
        else:
            index, sample_seed = int(item), None
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        image, class_map = self.pixels(index)
        if self.augment is not None:
            if sample_seed is not None:
                seed_augment(self.augment, sample_seed)
            image, class_map = apply_augment(self.augment, image, class_map)
        class_map = np.ascontiguousarray(class_map, dtype=np.uint8)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.uint8)),
            "mask": torch.from_numpy((class_map > 0).view(np.uint8)[None]),
            "class_map": torch.from_numpy(class_map),
            "label": int(self.labels[index]),
            "index": index,
        }


# ------------------------------------------------------------------------------------------------ loaders


class EpochSampler(Sampler):
    """Yields ``(index, augmentation_seed)`` pairs; order and seeds are functions of ``(seed, epoch)``.

    Each ``iter()`` uses the current epoch and then advances it, so successive epochs differ; ``set_epoch(e)``
    makes the next pass epoch ``e`` (resume). The seed of a sample does not depend on where the shuffle puts it.

    ``indices`` (optional) lists the dataset items of one epoch, repeats allowed (deterministic oversampling): an
    epoch is then a shuffle of that list, and each entry, each copy of a repeated item included, gets its own
    augmentation seed. Without it an epoch is every item of ``range(n)`` once.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, indices: Sequence[int] | None = None):
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0
        self.indices: np.ndarray | None = None
        if indices is None:
            self.n = int(n)
        else:
            self.indices = np.asarray(list(indices), dtype=np.int64).reshape(-1)
            if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= int(n)):
                raise ValueError(f"sampler indices must lie in 0..{int(n) - 1}, the dataset's items")
            self.n = int(self.indices.size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order_seq, seed_seq = np.random.SeedSequence([self.seed & _SEED_MASK, self.epoch]).spawn(2)
        self.epoch += 1
        order = np.random.default_rng(order_seq).permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = np.random.default_rng(seed_seq).integers(0, 2**63 - 1, size=self.n, dtype=np.int64)
        items = order if self.indices is None else self.indices[order]
        for i, item in zip(order, items, strict=True):
            yield int(item), int(seeds[i])


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python and NumPy from the worker's torch seed.

    torch gives each worker ``base_seed + worker_id`` with ``base_seed`` drawn from the loader's generator, so
    these streams are repeatable; augmentation itself does not depend on them (see the module docstring).
    OpenCV's thread pool is deliberately left alone: reconfiguring it (``cv2.setNumThreads``) in a forked worker
    deadlocks when the parent process had already used it.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the legacy global generator is what third-party code draws from)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    drop_last: bool = False,
    sampler: EpochSampler | None = None,
) -> DataLoader:
    """A DataLoader whose batches depend only on ``seed`` and the epoch (see :class:`EpochSampler`).

    Workers persist across epochs when ``num_workers > 0``; memory is pinned when CUDA is available. ``sampler``
    replaces the default ``EpochSampler(len(dataset), shuffle, seed)`` (e.g. one process's share of it).
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed) & (2**63 - 1))
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=sampler if sampler is not None else EpochSampler(len(dataset), shuffle, seed),  # type: ignore[arg-type]
        num_workers=int(num_workers),
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )


# ------------------------------------------------------------------------------------------------ from a config


def _load_union(
    cfg: Any, keys: Sequence[str]
) -> tuple[pd.DataFrame, ArrayCache | None, list[dict[str, Any]]]:
    """Rows of every dataset in ``keys`` concatenated, and their cache (built if needed) when ``data.cache`` is on."""
    frames, infos, folders = [], [], []
    settings = CacheSettings(cfg.data.image_size, cfg.data.resize, cfg.data.channels)
    for key in keys:
        rows, info = load_dataset_rows(cfg, key)
        frames.append(rows)
        infos.append(info)
        if cfg.data.cache:
            folders.append(ensure_cache(rows, key, info["data_root"], info["manifest_sha256"], settings))
    rows = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return rows, (ArrayCache(folders) if folders else None), infos


def _dataset(cfg: Any, rows: pd.DataFrame, cache: ArrayCache | None, augment: str) -> SegmentationDataset:
    return SegmentationDataset(
        rows,
        image_size=cfg.data.image_size,
        resize=cfg.data.resize,
        channels=cfg.data.channels,
        normalize=cfg.data.normalize,
        augment=augment,
        cache=cache,
        seed=cfg.train.seed,
    )


def build_datasets(
    cfg: Any, fold: int, dataset_key: str | None = None
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Training (augmented with ``data.augment``) and validation (not augmented) datasets of fold ``fold``.

    ``dataset_key`` picks one dataset; by default the union of ``data.dataset``. Uses the cache when ``data.cache``.
    """
    keys = [dataset_key] if dataset_key else list(cfg.data.datasets)
    rows, cache, _ = _load_union(cfg, keys)
    train, val = fold_rows(rows, fold)
    return _dataset(cfg, train, cache, cfg.data.augment), _dataset(cfg, val, cache, "none")


def build_test_dataset(cfg: Any, dataset_key: str | None = None) -> SegmentationDataset:
    """The held-out test rows of ``dataset_key`` (default: every dataset of ``data.dataset``), not augmented."""
    keys = [dataset_key] if dataset_key else list(cfg.data.datasets)
    rows, cache, _ = _load_union(cfg, keys)
    test = test_rows(rows)
    if len(test) == 0:
        raise DataError(
            f"no test rows in the manifest(s) of {', '.join(keys)}; run prepare with --test-size > 0"
        )
    return _dataset(cfg, test, cache, "none")
