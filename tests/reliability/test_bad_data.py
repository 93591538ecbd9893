"""Bad raw data through ``busbench prepare``: one clear error line, a non-zero exit, and nothing written.

Each test damages a private copy of a synthetic raw tree the way real downloads get damaged (truncated or empty
files, re-encoded masks, metadata saved by a spreadsheet with another separator, duplicated rows, symlink loops,
file names from another encoding, missing folders), runs the real command line and checks that

1. stderr holds exactly one ``busbench prepare: error: ...`` line naming the offending file and the fix,
2. the exit status is non-zero,
3. the data root (raw, derived, manifests) is byte-for-byte what it was: no partial output, no temp files, and
   raw files untouched.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from badinput_testdata import assert_unchanged, run_cli, run_subprocess, snapshot
from PIL import Image

PREPARE = ("--folds", "2", "--test-size", "0.25", "--quiet")


def prepare_fails(capsys: pytest.CaptureFixture[str], data_root: Path, *keys: str) -> str:
    """Run ``busbench prepare`` expecting a failure that leaves ``data_root`` as it was; returns the message."""
    before = snapshot(data_root)
    result = run_cli(capsys, "prepare", "--datasets", *keys, "--data-root", data_root, *PREPARE)
    message = result.error_line("prepare")
    assert_unchanged(before, data_root)
    return message


def rename_bytes(src: Path, new_name: bytes) -> Path:
    """Rename ``src`` to a bytes name in its folder; skips where the file system refuses non-UTF-8 names."""
    target = os.path.join(os.fsencode(src.parent), new_name)
    try:
        os.rename(os.fsencode(src), target)
    except OSError as exc:
        pytest.skip(f"this file system refuses non-UTF-8 file names ({exc})")
    return Path(os.fsdecode(target))


# ----------------------------------------------------------------------------------------------- damaged files


def test_truncated_image(make_raw, capsys):
    root, ds = make_raw("busi")
    image = ds / "benign" / "benign (4).png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # an interrupted download or copy
    message = prepare_fails(capsys, root, "busi")
    assert message.startswith(f"{image}: cannot decode the image")
    assert "truncated" in message and "re-extract it from the original archive" in message


def test_truncated_image_after_a_good_prepare_keeps_the_earlier_outputs(make_raw, capsys):
    """A failed re-run must not clobber derived masks and manifests of the earlier successful run."""
    root, ds = make_raw("busi")
    assert run_cli(capsys, "prepare", "--datasets", "busi", "--data-root", root, *PREPARE).code == 0
    assert (root / "manifests" / "busi.csv").is_file() and any((root / "derived" / "busi").iterdir())
    image = ds / "normal" / "normal (3).png"  # the last sample in id order: every other one is decoded first
    image.write_bytes(image.read_bytes()[:100])
    message = prepare_fails(capsys, root, "busi")
    assert message.startswith(f"{image}: cannot decode the image")


def test_zero_byte_mask(make_raw, capsys):
    root, ds = make_raw("busi")
    mask = ds / "malignant" / "malignant (2)_mask.png"
    mask.write_bytes(b"")
    message = prepare_fails(capsys, root, "busi")
    assert message.startswith(f"{mask}: cannot decode the image")
    assert "re-extract it from the original archive" in message


@pytest.mark.parametrize(
    ("key", "mask_rel", "image_name"),
    [
        ("busi", "benign/benign (4)_mask.png", "benign (4).png"),
        ("busbra", "Masks/mask_0003-l.png", "bus_0003-l.png"),
    ],
)
def test_mask_of_another_size_is_refused(make_raw, capsys, key, mask_rel, image_name):
    """BUSI and BUS-BRA masks have their image's size; a mask of another size belongs to another image or was
    resampled, so it is an error rather than silently stretched onto the image."""
    root, ds = make_raw(key)
    mask = ds / mask_rel
    with Image.open(mask) as m:
        mode, (w, h) = m.mode, m.size
        m.resize((w + 7, h + 3), Image.Resampling.NEAREST).convert(mode).save(mask)
    message = prepare_fails(capsys, root, key)
    assert message.startswith(f"{mask}: mask is {w + 7}x{h + 3} but its image {image_name} is {w}x{h}")
    assert "Restore both files from the original archive" in message


def size_mismatches(dataset_dir: Path) -> list[tuple[str, str, tuple[int, int]]]:
    """(folder, mask name, image size) of each mask whose size differs from its image's, from the PNG headers."""
    found = []
    for mask in sorted(dataset_dir.rglob("masks/*.png")):
        if "All" in mask.relative_to(dataset_dir).parts:  # BUS-UC's union folder, which the adapter ignores
            continue
        with Image.open(mask) as m, Image.open(mask.parent.parent / "images" / mask.name) as i:
            if m.size != i.size:
                found.append((mask.parent.parent.name, mask.name, i.size))
    return found


