"""Dataset adapters on the real samples and on synthetic data in every raw layout, quirks and bad input included.

Expected values are computed independently of the adapters (folder listings, pandas, plain PIL conversions).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from PIL import Image

from busbench.data import layouts as L
from busbench.data.adapters import ADAPTERS, Adapter, dataset_keys, get_adapter
from busbench.data.adapters.base import mask_to_bool, read_mask
from busbench.data.adapters.curated_busi import load_keep_list, packaged_keep_list_bytes
from busbench.data.synth import synthesize
from busbench.errors import ConfigError, DataError

FOLDERS = {
    "busi": "BUSI",
    "curated_busi": "Curated_BUSI",
    "busbra": "BUSBRA",
    "bus_uc": "BUS_UC",
    "bus_uclm": "BUS-UCLM",
    "yap2018": "Yap2018",
}
N = 24


def _grey_bool(path: Path) -> np.ndarray:
    """Independent mask reading: PIL's own conversion to L (ignores alpha), any non-zero pixel."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0


def _load(key: str, raw_root: Path, **options) -> tuple[Adapter, list]:
    adapter = get_adapter(key, **options)
    return adapter, adapter.scan(adapter.locate(raw_root))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    for key, folder in FOLDERS.items():
        synthesize(key, root / folder, n=N, seed=7)
    return root


@pytest.fixture
def raw(synthetic_root, tmp_path) -> Path:
    """A private, writable copy of the synthetic raw root, for tests that damage it."""
    copy = tmp_path / "raw"
    shutil.copytree(synthetic_root, copy)
    return copy


# ------------------------------------------------------------------------------------------------ registry


def test_registry_keys_and_unknown_key():
    assert dataset_keys() == sorted(FOLDERS)
    assert {k: cls.folder for k, cls in ADAPTERS.items()} == FOLDERS
    with pytest.raises(DataError) as exc:
        get_adapter("nope")
    assert all(k in str(exc.value) for k in FOLDERS)
    with pytest.raises(DataError, match="Did you mean 'busbra'"):
        get_adapter("bus_bra")


def test_bad_options():
    with pytest.raises(ConfigError, match="hesn_rule"):
        get_adapter("bus_uclm", hesn_rule="crop")
    with pytest.raises(ConfigError, match="no option 'colour'"):
        get_adapter("busi", colour=True)
    with pytest.raises(ConfigError, match="source"):
        get_adapter("curated_busi", source="kaggle")
    with pytest.raises(ConfigError, match="exclude_doppler"):
        get_adapter("bus_uclm", exclude_doppler="yes")


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_busi(real_data_root):
    adapter, samples = _load("busi", real_data_root)
    folder = adapter.locate(real_data_root)
    assert folder == real_data_root / "BUSI"
    expected_labels = collections.Counter()
    masks_on_disk = 0
    for cls in ("benign", "malignant", "normal"):
        names = sorted(p.name for p in (folder / cls).iterdir())
        expected_labels[cls] = sum("_mask" not in n for n in names)
        masks_on_disk += sum("_mask" in n for n in names)
    assert len(samples) == 201 and masks_on_disk == 219
    assert collections.Counter(s.label for s in samples) == expected_labels
    assert expected_labels["benign"] > 90  # 90 in sequence plus the extra multi-mask cases
    assert sum(len(s.mask_paths) for s in samples) == 219
    assert [s.sample_id for s in samples] == sorted(s.sample_id for s in samples)
    assert all(s.patient_id == s.sample_id and s.official_fold is None for s in samples)
    multi = {s.sample_id: s for s in samples if len(s.mask_paths) > 1}
    assert len(multi) == 17 and "benign_0195" in multi and len(multi["benign_0195"].mask_paths) == 3
    for sample in multi.values():
        decoded = adapter.decode(sample)
        expected = np.zeros(decoded.mask.shape, dtype=bool)
        for path in sample.mask_paths:
            expected |= _grey_bool(path)
        assert decoded.mask.sum() == expected.sum() and np.array_equal(decoded.mask, expected)
        assert decoded.image.shape == (*expected.shape, 3)
        assert set(np.unique(decoded.class_map)) == {0, 1 if sample.label == "benign" else 2}
    # RGBA masks (alpha all-on) are read through their colour channels.
    rgba = read_mask(folder / "benign" / "benign (4)_mask_1.png")
    assert rgba.any() and np.array_equal(rgba, _grey_bool(folder / "benign" / "benign (4)_mask_1.png"))
    for sample in samples[::15]:
        decoded = adapter.decode(sample)
        if sample.label == "normal":
            assert not decoded.mask.any() and not decoded.class_map.any()
        else:
            assert decoded.mask.any()


