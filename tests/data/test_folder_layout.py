"""The generic ``folder`` layout: conventions, the whole prepare pipeline on it, and one clear error per bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from busbench import cli
from busbench.config import load_config
from busbench.data.adapters import get_adapter
from busbench.data.adapters.folder import classify, mask_values, sample_id_of
from busbench.data.prepare import prepare
from busbench.errors import ConfigError, DataError


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def _prepare(dataset: Path, data: Path, key: str = "clinic", folds: int = 2) -> list[Path]:
    return prepare(
        [key], data_root=data, raw_root=dataset, folds=folds, progress=False,
        adapter_options={key: {"layout": "folder", "folder": "."}},
    )


def test_mask_convention() -> None:
    where = Path("m.png")
    values = np.array([[0, 255], [0, 0]], dtype=np.uint8)
    class_map, label = classify(values, "malignant", where)
    assert label == "malignant" and class_map.tolist() == [[0, 2], [0, 0]]
    with pytest.raises(DataError, match="255, which carries no class, and the image has no label"):
        classify(values, None, where)
    class_map, label = classify(np.array([[1, 2]], dtype=np.uint8), None, where)
    assert label == "malignant" and class_map.tolist() == [[1, 2]]
    assert classify(np.array([[0, 1]], dtype=np.uint8), None, where)[1] == "benign"
    # with a label, 0/1 is a binary mask of the labelled class
    assert classify(np.array([[0, 1]], dtype=np.uint8), "malignant", where)[0].tolist() == [[0, 2]]
    assert classify(np.zeros((2, 2), np.uint8), None, where)[1] == "normal"
    with pytest.raises(DataError, match="labels this image normal but its mask marks 1 lesion pixels"):
        classify(np.array([[0, 1]], dtype=np.uint8), "normal", where)
    with pytest.raises(DataError, match="labels this image benign but its mask marks malignant pixels"):
        classify(np.array([[2, 1]], dtype=np.uint8), "benign", where)
    with pytest.raises(DataError, match=r"mask values 0, 1, 128, 255 do not follow the folder convention"):
        classify(np.array([[0, 1, 128, 255]], dtype=np.uint8), "benign", where)
    assert sample_id_of("case 01 (left)") == "case_01__left_" and sample_id_of("_x") == "s_x"


def test_mask_files_in_any_grey_encoding(tmp_path: Path) -> None:
    grey = np.array([[0, 255, 255], [0, 0, 255]], dtype=np.uint8)
    Image.fromarray(grey > 0).save(tmp_path / "bit.png")  # 1-bit
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    palette = Image.fromarray(np.array([[0, 2, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 0, 255, 0, 255, 0, 0] + [0] * 759)
    palette.save(tmp_path / "pal.png")
    assert mask_values(tmp_path / "bit.png").tolist() == grey.tolist()
    assert mask_values(tmp_path / "rgb.png").tolist() == grey.tolist()
    assert mask_values(tmp_path / "pal.png").tolist() == [[0, 2, 1]]  # palette read by index
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="colour mask"):
        mask_values(tmp_path / "colour.png")


def test_prepare_runs_the_whole_pipeline(tmp_path: Path, folder_dataset) -> None:
    dataset = folder_dataset(tmp_path / "export", n=12)
    # an exact copy of one image under another patient: a near-duplicate, so both must land in one group
    shutil.copy(dataset / "images" / "img1.png", dataset / "images" / "img1 copy.png")
    shutil.copy(dataset / "masks" / "img1.png", dataset / "masks" / "img1 copy.png")
    with (dataset / "meta.csv").open("a", encoding="utf-8") as f:
        f.write("img1 copy,pat9,Benign,scanner-1\n")
    before = _tree(dataset)
    _prepare(dataset, tmp_path / "data", folds=2)
    assert _tree(dataset) == before  # raw data is only read
    df = pd.read_csv(tmp_path / "data" / "manifests" / "clinic.csv", dtype=str, keep_default_na=False)
    assert len(df) == 13 and set(df["dataset"]) == {"clinic"}
    assert "img1_copy" in set(df["sample_id"]) and set(df["meta_scanner_model"]) == {"scanner-0", "scanner-1"}
    rows = df.set_index("sample_id")
    assert rows.loc["img1_copy", "label"] == "benign" and rows.loc["img1_copy", "patient_id"] == "pat9"
    assert rows.loc["img1_copy", "group_id"] == rows.loc["img1", "group_id"]  # near-duplicate linked across patients
    for _, group in df.groupby("group_id"):
        assert group["split"].nunique() == 1 and group["fold"].nunique() == 1
    assert set(df["split"]) == {"dev", "test"} and set(df.loc[df["split"] == "dev", "fold"]) == {"0", "1"}
    # derived masks: 0/255 lesion mask and a class map with the label's class value
    derived = tmp_path / "data" / "derived"
    malignant = df.loc[df["label"] == "malignant", "sample_id"].iloc[0]
    mask = cv2.imread(str(derived / "clinic" / f"{malignant}.png"), cv2.IMREAD_UNCHANGED)
    classes = cv2.imread(str(derived / "clinic" / f"{malignant}_classes.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(mask)) == {0, 255} and set(np.unique(classes)) == {0, 2}
    assert np.array_equal(mask > 0, classes > 0)
    assert cli.main(["audit", "clinic", "--data-root", str(tmp_path / "data")]) == 0
    # the prepared key is now a dataset configs accept
    cfg = load_config(None, ["data.dataset=clinic", f"data.data_root={tmp_path / 'data'}"])
    assert cfg.data.dataset == "clinic"
    with pytest.raises(ConfigError, match=r"unknown dataset 'clinik' \(did you mean 'clinic'\?\).*--layout folder"):
        load_config(None, ["data.dataset=clinik", f"data.data_root={tmp_path / 'data'}"])


def test_labels_from_class_maps_without_meta(tmp_path: Path, folder_dataset) -> None:
    dataset = folder_dataset(tmp_path / "export", n=15, meta=False)
    for i in range(15):  # rewrite each mask as a class map: 1 benign, 2 malignant
        path = dataset / "masks" / f"img{i}.png"
        mask = np.asarray(Image.open(path)) > 0
        Image.fromarray(mask.astype(np.uint8) * (1 + (i % 3 == 2))).save(path)
    _prepare(dataset, tmp_path / "data", folds=2)
    df = pd.read_csv(tmp_path / "data" / "manifests" / "clinic.csv", dtype=str, keep_default_na=False)
    expected = {f"img{i}": ("normal", "benign", "malignant")[i % 3] for i in range(15)}
    assert dict(zip(df["sample_id"], df["label"], strict=True)) == expected
    assert (df["patient_id"] == df["sample_id"]).all()  # no meta.csv: every image is its own patient


def _bad_masks_folder(root: Path) -> None:
    shutil.rmtree(root / "masks")


def _orphan_mask(root: Path) -> None:
    (root / "images" / "img4.png").unlink()


def _image_without_mask(root: Path) -> None:
    (root / "masks" / "img4.png").unlink()


def _unknown_meta_id(root: Path) -> None:
    with (root / "meta.csv").open("a", encoding="utf-8") as f:
        f.write("img99,P09,benign,scanner-0\n")


def _missing_meta_column(root: Path) -> None:
    text = (root / "meta.csv").read_text(encoding="utf-8")
    (root / "meta.csv").write_text(text.replace("patient_id", "patient"), encoding="utf-8")


def _meta_without_row(root: Path) -> None:
    lines = (root / "meta.csv").read_text(encoding="utf-8").splitlines()
    (root / "meta.csv").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")


def _bad_label(root: Path) -> None:
    text = (root / "meta.csv").read_text(encoding="utf-8")
    (root / "meta.csv").write_text(text.replace("img2,P01,malignant", "img2,P01,cancer"), encoding="utf-8")


def _antialiased_mask(root: Path) -> None:
    path = root / "masks" / "img1.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[0, 0] = 128
    Image.fromarray(mask).save(path)


def _jpeg_mask(root: Path) -> None:
    path = root / "masks" / "img1.png"
    Image.open(path).save(path.with_suffix(".jpg"))
    path.unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_bad_masks_folder, r"has images/ but no masks/ folder"),
        (_orphan_mask, r"mask\(s\) img4.png in .* have no image of the same stem"),
        (_image_without_mask, r"image\(s\) img4.png in .* have no mask of the same stem"),
        (_unknown_meta_id, r"meta.csv: sample_id\(s\) img99 match no image in images/"),
        (_missing_meta_column, r"meta.csv: missing column\(s\) patient_id .*correct meta.csv"),
        (_meta_without_row, r"meta.csv: no row for image\(s\) img8"),
        (_bad_label, r"row 4 \(img2\) has label 'cancer'"),
        (_antialiased_mask, r"img1.png: mask values 0, 128, 255 do not follow the folder convention"),
        (_jpeg_mask, r"masks img1.jpg .* are JPEG"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_bad_input_is_one_clear_error_and_writes_nothing(
    tmp_path: Path, damage, message: str, capsys, folder_dataset
) -> None:
    dataset = folder_dataset(tmp_path / "export", n=9)
    damage(dataset)
    data = tmp_path / "data"
    argv = ["prepare", "--layout", "folder", "--key", "clinic", "--dataset-dir", str(dataset), "--data-root",
            str(data), "--folds", "2", "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("busbench prepare: error: ")
    with pytest.raises(DataError, match=message):
        _prepare(dataset, data)
    assert _tree(data) == []


def test_too_small_for_the_partition_is_one_clear_error(tmp_path: Path, capsys, folder_dataset) -> None:
    dataset = folder_dataset(tmp_path / "export", n=9)  # 3 images per label, 5 patients
    data = tmp_path / "data"
    argv = ["prepare", "--layout", "folder", "--key", "clinic", "--dataset-dir", str(dataset), "--data-root",
            str(data), "--folds", "2", "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "clinic: the test split (--test-size 0.2) needs 5 stratified parts" in err
    assert "(3 benign, 3 malignant, 3 normal); use --test-size 0.34" in err
    assert _tree(data) == []


def test_key_and_argument_rules(tmp_path: Path, capsys, folder_dataset) -> None:
    dataset = folder_dataset(tmp_path / "export", n=15)
    with pytest.raises(DataError, match=r"'busi' is already a registered dataset .*--key busi_local"):
        get_adapter("busi", layout="folder")
    with pytest.raises(DataError, match="'Hospital A' is not usable"):
        get_adapter("Hospital A", layout="folder")
    with pytest.raises(DataError, match="unknown layout 'flat'; valid layouts: folder"):
        get_adapter("clinic", layout="flat")
    with pytest.raises(DataError, match="A dataset of your own is prepared with --layout folder"):
        get_adapter("clinic")
    for argv, message in (
        (["--layout", "folder", "--dataset-dir", str(dataset)], "needs --key NAME"),
        (["--datasets", "busi", "--layout", "folder", "--key", "x"], "leave out --datasets"),
        (["--key", "x"], "--key and --dataset-dir go with --layout"),
        (["--layout", "folder", "--key", "x", "--dataset-dir", str(dataset), "--raw-root", str(tmp_path)],
         "pass only one of them"),
    ):
        assert cli.main(["prepare", *argv, "--data-root", str(tmp_path / "data"), "--quiet"]) == 1
        assert message in capsys.readouterr().err
    # without --dataset-dir the folder is <raw root>/<key>, found through one extra nesting level
    raw = tmp_path / "data" / "raw"
    shutil.copytree(dataset, raw / "clinic" / "export_2024")
    assert cli.main(["prepare", "--layout", "folder", "--key", "clinic", "--data-root", str(tmp_path / "data"),
                     "--folds", "2", "--quiet"]) == 0
    df = pd.read_csv(tmp_path / "data" / "manifests" / "clinic.csv", dtype=str)
    assert df["image_path"].str.startswith("clinic/export_2024/images/").all()
