"""Preprocessed-pixel cache: identical to decoding the PNGs, keyed so that it is never stale, built atomically."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from loader_testdata import make_cfg, write_prepared
from PIL import Image

import busbench.data.cache as cache_mod
from busbench.data.cache import (
    CACHE_FORMAT_VERSION,
    CLASSMAPS_FILE,
    IMAGES_FILE,
    INDEX_FILE,
    ArrayCache,
    CacheSettings,
    ensure_cache,
)
from busbench.data.decode import square_row
from busbench.data.loader import SegmentationDataset, build_datasets, build_test_dataset, load_dataset_rows
from busbench.errors import DataError


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    write_prepared(tmp_path / "data", key="busi", n=12)
    return tmp_path / "data"


def _build(data_root: Path, settings: CacheSettings, key: str = "busi") -> Path:
    cfg = make_cfg(data_root)
    rows, info = load_dataset_rows(cfg, key)
    return ensure_cache(rows, key, data_root, info["manifest_sha256"], settings, workers=2)


def _leftovers(data_root: Path) -> list[str]:
    return sorted(p.name for p in (data_root / "cache").rglob(".building-*"))


@pytest.mark.parametrize("resize", ["letterbox", "resize"])
@pytest.mark.parametrize("channels", [1, 3])
def test_cache_equals_png_path_pixel_for_pixel(prepared, resize, channels):
    settings = CacheSettings(40, resize, channels)
    folder = _build(prepared, settings)
    rows, _ = load_dataset_rows(make_cfg(prepared), "busi")
    cache = ArrayCache([folder])
    for rec in rows.to_dict("records"):
        image, class_map, info = square_row(rec, 40, resize, channels)
        where = cache.locate("busi", rec["sample_id"])
        cached_image, cached_class = cache.read(where)
        np.testing.assert_array_equal(cached_image, image)
        np.testing.assert_array_equal(cached_class, class_map)
        assert cache.geometry(where) == info
    # and through the dataset, augmentation off: identical tensors
    plain = SegmentationDataset(rows, 40, resize, channels, "per_image")
    cached = SegmentationDataset(rows, 40, resize, channels, "per_image", cache=cache)
    for i in range(len(rows)):
        a, b = plain[i], cached[i]
        for key in ("image", "mask", "class_map"):
            assert a[key].dtype == b[key].dtype
            assert (a[key] == b[key]).all(), f"row {i} {key} differs"


def test_cache_layout_and_index(prepared):
    folder = _build(prepared, CacheSettings(32, "letterbox", 1))
    assert folder.parent == prepared / "cache" / "busi"
    images = np.load(folder / IMAGES_FILE, mmap_mode="r")
    classmaps = np.load(folder / CLASSMAPS_FILE, mmap_mode="r")
    assert images.shape == (12, 32, 32, 1) and images.dtype == np.uint8
    assert classmaps.shape == (12, 32, 32) and classmaps.dtype == np.uint8
    index = json.loads((folder / INDEX_FILE).read_text())
    rows, info = load_dataset_rows(make_cfg(prepared), "busi")
    assert index["sample_ids"] == list(rows["sample_id"])
    assert index["format"] == CACHE_FORMAT_VERSION and index["manifest_sha256"] == info["manifest_sha256"]
    assert [g["original_hw"] for g in index["geometry"]] == [
        [h, w] for h, w in zip(rows["height"], rows["width"], strict=True)
    ]
    # malignant rows carry class 2, benign class 1, normal none
    for j, label in enumerate(rows["label"]):
        values = set(np.unique(classmaps[j])) - {0}
        assert values == {"normal": set(), "benign": {1}, "malignant": {2}}[label]
    assert _leftovers(prepared) == []


def test_unchanged_inputs_reuse_the_cache(prepared, monkeypatch):
    settings = CacheSettings(32, "letterbox", 1)
    first = _build(prepared, settings)
    stamp = (first / IMAGES_FILE).stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cache rebuilt although nothing changed")

    monkeypatch.setattr(cache_mod, "_build", no_rebuild)
    assert _build(prepared, settings) == first
    assert (first / IMAGES_FILE).stat().st_mtime_ns == stamp


def test_changed_manifest_gives_a_new_cache(prepared):
    settings = CacheSettings(32, "letterbox", 1)
    first = _build(prepared, settings)
    manifest = prepared / "manifests" / "busi.csv"
    lines = manifest.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    cells[header.index("patient_id")] = "renamed"  # new content, same pixels
    manifest.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    second = _build(prepared, settings)
    assert second != first and (second / INDEX_FILE).is_file() and (first / INDEX_FILE).is_file()


def test_rewritten_mask_gives_a_new_cache(prepared):
    settings = CacheSettings(32, "letterbox", 1)
    first = _build(prepared, settings)
    rows, _ = load_dataset_rows(make_cfg(prepared), "busi")
    j = int(np.nonzero((rows["label"] == "benign").to_numpy())[0][0])
    mask_path, class_path = Path(rows.loc[j, "mask_path"]), Path(rows.loc[j, "class_mask_path"])
    h, w = int(rows.loc[j, "height"]), int(rows.loc[j, "width"])
    new_mask = np.zeros((h, w), np.uint8)
    new_mask[: h // 2, : w // 2] = 1
    Image.fromarray(new_mask * 255, "L").save(mask_path)  # prepare regenerated the derived masks
    Image.fromarray(new_mask, "L").save(class_path)
    second = _build(prepared, settings)
    assert second != first
    cached = ArrayCache([second]).read(ArrayCache([second]).locate("busi", rows.loc[j, "sample_id"]))[1]
    np.testing.assert_array_equal(cached, square_row(rows.loc[j], 32, "letterbox", 1)[1])


def test_settings_change_gives_a_different_folder(prepared):
    folders = {
        _build(prepared, CacheSettings(32, "letterbox", 1)),
        _build(prepared, CacheSettings(48, "letterbox", 1)),
        _build(prepared, CacheSettings(32, "resize", 1)),
        _build(prepared, CacheSettings(32, "letterbox", 3)),
    }
    assert len(folders) == 4


def test_format_version_is_part_of_the_key(prepared, monkeypatch):
    first = _build(prepared, CacheSettings(32, "letterbox", 1))
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    assert _build(prepared, CacheSettings(32, "letterbox", 1)) != first


def test_edited_preprocessing_code_never_reuses_stale_pixels(prepared, tmp_path, monkeypatch):
    """The geometry module's source is edited (here: its file holds other bytes, and the edited resizer mirrors
    every image): the next build keys a new folder, holding the new code's pixels, and the dataset reads those."""
    import busbench.data.geometry as geometry

    settings = CacheSettings(32, "letterbox", 1)
    first = _build(prepared, settings)
    rows, _ = load_dataset_rows(make_cfg(prepared), "busi")
    edited = tmp_path / "geometry.py"
    edited.write_bytes(Path(geometry.__file__).read_bytes() + b"\n# mirrored\n")

    def mirrored(row, size, mode, channels):
        image, class_map, info = square_row(row, size, mode, channels)
        return image[:, ::-1].copy(), class_map[:, ::-1].copy(), info

    try:
        monkeypatch.setattr(geometry, "__file__", str(edited))
        monkeypatch.setattr(cache_mod, "square_row", mirrored)
        cache_mod._module_digest.cache_clear()
        second = _build(prepared, settings)
        assert second != first and (first / INDEX_FILE).is_file()  # the old folder is left for other readers
        assert (
            json.loads((second / INDEX_FILE).read_text())["code"]
            != json.loads((first / INDEX_FILE).read_text())["code"]
        )
        ds = SegmentationDataset(rows, 32, "letterbox", 1, cache=ArrayCache([second]))
        for i, rec in enumerate(rows.to_dict("records")):
            image, class_map, _ = mirrored(rec, 32, "letterbox", 1)
            np.testing.assert_array_equal(ds[i]["image"][0].numpy(), image[:, :, 0])
            np.testing.assert_array_equal(ds[i]["class_map"].numpy(), class_map)
    finally:
        monkeypatch.undo()
        cache_mod._module_digest.cache_clear()
    assert _build(prepared, settings) == first  # the original code finds its own cache again


