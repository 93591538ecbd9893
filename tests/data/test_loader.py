"""Rows, decoding, the segmentation dataset and seeded loaders."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.functional as TF
from loader_testdata import make_cfg, save_image, write_prepared
from PIL import Image

from busbench.data.cache import ArrayCache, CacheSettings, ensure_cache
from busbench.data.decode import decode_row, read_image, read_mask
from busbench.data.geometry import restore
from busbench.data.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochSampler,
    SegmentationDataset,
    build_datasets,
    build_test_dataset,
    device_batch,
    fold_rows,
    load_dataset_rows,
    make_loader,
    normalize_images,
    test_rows,
)
from busbench.errors import DataError


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    write_prepared(tmp_path / "data", key="busi", n=15, folds=3)
    return tmp_path / "data"


@pytest.fixture
def rows(prepared: Path) -> pd.DataFrame:
    return load_dataset_rows(make_cfg(prepared), "busi")[0]


# ------------------------------------------------------------------------------------------------ rows


def test_load_dataset_rows_resolves_paths(prepared, rows):
    _, info = load_dataset_rows(make_cfg(prepared), "busi")
    assert len(rows) == 15
    for column in ("image_path", "mask_path", "class_mask_path"):
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in rows[column])
    assert info["folds"] == [0, 1, 2] and len(info["manifest_sha256"]) == 64
    assert info["manifest_sha256"] == info["summary_sha256"]


def test_missing_manifest_names_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"busbench prepare --datasets busbra"):
        load_dataset_rows(make_cfg(tmp_path), "busbra")


def test_moved_data_root_falls_back_to_its_own_folders(tmp_path):
    write_prepared(tmp_path / "old", n=6)
    (tmp_path / "old").rename(tmp_path / "new")  # the summary's absolute roots no longer exist
    rows, info = load_dataset_rows(make_cfg(tmp_path / "new"), "busi")
    assert info["raw_root"] == str(tmp_path / "new" / "raw")
    assert all(Path(p).is_file() for p in rows["image_path"])


def test_fold_rows_partition(rows):
    dev = rows[rows["split"] == "dev"]
    seen_val = []
    for k in range(3):
        train, val = fold_rows(rows, k)
        assert set(val["fold"]) == {k} and k not in set(train["fold"])
        assert set(train["sample_id"]).isdisjoint(val["sample_id"])
        assert set(train["sample_id"]) | set(val["sample_id"]) == set(dev["sample_id"])
        assert (train["split"] == "dev").all() and (val["split"] == "dev").all()
        assert list(train.index) == list(range(len(train)))
        seen_val += list(val["sample_id"])
    assert sorted(seen_val) == sorted(dev["sample_id"])  # every dev row validates exactly once
    test = test_rows(rows)
    assert (test["split"] == "test").all() and len(test) + len(dev) == len(rows)
    with pytest.raises(DataError, match=r"folds \[0, 1, 2\]"):
        fold_rows(rows, 3)


def test_union_keeps_each_datasets_folds_and_test_rows(tmp_path):
    root = tmp_path / "data"
    write_prepared(root, key="busi", n=9, folds=3, seed=1)
    write_prepared(root, key="busbra", n=12, folds=3, seed=2)
    cfg = make_cfg(root, dataset=["busi", "busbra"], image_size=32, cache=True)
    train, val = build_datasets(cfg, 1)
    per_key = {k: load_dataset_rows(cfg, k)[0] for k in ("busi", "busbra")}
    for key, krows in per_key.items():
        expected_val = set(krows.loc[(krows["split"] == "dev") & (krows["fold"] == 1), "sample_id"])
        assert set(val.rows.loc[val.rows["dataset"] == key, "sample_id"]) == expected_val
        assert set(train.rows.loc[train.rows["dataset"] == key, "fold"]) == {0, 2}
    test = build_test_dataset(cfg)
    assert set(test.rows["dataset"]) == {"busi", "busbra"} and (test.rows["split"] == "test").all()
    assert len(test.cache.folders) == 2
    only = build_test_dataset(cfg, "busbra")
    assert set(only.rows["dataset"]) == {"busbra"}
    item = val[len(val) - 1]  # reads from the second dataset's cache
    assert item["image"].shape == (1, 32, 32)


def test_union_with_different_fold_counts_is_refused(tmp_path):
    root = tmp_path / "data"
    write_prepared(root, key="busi", n=9, folds=2)
    write_prepared(root, key="busbra", n=12, folds=3)
    cfg = make_cfg(root, dataset=["busi", "busbra"], image_size=32, cache=False)
    with pytest.raises(DataError, match="busi"):
        build_datasets(cfg, 2)


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "1"])
def test_read_image_matches_pil(tmp_path, mode):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (23, 31), dtype=np.uint8)
    path = tmp_path / f"im_{mode}.png"
    save_image(path, grey, mode)
    rgb = read_image(path, 3)
    assert rgb.shape == (23, 31, 3) and rgb.dtype == np.uint8
    pil = Image.open(path)
    np.testing.assert_array_equal(rgb, np.asarray(pil.convert("RGB")))  # alpha dropped, 1-bit as 0/255
    grey_out = read_image(path, 1)
    assert grey_out.shape == (23, 31, 1)
    diff = np.abs(grey_out[:, :, 0].astype(int) - np.asarray(pil.convert("RGB").convert("L"), dtype=int))
    assert diff.max() <= 1  # OpenCV and PIL round BT.601 differently by at most one level
    if mode == "1":
        assert set(np.unique(rgb)) <= {0, 255}


def test_read_image_16_bit_and_bad_files(tmp_path):
    values = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), values)
    out = read_image(tmp_path / "deep.png", 1)[:, :, 0]
    np.testing.assert_array_equal(out, np.round(values / 257.0).astype(np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        read_image(tmp_path / "broken.png", 1)
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png", 1)


def test_read_mask_encodings(tmp_path):
    mask = np.zeros((12, 14), bool)
    mask[3:8, 4:11] = True
    Image.fromarray(mask).convert("1").save(tmp_path / "one_bit.png")
    Image.fromarray(np.dstack([mask * 255] * 3 + [np.full(mask.shape, 255)]).astype(np.uint8), "RGBA").save(
        tmp_path / "rgba.png"
    )
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(tmp_path / "grey.png")
    for name in ("one_bit.png", "rgba.png", "grey.png"):
        np.testing.assert_array_equal(read_mask(tmp_path / name), mask)
    Image.fromarray(mask.astype(np.uint8), "L").save(tmp_path / "zero_one.png")
    with pytest.raises(DataError, match="0/255"):
        read_mask(tmp_path / "zero_one.png")


def test_decode_row_checks_consistency(rows, tmp_path):
    rec = rows.iloc[0].to_dict()  # benign
    image, class_map = decode_row(rec, 1)
    assert set(np.unique(class_map)) == {0, 1}
    np.testing.assert_array_equal(class_map > 0, read_mask(rec["mask_path"]))
    # without a class map the label colours the mask
    derived = decode_row({**rec, "class_mask_path": ""}, 1)[1]
    np.testing.assert_array_equal(derived, class_map)
    # a manifest whose size disagrees with the file
    with pytest.raises(DataError, match="manifest says"):
        decode_row({**rec, "height": rec["height"] + 1}, 1)
    # a class map that does not match the binary mask
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros_like(class_map), "L").save(other)
    with pytest.raises(DataError, match="does not match"):
        decode_row({**rec, "class_mask_path": str(other)}, 1)
    normal_with_lesion = {**rec, "class_mask_path": "", "label": "normal"}
    with pytest.raises(DataError, match="labelled normal"):
        decode_row(normal_with_lesion, 1)


# ------------------------------------------------------------------------------------------------ dataset


@pytest.mark.parametrize("channels", [1, 3])
def test_item_contract(rows, channels):
    ds = SegmentationDataset(rows, 40, "letterbox", channels, "unit")
    labels = {"normal": 0, "benign": 1, "malignant": 2}
    for i in range(len(ds)):
        item = ds[i]
        # everything uint8 as loaded: the image un-normalised, the targets as class indices
        assert item["image"].shape == (channels, 40, 40) and item["image"].dtype == torch.uint8
        assert item["mask"].shape == (1, 40, 40) and item["mask"].dtype == torch.uint8
        assert item["class_map"].shape == (40, 40) and item["class_map"].dtype == torch.uint8
        assert set(item["mask"].unique().tolist()) <= {0, 1}
        assert torch.equal(item["mask"][0] > 0, item["class_map"] > 0)
        assert item["label"] == labels[rows.loc[i, "label"]] and item["index"] == i
        assert set(item["class_map"].unique().tolist()) <= {0, item["label"]}
        pixels, class_map = ds.pixels(i)  # not augmented: the item is the square pixels themselves
        np.testing.assert_array_equal(item["image"].numpy(), pixels.transpose(2, 0, 1))
        np.testing.assert_array_equal(item["class_map"].numpy(), class_map)
    with pytest.raises(IndexError):
        ds[len(ds)]


def float_path(image: np.ndarray, mode: str) -> np.ndarray:
    """The per-sample float32 normalisation the dataset applied on the host before it returned uint8 (the same
    float32 operations in the same order), kept here to show that moving it onto the device changed nothing."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    chw *= np.float32(1.0 / 255.0)
    if mode == "per_image":
        mean, std = chw.mean(dtype=np.float64), chw.std(dtype=np.float64)
        chw -= np.float32(mean)
        if std > 1e-6:
            chw *= np.float32(1.0 / std)
    elif mode == "imagenet":
        c = chw.shape[0]
        mean = np.asarray(IMAGENET_MEAN if c == 3 else (sum(IMAGENET_MEAN) / 3,), np.float32)[:, None, None]
        std = np.asarray(IMAGENET_STD if c == 3 else (sum(IMAGENET_STD) / 3,), np.float32)[:, None, None]
        chw -= mean
        chw /= std
    return chw


