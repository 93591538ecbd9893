"""Synthetic datasets: every layout checked against the documented facts of the real release, and determinism."""

from __future__ import annotations

import csv
import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull

from busbench.cli import main as cli_main
from busbench.data import layouts as L
from busbench.data import synth
from busbench.data.synth import MIN_N, render_bus_image, synthesize
from busbench.errors import ConfigError, DataError


def _mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _bbox(mask: np.ndarray) -> str:
    """BUS-BRA's BBOX string: 1-based left and top, then extent minus one (Matlab regionprops convention)."""
    ys, xs = np.nonzero(mask)
    return f"[{xs.min() + 1},{ys.min() + 1},{xs.max() - xs.min()},{ys.max() - ys.min()}]"


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    """Every layout written once at its default size."""
    root = tmp_path_factory.mktemp("synth")
    return {key: synthesize(key, root / key) for key in L.LAYOUT_KEYS}


# ------------------------------------------------------------------------------------------------ renderer


def test_render_shapes_and_empty_normal():
    rng = np.random.default_rng(0)
    img, mask = render_bus_image(rng, 120, 150, lesion=True)
    assert (
        img.shape == (120, 150) and img.dtype == np.uint8 and mask.dtype == bool and mask.shape == (120, 150)
    )
    assert 0.005 < mask.mean() < 0.3
    img, mask = render_bus_image(rng, 64, 80, lesion=False)
    assert not mask.any() and img.std() > 10


def test_render_looks_like_bmode():
    """Hypoechoic lesions, a bright near field, malignant shadowing and irregular malignant outlines."""
    solidity = {False: [], True: []}
    shadow_ratio = []
    for seed in range(12):
        for malignant in (False, True):
            img, mask = render_bus_image(
                np.random.default_rng(seed), 160, 160, lesion=True, malignant=malignant
            )
            img = img.astype(float)
            ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
            assert img[mask].mean() < 0.7 * img[ring].mean()
            assert img[:5].mean() > img[40:100].mean()  # near-field band
            ys, xs = np.nonzero(mask)
            solidity[malignant].append(mask.sum() / ConvexHull(np.c_[ys, xs]).volume)
            if malignant:
                below = slice(ys.max() + 3, min(160, ys.max() + 25))
                cols = np.unique(xs)
                others = np.setdiff1d(np.arange(160), np.arange(cols.min() - 10, cols.max() + 11))
                if others.size:
                    shadow_ratio.append(img[below][:, cols].mean() / img[below][:, others].mean())
    assert np.mean(solidity[True]) < np.mean(solidity[False]) - 0.03
    assert np.median(shadow_ratio) < 0.85


def test_speckle_is_multiplicative():
    """Speckle scales with echogenicity: brighter tissue has proportionally larger local spread."""
    img, _ = render_bus_image(np.random.default_rng(5), 200, 200, lesion=False)
    img = img.astype(float)
    local_mean = ndimage.uniform_filter(img, 5)
    local_sd = np.sqrt(np.maximum(ndimage.uniform_filter(img**2, 5) - local_mean**2, 0))
    assert local_sd[20:180, 20:180].mean() > 5


# --------------------------------------------------------------------------------------------------- BUSI


def test_busi_layout(synthetic):
    base = synthetic["busi"]
    assert base.name == L.BUSI_ARCHIVE_DIR
    assert sorted(p.name for p in base.iterdir()) == ["benign", "malignant", "normal"]
    modes: set[str] = set()
    for cls in L.BUSI_CLASSES:
        names = sorted(p.name for p in (base / cls).iterdir())
        numbers = sorted(int(m["n"]) for m in map(L.BUSI_FILE_RE.match, names) if m and not m["mask"])
        assert numbers == list(range(1, len(numbers) + 1))  # contiguous, not zero-padded
        for name in names:
            match = L.BUSI_FILE_RE.match(name)
            assert match and match["cls"] == cls, name
            path = base / cls / name
            if not match["mask"]:
                assert _mode(path) == "RGB"
                image = _pixels(path)
                mask_path = base / cls / L.busi_mask_name(cls, int(match["n"]))
                assert mask_path.is_file()
                assert _pixels(mask_path).shape[:2] == image.shape[:2]
                assert 90 <= image.shape[0] <= 200 and 90 <= image.shape[1] <= 220
            else:
                modes.add(_mode(path))
                if cls == "normal":
                    assert _mode(path) == "RGB" and not _pixels(path).any()
    assert {"1", "L", "RGB", "RGBA"} <= modes
    rgba = _pixels(base / "benign" / "benign (2)_mask_1.png")
    assert rgba.shape[2] == 4 and (rgba[..., 3] == 255).all() and set(np.unique(rgba[..., :3])) == {0, 255}
    assert _mode(base / "benign" / "benign (5)_mask.png") == "L"