def test_preprocessing_digest_follows_the_source_and_opencv(tmp_path, monkeypatch):
    module = tmp_path / "pixel_code_v.py"
    module.write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        before = cache_mod.preprocessing_digest(["pixel_code_v"])
        assert cache_mod.preprocessing_digest(["pixel_code_v"]) == before  # stable while nothing changes
        module.write_text("SCALE = 2\n")
        cache_mod._module_digest.cache_clear()
        assert cache_mod.preprocessing_digest(["pixel_code_v"]) != before
        defaults = cache_mod.preprocessing_digest()
        monkeypatch.setattr(cache_mod.cv2, "__version__", "0.0.0-other")
        assert cache_mod.preprocessing_digest() != defaults
    finally:
        cache_mod._module_digest.cache_clear()


def test_failed_build_leaves_nothing(prepared, monkeypatch):
    calls = {"n": 0}
    real = cache_mod.square_row

    def failing(row, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise DataError(f"{row['image_path']} could not be decoded")
        return real(row, *args)

    monkeypatch.setattr(cache_mod, "square_row", failing)
    with pytest.raises(DataError, match="could not be decoded"):
        _build(prepared, CacheSettings(32, "letterbox", 1))
    assert list((prepared / "cache" / "busi").iterdir()) == []


def test_full_disk_is_reported_and_leaves_nothing(prepared, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "open_memmap", no_space)
    with pytest.raises(DataError, match=r"No space left on device.*data.cache: false"):
        _build(prepared, CacheSettings(32, "letterbox", 1))
    assert list((prepared / "cache" / "busi").iterdir()) == []


def test_losing_a_build_race_discards_the_temporary_copy(prepared, monkeypatch):
    real_build = cache_mod._build
    settings = CacheSettings(32, "letterbox", 1)
    raced = {"done": False}

    def build_then_lose(*args, **kwargs):
        real_build(*args, **kwargs)
        if not raced["done"]:  # another process finishes the same cache while this one is still building
            raced["done"] = True
            _build(prepared, settings)

    monkeypatch.setattr(cache_mod, "_build", build_then_lose)
    winner_folders = sorted((prepared / "cache" / "busi").glob("*"))
    assert winner_folders == []
    folder = _build(prepared, settings)
    assert raced["done"] and (folder / INDEX_FILE).is_file()
    assert [p.name for p in (prepared / "cache" / "busi").iterdir()] == [folder.name]
    ArrayCache([folder])  # the surviving copy is complete


def _build_in_process(data_root: str, queue) -> None:
    folder = _build(Path(data_root), CacheSettings(32, "letterbox", 3))
    queue.put(str(folder))


def test_concurrent_builders_agree(prepared):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(prepared), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = {queue.get(timeout=5), queue.get(timeout=5)}
    assert len(results) == 1
    folder = Path(results.pop())
    assert [p.name for p in (prepared / "cache" / "busi").iterdir()] == [folder.name]
    ArrayCache([folder])


def test_corrupt_cache_is_reported_with_the_fix(prepared):
    folder = _build(prepared, CacheSettings(32, "letterbox", 1))
    (folder / INDEX_FILE).write_text("{not json")
    with pytest.raises(DataError, match="delete"):
        ArrayCache([folder])
    folder = _build(prepared, CacheSettings(32, "letterbox", 3))
    np.save(folder / IMAGES_FILE, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="inconsistent"):
        ArrayCache([folder])


def test_pickled_cache_does_not_carry_the_arrays(prepared):
    folder = _build(prepared, CacheSettings(64, "letterbox", 3))
    cache = ArrayCache([folder])
    where = cache.locate("busi", "busi_004")
    expected = cache.read(where)
    blob = pickle.dumps(cache)
    assert len(blob) < os.path.getsize(folder / IMAGES_FILE) / 4
    clone = pickle.loads(blob)
    for a, b in zip(clone.read(where), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_rows_from_another_manifest_are_refused(prepared):
    cache = ArrayCache([_build(prepared, CacheSettings(32, "letterbox", 1))])
    rows, _ = load_dataset_rows(make_cfg(prepared), "busi")
    rows.loc[0, "sample_id"] = "not_in_cache"
    with pytest.raises(DataError, match="not in the cache"):
        SegmentationDataset(rows, 32, "letterbox", 1, cache=cache)
    with pytest.raises(ValueError, match="cache holds"):
        SegmentationDataset(rows.iloc[1:], 48, "letterbox", 1, cache=cache)


def test_config_builders_use_one_cache_for_folds_and_test(prepared):
    cfg = make_cfg(prepared, image_size=32, cache=True)
    train0, val0 = build_datasets(cfg, 0)
    train1, _ = build_datasets(cfg, 1)
    test = build_test_dataset(cfg, "busi")
    assert train0.cache is not None and train1.cache is not None and test.cache is not None
    assert train0.cache.folders == train1.cache.folders == test.cache.folders
    assert len(list((prepared / "cache" / "busi").iterdir())) == 1
    cfg.data.cache = False
    plain_train, _ = build_datasets(cfg, 0)
    assert plain_train.cache is None