def test_normalisations():
    rng = np.random.default_rng(0)
    img3 = rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    batch = torch.from_numpy(img3)
    unit = normalize_images(batch, "unit")
    assert unit.dtype == torch.float32
    np.testing.assert_allclose(unit.numpy(), img3 / 255.0, atol=1e-7)
    per = normalize_images(batch, "per_image").numpy()
    for b in range(2):  # each image on its own
        assert abs(float(per[b].mean())) < 1e-5 and abs(float(per[b].std()) - 1) < 1e-4
    imnet = normalize_images(batch, "imagenet")
    torch.testing.assert_close(imnet, TF.normalize(batch.float() / 255, IMAGENET_MEAN, IMAGENET_STD))
    grey = batch[:, :1]
    np.testing.assert_allclose(
        normalize_images(grey, "imagenet").numpy(), (img3[:, :1] / 255.0 - 0.449) / 0.226, atol=1e-6
    )
    flat = normalize_images(torch.full((1, 1, 8, 8), 77, dtype=torch.uint8), "per_image")
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-6
    with pytest.raises(ValueError):
        normalize_images(batch, "zscore")
    with pytest.raises(TypeError, match="uint8"):  # normalising twice is refused, not silently done
        normalize_images(unit, "unit")


@pytest.mark.parametrize("mode", ["unit", "per_image", "imagenet"])
@pytest.mark.parametrize("channels", [1, 3])
def test_device_normalisation_equals_the_former_host_float_path(rows, mode, channels):
    """Every augmented training batch normalised on the device equals the former per-sample float32 path (unit and
    imagenet bit for bit; per_image within float32 rounding, its statistics being summed in another order)."""
    ds = SegmentationDataset(rows, 32, "letterbox", channels, mode, augment="bus")
    for batch in make_loader(ds, 4, shuffle=True, seed=5, num_workers=0):
        expected = np.stack([float_path(img.permute(1, 2, 0).numpy(), mode) for img in batch["image"]])
        x, y = device_batch(batch, mode, "cpu", channels_last=True)
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        if mode == "per_image":
            np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(x.numpy(), expected)
        assert y.dtype == torch.float32 and y.shape == (len(x), 1, 32, 32)
        assert torch.equal(y, (batch["class_map"][:, None] > 0).float())


