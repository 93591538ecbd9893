"""``busbench export nnunet``: the raw dataset layout, splits_final.json equal to the manifest's folds, label maps
equal to busbench's masks, the refusals; and nnU-Net v2's own planning, preprocessing and split loading of the
exported dataset (slow; skipped when nnunetv2 is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from busbench import cli
from busbench.data.decode import read_image, read_mask
from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine.export_nnunet import export_nnunet
from busbench.errors import DataError


def manifest(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "manifests" / "busi.csv", dtype={"sample_id": str})


def test_layout_splits_and_labels(synthetic_root, tmp_path, capsys):
    args = ["export", "nnunet", "--dataset", "busi", "--id", "501", "--out", str(tmp_path),
            "--set", f"data.data_root={synthetic_root}"]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for needle in ("nnUNetv2_plan_and_preprocess -d 501", "splits_final.json", "nnUNetv2_train 501 2d $f",
                   "nnUNetv2_predict", "busbench score --dataset busi --pred-dir"):  # fmt: skip
        assert needle in printed, needle
    folder = tmp_path / "Dataset501_busi"
    rows = manifest(synthetic_root)
    dev, test = rows[rows["split"] == "dev"], rows[rows["split"] == "test"]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(f"{s}_0000.png" for s in dev["sample_id"])
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == sorted(f"{s}.png" for s in test["sample_id"])
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "ultrasound"} and meta["file_ending"] == ".png"
    assert meta["labels"] == {"background": 0, "lesion": 1} and meta["numTraining"] == len(dev)
    splits = json.loads((folder / "splits_final.json").read_text())
    assert len(splits) == dev["fold"].nunique()
    for k, split in enumerate(splits):
        assert split["val"] == sorted(dev.loc[dev["fold"] == k, "sample_id"])
        assert split["train"] == sorted(dev.loc[dev["fold"] != k, "sample_id"])
    rec = test.iloc[0]
    label = np.asarray(Image.open(folder / "labelsTs" / f"{rec['sample_id']}.png"))
    np.testing.assert_array_equal(label, read_mask(synthetic_root / "derived" / rec["mask_path"]).astype(np.uint8))
    image = np.asarray(Image.open(folder / "imagesTs" / f"{rec['sample_id']}_0000.png"))
    assert image.dtype == np.uint8 and image.ndim == 2
    np.testing.assert_array_equal(image, read_image(synthetic_root / "raw" / rec["image_path"], 1)[:, :, 0])

    with pytest.raises(DataError, match="already exists"):
        export_nnunet("busi", 501, tmp_path, name="other", overrides=[f"data.data_root={synthetic_root}"])
    export_nnunet("busi", 501, tmp_path, labels="classes", overrides=[f"data.data_root={synthetic_root}"], force=True)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "benign": 1, "malignant": 2}
    malignant = rows[rows["label"] == "malignant"].iloc[0]
    part = "Tr" if malignant["split"] == "dev" else "Ts"
    values = np.unique(np.asarray(Image.open(folder / f"labels{part}" / f"{malignant['sample_id']}.png")))
    assert set(values) == {0, 2}


@pytest.mark.slow
def test_nnunet_plans_preprocesses_and_loads_the_splits(tmp_path, monkeypatch):
    """nnU-Net's own integrity check, planning, preprocessing and trainer split loading accept the export."""
    pytest.importorskip("nnunetv2", reason="nnU-Net v2 is an optional extra: pip install 'busbench[nnunet]'")
    import nnunetv2.paths
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    data = tmp_path / "data"
    synthesize("busi", data / "raw" / "BUSI", n=16, seed=0)
    prepare(["busi"], data_root=data, folds=2, test_size=0.25, seed=42, progress=False)
    folder = export_nnunet("busi", 777, tmp_path / "raw", overrides=[f"data.data_root={data}"])
    env = {
        **os.environ,
        "nnUNet_raw": str(tmp_path / "raw"),
        "nnUNet_preprocessed": str(tmp_path / "pre"),
        "nnUNet_results": str(tmp_path / "res"),
        "nnUNet_n_proc_DA": "1",
    }
    tool = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    done = subprocess.run(
        [str(tool), "-d", "777", "-c", "2d", "--verify_dataset_integrity", "-np", "1", "-npfp", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    pre = tmp_path / "pre" / folder.name
    shutil.copy(folder / "splits_final.json", pre / "splits_final.json")

    import torch

    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    rows = manifest(data)
    dev = rows[rows["split"] == "dev"]
    # nnU-Net reads its folders from the environment when first imported; point every copy at this test's
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, env[name])
        for module in (nnunetv2.paths, trainer_module):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, env[name])
    for k in range(2):
        trainer = trainer_module.nnUNetTrainer(plans, "2d", k, dataset_json, device=torch.device("cpu"))
        train_keys, val_keys = trainer.do_split()
        assert sorted(val_keys) == sorted(dev.loc[dev["fold"] == k, "sample_id"])
        assert sorted(train_keys) == sorted(dev.loc[dev["fold"] != k, "sample_id"])