def test_busi_multi_masks_disjoint_and_overlapping(synthetic):
    base = synthetic["busi"]

    def m(cls, n, k):
        with Image.open(base / cls / L.busi_mask_name(cls, n, k)) as image:
            return np.asarray(image.convert("L")) > 127

    assert not (m("benign", 2, 0) & m("benign", 2, 1)).any()  # two separate lesions
    assert (m("benign", 3, 0) & m("benign", 3, 1)).any()  # a second outline on the same mass
    assert (base / "benign" / "benign (3)_mask_2.png").is_file()
    assert (m("malignant", 1, 0) & m("malignant", 1, 1)).any()
    multi = sorted(p.name for p in base.rglob("*_mask_*.png"))
    assert multi == [
        "benign (2)_mask_1.png",
        "benign (3)_mask_1.png",
        "benign (3)_mask_2.png",
        "malignant (1)_mask_1.png",
    ]


def test_busi_colour_overlays_and_duplicates(synthetic):
    base = synthetic["busi"]
    coloured = []
    for path in sorted(base.rglob("*).png")):
        rgb = _pixels(path).astype(int)
        if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any():
            coloured.append(path.name)
    assert coloured == ["benign (4).png", "malignant (2).png", "normal (1).png"]
    # Cross-label exact duplicate, image and mask.
    assert (base / "benign" / "benign (7).png").read_bytes() == (
        base / "malignant" / "malignant (3).png"
    ).read_bytes()
    assert (base / "benign" / "benign (7)_mask.png").read_bytes() == (
        base / "malignant" / "malignant (3)_mask.png"
    ).read_bytes()
    # Same-label near duplicate: the last benign image is benign 6 resized and re-encoded.
    last = max(int(L.BUSI_FILE_RE.match(p.name)["n"]) for p in (base / "benign").glob("benign (*).png"))
    original = _pixels(base / "benign" / "benign (6).png")
    copy = _pixels(base / "benign" / f"benign ({last}).png")
    assert copy.shape != original.shape
    assert abs(copy.shape[0] / original.shape[0] - 0.9) < 0.02
    back = np.asarray(Image.fromarray(copy).resize(original.shape[1::-1], Image.Resampling.BILINEAR))
    r = np.corrcoef(back[..., 0].ravel().astype(float), original[..., 0].ravel().astype(float))[0, 1]
    assert r > 0.9 and not np.array_equal(back, original)


# ------------------------------------------------------------------------------------------- Curated BUSI


def test_curated_busi_layout(synthetic):
    base = synthetic["curated_busi"]
    assert base.name == "Curated BUSI"
    keep = {(row[0], int(row[1])) for row in _keep_rows()}
    images = sorted((base / "images").iterdir())
    assert len(images) == 30
    values = set()
    for path in images:
        match = L.CURATED_IMAGE_RE.match(path.name)
        assert match and (match["cls"], int(match["n"])) in keep
        mask = base / "masks" / L.curated_mask_name(match["cls"], int(match["n"]))
        assert _pixels(path).shape == (128, 128) and _mode(mask) == "L"
        values |= set(np.unique(_pixels(mask)).tolist())
        if match["cls"] == "normal":
            assert not _pixels(mask).any()
    assert values == {0, 254, 255}  # the release script's uint8 sum wraps 255+255 to 254
    assert len(list((base / "masks").iterdir())) == 30


def _keep_rows() -> list[list[str]]:
    text = (Path(synth.__file__).parent / L.CURATED_KEEP_LIST).read_text(encoding="utf-8")
    return list(csv.reader(io.StringIO(text), delimiter=";"))[1:]


# -------------------------------------------------------------------------------------------------- BUSBRA