@pytest.mark.parametrize("key", ["bus_uclm", "bus_uc"])
def test_documented_size_quirks_are_resized_and_recorded(pristine, tmp_path, capsys, key):
    """BUS-UCLM's HESN images and BUS-UC's 1-px mirror mismatch are documented quirks: those masks are resized to
    their image and each one is recorded in the summary JSON notes."""
    raw, rel = pristine[key]
    mismatched = size_mismatches(raw / rel)
    assert mismatched, f"the synthetic {key} layout should hold its size quirk"
    data_root = tmp_path / "data"
    result = run_cli(
        capsys, "prepare", "--datasets", key, "--raw-root", raw, "--data-root", data_root, *PREPARE
    )
    assert result.code == 0, result.err
    summary = json.loads((data_root / "manifests" / f"{key}.json").read_text())
    manifest = pd.read_csv(data_root / "manifests" / f"{key}.csv", dtype=str)
    for folder, name, (w, h) in mismatched:
        notes = [n for n in summary["notes"] if f"{name}: mask is " in n and "resized to the image" in n]
        assert len(notes) == 1, f"no note records the resized mask {folder}/{name}: {summary['notes']}"
        row = manifest[manifest["image_path"].str.endswith(f"{folder}/images/{name}")].iloc[0]
        assert (int(row["width"]), int(row["height"])) == (w, h)
        with Image.open(data_root / "derived" / row["mask_path"]) as derived:
            assert derived.size == (w, h)


@pytest.mark.parametrize("colour", [(0, 0, 255), (0, 128, 0)], ids=["blue", "anti-aliased-green"])
def test_colour_mask_with_unexpected_colours(make_raw, capsys, colour):
    """BUS-UCLM masks code classes as exact black/green/red; any other colour (a paint tool's blue, the in-between
    greens of a resampled mask) would otherwise turn into a wrong class."""
    root, ds = make_raw("bus_uclm")
    mask = sorted((ds / "masks").glob("*.png"))[0]
    with Image.open(mask) as m:
        pixels = np.array(m.convert("RGB"))
    pixels[5:8, 5:9] = colour
    Image.fromarray(pixels).save(mask)
    message = prepare_fails(capsys, root, "bus_uclm")
    assert message.startswith(
        f"{mask}: 12 pixels have colours other than black (0,0,0), green (0,255,0) or red"
    )
    assert str(colour) in message and "restore the original mask" in message


# --------------------------------------------------------------------------------------------------- metadata


def rewrite_csv(
    path: Path, delimiter: str, encoding: str, transform=lambda rows: rows, *, read_delimiter: str
):
    """Rewrite a metadata table as a spreadsheet would: parsed, then saved with ``delimiter``."""
    text = path.read_text(encoding=encoding)
    rows = transform(list(csv.reader(io.StringIO(text), delimiter=read_delimiter)))
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerows(rows)
    path.write_text(out.getvalue(), encoding=encoding)


@pytest.mark.parametrize(
    ("key", "table", "encoding", "right", "wrong"),
    [
        ("bus_uclm", "INFO.csv", "utf-8-sig", ";", ","),
        ("busbra", "bus_data.csv", "utf-8", ",", ";"),
    ],
)
def test_metadata_with_the_wrong_separator(make_raw, capsys, key, table, encoding, right, wrong):
    root, ds = make_raw(key)
    path = ds / table
    rewrite_csv(path, wrong, encoding, read_delimiter=right)
    message = prepare_fails(capsys, root, key)
    assert message == (
        f"{path}: header is not {right!r}-separated (found {wrong!r} instead); "
        f"save the file with {right!r} as separator"
    )


