"""``busbench export nnunet``: a prepared dataset as an nnU-Net v2 raw dataset, on busbench's split.

``DIR/DatasetNNN_<Name>/`` receives:

=====================  ===========================================================================================
``imagesTr/``          every development image as ``<sample_id>_0000.png`` (8-bit grey, decoded like busbench's
                       training data: :func:`busbench.data.decode.decode_row` with one channel)
``labelsTr/``          its label map ``<sample_id>.png``: 0 background, 1 lesion (``--labels binary``) or 1 benign,
                       2 malignant (``--labels classes``)
``imagesTs/``          the held-out test images, ``<sample_id>_0000.png``
``labelsTs/``          their label maps (for ``nnUNetv2_evaluate_folder``; ``busbench score`` reads the manifest)
``dataset.json``       one channel, the labels, ``numTraining``, ``file_ending: .png``, and the manifest's SHA-256
``splits_final.json``  busbench's folds: entry ``k`` trains on the development images outside fold ``k`` and
                       validates on fold ``k``
=====================  ===========================================================================================

nnU-Net reads ``splits_final.json`` from its preprocessed folder, so the printed commands copy it there after
``nnUNetv2_plan_and_preprocess``. Case names are the sample ids, so the masks ``nnUNetv2_predict`` writes for
``imagesTs`` go straight into ``busbench score``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from busbench.config import load_config
from busbench.data.decode import decode_row
from busbench.data.loader import load_dataset_rows
from busbench.errors import ConfigError, DataError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_CASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
LABELS = {
    "binary": {"background": 0, "lesion": 1},
    "classes": {"background": 0, "benign": 1, "malignant": 2},
}


def dataset_folder(out: Path, dataset_id: int, name: str) -> Path:
    return Path(out) / f"Dataset{dataset_id:03d}_{name}"


def make_splits(rows: pd.DataFrame) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` entries from the manifest's development folds."""
    dev = rows[rows["split"] == "dev"]
    folds = sorted(int(f) for f in set(dev["fold"]))
    splits = []
    for k in folds:
        val = dev["fold"].astype(int) == k
        splits.append(
            {
                "train": sorted(dev.loc[~val, "sample_id"].astype(str)),
                "val": sorted(dev.loc[val, "sample_id"].astype(str)),
            }
        )
    return splits


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(array)):
        raise DataError(f"could not write {path}")


def next_commands(folder: Path, dataset_id: int, key: str, n_folds: int) -> list[str]:
    """The nnU-Net commands that train and predict on the exported dataset, then the busbench score command."""
    raw = shlex.quote(str(folder.parent))
    name = folder.name
    folds = " ".join(str(k) for k in range(n_folds))
    return [
        f"export nnUNet_raw={raw} nnUNet_preprocessed=nnUNet_preprocessed nnUNet_results=nnUNet_results",
        f"nnUNetv2_plan_and_preprocess -d {dataset_id} -c 2d --verify_dataset_integrity",
        f'cp {shlex.quote(str(folder / "splits_final.json"))} "$nnUNet_preprocessed/{name}/"',
        f"for f in {folds}; do nnUNetv2_train {dataset_id} 2d $f; done",
        f'nnUNetv2_predict -i {shlex.quote(str(folder / "imagesTs"))} -o nnunet_pred_{key} -d {dataset_id} '
        f"-c 2d -f {folds}",
        f"busbench score --dataset {key} --pred-dir nnunet_pred_{key} --name nnunet_2d",
    ]


def export_nnunet(
    dataset: str,
    dataset_id: int,
    out: Path,
    labels: str = "binary",
    name: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> Path:
    """Write ``out/DatasetNNN_<name>/`` (see the module docstring); returns that folder."""
    if not 1 <= int(dataset_id) <= 999:
        raise ConfigError(f"--id {dataset_id}: nnU-Net dataset ids are 1..999 (use 500+ to stay clear of others)")
    if labels not in LABELS:
        raise ConfigError(f"--labels {labels!r}: choose one of {', '.join(LABELS)}")
    name = name or dataset
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: letters, digits, '_' and '-' only")
    cfg = load_config(None, [f"data.dataset={dataset}", *(overrides or [])])
    rows, info = load_dataset_rows(cfg, dataset)
    bad = [s for s in rows["sample_id"].astype(str) if not _CASE.match(s)]
    if bad:
        raise DataError(f"sample ids {bad[:5]} cannot be nnU-Net case names (letters, digits, '.', '_', '+', '-')")
    out = Path(out)
    existing = sorted(out.glob(f"Dataset{int(dataset_id):03d}_*")) if out.is_dir() else []
    if existing and not force:
        raise DataError(
            f"{existing[0]} already exists (nnU-Net dataset id {dataset_id}); pick another --id or pass --force"
        )
    folder = dataset_folder(out, int(dataset_id), name)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=out))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        for rec in rows.to_dict("records"):
            image, class_map = decode_row(rec, 1)
            label = class_map if labels == "classes" else (class_map > 0).astype(np.uint8)
            part = "Tr" if rec["split"] == "dev" else "Ts"
            sid = str(rec["sample_id"])
            _write_png(tmp / f"images{part}" / f"{sid}_0000.png", image[:, :, 0])
            _write_png(tmp / f"labels{part}" / f"{sid}.png", label)
        splits = make_splits(rows)
        meta: dict[str, Any] = {
            "name": name,
            "description": f"busbench export of the prepared {dataset} dataset (development split: imagesTr, "
            "held-out test split: imagesTs)",
            "channel_names": {"0": "ultrasound"},
            "labels": LABELS[labels],
            "numTraining": int((rows["split"] == "dev").sum()),
            "file_ending": ".png",
            "busbench": {
                "dataset": dataset,
                "manifest_sha256": info["manifest_sha256"],
                "folds": len(splits),
                "n_test": int((rows["split"] == "test").sum()),
            },
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "splits_final.json").write_text(json.dumps(splits, indent=2) + "\n", encoding="utf-8")
        for old in existing:
            shutil.rmtree(old)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, metavar="KEY", help="prepared dataset to export")
    parser.add_argument("--id", required=True, type=int, metavar="N", help="nnU-Net dataset id (1..999)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="nnU-Net raw folder (nnUNet_raw)")
    parser.add_argument(
        "--labels", choices=sorted(LABELS), default="binary", help="lesion mask (default) or benign/malignant map"
    )
    parser.add_argument("--name", default=None, help="dataset name in DatasetNNN_<name> (default: the key)")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset with this id")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="e.g. --set data.data_root=DIR"
    )


def run(args: argparse.Namespace) -> int:
    folder = export_nnunet(args.dataset, args.id, args.out, args.labels, args.name, args.set, args.force)
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    n_folds = meta["busbench"]["folds"]
    print(
        f"wrote {folder}: {meta['numTraining']} training and {meta['busbench']['n_test']} test cases, "
        f"{n_folds} folds in splits_final.json"
    )
    print("next (nnU-Net v2, pip install 'busbench[nnunet]'):")
    for line in next_commands(folder, args.id, args.dataset, n_folds):
        print(f"  {line}")
    return 0
