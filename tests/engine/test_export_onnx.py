"""``busbench export onnx``: a trained run's ensemble and single fold exported with preprocess.json, parity with
PyTorch on the run's test images, the same masks as ``busbench predict``; and parity of every CNN of the zoo
(narrow widths, 64 px) on real ultrasound images when the real-data samples are present, else synthetic ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from engine_testdata import tiny_config
from zoo_testdata import TINY_CNN

from busbench import cli
from busbench.config import load_config
from busbench.data.decode import read_image, read_mask, square_image
from busbench.data.geometry import geometry_for, restore
from busbench.engine import tasks
from busbench.engine.export_onnx import TOLERANCE, ProbabilityGraph, export_onnx, parity, to_onnx
from busbench.engine.predict import predict_images
from busbench.engine.train import train
from busbench.errors import ModelError
from busbench.models import create_model

ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install 'busbench[onnx]'")
pytest.importorskip("onnx")

# narrow versions of the CNN zoo (every stage kept), at 64 px
CNN_ZOO = {
    **TINY_CNN,
    "skunet": {"base_width": 4},
    "unet_ds": {"base_width": 4},
    "smp_unet": {"encoder": "resnet18"},
}


@pytest.fixture(scope="module")
def run_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx_run")
    train(tiny_config(synthetic_root, out, "train.epochs=1"))
    return out / "demo" / "busi" / "unet"


def test_export_ensemble_and_fold(run_dir, synthetic_root, tmp_path, capsys):
    assert cli.main(["export", "onnx", "--run", str(run_dir), "--out", str(tmp_path / "ens.onnx")]) == 0
    assert "parity max |diff|" in capsys.readouterr().out
    assert cli.main(["export", "onnx", "--run", str(run_dir), "--fold", "1"]) == 0
    assert (run_dir / "export" / "fold1.onnx").is_file()
    spec = json.loads((tmp_path / "ens.preprocess.json").read_text())
    assert spec["size"] == 32 and spec["resize"] == "letterbox" and spec["channels"] == 1
    assert spec["threshold"] == 0.5 and spec["folds"] == [0, 1] and spec["input"]["dtype"] == "uint8"
    assert spec["parity"]["max_abs_diff"]["lesion"] <= TOLERANCE

    # an image file through preprocess.json's rules and the ONNX graph gives busbench predict's mask
    image_path = sorted((synthetic_root / "raw").rglob("malignant (*).png"))[0]
    image = read_image(image_path, spec["channels"])
    square, _ = square_image(image, spec["size"], spec["resize"])
    session = ort.InferenceSession(str(tmp_path / "ens.onnx"))
    lesion = session.run(None, {"image": square.transpose(2, 0, 1)[None]})[0][0, 0]
    info = geometry_for(image.shape[:2], spec["size"], spec["resize"])
    mask = restore(lesion, info) >= spec["threshold"]
    predict_images(run_dir, [image_path], tmp_path / "pred")
    predicted = read_mask(tmp_path / "pred" / f"{image_path.stem}.png")
    assert mask.shape == predicted.shape
    assert (mask != predicted).mean() < 1e-3  # float rounding may flip a pixel sitting exactly at the threshold


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight ultrasound images: real BUSI/BUSBRA/BUS-UCLM ones when available, else synthetic BUS images."""
    real = os.environ.get("BUSBENCH_REAL_DATA")
    files = sorted(p for p in Path(real).rglob("*.png") if "mask" not in p.name.lower())[::7][:8] if real else []
    if not files:
        from busbench.data.synth import synthesize

        folder = tmp_path_factory.mktemp("onnx_images")
        synthesize("busbra", folder / "BUSBRA", n=20, seed=3)
        files = sorted(p for p in folder.rglob("*.png") if "mask" not in p.name.lower())[:8]
    return files


def _inputs(files: list[Path], size: int) -> torch.Tensor:
    """uint8 ``(B, 1, size, size)`` network inputs of ``files`` (grey, letterboxed)."""
    squares = [square_image(read_image(f, 1), size, "letterbox")[0] for f in files]
    return torch.from_numpy(np.stack([s.transpose(2, 0, 1) for s in squares]))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CNN_ZOO))
def test_cnn_zoo_parity(name, image_files):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.name={name}", "data.normalize=per_image"])
    model = create_model(name, in_channels=1, num_classes=1, image_size=64, **CNN_ZOO[name]).eval()
    graph = ProbabilityGraph(tasks.build_task(cfg), [model]).eval()
    images = _inputs(image_files, 64)
    data = to_onnx(graph, images[:1])
    report = parity(data, graph, images)
    assert report["lesion"] <= TOLERANCE, report


def test_multiclass_ensemble_parity(image_files):
    cfg = load_config(None, ["task.mode=multiclass"])
    torch.manual_seed(1)
    models = [create_model("unet", in_channels=1, num_classes=3, image_size=32, base_width=4) for _ in range(2)]
    graph = ProbabilityGraph(tasks.build_task(cfg), models).eval()
    assert graph.output_names() == ["lesion", "classes"]
    images = _inputs(image_files[:3], 32)
    report = parity(to_onnx(graph, images[:1]), graph, images)
    assert set(report) == {"lesion", "classes"} and max(report.values()) <= TOLERANCE


def test_maskrcnn_is_refused_with_the_reason(run_dir, tmp_path):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"] = {"name": "maskrcnn", "params": {}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelError, match="cannot be exported to ONNX: tracing freezes"):
        export_onnx(tmp_path)