def test_busbra_layout(synthetic):
    base = synthetic["busbra"]
    assert base.name == "BUSBRA"
    assert sorted(p.name for p in base.iterdir()) == sorted(
        ["Images", "Masks", "bus_data.csv", "5-fold-cv.csv", "10-fold-cv.csv", "LICENSE.txt"]
    )
    raw = (base / "bus_data.csv").read_bytes()
    assert raw.startswith(b"ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX\n")
    assert b"\r" not in raw and raw.endswith(b"\n")
    table = pd.read_csv(base / "bus_data.csv", dtype=str, keep_default_na=False)
    assert len(table) == 30 and table["ID"].is_monotonic_increasing
    sides: dict[int, set[str]] = {}
    height_mismatch = 0
    for row in table.itertuples():
        match = L.BUSBRA_ID_RE.match(row.ID)
        assert match and int(row.Case) == int(match["case"])
        sides.setdefault(int(row.Case), set()).add(match["side"])
        assert row.Side == L.BUSBRA_SIDES[match["side"]] and row.Pathology in ("benign", "malignant")
        image = _pixels(base / "Images" / f"{row.ID}.png")
        assert _mode(base / "Images" / f"{row.ID}.png") == "L"
        mask_path = base / "Masks" / f"mask_{row.ID[4:]}.png"
        assert _mode(mask_path) == "1"
        mask = _pixels(mask_path)
        assert mask.shape == image.shape and int(row.Width) == image.shape[1]
        height_mismatch += int(row.Height) != image.shape[0]
        assert _bbox(mask) == row.BBOX
        assert 1 <= len(table[table.Case == row.Case].Pathology.unique()) == 1
    assert height_mismatch == 1
    assert all(s in ({"l", "r"}, {"s"}) for s in sides.values())
    assert {"l", "r"} in sides.values() and {"s"} in sides.values()
    assert sorted(sides) == list(range(1, len(sides) + 1))
    assert '"[' in raw.decode()  # BBOX quoted, as in the real file


@pytest.mark.parametrize("k", [5, 10])
def test_busbra_fold_files(synthetic, k):
    base = synthetic["busbra"]
    text = (base / f"{k}-fold-cv.csv").read_text()
    header = text.splitlines()[0]
    assert header == "ID,Pathology,kFold," + ",".join(f"valid_{j}" for j in range(1, k + 1))
    rows = list(csv.DictReader(io.StringIO(text)))
    data = {r["ID"]: r for r in csv.DictReader(io.StringIO((base / "bus_data.csv").read_text()))}
    assert [r["ID"] for r in rows] == sorted(data)
    fold_of_case: dict[str, set[int]] = {}
    for r in rows:
        fold = int(r["kFold"])
        assert 1 <= fold <= k and r["Pathology"] == data[r["ID"]]["Pathology"]
        fold_of_case.setdefault(data[r["ID"]]["Case"], set()).add(fold)
        for j in range(1, k + 1):
            assert r[f"valid_{j}"] in ({"NaN"} if j == fold else {"0", "1"})
    assert all(len(f) == 1 for f in fold_of_case.values())  # patient-grouped
    assert {f for fs in fold_of_case.values() for f in fs} == set(range(1, k + 1))


@pytest.mark.realdata
def test_busbra_headers_match_the_real_files(synthetic, real_data_root):
    for name in ("bus_data.csv", "5-fold-cv.csv", "10-fold-cv.csv"):
        real = (real_data_root / "BUSBRA" / name).read_bytes()
        ours = (synthetic["busbra"] / name).read_bytes()
        assert ours.split(b"\n")[0] == real.split(b"\n")[0]
        assert (b"\r" in ours) == (b"\r" in real) and ours[:3] != b"\xef\xbb\xbf"


@pytest.mark.realdata
def test_busbra_bbox_rule_holds_on_real_data(real_data_root):
    """The BBOX rule the synthetic table uses is the one the real table follows."""
    table = pd.read_csv(real_data_root / "BUSBRA" / "bus_data.csv", dtype=str)
    for row in table.itertuples():
        assert _bbox(_pixels(real_data_root / "BUSBRA" / "Masks" / f"mask_{row.ID[4:]}.png")) == row.BBOX


# -------------------------------------------------------------------------------------------------- BUS-UC