@pytest.mark.realdata
def test_real_busbra(real_data_root):
    adapter, samples = _load("busbra", real_data_root)
    assert len(samples) == 283
    assert len({s.patient_id for s in samples}) == 160
    table = pd.read_csv(real_data_root / "BUSBRA" / "bus_data.csv", dtype=str)
    folds = pd.read_csv(real_data_root / "BUSBRA" / "5-fold-cv.csv", dtype=str).set_index("ID")["kFold"]
    by_id = {s.sample_id: s for s in samples}
    assert sorted(by_id) == sorted(table.ID)
    for row in table.itertuples():
        sample = by_id[row.ID]
        assert sample.label == row.Pathology and int(sample.patient_id) == int(row.Case)
        assert sample.official_fold == int(folds[row.ID])
        assert sample.meta["BIRADS"] == row.BIRADS and sample.meta["Histology"] == row.Histology
    pairs = collections.defaultdict(list)
    for s in samples:
        pairs[s.sample_id[4:8]].append(s)
    for group in pairs.values():
        suffixes = sorted(s.sample_id[-1] for s in group)
        assert suffixes in (["l", "r"], ["s"]) and len({s.patient_id for s in group}) == 1
    for sample in samples[::40]:
        decoded = adapter.decode(sample)
        assert decoded.image.ndim == 2 and decoded.image.dtype == np.uint8
        assert np.array_equal(decoded.mask, _grey_bool(sample.mask_paths[0])) and decoded.notes == []


@pytest.mark.realdata
def test_real_bus_uclm(real_data_root):
    adapter, samples = _load("bus_uclm", real_data_root)
    assert len(samples) == 70
    assert {s.patient_id for s in samples} == {"ALWI", "COPE", "CRCI", "ELCO", "LOTI"}
    info = pd.read_csv(real_data_root / "BUS-UCLM" / "INFO.csv", sep=";", encoding="utf-8-sig", dtype=str)
    labels = dict(zip(info.Image.str.replace(".png", "", regex=False), info.Label.str.lower(), strict=True))
    assert {s.sample_id: s.label for s in samples} == labels
    for sample in samples:
        decoded = adapter.decode(sample)
        rgb = np.asarray(Image.open(sample.mask_paths[0]).convert("RGB")).astype(int)
        green = (rgb[..., 0] == 0) & (rgb[..., 1] == 255) & (rgb[..., 2] == 0)
        red = (rgb[..., 0] == 255) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0)
        assert np.array_equal(decoded.class_map == 1, green) and np.array_equal(decoded.class_map == 2, red)
        assert np.array_equal(decoded.mask, green | red)
        values = set(np.unique(decoded.class_map).tolist()) - {0}
        assert values == {"normal": set(), "benign": {1}, "malignant": {2}}[sample.label]
        assert decoded.image.shape == (606, 856, 3) and decoded.notes == []
        assert set(sample.meta) == {"Doppler", "Marks", "Combined", "Resolution"}


@pytest.mark.realdata
def test_real_busi_is_not_a_complete_curated_source(real_data_root):
    """The real sample lacks most kept BUSI ids, so building Curated BUSI from it must fail, naming a file."""
    adapter = get_adapter("curated_busi")
    folder = adapter.locate(real_data_root)
    assert folder == real_data_root / "BUSI"
    with pytest.raises(
        DataError, match=r"keep-list names \d+ images this BUSI copy lacks: .*benign \(\d+\)\.png"
    ):
        adapter.scan(folder)


# --------------------------------------------------------------------------------- synthetic, every dataset


@pytest.mark.parametrize("key", sorted(FOLDERS))
def test_synthetic_roundtrip(synthetic_root, key):
    adapter, samples = _load(key, synthetic_root)
    assert len(samples) == N
    assert [s.sample_id for s in samples] == sorted({s.sample_id for s in samples})
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", s.sample_id) for s in samples)
    assert {s.label for s in samples} <= set(adapter.labels)
    for sample in samples:
        assert sample.image_path.is_absolute() and sample.image_path.is_file()
        assert all(p.is_absolute() and p.is_file() for p in sample.mask_paths)
        decoded = adapter.decode(sample)
        h, w = decoded.image.shape[:2]
        assert decoded.image.dtype == np.uint8 and decoded.image.ndim in (2, 3)
        assert decoded.mask.shape == (h, w) and decoded.mask.dtype == bool
        assert decoded.class_map.shape == (h, w) and decoded.class_map.dtype == np.uint8
        assert np.array_equal(decoded.mask, decoded.class_map > 0)
        assert decoded.mask.any() == (sample.label != "normal")


