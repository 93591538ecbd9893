"""``busbench audit``: a clean prepared dataset passes; every kind of tampering fails with the right message and a
non-zero exit status."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prepare_testdata import synth_raw

from busbench.cli import main as cli_main
from busbench.data.audit import audit_manifest, audit_split_file, check_manifest
from busbench.data.manifest import manifest_bytes, sha256_bytes
from busbench.data.prepare import prepare
from busbench.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    synth_raw(root, "busi", 30, seed=2)
    synth_raw(root, "busbra", 24, seed=2)
    prepare(["busi", "busbra"], data_root=root, folds=3, progress=False)
    return root


@pytest.fixture
def root(prepared, tmp_path) -> Path:
    """A private copy of the prepared data root whose summaries record the copy's own roots (as if prepared
    there), since recorded roots that still exist take precedence over the data-root defaults."""
    data = tmp_path / "data"
    shutil.copytree(prepared, data, symlinks=True)
    for summary_file in (data / "manifests").glob("*.json"):
        summary = json.loads(summary_file.read_text())
        summary["raw_root"], summary["derived_root"] = str(data / "raw"), str(data / "derived")
        summary_file.write_text(json.dumps(summary))
    return data


def _tamper(root: Path, key: str, change: Callable[[pd.DataFrame], None], fix_hash: bool = True) -> None:
    """Edit the manifest as text-level data; by default keep the summary's hash in step so that only the edit
    itself is under test."""
    path = root / "manifests" / f"{key}.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(df)
    data = manifest_bytes(df.to_dict("records"))
    path.write_bytes(data)
    if fix_hash:
        summary_file = path.with_suffix(".json")
        summary = json.loads(summary_file.read_text())
        summary["manifest_sha256"] = sha256_bytes(data)
        summary_file.write_text(json.dumps(summary))


def _fails_with(root: Path, key: str, *fragments: str) -> list[str]:
    report = audit_manifest(key, data_root=root)
    assert not report.ok
    text = report.text()
    for fragment in fragments:
        assert fragment in text, text
    code = cli_main(["audit", key, "--data-root", str(root)])
    assert code == 1
    with pytest.raises(DataError, match="audit of .* failed"):
        check_manifest(key, data_root=root)
    return report.problems


def test_clean_dataset_passes(root, capsys):
    for key in ("busi", "busbra"):
        report = audit_manifest(key, data_root=root)
        assert report.ok, report.text()
        assert check_manifest(key, data_root=root).ok
    assert cli_main(["audit", "busi", "busbra", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASSED") == 2 and "label conflicts: 1: benign_0007/malignant_0003" in out
    # a manifest path works as well as a key
    assert audit_manifest(root / "manifests" / "busi.csv", data_root=root).ok


def _patient_with_two_images(df: pd.DataFrame) -> str:
    counts = df["patient_id"].value_counts()
    return str(counts[counts == 2].index.sort_values()[0])


def test_patient_crossing_test_and_dev(root):
    def move_one_image(df: pd.DataFrame) -> None:
        rows = df.index[df["patient_id"] == _patient_with_two_images(df)]
        first = rows[0]
        if df.loc[first, "split"] == "test":
            df.loc[first, ["split", "fold"]] = ["dev", "0"]
        else:
            df.loc[first, ["split", "fold"]] = ["test", "-1"]

    _tamper(root, "busbra", move_one_image)
    problems = _fails_with(
        root, "busbra", "patient(s) cross splits or folds", "group(s) cross splits or folds"
    )
    assert any(re.search(r"patient \S+ in fold \d and test", p) for p in problems)
    # the edit also broke the recorded split counts
    assert any(p.startswith("split counts") for p in problems)


def test_patient_in_two_folds(root):
    def refold(df: pd.DataFrame) -> None:
        dev = df[df["split"] == "dev"]
        counts = dev["patient_id"].value_counts()
        patient = counts[counts == 2].index.sort_values()[0]
        row = dev.index[dev["patient_id"] == patient][0]
        df.loc[row, "fold"] = str((int(df.loc[row, "fold"]) + 1) % 3)

    _tamper(root, "busbra", refold)
    problems = _fails_with(root, "busbra", "patient(s) cross splits or folds")
    assert any("in fold" in p and "and fold" in p for p in problems)


def test_duplicate_pair_split_apart(root):
    """A benign/malignant copy given its own group and moved: caught through the summary's duplicate list."""

    def separate(df: pd.DataFrame) -> None:
        row = df.index[df["sample_id"] == "malignant_0003"][0]
        partner = df.index[df["sample_id"] == "benign_0007"][0]
        df.loc[row, "group_id"] = "g9999"
        if df.loc[partner, "split"] == "test":
            df.loc[row, ["split", "fold"]] = ["dev", "0"]
        else:
            df.loc[row, ["split", "fold"]] = ["test", "-1"]

    _tamper(root, "busi", separate)
    _fails_with(root, "busi", "near-duplicate pair(s) cross splits or folds", "benign_0007")


def test_path_escaping_root(root):
    _tamper(
        root,
        "busi",
        lambda df: df.__setitem__("image_path", df["image_path"].where(df.index != 3, "../../x.png")),
    )
    _fails_with(root, "busi", "column 'image_path' holds a path that contains '..'")
    _tamper(
        root,
        "busi",
        lambda df: df.__setitem__("image_path", df["image_path"].where(df.index != 3, "/etc/hosts")),
    )
    _fails_with(root, "busi", "is absolute")