def test_bus_uc_layout(synthetic):
    base = synthetic["bus_uc"]
    assert base.relative_to(base.parent.parent.parent).parts == ("bus_uc", "BUS_UC", "BUS_UC")
    assert sorted(p.name for p in base.iterdir()) == ["All", "Benign", "Malignant"]
    union: dict[str, bytes] = {}
    mismatched = []
    for cls in ("Benign", "Malignant"):
        images = sorted(p.name for p in (base / cls / "images").iterdir())
        assert images == sorted(p.name for p in (base / cls / "masks").iterdir()) and images
        for name in images:
            assert re.fullmatch(r"0\d+\.png", name)
            union[name] = (base / cls / "images" / name).read_bytes()
            mask = _pixels(base / cls / "masks" / name)
            assert set(np.unique(mask)) == {0, 255}
            if mask.shape != _pixels(base / cls / "images" / name).shape:
                mismatched.append(name)
    assert {p.name: p.read_bytes() for p in (base / "All" / "images").iterdir()} == union
    assert len(union) == 30 and len(mismatched) == 1


# ------------------------------------------------------------------------------------------------ BUS-UCLM


def test_bus_uclm_layout(synthetic):
    base = synthetic["bus_uclm"]
    assert base.parts[-2:] == ("BUS-UCLM Breast ultrasound lesion segmentation dataset", "BUS-UCLM")
    raw = (base / "INFO.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfImage;Resolution;Label;Doppler;Marks;Combined\n")
    assert b"\r" not in raw and raw.endswith(b"\n")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig")), delimiter=";"))
    names = [r["Image"] for r in rows]
    assert names == sorted(names) and len(rows) == 30
    assert sorted(p.name for p in (base / "images").iterdir()) == names
    assert sorted(p.name for p in (base / "masks").iterdir()) == names
    assert {r["Label"] for r in rows} == {"Normal", "Benign", "Malignant"}
    assert [r["Doppler"] for r in rows].count("Y") == 1
    assert {r["Doppler"] for r in rows} == {"Yes", "No", "Y"} and {r["Combined"] for r in rows} == {
        "Yes",
        "No",
    }
    assert len({r["Resolution"] for r in rows}) == 1
    width, height = map(int, rows[0]["Resolution"].split("x"))
    colours = {"Normal": set(), "Benign": {(0, 255, 0)}, "Malignant": {(255, 0, 0)}}
    patients_labels: dict[str, set[str]] = {}
    for r in rows:
        assert L.UCLM_NAME_RE.match(r["Image"])
        patients_labels.setdefault(r["Image"][:4], set()).add(r["Label"])
        mask = _pixels(base / "masks" / r["Image"])
        assert _mode(base / "masks" / r["Image"]) == "RGB" and mask.shape == (height, width, 3)
        found = {tuple(c) for c in np.unique(mask.reshape(-1, 3), axis=0)} - {(0, 0, 0)}
        assert found == colours[r["Label"]]
        image_path = base / "images" / r["Image"]
        if r["Image"].startswith("HESN"):
            assert _mode(image_path) == "RGBA"
            h, w = _pixels(image_path).shape[:2]
            assert h < height and w < width
        else:
            assert _mode(image_path) == "RGB" and _pixels(image_path).shape == (height, width, 3)
            rgb = _pixels(image_path).astype(float)
            assert rgb[..., 2].mean() > rgb[..., 0].mean()  # blue tint
    assert any({"Benign", "Malignant"} <= labels for labels in patients_labels.values())
    assert "HESN" in patients_labels


@pytest.mark.realdata
def test_bus_uclm_info_format_matches_real(synthetic, real_data_root):
    real = (real_data_root / "BUS-UCLM" / "INFO.csv").read_bytes()
    ours = (synthetic["bus_uclm"] / "INFO.csv").read_bytes()
    assert ours.split(b"\n")[0] == real.split(b"\n")[0]
    assert (b"\r" in ours) == (b"\r" in real)


# -------------------------------------------------------------------------------------------------- Yap2018