def test_locate_through_archive_nestings(synthetic_root):
    expected = {
        "busi": ("BUSI", "Dataset_BUSI_with_GT"),
        "curated_busi": ("Curated_BUSI", "Curated BUSI"),
        "busbra": ("BUSBRA", "BUSBRA"),
        "bus_uc": ("BUS_UC", "BUS_UC", "BUS_UC"),
        "bus_uclm": ("BUS-UCLM", "BUS-UCLM Breast ultrasound lesion segmentation dataset", "BUS-UCLM"),
        "yap2018": ("Yap2018", "BUS"),
    }
    for key, parts in expected.items():
        assert get_adapter(key).locate(synthetic_root) == synthetic_root.joinpath(*parts)


def test_locate_reports_where_it_looked(tmp_path):
    (tmp_path / "BUSI" / "junk").mkdir(parents=True)
    for key, folder in FOLDERS.items():
        with pytest.raises(DataError) as exc:
            get_adapter(key).locate(tmp_path)
        assert str(tmp_path / folder) in str(exc.value) or str(tmp_path / "BUSI") in str(exc.value)
    with pytest.raises(DataError, match=r"nothing below .*BUSI matches.*Dataset_BUSI_with_GT"):
        get_adapter("busi").locate(tmp_path)
    with pytest.raises(DataError, match=r"BUS-UCLM does not exist.*INFO.csv"):
        get_adapter("bus_uclm").locate(tmp_path)


def test_macos_resource_folders_are_skipped(raw):
    nested = raw / "BUSI" / "unpacked"
    nested.mkdir()
    (raw / "BUSI" / "Dataset_BUSI_with_GT").rename(nested / "Dataset_BUSI_with_GT")
    shutil.copytree(nested, raw / "BUSI" / "__MACOSX" / "unpacked")
    assert get_adapter("busi").locate(raw) == nested / "Dataset_BUSI_with_GT"


def test_samples_are_hashable(synthetic_root):
    _, samples = _load("busbra", synthetic_root)
    assert len(set(samples)) == len(samples)


def test_two_copies_are_ambiguous(raw):
    shutil.copytree(raw / "BUSI" / "Dataset_BUSI_with_GT", raw / "BUSI" / "copy")
    with pytest.raises(DataError, match="more than one dataset copy"):
        get_adapter("busi").locate(raw)


# ------------------------------------------------------------------------------------------------- BUSI


def test_busi_quirks(synthetic_root):
    adapter, samples = _load("busi", synthetic_root)
    by_id = {s.sample_id: s for s in samples}
    for sample_id, count in (("benign_0002", 2), ("benign_0003", 3), ("malignant_0001", 2)):
        sample = by_id[sample_id]
        assert len(sample.mask_paths) == count and sample.meta["mask_files"] == str(count)
        decoded = adapter.decode(sample)
        parts = [_grey_bool(p) for p in sample.mask_paths]
        expected = np.logical_or.reduce(parts)
        assert np.array_equal(decoded.mask, expected)
        assert (
            decoded.mask.sum() < sum(p.sum() for p in parts) or sample_id == "benign_0002"
        )  # overlap counted once
        assert any("merged by OR" in n for n in decoded.notes)
    assert by_id["benign_0002"].mask_paths[1].name == "benign (2)_mask_1.png"  # the RGBA one
    l_mask = adapter.decode(by_id["benign_0005"])
    assert l_mask.mask.any() and np.array_equal(l_mask.class_map, l_mask.mask.astype(np.uint8))
    malignant = adapter.decode(by_id["malignant_0004"])
    assert set(np.unique(malignant.class_map)) == {0, 2}
    normal = adapter.decode(by_id["normal_0001"])
    assert normal.image.shape[2] == 3 and not normal.mask.any()
    # The cross-label duplicate decodes to identical pixels under both labels.
    a, b = adapter.decode(by_id["benign_0007"]), adapter.decode(by_id["malignant_0003"])
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert set(np.unique(a.class_map)) == {0, 1} and set(np.unique(b.class_map)) == {0, 2}


