"""``busbench prepare`` end to end: real samples, synthetic data in all six layouts, determinism, bad input that
must leave nothing behind, and the manifest reader/writer contract."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prepare_testdata import FOLDERS, link_real, snapshot, synth_raw

from busbench.cli import main as cli_main
from busbench.data.audit import audit_manifest
from busbench.data.manifest import (
    COLUMNS,
    DataRoots,
    manifest_bytes,
    manifest_sha256,
    read_manifest,
    relative_posix,
    resolve_paths,
)
from busbench.data.prepare import parse_options, prepare
from busbench.errors import ConfigError, DataError


def _manifest(data_root: Path, key: str) -> pd.DataFrame:
    return read_manifest(data_root / "manifests" / f"{key}.csv")


def _summary(data_root: Path, key: str) -> dict:
    return json.loads((data_root / "manifests" / f"{key}.json").read_text())


def _part(df: pd.DataFrame) -> pd.Series:
    return df["split"].where(df["split"] == "test", "fold" + df["fold"].astype(str))


def _assert_no_leak(df: pd.DataFrame) -> None:
    part = _part(df)
    for column in ("patient_id", "group_id"):
        spread = part.groupby(df[column]).nunique()
        assert (spread == 1).all(), spread[spread > 1]


# ------------------------------------------------------------------------------------------------ real samples


@pytest.fixture(scope="module")
def real_prepared(real_data_root, tmp_path_factory) -> Path:
    root = link_real(real_data_root, tmp_path_factory.mktemp("real"))
    before = snapshot(real_data_root)
    # drawn splits over the samples (the v1 split of these files is tested in test_reference_splits.py)
    prepare(["busi", "busbra"], data_root=root, progress=False, splits="new")
    prepare(["bus_uclm"], data_root=root, folds=3, progress=False, splits="new")
    assert snapshot(real_data_root) == before, "raw files were modified"
    return root


@pytest.mark.realdata
def test_real_busi(real_prepared, real_data_root):
    df = _manifest(real_prepared, "busi")
    assert len(df) == 201
    assert df["label"].value_counts().to_dict() == {"benign": 101, "malignant": 60, "normal": 40}
    mask_files = sorted((real_data_root / "BUSI").glob("*/*_mask*.png"))
    assert len(mask_files) == 219
    derived = sorted((real_prepared / "derived" / "busi").iterdir())
    assert len(derived) == 2 * 201
    # benign 195 has three outlines: the derived mask is their union, read here with plain PIL
    union = np.zeros(0)
    for path in sorted((real_data_root / "BUSI" / "benign").glob("benign (195)_mask*.png")):
        with Image.open(path) as im:
            m = np.asarray(im.convert("L")) > 0
        union = m if union.size == 0 else union | m
    row = df.set_index("sample_id").loc["benign_0195"]
    with Image.open(real_prepared / "derived" / row["mask_path"]) as im:
        derived_mask = np.asarray(im)
    assert set(np.unique(derived_mask).tolist()) == {0, 255}
    assert np.array_equal(derived_mask > 0, union)
    assert (int(row["height"]), int(row["width"])) == union.shape
    with Image.open(real_prepared / "derived" / row["class_mask_path"]) as im:
        assert set(np.unique(np.asarray(im)).tolist()) == {0, 1}
    assert row["image_path"] == "BUSI/benign/benign (195).png"
    # duplicates across labels share a group, hence a split
    by_id = df.set_index("sample_id")
    for a, b in (
        ("benign_0042", "malignant_0051"),
        ("benign_0085", "malignant_0052"),
        ("normal_0005", "normal_0013"),
    ):
        assert by_id.loc[a, "group_id"] == by_id.loc[b, "group_id"]
    assert by_id.loc[[f"malignant_{i:04d}" for i in range(4, 10)], "group_id"].nunique() == 1
    summary = _summary(real_prepared, "busi")
    conflicts = {(c["a"], c["b"]) for c in summary["duplicates"]["label_conflicts"]}
    assert conflicts == {("benign_0042", "malignant_0051"), ("benign_0085", "malignant_0052")}
    assert summary["groups"] == df["group_id"].nunique() == 190
    assert summary["patients"] == 201
    assert summary["manifest_sha256"] == manifest_sha256(real_prepared / "manifests" / "busi.csv")
    assert any("benign_0195" in n and "3 mask files" in n for n in summary["notes"])
    _assert_no_leak(df)
    test = df["split"] == "test"
    print(
        f"BUSI test fraction {test.mean():.3f}, max label deviation {summary['balance']['max_label_deviation']}"
    )
    assert max(summary["balance"]["max_label_deviation"].values()) <= 0.05
    assert audit_manifest("busi", data_root=real_prepared).ok


@pytest.mark.realdata
def test_real_busbra(real_prepared):
    df = _manifest(real_prepared, "busbra")
    assert len(df) == 283
    assert df["patient_id"].nunique() == 160
    _assert_no_leak(df)
    sides = df.assign(case=df["sample_id"].str[4:8]).groupby("case")
    pairs = [g for _, g in sides if len(g) == 2]
    assert pairs, "the sample holds -l/-r pairs"
    for g in pairs:
        assert sorted(g["sample_id"].str[-1]) == ["l", "r"]
        assert g["group_id"].nunique() == 1 and _part(g).nunique() == 1
    assert {"meta_BIRADS", "meta_Histology", "meta_Device"} <= set(df.columns)
    summary = _summary(real_prepared, "busbra")
    assert max(summary["balance"]["max_label_deviation"].values()) <= 0.05
    assert audit_manifest("busbra", data_root=real_prepared).ok


@pytest.mark.realdata
def test_real_busbra_official_folds(real_data_root, real_prepared, tmp_path):
    root = link_real(real_data_root, tmp_path, keys=("busbra",))
    prepare(["busbra"], data_root=root, official_folds=True, progress=False, splits="new")
    df = _manifest(root, "busbra").set_index("sample_id")
    with open(real_data_root / "BUSBRA" / "5-fold-cv.csv", newline="") as fh:
        official = {r["ID"]: int(r["kFold"]) for r in csv.DictReader(fh)}
    dev = df[df["split"] == "dev"]
    assert (dev["fold"] == dev.index.map(official) - 1).all()
    plain = _manifest(real_prepared, "busbra").set_index("sample_id")
    assert (df["split"] == plain["split"]).all()  # same held-out test split with or without the option
    summary = _summary(root, "busbra")
    assert summary["official_folds"] is True
    assert audit_manifest("busbra", data_root=root).ok


@pytest.mark.realdata
def test_real_bus_uclm(real_prepared):
    df = _manifest(real_prepared, "bus_uclm")
    assert len(df) == 70
    assert sorted(df["patient_id"].unique()) == ["ALWI", "COPE", "CRCI", "ELCO", "LOTI"]
    assert df["group_id"].nunique() == 5
    _assert_no_leak(df)
    assert (df["split"] == "test").sum() > 0 and sorted(df.loc[df["split"] == "dev", "fold"].unique()) == [
        0,
        1,
        2,
    ]
    summary = _summary(real_prepared, "bus_uclm")
    assert summary["adapter_options"]["hesn_rule"] == "resize_mask"
    assert any("label 'benign' occurs in 1 group" in n for n in summary["notes"])
    malignant = df[df["label"] == "malignant"].iloc[0]
    with Image.open(real_prepared / "derived" / malignant["class_mask_path"]) as im:
        assert set(np.unique(np.asarray(im)).tolist()) == {0, 2}
    assert audit_manifest("bus_uclm", data_root=real_prepared).ok


# --------------------------------------------------------------------------------------------- synthetic data

SYNTH_N = {"busi": 30, "curated_busi": 24, "busbra": 24, "bus_uc": 24, "bus_uclm": 24, "yap2018": 24}


@pytest.fixture(scope="module")
def synthetic_raw(tmp_path_factory) -> Path:
    """A data root holding raw/ for all six layouts (read-only for the tests that copy it)."""
    root = tmp_path_factory.mktemp("synthetic")
    for key, n in SYNTH_N.items():
        synth_raw(root, key, n, seed=1)
    return root


@pytest.fixture
def data_root(synthetic_raw, tmp_path) -> Path:
    """A private copy of the synthetic raw data, free to break."""
    shutil.copytree(synthetic_raw / "raw", tmp_path / "raw")
    return tmp_path


def test_all_six_layouts_prepare_and_audit_cleanly(data_root):
    keys = list(FOLDERS)
    raw_before = snapshot(data_root / "raw")
    paths = prepare(keys, data_root=data_root, folds=3, progress=False)
    assert paths == [data_root / "manifests" / f"{k}.csv" for k in keys]
    assert snapshot(data_root / "raw") == raw_before
    for key in keys:
        df = _manifest(data_root, key)
        summary = _summary(data_root, key)
        assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
        assert summary["counts"]["images"] == len(df)
        assert summary["counts"]["label"] == {
            k: int(v) for k, v in sorted(df["label"].value_counts().items())
        }
        assert len(list((data_root / "derived" / key).iterdir())) == 2 * len(df)
        assert not df["image_path"].str.startswith("/").any()
        _assert_no_leak(df)
        report = audit_manifest(key, data_root=data_root)
        assert report.ok, report.text()
    # the synthetic BUSI holds a benign/malignant copy and a resized JPEG copy: both found and grouped
    busi = _summary(data_root, "busi")["duplicates"]
    assert len(busi["label_conflicts"]) == 1 and len(busi["pairs"]) == 2


def test_prepare_twice_gives_identical_bytes(data_root, tmp_path_factory):
    prepare(["busi", "busbra"], data_root=data_root, folds=3, seed=5, progress=False)
    first = snapshot(data_root / "manifests") | {
        f"derived/{k}": v for k, v in snapshot(data_root / "derived").items()
    }
    prepare(["busi", "busbra"], data_root=data_root, folds=3, seed=5, progress=False)
    second = snapshot(data_root / "manifests") | {
        f"derived/{k}": v for k, v in snapshot(data_root / "derived").items()
    }
    assert first == second
    # another machine: same raw files elsewhere, manifests byte-identical (paths are relative)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(data_root / "raw", elsewhere / "raw")
    prepare(["busi", "busbra"], data_root=elsewhere, folds=3, seed=5, progress=False, workers=1)
    for key in ("busi", "busbra"):
        a = (data_root / "manifests" / f"{key}.csv").read_bytes()
        assert a == (elsewhere / "manifests" / f"{key}.csv").read_bytes()
        assert b"\r" not in a
    # another seed, another split
    prepare(["busi"], data_root=elsewhere, folds=3, seed=6, progress=False)
    assert (elsewhere / "manifests" / "busi.csv").read_bytes() != (
        data_root / "manifests" / "busi.csv"
    ).read_bytes()


def test_rerun_replaces_stale_derived_files(data_root):
    prepare(["busi"], data_root=data_root, folds=3, progress=False)
    stale = data_root / "derived" / "busi" / "gone_0001.png"
    stale.write_bytes(b"old")
    prepare(["busi"], data_root=data_root, folds=3, progress=False)
    assert not stale.exists()
    assert not [p for p in (data_root / "derived").iterdir() if p.name.startswith(".")]


def test_cli_prepare_prints_table_and_options(data_root, capsys):
    code = cli_main(
        [
            "prepare",
            "--datasets",
            "bus_uclm",
            "busi",
            "--data-root",
            str(data_root),
            "--folds",
            "3",
            "--exclude-doppler",
            "--option",
            "bus_uclm.hesn_rule=resize_mask",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "dataset" in out and "bus_uclm" in out and "busi" in out and "wrote" in out
    summary = _summary(data_root, "bus_uclm")
    assert summary["adapter_options"]["exclude_doppler"] is True
    assert summary["excluded"], "the synthetic BUS-UCLM has Doppler images to leave out"
    assert len(_manifest(data_root, "bus_uclm")) == SYNTH_N["bus_uclm"] - len(summary["excluded"])


def test_env_var_sets_the_data_root(data_root, monkeypatch):
    monkeypatch.setenv("BUSBENCH_DATA", str(data_root))
    prepare(["yap2018"], folds=3, progress=False)
    assert (data_root / "manifests" / "yap2018.csv").is_file()
    assert DataRoots.resolve().raw_root == data_root / "raw"


def test_parse_options():
    assert parse_options(["bus_uclm.exclude_doppler=yes", "curated_busi.source=busi", "x.n=3"]) == {
        "bus_uclm": {"exclude_doppler": True},
        "curated_busi": {"source": "busi"},
        "x": {"n": 3},
    }
    with pytest.raises(DataError, match="not KEY.NAME=VALUE"):
        parse_options(["exclude_doppler"])


# ------------------------------------------------------------------------------------ bad input: no output left


def _fails(data_root: Path, match: str, keys=("busi",), **kwargs) -> DataError:
    before = snapshot(data_root)
    with pytest.raises((DataError, ConfigError), match=match) as info:
        prepare(list(keys), data_root=data_root, folds=kwargs.pop("folds", 3), progress=False, **kwargs)
    assert snapshot(data_root) == before, "a failed prepare left files behind"
    return info.value


def _busi_dir(data_root: Path) -> Path:
    return data_root / "raw" / "BUSI" / "Dataset_BUSI_with_GT"


def test_unknown_key(data_root):
    _fails(data_root, "unknown dataset key 'busy'.*Did you mean 'busi'", keys=("busi", "busy"))


def test_missing_dataset_folder(data_root):
    shutil.rmtree(data_root / "raw" / "BUSI")
    _fails(data_root, r"busi: dataset folder not found \(.*BUSI does not exist")


def test_missing_raw_root(tmp_path):
    _fails(tmp_path, f"raw root {tmp_path / 'raw'} does not exist")


def test_image_without_mask(data_root):
    (_busi_dir(data_root) / "benign" / "benign (9)_mask.png").unlink()
    _fails(data_root, r"benign \(9\)")


def test_unreadable_png(data_root):
    path = _busi_dir(data_root) / "malignant" / "malignant (2).png"
    path.write_bytes(path.read_bytes()[:200])
    _fails(data_root, r"malignant \(2\)\.png")


def test_mask_of_another_size(data_root):
    path = _busi_dir(data_root) / "benign" / "benign (8)_mask.png"
    Image.new("L", (17, 19)).save(path)
    _fails(data_root, r"benign \(8\)_mask\.png: mask is 17x19")


def test_metadata_row_without_file(data_root):
    images = sorted((data_root / "raw" / "BUSBRA" / "BUSBRA" / "Images").iterdir())
    images[3].unlink()
    _fails(data_root, images[3].stem, keys=("busbra",))


def test_file_without_metadata_row(data_root):
    folder = data_root / "raw" / "BUSBRA" / "BUSBRA"
    shutil.copy(folder / "Images" / "bus_0001-l.png", folder / "Images" / "bus_0999-s.png")
    shutil.copy(folder / "Masks" / "mask_0001-l.png", folder / "Masks" / "mask_0999-s.png")
    _fails(data_root, "bus_0999-s", keys=("busbra",))


def test_empty_dataset(data_root):
    for cls in ("benign", "malignant", "normal"):
        shutil.rmtree(_busi_dir(data_root) / cls)
        (_busi_dir(data_root) / cls).mkdir()
    _fails(data_root, "class folder .*benign holds no images")


def test_second_dataset_failing_writes_nothing_and_keeps_old_outputs(data_root):
    prepare(["busi"], data_root=data_root, folds=3, progress=False)
    mask = sorted((data_root / "raw" / "BUSBRA" / "BUSBRA" / "Masks").iterdir())[0]
    mask.unlink()
    _fails(data_root, f"image without its mask {mask}", keys=("busi", "busbra"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_size": 0.0}, "--test-size must be between 0 and 1"),
        ({"test_size": 1.5}, "--test-size must be between 0 and 1"),
        ({"folds": 1}, "--folds must be an integer of at least 2"),
        ({"official_folds": True}, "busi has none"),
        ({"adapter_options": {"busbra": {"x": 1}}}, "adapter options given for 'busbra'"),
        ({"adapter_options": {"busi": {"x": 1}}}, "dataset 'busi' has no option 'x'"),
    ],
)
def test_bad_arguments(data_root, kwargs, match):
    _fails(data_root, match, **kwargs)


def test_too_few_groups_for_the_folds(data_root):
    _fails(
        data_root,
        r"bus_uclm: \d+ group\(s\).*cannot fill a test split and 20 folds",
        keys=("bus_uclm",),
        folds=20,
    )


def test_repeated_key_and_overlapping_roots(data_root):
    _fails(data_root, "listed more than once", keys=("busi", "busi"))
    _fails(data_root, "overlaps the raw root", derived_root=data_root / "raw" / "derived")


def test_cli_error_is_one_line_and_exit_1(data_root, capsys):
    before = snapshot(data_root)
    code = cli_main(["prepare", "--datasets", "nope", "--data-root", str(data_root)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "unknown dataset key 'nope'" in err
    assert snapshot(data_root) == before


# ---------------------------------------------------------------------------------------- manifest contract


def _rows(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "sample_id": f"s{i}",
                "dataset": "toy",
                "patient_id": f"p{i // 2}",
                "group_id": f"g{i // 2}",
                "label": ["benign", "malignant", "normal"][i % 3],
                "image_path": f"Toy/img {i}.png",
                "mask_path": f"toy/s{i}.png",
                "class_mask_path": f"toy/s{i}_classes.png",
                "height": 10 + i,
                "width": 20,
                "split": "test" if i < 2 else "dev",
                "fold": -1 if i < 2 else i % 2,
                "meta_b": "x,y" if i == 3 else "",
                "meta_a": str(i),
            }
        )
    return rows


def test_manifest_bytes_are_canonical():
    rows = _rows()
    data = manifest_bytes(rows)
    shuffled = rows[::-1]
    random.Random(0).shuffle(shuffled)
    assert manifest_bytes(shuffled) == data
    text = data.decode()
    assert text.splitlines()[0] == ",".join([*COLUMNS, "meta_a", "meta_b"])
    assert text.endswith("\n") and "\r" not in text and '"x,y"' in text
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(manifest_bytes(rows)).hexdigest()
    with pytest.raises(TypeError):
        manifest_bytes([{**rows[0], "height": 1.5}])


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "toy.csv"
    path.write_bytes(manifest_bytes(rows))
    return path


def test_read_manifest_types(tmp_path):
    df = read_manifest(_write(tmp_path, _rows()))
    assert df["height"].dtype == np.int64 and df["fold"].tolist() == [-1, -1, 0, 1, 0, 1]
    assert df.loc[0, "meta_b"] == "" and df.loc[3, "meta_b"] == "x,y"


@pytest.mark.parametrize(
    ("change", "column", "problem"),
    [
        ({"label": "cyst"}, "label", "values outside"),
        ({"split": "train"}, "split", "values outside"),
        ({"height": "tall"}, "height", "non-integer"),
        ({"width": 0}, "width", "not positive"),
        ({"fold": 3}, "fold", "not -1 on test rows"),
        ({"image_path": "/abs/img.png"}, "image_path", "is absolute"),
        ({"image_path": "C:/data/img.png"}, "image_path", "is absolute"),
        ({"mask_path": "../outside.png"}, "mask_path", "contains '..'"),
        ({"mask_path": "toy\\s0.png"}, "mask_path", "backslashes"),
        ({"group_id": ""}, "group_id", "empty values"),
    ],
)
def test_read_manifest_rejects_bad_values(tmp_path, change, column, problem):
    rows = _rows()
    rows[0].update(change)
    path = _write(tmp_path, rows)
    with pytest.raises(DataError, match=rf"manifest {path}: column '{column}' .*{problem}.*row 's0'"):
        read_manifest(path)


def test_read_manifest_missing_column_and_file(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "group_id"} for r in _rows()]
    path = tmp_path / "toy.csv"
    path.write_text(pd.DataFrame(rows).to_csv(index=False))
    with pytest.raises(DataError, match=f"manifest {path}: column 'group_id' is missing"):
        read_manifest(path)
    with pytest.raises(DataError, match="not found; run busbench prepare"):
        read_manifest(tmp_path / "none.csv")


def test_resolve_paths_inside_roots_only(tmp_path):
    df = read_manifest(_write(tmp_path, _rows()))
    out = resolve_paths(df, tmp_path / "raw", tmp_path / "derived")
    assert out.loc[0, "image_path"] == str(tmp_path / "raw" / "Toy" / "img 0.png")
    assert out.loc[1, "class_mask_path"] == str(tmp_path / "derived" / "toy" / "s1_classes.png")
    for bad in ("../../etc/passwd", "/etc/passwd", "Toy/../../x.png"):
        tampered = df.copy()
        tampered.loc[2, "image_path"] = bad
        with pytest.raises(DataError, match="manifest row 's2' column 'image_path'"):
            resolve_paths(tampered, tmp_path / "raw", tmp_path / "derived")


def test_relative_posix(tmp_path):
    assert relative_posix(tmp_path / "a" / "b c.png", tmp_path, "image") == "a/b c.png"
    with pytest.raises(DataError, match="is not inside"):
        relative_posix(tmp_path.parent / "x.png", tmp_path, "image")


def test_manifest_round_trip_through_pandas_is_lossless(tmp_path):
    rows = _rows()
    path = _write(tmp_path, rows)
    df = read_manifest(path)
    again = manifest_bytes(df.to_dict("records"))
    assert again == path.read_bytes()
    assert io.BytesIO(again).read() == manifest_bytes(rows)