def test_training_on_uint8_batches_gives_the_weights_of_the_float_path(rows):
    """A few optimiser steps of a small network: inputs normalised on the device vs the former float32 tensors."""
    ds = SegmentationDataset(rows, 32, "letterbox", 1, "per_image", augment="bus")
    loader = make_loader(ds, 4, shuffle=True, seed=1, num_workers=0)
    weights = []
    for device_path in (True, False):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3, padding=1)
        )
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        loader.sampler.set_epoch(0)
        for batch in loader:
            if device_path:
                x, y = device_batch(batch, "per_image", "cpu")
            else:
                x = torch.from_numpy(
                    np.stack(
                        [float_path(img.permute(1, 2, 0).numpy(), "per_image") for img in batch["image"]]
                    )
                )
                y = (batch["class_map"][:, None] > 0).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_uint8_targets_train_every_task_mode_as_before(rows):
    """Multi-class class maps, multitask labels and Mask R-CNN instances read uint8 batches as they read the former
    int64 class maps and float32 masks."""
    from busbench.methods.multiclass import MulticlassLoss
    from busbench.models.maskrcnn import maskrcnn_targets_from_masks

    ds = SegmentationDataset(rows, 32, "letterbox", 1, "unit", augment="bus")
    batch = next(iter(make_loader(ds, 6, shuffle=True, seed=2, num_workers=0)))
    assert batch["label"].dtype == torch.int64 and batch["class_map"].dtype == torch.uint8
    logits = torch.randn(len(batch["index"]), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loss = MulticlassLoss(ce_weight=0.5)
    assert batch["class_map"].max() > 0
    torch.testing.assert_close(
        loss(logits, batch["class_map"]), loss(logits, batch["class_map"].long()), rtol=0, atol=0
    )
    old = maskrcnn_targets_from_masks(batch["mask"].float())
    new = maskrcnn_targets_from_masks(batch["mask"])
    assert sum(len(t["boxes"]) for t in new) > 0
    for a, b in zip(old, new, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "masks"))