def test_mask_encodings():
    lesion = np.zeros((6, 7), dtype=bool)
    lesion[2:4, 1:5] = True
    grey = lesion.astype(np.uint8) * 255
    assert np.array_equal(mask_to_bool(lesion, "1"), lesion)
    assert np.array_equal(mask_to_bool(grey, "L"), lesion)
    assert np.array_equal(mask_to_bool(lesion.astype(np.uint8), "L"), lesion)  # 0/1-valued
    assert np.array_equal(mask_to_bool(np.dstack([grey] * 3), "RGB"), lesion)
    on = np.full_like(grey, 255)
    assert np.array_equal(mask_to_bool(np.dstack([grey, grey, grey, on]), "RGBA"), lesion)  # BUSI's RGBA
    zeros = np.zeros_like(grey)
    assert np.array_equal(
        mask_to_bool(np.dstack([zeros, zeros, zeros, grey]), "RGBA"), lesion
    )  # alpha carries it
    assert not mask_to_bool(np.dstack([zeros, zeros, zeros, on]), "RGBA").any()  # empty, alpha all-on
    assert np.array_equal(mask_to_bool(np.dstack([grey, on]), "LA"), lesion)
    assert np.array_equal(mask_to_bool(np.dstack([zeros, grey, zeros]), "RGB"), lesion)  # any channel
    jpeg_like = grey.astype(int) + np.where(lesion, -30, 20)
    assert np.array_equal(mask_to_bool(jpeg_like.astype(np.uint8), "L"), lesion)


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "RGBA", "P", "LA", "I;16"])
def test_mask_files_in_every_mode(tmp_path, mode):
    lesion = np.zeros((9, 11), dtype=bool)
    lesion[3:7, 2:9] = True
    grey = Image.fromarray(lesion.astype(np.uint8) * 255)
    image = Image.fromarray(lesion) if mode == "1" else grey.convert(mode)
    if mode == "I;16":
        image = Image.fromarray(lesion.astype(np.uint16) * 65535)
    path = tmp_path / "m.png"
    image.save(path)
    assert np.array_equal(read_mask(path), lesion)


# ----------------------------------------------------------------------------------------------- Curated


def test_packaged_keep_list():
    data = packaged_keep_list_bytes()
    assert hashlib.sha256(data).hexdigest() == L.CURATED_KEEP_LIST_SHA256
    assert (
        data.startswith(b"class;id\r\n") and data.count(b"\r\n") == 450
    )  # header + 450 rows, no final newline
    keep = load_keep_list()
    assert {cls: len(ids) for cls, ids in keep.items()} == {"benign": 222, "malignant": 164, "normal": 64}
    assert 20 in keep["benign"] and 1 not in keep["benign"]


def test_shipped_file_matches_published_hash_byte_for_byte():
    """Line endings must survive git and packaging: the shipped file is hashed as bytes."""
    path = Path(L.__file__).parent / L.CURATED_KEEP_LIST
    assert hashlib.sha256(path.read_bytes()).hexdigest() == L.CURATED_KEEP_LIST_SHA256


def test_curated_zenodo(synthetic_root):
    adapter, samples = _load("curated_busi", synthetic_root)
    keep = load_keep_list()
    assert adapter.options()["source"] == "auto"
    for sample in samples:
        cls, number = sample.sample_id.rsplit("_", 1)
        assert sample.label == cls and int(number) in keep[cls]
        assert sample.image_path.name == f"{cls}_id_{int(number)}.png"
        decoded = adapter.decode(sample)
        raw_mask = np.asarray(Image.open(sample.mask_paths[0]))
        assert np.array_equal(decoded.mask, raw_mask > 0)  # 254 (wrapped overlap) counts as lesion
    assert any(254 in np.asarray(Image.open(s.mask_paths[0])) for s in samples)


def test_curated_from_busi_with_keep_list(raw, tmp_path):
    keep_csv = tmp_path / "keep.csv"
    keep_csv.write_bytes(b"class;id\r\nbenign;2\r\nbenign;3\r\nmalignant;1\r\nnormal;2\r\n")
    shutil.rmtree(raw / "Curated_BUSI")
    adapter = get_adapter("curated_busi", keep_list=keep_csv)
    folder = adapter.locate(raw)
    assert folder == raw / "BUSI" / "Dataset_BUSI_with_GT"
    samples = adapter.scan(folder)
    assert [s.sample_id for s in samples] == ["benign_0002", "benign_0003", "malignant_0001", "normal_0002"]
    assert len(adapter.excluded) == N - 4 and "benign_0001" in adapter.excluded
    assert len(samples[1].mask_paths) == 3  # every outline kept, including _mask_2
    with pytest.raises(DataError, match="source=zenodo"):
        get_adapter("curated_busi", source="zenodo").locate(raw)
    keep_csv.write_bytes(b"class;id\r\nbenign;2\r\nbenign;400\r\n")
    with pytest.raises(DataError, match=r"benign \(400\)\.png"):
        adapter.scan(folder)
    keep_csv.write_bytes(b"class;id\r\nbenign;x\r\n")
    with pytest.raises(DataError, match="keep.csv: line 2"):
        adapter.scan(folder)


