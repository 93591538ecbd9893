"""The shipped v1 splits: the real samples get exactly their reference split, damaged copies end as documented,
and other people's splits are audited against busbench's patient and near-duplicate links."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prepare_testdata import REAL_FOLDERS, link_real, snapshot
from sklearn.model_selection import train_test_split

from busbench.cli import main as cli_main
from busbench.data.audit import audit_manifest, audit_split_file
from busbench.data.prepare import prepare
from busbench.data.splits import REFERENCE_COLUMNS, reference_keys, reference_split
from busbench.errors import DataError

pytestmark = pytest.mark.realdata
COPY_PER_CLASS = 6  # BUSI images per class in the damaged copies
COPIED = 3 * COPY_PER_CLASS


def _summary(root: Path, key: str) -> dict:
    return json.loads((root / "manifests" / f"{key}.json").read_text())


def test_packaged_reference_files_are_consistent():
    assert reference_keys() == ["bus_uclm", "busbra", "busi", "curated_busi"]
    for key in reference_keys():
        rows = reference_split(key).rows
        assert list(rows.columns) == list(REFERENCE_COLUMNS)
        assert set(rows["split"]) == {"dev", "test"}
        assert (rows.loc[rows["split"] == "test", "fold"] == -1).all()
        assert sorted(rows.loc[rows["split"] == "dev", "fold"].unique()) == [0, 1, 2, 3, 4]
        part = rows["split"] + rows["fold"].astype(str)
        assert (part.groupby(rows["group_id"]).nunique() == 1).all(), f"{key}: a group crosses parts"
        assert (part.groupby(rows["patient_id"]).nunique() == 1).all(), f"{key}: a patient crosses parts"
    assert reference_split("bus_uc") is None


@pytest.fixture(scope="module")
def partial_root(real_data_root, tmp_path_factory) -> Path:
    root = link_real(real_data_root, tmp_path_factory.mktemp("v1"))
    prepare(list(REAL_FOLDERS), data_root=root, progress=False, allow_partial=True)
    return root


@pytest.mark.parametrize("key", list(REAL_FOLDERS))
def test_partial_samples_keep_their_reference_split(partial_root, key):
    manifest = pd.read_csv(partial_root / "manifests" / f"{key}.csv", dtype=str, keep_default_na=False)
    reference = pd.read_csv(
        io.BytesIO(reference_split(key).rows.to_csv(index=False).encode()), dtype=str, keep_default_na=False
    ).set_index("sample_id")
    ref = reference.loc[manifest["sample_id"]]
    for column in ("split", "fold", "group_id", "patient_id", "label", "image_path", "height", "width"):
        assert (manifest[column].to_numpy() == ref[column].to_numpy()).all(), column
    summary = _summary(partial_root, key)
    assert summary["splits"]["source"] == "v1" and summary["splits"]["partial"] is True
    info = summary["reference"]
    assert info["status"] == "partial"
    assert info["present"] == info["same_bytes"] == len(manifest)
    assert info["missing"] == len(reference) - len(manifest) == len(info["missing_ids"])
    assert info["changed"] == [] and info["extra"] == []
    assert set(summary["versions"]) >= {"busbench", "python", "numpy", "scikit-learn", "opencv"}
    report = audit_manifest(key, data_root=partial_root)
    assert report.ok, report.text()
    assert "partial copy" in report.text() and "v1, partial" in report.facts["split"]


def test_partial_copy_refused_without_the_flag(real_data_root, tmp_path, capsys):
    root = link_real(real_data_root, tmp_path, keys=("busi",))
    code = cli_main(["prepare", "--datasets", "busi", "--data-root", str(root), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "579 of the 780 images of the BUSI public release are missing" in err[0]
    assert "--allow-partial" in err[0] and "re-download" in err[0]
    assert not (root / "manifests").exists() and not (root / "derived").exists()


def test_draw_settings_with_the_reference_split_are_refused(real_data_root, tmp_path):
    root = link_real(real_data_root, tmp_path, keys=("busi", "busbra"))
    with pytest.raises(DataError, match="--folds apply to drawn splits.*add --splits new"):
        prepare(["busi"], data_root=root, folds=3, allow_partial=True, progress=False)
    with pytest.raises(DataError, match="--official-folds draws a new split"):
        prepare(["busbra"], data_root=root, official_folds=True, allow_partial=True, progress=False)
    assert not (root / "manifests").exists()


# ------------------------------------------------------------------------------------------------ bad copies


@pytest.fixture
def busi_copy(real_data_root, tmp_path) -> Path:
    """data root whose raw/BUSI is a copy of a few BUSI samples per class, free to change."""
    for folder in sorted((real_data_root / "BUSI").iterdir()):
        images = sorted(p for p in folder.glob("*.png") if "_mask" not in p.name)[:COPY_PER_CLASS]
        (tmp_path / "raw" / "BUSI" / folder.name).mkdir(parents=True)
        for image in images:
            for path in [image, *folder.glob(f"{image.stem}_mask*.png")]:
                shutil.copyfile(path, tmp_path / "raw" / "BUSI" / folder.name / path.name)
    return tmp_path


def _run(root: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli_main(["prepare", "--datasets", "busi", "--data-root", str(root), "--allow-partial", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_deleted_image_is_one_more_missing(busi_copy, capsys):
    (busi_copy / "raw" / "BUSI" / "benign" / "benign (1).png").unlink()
    for mask in (busi_copy / "raw" / "BUSI" / "benign").glob("benign (1)_mask*.png"):
        mask.unlink()
    code = cli_main(["prepare", "--datasets", "busi", "--data-root", str(busi_copy), "--quiet"])
    assert code == 1 and f"{780 - COPIED + 1} of the 780 images" in capsys.readouterr().err
    assert not (busi_copy / "manifests").exists()
    code, out, _ = _run(busi_copy, capsys)
    assert code == 0 and f"partial: {COPIED - 1} of 780 images present" in out
    info = _summary(busi_copy, "busi")["reference"]
    assert info["missing"] == 780 - COPIED + 1 and "benign_0001" in info["missing_ids"]


def test_added_image_is_refused_by_name(busi_copy, capsys):
    folder = busi_copy / "raw" / "BUSI" / "benign"
    for name in ("benign (1).png", "benign (1)_mask.png"):
        shutil.copyfile(folder / name, folder / name.replace("(1)", "(999)"))
    before = snapshot(busi_copy)
    code, _, err = _run(busi_copy, capsys)
    assert code == 1 and "1 image(s) on disk are not in the BUSI public release: benign_0999" in err
    assert snapshot(busi_copy) == before  # nothing written


def test_reencoded_image_is_listed_and_keeps_its_split(busi_copy, capsys, caplog):
    path = busi_copy / "raw" / "BUSI" / "malignant" / "malignant (1).png"
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    assert buffer.getvalue() != path.read_bytes()
    path.write_bytes(buffer.getvalue())
    code, out, _ = _run(busi_copy, capsys)
    assert code == 0
    assert any(f"1 of {COPIED} images differ in bytes" in r.getMessage() for r in caplog.records)
    summary = _summary(busi_copy, "busi")
    assert summary["reference"]["changed"] == ["malignant_0001"]
    row = (
        pd.read_csv(busi_copy / "manifests" / "busi.csv", dtype=str)
        .set_index("sample_id")
        .loc["malignant_0001"]
    )
    ref = reference_split("busi").rows.loc["malignant_0001"]
    assert (row["split"], int(row["fold"]), row["group_id"]) == (ref["split"], ref["fold"], ref["group_id"])


def test_byte_flipped_image_is_refused_naming_the_file(busi_copy, capsys):
    path = busi_copy / "raw" / "BUSI" / "normal" / "normal (1).png"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before = snapshot(busi_copy)
    code, _, err = _run(busi_copy, capsys)
    assert code == 1 and "normal (1).png" in err and "damaged" in err
    assert snapshot(busi_copy) == before


# ----------------------------------------------------------------------------------------- someone's split


def test_image_level_split_of_busi_reports_straddling_pairs(partial_root, tmp_path, capsys):
    manifest = pd.read_csv(partial_root / "manifests" / "busi.csv", dtype=str, keep_default_na=False)
    names = manifest["image_path"].str.rsplit("/", n=1).str[-1]
    index = np.arange(len(manifest))
    train, test = train_test_split(index, test_size=0.2, stratify=manifest["label"], random_state=0)
    split = np.full(len(manifest), "train", dtype=object)
    split[test] = "test"
    file = tmp_path / "paper_split.csv"
    pd.DataFrame({"filename": names, "set": split}).to_csv(file, index=False)

    pairs = _summary(partial_root, "busi")["duplicates"]["pairs"]
    part = dict(zip(manifest["sample_id"], split, strict=True))
    crossing = sorted((p["a"], p["b"]) for p in pairs if part[p["a"]] != part[p["b"]])
    assert crossing, "this image-level split separates some near-duplicates"

    code = cli_main(["audit", "busi", "--data-root", str(partial_root), "--split-file", str(file)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"LEAKS: {len(crossing)} of {len(pairs)} near-duplicate pairs" in out
    written = pd.read_csv(tmp_path / "paper_split_leaks.csv", dtype=str)
    assert sorted(zip(written["a"], written["b"], strict=True)) == crossing
    assert (written["part_a"] != written["part_b"]).all()
    for name in ("train", "test"):
        assert f"  {name}: {int((split == name).sum())} images: " in out


def test_v1_split_file_has_no_straddling_pair(partial_root, tmp_path):
    v1 = tmp_path / "busi_v1.csv"
    v1.write_bytes(reference_split("busi").rows.to_csv(index=False).encode())
    report = audit_split_file("busi", v1, data_root=partial_root, pairs_out=tmp_path / "pairs.csv")
    assert report.ok, report.text()
    assert "OK: 0 of 15 near-duplicate pairs" in report.text()
    assert len(pd.read_csv(tmp_path / "pairs.csv")) == 0


def test_fold_list_with_patients_split_across_folds(partial_root, tmp_path):
    """BUSBRA's official 10-fold list is patient-grouped; splitting one patient's two sides is caught."""
    folds = pd.read_csv(partial_root / "raw" / "BUSBRA" / "10-fold-cv.csv", dtype=str)[["ID", "kFold"]]
    assert audit_split_file("busbra", _write(folds, tmp_path / "a.csv"), data_root=partial_root).ok
    pair = folds["ID"].str.endswith("-l") & folds["ID"].str.replace("-l", "-r").isin(folds["ID"])
    first = folds.index[pair][0]
    folds.loc[first, "kFold"] = str(int(folds.loc[first, "kFold"]) % 10 + 1)
    report = audit_split_file("busbra", _write(folds, tmp_path / "b.csv"), data_root=partial_root)
    assert not report.ok and "1 of" in report.text() and "same-patient pairs straddle parts" in report.text()


def _write(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path