def test_non_binary_mask(root):
    df = pd.read_csv(root / "manifests" / "busi.csv", dtype=str)
    row = df[df["label"] == "benign"].iloc[0]
    path = root / "derived" / row["mask_path"]
    with Image.open(path) as im:
        mask = np.asarray(im).copy()
    mask[mask == 255] = 128
    mask[0, 0] = 255
    Image.fromarray(mask).save(path)
    _fails_with(root, "busi", f"{row['sample_id']}: mask_path", "is not binary 0/255 (holds [128])")


def test_class_map_disagreeing_with_mask(root):
    df = pd.read_csv(root / "manifests" / "busi.csv", dtype=str)
    row = df[df["label"] == "normal"].iloc[0]
    path = root / "derived" / row["class_mask_path"]
    with Image.open(path) as im:
        class_map = np.asarray(im).copy()
    class_map[0, 0] = 1
    Image.fromarray(class_map).save(path)
    _fails_with(root, "busi", f"{row['sample_id']}: class map and mask disagree")


def test_missing_file_and_wrong_size(root):
    df = pd.read_csv(root / "manifests" / "busi.csv", dtype=str)
    (root / "derived" / df.loc[2, "class_mask_path"]).unlink()
    _tamper(root, "busi", lambda d: d.__setitem__("height", d["height"].where(d.index != 5, "999")))
    _fails_with(
        root,
        "busi",
        "1 file(s) missing",
        "class_mask_path",
        f"{df.loc[5, 'sample_id']}: image",
        "manifest says 999x",
    )


def test_count_mismatch(root):
    summary_file = root / "manifests" / "busi.json"
    summary = json.loads(summary_file.read_text())
    summary["counts"]["label"]["benign"] += 1
    summary_file.write_text(json.dumps(summary))
    _fails_with(root, "busi", "label counts in busi.csv", "differ from busi.json")


def test_hash_mismatch(root):
    _tamper(root, "busi", lambda df: df.__setitem__("meta_mask_files", "9"), fix_hash=False)
    _fails_with(root, "busi", "manifest SHA-256", "does not match busi.json")


def test_missing_manifest_and_summary(root, tmp_path):
    report = audit_manifest("yap2018", data_root=root)
    assert not report.ok and "run busbench prepare --datasets yap2018" in report.problems[0]
    (root / "manifests" / "busi.json").unlink()
    _fails_with(root, "busi", "summary", "not found")


def test_recorded_raw_root_used_when_data_root_moves(tmp_path):
    """Raw data outside the data root: audit finds it through the summary, and says where it looked if not."""
    raw = tmp_path / "elsewhere" / "raw"
    synth_raw(tmp_path / "elsewhere", "busi", 24)
    prepare(["busi"], data_root=tmp_path / "data", raw_root=raw, folds=3, progress=False)
    assert audit_manifest("busi", data_root=tmp_path / "data").ok
    shutil.move(tmp_path / "elsewhere", tmp_path / "moved")
    report = audit_manifest("busi", data_root=tmp_path / "data")
    assert not report.ok and "file(s) missing" in report.text() and "pass --raw-root" in report.text()
    assert audit_manifest("busi", data_root=tmp_path / "data", raw_root=tmp_path / "moved" / "raw").ok


def test_split_file_against_synthetic_busi(prepared, tmp_path, capsys):
    """busbench's own split passes; a split that separates a known duplicate pair fails and lists it; files
    without a usable column are one clear error."""
    df = pd.read_csv(prepared / "manifests" / "busi.csv", dtype=str, keep_default_na=False)
    own = tmp_path / "own.csv"
    df[["sample_id", "split", "fold"]].to_csv(own, index=False)
    assert cli_main(["audit", "busi", "--data-root", str(prepared), "--split-file", str(own)]) == 0
    assert "OK: 0 of 2 near-duplicate pairs" in capsys.readouterr().out

    # synthetic BUSI: malignant (3) is a byte copy of benign (7)
    names = df["image_path"].str.rsplit("/", n=1).str[-1]
    split = np.where(
        names == "malignant (3).png", "test", np.where(names == "benign (7).png", "train", "val")
    )
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"Image": names, "Subset": split}).to_csv(bad, index=False)
    out_csv = tmp_path / "pairs.csv"
    args = [
        "audit",
        "busi",
        "--data-root",
        str(prepared),
        "--split-file",
        str(bad),
        "--pairs-out",
        str(out_csv),
    ]
    assert cli_main(args) == 1
    out = capsys.readouterr().out
    assert "1 of 1 test images have a near-duplicate or same-patient image in another part" in out
    pairs = pd.read_csv(out_csv, dtype=str)
    assert ("benign_0007", "malignant_0003") in set(zip(pairs["a"], pairs["b"], strict=True))

    no_part = tmp_path / "no_part.csv"
    pd.DataFrame({"Image": names}).to_csv(no_part, index=False)
    with pytest.raises(DataError, match="neither a split column"):
        audit_split_file("busi", no_part, data_root=prepared)
    other = tmp_path / "other.csv"
    pd.DataFrame({"Image": ["x.png", "y.png"], "split": ["train", "test"]}).to_csv(other, index=False)
    with pytest.raises(DataError, match="no column names images of the prepared dataset"):
        audit_split_file("busi", other, data_root=prepared)
    odd = tmp_path / "odd.csv"
    pd.DataFrame({"Image": names, "split": "tran"}).to_csv(odd, index=False)
    with pytest.raises(DataError, match=r"holds \['tran'\], not train/val/test"):
        audit_split_file("busi", odd, data_root=prepared)