def test_curated_source_choice(raw):
    assert get_adapter("curated_busi").locate(raw) == raw / "Curated_BUSI" / "Curated BUSI"
    assert get_adapter("curated_busi", source="busi").locate(raw) == raw / "BUSI" / "Dataset_BUSI_with_GT"
    with pytest.raises(DataError, match="source=busi"):
        get_adapter("curated_busi", source="busi").scan(raw / "Curated_BUSI" / "Curated BUSI")


# -------------------------------------------------------------------------------------------------- BUSBRA


def test_busbra_quirks(synthetic_root):
    adapter, samples = _load("busbra", synthetic_root)
    folder = adapter.locate(synthetic_root)
    table = pd.read_csv(folder / "bus_data.csv", dtype=str)
    off = []
    for row in table.itertuples():
        with Image.open(folder / "Images" / f"{row.ID}.png") as image:
            if image.height != int(row.Height):
                off.append(row.ID)
    assert len(off) == 1
    by_id = {s.sample_id: s for s in samples}
    decoded = adapter.decode(by_id[off[0]])
    assert decoded.image.shape[0] != int(table.set_index("ID").Height[off[0]])  # pixels win
    assert any("bus_data.csv says" in n for n in decoded.notes)
    assert all(not adapter.decode(s).notes for s in samples if s.sample_id != off[0])
    folds = pd.read_csv(folder / "5-fold-cv.csv", dtype=str).set_index("ID")["kFold"]
    assert all(s.official_fold == int(folds[s.sample_id]) for s in samples)
    for s in samples:
        assert s.patient_id == s.sample_id[4:8]
        assert s.meta["Side"] == L.BUSBRA_SIDES[s.sample_id[-1]]


def test_busbra_without_fold_file(raw):
    (raw / "BUSBRA" / "BUSBRA" / "5-fold-cv.csv").unlink()
    _, samples = _load("busbra", raw)
    assert all(s.official_fold is None for s in samples)


# -------------------------------------------------------------------------------------------------- BUS-UC


def test_bus_uc_quirks(synthetic_root):
    adapter, samples = _load("bus_uc", synthetic_root)
    assert all(s.sample_id == f"{s.label}_{s.image_path.stem}" for s in samples)
    assert not any("All" in s.image_path.parts for s in samples)
    notes = {s.sample_id: adapter.decode(s).notes for s in samples}
    resized = [sid for sid, n in notes.items() if any("resized" in x for x in n)]
    assert len(resized) == 1 and resized[0].startswith("malignant_")


# ------------------------------------------------------------------------------------------------ BUS-UCLM


def test_bus_uclm_hesn_resize_mask(synthetic_root):
    adapter, samples = _load("bus_uclm", synthetic_root)
    hesn = [s for s in samples if s.patient_id == "HESN"]
    assert len(hesn) == 3
    for sample in hesn:
        with Image.open(sample.image_path) as image, Image.open(sample.mask_paths[0]) as mask:
            assert image.mode == "RGBA" and image.size != mask.size
            size = image.size
            colour_mask = np.asarray(mask.convert("RGB"))
        decoded = adapter.decode(sample)
        assert decoded.image.shape == (size[1], size[0], 3)
        assert decoded.mask.shape == (size[1], size[0])
        assert any("resized" in n and "hesn_rule=resize_mask" in n for n in decoded.notes)
        # Nearest-neighbour resizing keeps classes exact: independent PIL resize of the colour mask.
        expected = np.asarray(Image.fromarray(colour_mask).resize(size, Image.Resampling.NEAREST))
        assert np.array_equal(decoded.class_map == 1, (expected == (0, 255, 0)).all(-1))
        assert np.array_equal(decoded.class_map == 2, (expected == (255, 0, 0)).all(-1))
        assert decoded.mask.any() == (sample.label != "normal")


def test_bus_uclm_hesn_exclude(synthetic_root):
    adapter, samples = _load("bus_uclm", synthetic_root, hesn_rule="exclude")
    assert len(samples) == N - 3 and not any(s.patient_id == "HESN" for s in samples)
    assert sorted(adapter.excluded) == ["HESN_000", "HESN_001", "HESN_002"]
    assert all("hesn_rule=exclude" in why for why in adapter.excluded.values())
    assert all(not adapter.decode(s).notes for s in samples)