def test_original_size_helpers_round_trip(rows):
    ds = SegmentationDataset(rows, 48, "letterbox", 1)
    for i in range(len(ds)):
        info = ds.letterbox_info(i)
        original = ds.original_mask(i)
        assert original.shape == info.original_hw == (rows.loc[i, "height"], rows.loc[i, "width"])
        back = restore(ds[i]["mask"][0].numpy(), info) > 0.5
        if original.any():
            dice = 2 * (back & original).sum() / (back.sum() + original.sum())
            assert dice > 0.85  # tiny test images; full-size agreement is checked in test_geometry
        else:
            assert not back.any()


# ------------------------------------------------------------------------------------------------ loaders


def _batches(loader, epochs: int = 2) -> list[dict[str, torch.Tensor]]:
    return [batch for _ in range(epochs) for batch in loader]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("image", "mask", "class_map", "label", "index"):
            assert torch.equal(x[key], y[key]), key


def test_loaders_are_deterministic_across_worker_counts(rows):
    def loader(workers: int, seed: int = 7):
        ds = SegmentationDataset(rows, 32, "letterbox", 1, "unit", augment="bus")
        return make_loader(ds, batch_size=4, shuffle=True, seed=seed, num_workers=workers)

    zero_a, zero_b = _batches(loader(0)), _batches(loader(0))
    two_a, two_b = _batches(loader(2)), _batches(loader(2))
    _assert_same(zero_a, zero_b)
    _assert_same(two_a, two_b)
    _assert_same(zero_a, two_a)  # the number of workers does not change a batch
    # epochs differ in order and augmentation
    first, second = zero_a[: len(zero_a) // 2], zero_a[len(zero_a) // 2 :]
    assert any(not torch.equal(x["index"], y["index"]) for x, y in zip(first, second, strict=True))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(first, second, strict=True))
    other = _batches(loader(0, seed=8))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(zero_a, other, strict=True))