@pytest.mark.parametrize(
    ("key", "table", "encoding", "delimiter", "column"),
    [
        ("busbra", "bus_data.csv", "utf-8", ",", "Pathology"),
        ("bus_uclm", "INFO.csv", "utf-8-sig", ";", "Label"),
    ],
)
def test_metadata_with_a_missing_column(make_raw, capsys, key, table, encoding, delimiter, column):
    root, ds = make_raw(key)
    path = ds / table

    def drop(rows):
        j = rows[0].index(column)
        return [r[:j] + r[j + 1 :] for r in rows]

    rewrite_csv(path, delimiter, encoding, drop, read_delimiter=delimiter)
    message = prepare_fails(capsys, root, key)
    assert message.startswith(f"{path}: missing column(s) {column} (header has ")
    assert message.endswith("restore the original file")


@pytest.mark.parametrize(
    ("key", "table", "encoding", "delimiter", "what"),
    [
        ("busbra", "bus_data.csv", "utf-8", ",", "ID bus_0002-l appears twice"),
        ("bus_uclm", "INFO.csv", "utf-8-sig", ";", "appears twice"),
    ],
)
def test_duplicate_metadata_rows(make_raw, capsys, key, table, encoding, delimiter, what):
    root, ds = make_raw(key)
    path = ds / table
    rewrite_csv(path, delimiter, encoding, lambda rows: [*rows, rows[3]], read_delimiter=delimiter)
    line = len(path.read_text(encoding=encoding).splitlines())
    message = prepare_fails(capsys, root, key)
    assert message.startswith(f"{path}: ") and what in message
    assert f"(line {line}); remove the duplicate row" in message


def test_two_files_naming_the_same_sample(make_raw, capsys):
    """'benign (7).png' and 'benign (07).png' are both sample benign_0007; keeping either silently would drop
    the other."""
    root, ds = make_raw("busi")
    folder = ds / "benign"
    shutil.copy(folder / "benign (7).png", folder / "benign (07).png")
    shutil.copy(folder / "benign (7)_mask.png", folder / "benign (07)_mask.png")
    message = prepare_fails(capsys, root, "busi")
    assert message == (
        f"{folder / 'benign (7).png'}: names the same image as benign (07).png (sample benign_0007); "
        f"keep one of the two files in {folder}"
    )


def test_all_or_nothing_across_datasets(make_raw, capsys):
    """A bad second dataset leaves nothing of the good first one behind."""
    root, _ = make_raw("busi")
    _, bra = make_raw("busbra")
    rewrite_csv(bra / "bus_data.csv", ";", "utf-8", read_delimiter=",")
    message = prepare_fails(capsys, root, "busi", "busbra")
    assert message.startswith(f"{bra / 'bus_data.csv'}: header is not ','-separated")
    assert not (root / "derived").exists() and not (root / "manifests").exists()


# ---------------------------------------------------------------------------------------- folders and names


def test_symlink_loops_are_not_followed(make_raw):
    """Loops inside class folders and beside the dataset are skipped: prepare ends, with the same 16 samples."""
    root, ds = make_raw("busi")
    os.symlink(ds / "benign", ds / "benign" / "loop")
    os.symlink(ds.parent, ds.parent / "again")
    os.symlink(ds, ds / "normal" / "up")
    raw_before = snapshot(root / "raw")
    result = run_subprocess("prepare", "--datasets", "busi", "--data-root", root, *PREPARE)
    assert result.code == 0, result.err
    manifest = pd.read_csv(root / "manifests" / "busi.csv", dtype=str)
    assert len(manifest) == 16 and manifest["sample_id"].is_unique
    assert not manifest["image_path"].str.contains("loop|again|up/").any()
    assert_unchanged(raw_before, root / "raw")


def test_symlink_loop_instead_of_a_dataset(tmp_path):
    """A raw folder holding only symlink loops ends quickly with 'dataset folder not found'."""
    root = tmp_path / "data"
    folder = root / "raw" / "BUSI"
    folder.mkdir(parents=True)
    os.symlink(folder, folder / "loop")
    os.symlink(folder / "loop", folder / "loop2")
    before = snapshot(root)
    result = run_subprocess("prepare", "--datasets", "busi", "--data-root", root, *PREPARE)
    message = result.error_line("prepare")
    assert message.startswith(f"busi: dataset folder not found (nothing below {folder} matches")
    assert "Unpack the dataset there" in message
    assert_unchanged(before, root)