def test_bus_uclm_flags(synthetic_root):
    folder = get_adapter("bus_uclm").locate(synthetic_root)
    info = list(csv.DictReader(io.StringIO((folder / "INFO.csv").read_text("utf-8-sig")), delimiter=";"))
    stray = next(r["Image"][:-4] for r in info if r["Doppler"] == "Y")
    _, samples = _load("bus_uclm", synthetic_root)
    by_id = {s.sample_id: s for s in samples}
    assert by_id[stray].meta["Doppler"] == "Yes"
    assert {s.meta["Doppler"] for s in samples} == {"Yes", "No"}
    for option, column in (
        ("exclude_doppler", "Doppler"),
        ("exclude_marks", "Marks"),
        ("exclude_combined", "Combined"),
    ):
        flagged = {r["Image"][:-4] for r in info if r[column] in ("Yes", "Y")}
        adapter, kept = _load("bus_uclm", synthetic_root, **{option: True})
        assert flagged and set(adapter.excluded) == flagged
        assert {s.sample_id for s in kept} == set(by_id) - flagged
    assert stray in _load("bus_uclm", synthetic_root, exclude_doppler=True)[0].excluded


def test_bus_uclm_label_colour_disagreement_is_noted(raw):
    adapter, samples = _load("bus_uclm", raw)
    benign = next(s for s in samples if s.label == "benign" and s.patient_id != "HESN")
    rgb = np.asarray(Image.open(benign.mask_paths[0]).convert("RGB")).copy()
    rgb[(rgb == (0, 255, 0)).all(-1)] = (255, 0, 0)
    Image.fromarray(rgb).save(benign.mask_paths[0])
    decoded = adapter.decode(benign)
    assert set(np.unique(decoded.class_map)) == {0, 2}
    assert any("INFO.csv says Benign" in n for n in decoded.notes)


def test_bus_uclm_foreign_colour_is_an_error(raw):
    adapter, samples = _load("bus_uclm", raw)
    sample = next(s for s in samples if s.label == "benign")
    rgb = np.asarray(Image.open(sample.mask_paths[0]).convert("RGB")).copy()
    rgb[0, 0] = (0, 254, 0)
    Image.fromarray(rgb).save(sample.mask_paths[0])
    with pytest.raises(DataError, match=re.escape(sample.mask_paths[0].name) + r".*\(0, 254, 0\)"):
        adapter.decode(sample)


# -------------------------------------------------------------------------------------------------- Yap2018


def test_yap2018_quirks(synthetic_root):
    adapter, samples = _load("yap2018", synthetic_root)
    folder = adapter.locate(synthetic_root)
    ids = [s.sample_id for s in samples]
    assert all(re.fullmatch(r"\d{6}", i) for i in ids) and "000001" in ids and "000295" in ids
    frame = pd.read_excel(folder / "DatasetB.xlsx", sheet_name="Hoja1", dtype=str)
    frame = frame[frame.Image.notna()]
    assert {s.sample_id: (s.label, s.meta["Diagnosis"]) for s in samples} == {
        r.Image: (r.Type.lower(), r.Diagnosis) for r in frame.itertuples()
    }
    modes = set()
    for sample in samples:
        with Image.open(sample.mask_paths[0]) as gt:
            modes.add(gt.mode)
        assert np.array_equal(adapter.decode(sample).mask, _grey_bool(sample.mask_paths[0]))
    assert modes == {"1", "L"}


def test_yap2018_numeric_ids_are_padded(raw):
    path = raw / "Yap2018" / "BUS" / "DatasetB.xlsx"
    workbook = load_workbook(path)
    sheet = workbook["Hoja1"]
    for row in range(2, sheet.max_row + 1):
        if sheet.cell(row, 1).value:
            sheet.cell(row, 1).value = int(sheet.cell(row, 1).value)
    workbook.save(path)
    _, samples = _load("yap2018", raw)
    assert len(samples) == N and samples[0].sample_id == "000001"


# ----------------------------------------------------------------------------------------------- bad input

# Per dataset: (dataset folder relative to raw root, an image, its mask, the metadata file or None).
LAYOUT_FILES = {
    "busi": ("BUSI/Dataset_BUSI_with_GT", "benign/benign (1).png", "benign/benign (1)_mask.png", None),
    "curated_busi": (
        "Curated_BUSI/Curated BUSI",
        "images/benign_id_20.png",
        "masks/benign_id_20_mask.png",
        None,
    ),
    "busbra": ("BUSBRA/BUSBRA", "Images/bus_0001-l.png", "Masks/mask_0001-l.png", "bus_data.csv"),
    "bus_uc": ("BUS_UC/BUS_UC/BUS_UC", "Benign/images/01.png", "Benign/masks/01.png", None),
    "bus_uclm": (
        "BUS-UCLM/BUS-UCLM Breast ultrasound lesion segmentation dataset/BUS-UCLM",
        None,
        None,
        "INFO.csv",
    ),
    "yap2018": ("Yap2018/BUS", "original/000001.png", "GT/000001.png", "DatasetB.xlsx"),
}