def test_yap2018_layout(synthetic):
    base = synthetic["yap2018"]
    assert base.name == "BUS" and sorted(p.name for p in base.iterdir()) == [
        "DatasetB.xlsx",
        "GT",
        "original",
    ]
    workbook = load_workbook(base / "DatasetB.xlsx")
    assert workbook.sheetnames == ["Hoja1"]
    sheet = workbook["Hoja1"]
    assert [sheet.cell(1, j).value for j in (1, 2, 3)] == ["Image", "Type", "Diagnosis"]
    assert sheet["F1"].value == "Llegend" and sheet["F2"].value and sheet["G2"].value
    ids = []
    for row in range(2, sheet.max_row + 1):
        cell = sheet.cell(row, 1)
        if cell.value is None:
            continue
        assert cell.data_type == "s" and re.fullmatch(r"\d{6}", cell.value)
        assert sheet.cell(row, 2).value in ("Benign", "Malignant") and sheet.cell(row, 3).value
        ids.append(cell.value)
    numbers = [int(i) for i in ids]
    assert numbers == sorted(numbers) and numbers[0] == 1 and 295 in numbers and max(numbers) < 300
    assert (
        sorted(p.stem for p in (base / "original").iterdir())
        == ids
        == sorted(p.stem for p in (base / "GT").iterdir())
    )
    for i in ids:
        assert _mode(base / "original" / f"{i}.png") == "L"
        expected = "L" if int(i) <= 20 or int(i) in (295, 297, 302) else "1"
        assert _mode(base / "GT" / f"{i}.png") == expected
        assert _pixels(base / "GT" / f"{i}.png").shape == _pixels(base / "original" / f"{i}.png").shape
    frame = pd.read_excel(base / "DatasetB.xlsx", sheet_name="Hoja1")
    assert list(frame.columns[:3]) == ["Image", "Type", "Diagnosis"]
    assert any(c.startswith("Unnamed:") for c in frame.columns) and "Llegend" in frame.columns


def test_xlsx_zip_has_fixed_dates(synthetic):
    with zipfile.ZipFile(synthetic["yap2018"] / "DatasetB.xlsx") as archive:
        assert {info.date_time for info in archive.infolist()} == {synth.FIXED_TIME.timetuple()[:6]}
        core = archive.read("docProps/core.xml").decode()
    assert "2020-01-01T00:00:00Z" in core


# ------------------------------------------------------------------------------------ determinism, CLI, errors


@pytest.mark.parametrize("layout", L.LAYOUT_KEYS)
def test_same_seed_same_bytes_other_seed_differs(tmp_path, layout):
    n = MIN_N[layout]
    first = synthesize(layout, tmp_path / "a", n=n, seed=3)
    again = synthesize(layout, tmp_path / "b", n=n, seed=3)
    other = synthesize(layout, tmp_path / "c", n=n, seed=4)
    a, b, c = _tree_bytes(first), _tree_bytes(again), _tree_bytes(other)
    assert a == b
    assert a != c
    assert sum(1 for name in a if name.endswith(".png")) >= n


def test_refuses_non_empty_out_and_overwrites_on_request(tmp_path):
    out = tmp_path / "BUSI"
    synthesize("busi", out, n=16, seed=1)
    with pytest.raises(DataError, match="--overwrite"):
        synthesize("busi", out, n=16, seed=2)
    before = _tree_bytes(out)
    synthesize("busi", out, n=17, seed=2, overwrite=True)
    after = _tree_bytes(out)
    assert before != after and len(list(out.rglob("*).png"))) == 17
    assert [p.name for p in tmp_path.iterdir()] == ["BUSI"]  # no temporary folders left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's 0700


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(root, rng, n):
        (root / "partial.png").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setitem(synth._WRITERS, "busi", broken)
    with pytest.raises(RuntimeError):
        synthesize("busi", tmp_path / "BUSI", n=16)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments():
    with pytest.raises(ConfigError, match="Did you mean 'busi'"):
        synthesize("bussi", Path("unused"))
    with pytest.raises(ConfigError, match="at least 20"):
        synthesize("busbra", Path("unused"), n=5)


def test_cli(tmp_path, capsys):
    out = tmp_path / "raw" / "BUS_UC"
    assert cli_main(["synth", "--layout", "bus_uc", "--out", str(out), "--n", "6", "--seed", "2"]) == 0
    assert "BUS_UC" in capsys.readouterr().out
    assert len(list((out / "BUS_UC" / "BUS_UC" / "All" / "images").iterdir())) == 6
    assert cli_main(["synth", "--layout", "bus_uc", "--out", str(out), "--n", "6"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["synth", "--layout", "nope", "--out", str(out)])
    assert exc.value.code == 2