def test_image_that_is_a_symlink_to_itself(make_raw, capsys):
    root, ds = make_raw("busi")
    image = ds / "benign" / "benign (9).png"
    image.unlink()
    os.symlink(image, image)
    message = prepare_fails(capsys, root, "busi")
    assert message.startswith(f"{ds / 'benign' / 'benign (9)_mask.png'}: mask without its image {image}")


def test_file_name_that_is_not_utf8(make_raw):
    """A Latin-1 name (byte 0xff) gives one readable error line, never a UnicodeEncodeError traceback; checked in
    a child process under the C locale so that the real stderr encoding is exercised."""
    root, ds = make_raw("busi")
    rename_bytes(ds / "benign" / "benign (7).png", b"benign (7)\xff.png")
    before = snapshot(root)
    result = run_subprocess("prepare", "--datasets", "busi", "--data-root", root, *PREPARE)
    message = result.error_line("prepare")
    shown = os.fsencode(ds / "benign").decode() + "/benign (7)\\xff.png"
    assert message.startswith(f"{shown}: file name is not valid UTF-8")
    assert "rename it to a UTF-8 name" in message
    assert_unchanged(before, root)


def test_folder_name_that_is_not_utf8(make_raw, capsys):
    """The archive's nesting folder with a non-UTF-8 name: refused before anything is written (a manifest could
    not hold its path)."""
    root, ds = make_raw("busi")
    renamed = rename_bytes(ds, b"Dataset_BUSI_with_GT\xe9")
    message = prepare_fails(capsys, root, "busi")
    assert message.startswith(
        f"{os.fsencode(renamed).decode('utf-8', 'backslashreplace')}: folder path is not valid UTF-8"
    )
    assert message.endswith(
        "folder path is not valid UTF-8 (undecodable bytes shown as \\x..); rename the folder "
        "holding those bytes to a UTF-8 name (e.g. convmv -f latin1 -t utf8)"
    )


def test_data_root_that_is_not_utf8(make_raw, capsys):
    """A data root below a Latin-1 named folder: refused before anything is written, since the summary records
    the roots (this used to end in a UnicodeEncodeError with derived masks already in place)."""
    root, _ = make_raw("busi")
    renamed = rename_bytes(root, b"d\xe4ta")
    message = prepare_fails(capsys, renamed, "busi")
    shown = os.fsencode(renamed / "raw").decode("utf-8", "backslashreplace")
    assert message.startswith(f"{shown}: folder path is not valid UTF-8")
    assert sorted(os.listdir(os.fsencode(renamed))) == [b"raw"]


@pytest.mark.parametrize("flag", ["--derived-root", "--out"])
def test_output_root_that_is_not_utf8(make_raw, capsys, tmp_path, flag):
    """Derived or manifest folders with non-UTF-8 names are refused before the first file is written."""
    root, _ = make_raw("busi")
    bad = os.path.join(os.fsencode(tmp_path), b"out\xff")
    before = snapshot(root)
    result = run_cli(
        capsys, "prepare", "--datasets", "busi", "--data-root", root, flag, os.fsdecode(bad), *PREPARE
    )
    message = result.error_line("prepare")
    assert_unchanged(before, root)
    assert "out\\xff: folder path is not valid UTF-8" in message
    assert not os.path.exists(bad)


@pytest.mark.parametrize(
    ("key", "folder", "expected"),
    [
        ("busi", "normal", "holds no images; re-extract Dataset_BUSI.zip"),
        ("bus_uc", "Malignant/images", "holds no PNG images; re-extract the BUS-UC archive"),
    ],
)
def test_empty_class_folder(make_raw, capsys, key, folder, expected):
    root, ds = make_raw(key)
    target = ds / folder
    for path in sorted(target.iterdir()):
        path.unlink()
    if key == "bus_uc":
        for path in sorted((target.parent / "masks").iterdir()):
            path.unlink()
    message = prepare_fails(capsys, root, key)
    assert str(target) in message and message.endswith(expected)


def test_missing_dataset_folder(tmp_path, make_raw, capsys):
    root, _ = make_raw("busbra")  # a raw root with another dataset only
    message = prepare_fails(capsys, root, "busi")
    assert message.startswith(f"busi: dataset folder not found ({root / 'raw' / 'BUSI'} does not exist")
    assert "Unpack the dataset there" in message and "--raw-root" in message


def test_missing_raw_root(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    message = prepare_fails(capsys, root, "busi")
    assert message.startswith(f"raw root {root / 'raw'} does not exist; unpack the datasets there")