def _uclm_first(folder: Path) -> str:
    return sorted(p.name for p in (folder / "images").iterdir())[0]


def _files(raw: Path, key: str) -> tuple[Path, Path, Path, Path | None]:
    rel, image, mask, meta = LAYOUT_FILES[key]
    folder = raw / rel
    if key == "bus_uclm":
        first = _uclm_first(folder)
        image, mask = f"images/{first}", f"masks/{first}"
    return folder, folder / image, folder / mask, (folder / meta if meta else None)


@pytest.mark.parametrize("key", sorted(FOLDERS))
def test_image_without_mask(raw, key):
    folder, image, mask, _ = _files(raw, key)
    mask.unlink()
    with pytest.raises(DataError, match=re.escape(image.name) + ".*without its mask"):
        get_adapter(key).scan(folder)


@pytest.mark.parametrize("key", ["busi", "curated_busi", "bus_uc"])
def test_mask_without_image(raw, key):
    folder, image, mask, _ = _files(raw, key)
    image.unlink()
    with pytest.raises(DataError, match=re.escape(mask.name) + ".*mask without its image"):
        get_adapter(key).scan(folder)


@pytest.mark.parametrize("key", sorted(FOLDERS))
def test_truncated_png(raw, key):
    folder, image, _, _ = _files(raw, key)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    adapter = get_adapter(key)
    sample = next(s for s in adapter.scan(folder) if s.image_path == image.resolve())
    with pytest.raises(DataError, match=re.escape(image.name) + ".*truncated or damaged"):
        adapter.decode(sample)


@pytest.mark.parametrize("key", ["busbra", "bus_uclm", "yap2018"])
def test_metadata_row_without_file(raw, key):
    folder, image, mask, meta = _files(raw, key)
    image.unlink()
    with pytest.raises(DataError, match=re.escape(meta.name) + f".*{re.escape(image.stem)}.*does not exist"):
        get_adapter(key).scan(folder)


@pytest.mark.parametrize("key", ["busbra", "bus_uclm", "yap2018"])
def test_file_without_metadata_row(raw, key):
    folder, image, mask, meta = _files(raw, key)
    extra = {"busbra": "bus_0999-s.png", "bus_uclm": "ZZZZ_000.png", "yap2018": "000999.png"}[key]
    shutil.copy(image, image.parent / extra)
    with pytest.raises(DataError, match=re.escape(extra) + ".*without a row in.*" + re.escape(meta.name)):
        get_adapter(key).scan(folder)


def test_busbra_stray_mask_and_fold_mismatch(raw):
    folder = raw / "BUSBRA" / "BUSBRA"
    shutil.copy(folder / "Masks" / "mask_0001-l.png", folder / "Masks" / "mask_0999-s.png")
    with pytest.raises(DataError, match=r"mask_0999-s\.png: mask without a row"):
        get_adapter("busbra").scan(folder)
    (folder / "Masks" / "mask_0999-s.png").unlink()
    lines = (folder / "5-fold-cv.csv").read_text().splitlines(keepends=True)
    (folder / "5-fold-cv.csv").write_text("".join(lines[:-1]))
    with pytest.raises(DataError, match=r"5-fold-cv\.csv: IDs do not match"):
        get_adapter("busbra").scan(folder)


@pytest.mark.parametrize("key", ["busi", "bus_uc", "curated_busi"])
def test_empty_dataset(raw, key):
    folder = _files(raw, key)[0]
    for path in sorted(folder.rglob("*.png")):
        path.unlink()
    with pytest.raises(DataError, match="holds no"):
        get_adapter(key).scan(folder)


def test_empty_metadata_tables(raw):
    for key in ("busbra", "bus_uclm"):
        folder, _, _, meta = _files(raw, key)
        text = meta.read_bytes().decode("utf-8-sig")
        meta.write_text(text.splitlines()[0] + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=re.escape(meta.name) + ": no rows"):
            get_adapter(key).scan(folder)


def test_empty_class_folder_and_missing_class(raw):
    folder = raw / "BUSI" / "Dataset_BUSI_with_GT"
    for path in sorted((folder / "normal").iterdir()):
        path.unlink()
    with pytest.raises(DataError, match=r"normal holds no images"):
        get_adapter("busi").scan(folder)
    (folder / "normal").rmdir()
    with pytest.raises(DataError, match=r"normal is missing"):
        get_adapter("busi").scan(folder)