def test_loader_cache_and_png_give_the_same_augmented_batches(prepared, rows):
    _, info = load_dataset_rows(make_cfg(prepared), "busi")
    folder = ensure_cache(rows, "busi", prepared, info["manifest_sha256"], CacheSettings(32, "letterbox", 3))
    plain = SegmentationDataset(rows, 32, "letterbox", 3, "imagenet", augment="bus")
    cached = SegmentationDataset(
        rows, 32, "letterbox", 3, "imagenet", augment="bus", cache=ArrayCache([folder])
    )
    _assert_same(
        _batches(make_loader(plain, 5, True, 3, 0)),
        _batches(make_loader(cached, 5, True, 3, 0)),
    )


def test_sampler_epochs_and_resume():
    sampler = EpochSampler(10, shuffle=True, seed=1)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert sorted(i for i, _ in epoch0) == list(range(10))
    assert epoch0 != epoch1
    sampler.set_epoch(1)
    assert list(sampler) == epoch1  # a resumed run replays epoch 1 exactly
    seeds0 = dict(epoch0)
    ordered = EpochSampler(10, shuffle=False, seed=1)
    pairs = list(ordered)
    assert [i for i, _ in pairs] == list(range(10))
    assert dict(pairs) == seeds0  # a sample's augmentation seed does not depend on the shuffle
    assert len(set(seeds0.values())) == 10
    assert list(EpochSampler(4, True, seed=-3)) == list(EpochSampler(4, True, seed=-3))


def test_dataset_survives_pickling_for_spawned_workers(prepared, rows):
    # spawn/forkserver workers receive a pickled dataset: the cache reopens its memory maps, the pipeline keeps its state
    _, info = load_dataset_rows(make_cfg(prepared), "busi")
    folder = ensure_cache(rows, "busi", prepared, info["manifest_sha256"], CacheSettings(32, "letterbox", 1))
    ds = SegmentationDataset(rows, 32, "letterbox", 1, "unit", augment="bus", cache=ArrayCache([folder]))
    clone = pickle.loads(pickle.dumps(ds))
    for i in range(len(ds)):
        a, b = ds[(i, 100 + i)], clone[(i, 100 + i)]
        assert all(torch.equal(a[k], b[k]) for k in ("image", "mask", "class_map"))


def test_make_loader_settings(rows):
    ds = SegmentationDataset(rows, 32)
    loader = make_loader(ds, 4, shuffle=False, seed=0, num_workers=0, drop_last=True)
    assert isinstance(loader.sampler, EpochSampler) and not loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()
    assert len(list(loader)) == len(ds) // 4
    assert make_loader(ds, 4, True, 0, num_workers=1).persistent_workers


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_busi_cache_matches_png_and_masks_restore(real_data_root, tmp_path):
    from busbench.data.prepare import prepare

    prepare(
        ["busi"], data_root=tmp_path / "data", raw_root=real_data_root, folds=3, progress=False, splits="new"
    )
    cfg = make_cfg(tmp_path / "data", image_size=96, channels=1)
    rows, info = load_dataset_rows(cfg, "busi")
    folder = ensure_cache(
        rows, "busi", tmp_path / "data", info["manifest_sha256"], CacheSettings(96, "letterbox", 1)
    )
    cached = SegmentationDataset(rows, 96, "letterbox", 1, cache=ArrayCache([folder]))
    plain = SegmentationDataset(rows, 96, "letterbox", 1)
    for i in range(
        len(rows)
    ):  # colour overlays, 1-bit and RGBA masks, multi-mask cases: all the same both ways
        a, b = cached[i], plain[i]
        assert all(torch.equal(a[k], b[k]) for k in ("image", "mask", "class_map")), rows.loc[i, "sample_id"]
        original = plain.original_mask(i)
        assert original.shape == (rows.loc[i, "height"], rows.loc[i, "width"])
        back = restore(a["mask"][0].numpy(), plain.letterbox_info(i), original.shape) > 0.5
        if original.sum() > 400:  # lesions large enough that one network pixel is a small part of them
            dice = 2 * (back & original).sum() / (back.sum() + original.sum())
            assert dice > 0.9, rows.loc[i, "sample_id"]
        assert a["label"] == {"normal": 0, "benign": 1, "malignant": 2}[rows.loc[i, "label"]]