def test_busi_unexpected_file_and_wrong_folder(raw):
    folder = raw / "BUSI" / "Dataset_BUSI_with_GT"
    shutil.copy(folder / "malignant" / "malignant (1).png", folder / "malignant" / "malignant (1)_vflip.png")
    with pytest.raises(DataError, match=r"malignant \(1\)_vflip\.png: unexpected file name"):
        get_adapter("busi").scan(folder)
    (folder / "malignant" / "malignant (1)_vflip.png").rename(folder / "benign" / "malignant (99).png")
    with pytest.raises(DataError, match=r"malignant \(99\)\.png: a malignant file in the benign/ folder"):
        get_adapter("busi").scan(folder)
    (folder / "benign" / "malignant (99).png").unlink()
    (folder / "benign" / ".DS_Store").write_bytes(b"\0")  # hidden and non-PNG files are ignored
    (folder / "benign" / "Thumbs.db").write_bytes(b"\0")
    assert len(get_adapter("busi").scan(folder)) == N


def test_wrong_separator(raw):
    folder, _, _, meta = _files(raw, "bus_uclm")
    meta.write_text(meta.read_text("utf-8-sig").replace(";", ","), encoding="utf-8-sig")
    with pytest.raises(DataError, match=r"INFO\.csv: header is not ';'-separated \(found ','"):
        get_adapter("bus_uclm").scan(folder)
    folder, _, _, meta = _files(raw, "busbra")
    frame = pd.read_csv(meta, dtype=str)
    frame.to_csv(meta, sep=";", index=False)
    with pytest.raises(DataError, match=r"bus_data\.csv: header is not ','-separated \(found ';'"):
        get_adapter("busbra").scan(folder)


def test_missing_column(raw):
    folder, _, _, meta = _files(raw, "bus_uclm")
    frame = pd.read_csv(meta, sep=";", encoding="utf-8-sig", dtype=str)
    frame.drop(columns=["Label"]).to_csv(meta, sep=";", index=False)
    with pytest.raises(DataError, match=r"INFO\.csv: missing column\(s\) Label"):
        get_adapter("bus_uclm").scan(folder)
    frame.drop(columns=["Doppler"]).to_csv(meta, sep=";", index=False)
    assert get_adapter("bus_uclm").scan(folder)  # optional column
    with pytest.raises(DataError, match=r"missing column\(s\) Doppler"):
        get_adapter("bus_uclm", exclude_doppler=True).scan(folder)
    folder, _, _, meta = _files(raw, "busbra")
    pd.read_csv(meta, dtype=str).drop(columns=["Pathology"]).to_csv(meta, index=False)
    with pytest.raises(DataError, match=r"bus_data\.csv: missing column\(s\) Pathology"):
        get_adapter("busbra").scan(folder)


def test_bad_metadata_values(raw):
    folder, _, _, meta = _files(raw, "busbra")
    frame = pd.read_csv(meta, dtype=str, keep_default_na=False)
    frame.loc[0, "Case"] = "7"
    frame.to_csv(meta, index=False)
    with pytest.raises(DataError, match=r"bus_data\.csv: line 2 \(bus_0001-l\) has Case '7'"):
        get_adapter("busbra").scan(folder)
    frame.loc[0, "Case"] = "1"
    frame.loc[0, "Pathology"] = "unknown"
    frame.to_csv(meta, index=False)
    with pytest.raises(DataError, match="Pathology 'unknown'"):
        get_adapter("busbra").scan(folder)
    folder, _, _, meta = _files(raw, "bus_uclm")
    text = meta.read_text("utf-8-sig")
    meta.write_text(text.replace(";Benign;", ";Cyst;", 1), encoding="utf-8-sig")
    with pytest.raises(DataError, match=r"INFO\.csv: line \d+ .* Label 'Cyst'"):
        get_adapter("bus_uclm").scan(folder)


def test_yap2018_workbook_problems(raw):
    folder, _, _, meta = _files(raw, "yap2018")
    workbook = load_workbook(meta)
    sheet = workbook["Hoja1"]
    sheet["B1"] = "Kind"
    workbook.save(meta)
    with pytest.raises(DataError, match=r"DatasetB\.xlsx: sheet 'Hoja1' lacks column\(s\) Type"):
        get_adapter("yap2018").scan(folder)
    sheet["B1"] = "Type"
    sheet.title = "Sheet9"
    workbook.create_sheet("Other")
    workbook.save(meta)
    with pytest.raises(DataError, match=r"DatasetB\.xlsx: no sheet 'Hoja1'"):
        get_adapter("yap2018").scan(folder)
    meta.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"DatasetB\.xlsx: cannot read the workbook"):
        get_adapter("yap2018").scan(folder)
    meta.unlink()
    with pytest.raises(DataError, match=r"DatasetB\.xlsx: metadata workbook not found"):
        get_adapter("yap2018").scan(folder)
