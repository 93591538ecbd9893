"""``busbench export onnx``: a run's fold model, or its fold ensemble, as one ONNX graph with its preprocessing.

The graph is the evaluator's own prediction code traced once (:meth:`busbench.engine.tasks.Task.predict`, then the
ensemble mean): its input ``image`` is the ``(B, C, S, S)`` uint8 network input (decoded, squared by the letterbox
or resize rule, not normalised); normalisation (:func:`busbench.data.loader.normalize_images`) happens inside the
graph. Outputs are probabilities: ``lesion`` ``(B, 1, S, S)``, plus ``classes`` ``(B, 3, S, S)`` (multiclass, background
first) or ``label`` ``(B, 3)`` (multitask, normal/benign/malignant; refinement is not applied). ``preprocess.json``
beside the model says how to get from an image file to ``image`` and from ``lesion`` back to a mask.

The parity check feeds the run's first ``--parity-images`` held-out test images through the exported graph with
onnxruntime and through PyTorch, and reports the largest absolute difference of each output; above ``1e-4`` the
export is refused and nothing is written. Test-time augmentation is not part of the graph.

Traced with PyTorch's TorchScript-based ONNX exporter (opset 17). Measured parity (max |diff| of ``lesion`` on real
BUS images, one randomly initialised model each at small widths): the CNN zoo (unet, attunet, unetpp, unet3p, unext,
cmunet, cmunext, skunet, unet_ds) and the smp family (smp_unet, smp_fpn, smp_deeplabv3p, smp_segformer tried) at
64 px, medt and ukan at 64 px and transunet and swinunet at 224 px all stay below 2e-6. ONNX cannot express
``maskrcnn`` (listed in :data:`NOT_EXPRESSIBLE`): tracing freezes its detection post-processing (the number of
detections, the per-detection mask pasting and the split of the batch into images), so the graph differs by up to
0.5 on some images and fails on batches of another size; it is refused with that reason.
"""

from __future__ import annotations

import argparse
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from busbench.atomic import atomic_write_bytes, atomic_write_text
from busbench.config import Config
from busbench.data.loader import (
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_dataset,
)
from busbench.engine import tasks
from busbench.engine.evaluate import _fold_checkpoints, _load_models, load_run_config
from busbench.errors import BusbenchError, ConfigError, ModelError

OPSET = 17
TOLERANCE = 1e-4
#: models a traced ONNX graph cannot reproduce, and why
NOT_EXPRESSIBLE = {
    "maskrcnn": "tracing freezes Mask R-CNN's data-dependent detection post-processing (number of detections, "
    "per-detection mask pasting, the split of the batch into images); the traced graph differs from PyTorch",
}
_CPU = torch.device("cpu")


class ProbabilityGraph(nn.Module):
    """uint8 images -> the mean over ``models`` of the task's probabilities (one model: that model's)."""

    def __init__(self, task: tasks.Task, models: Sequence[nn.Module]):
        super().__init__()
        self.task = task
        self.models = nn.ModuleList(models)

    def output_names(self) -> list[str]:
        mode = self.task.mode
        return ["lesion", *(["classes"] if mode == "multiclass" else []), *(["label"] if mode == "multitask" else [])]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pred = self.task.predict(list(self.models), images, _CPU, None)
        outs = [pred.lesion.mean(dim=0).unsqueeze(1)]
        if pred.pixel is not None:
            outs.append(pred.pixel.mean(dim=0))
        if pred.image is not None:
            outs.append(pred.image.mean(dim=0))
        return tuple(outs)


def to_onnx(graph: ProbabilityGraph, example: torch.Tensor) -> bytes:
    """The ONNX model of ``graph`` traced on ``example`` (batch size is dynamic)."""
    import onnx

    names = graph.output_names()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                graph.eval(),
                (example,),
                buf,
                dynamo=False,
                input_names=["image"],
                output_names=names,
                dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                opset_version=OPSET,
            )
        except Exception as exc:  # the exporter raises many types; the message says what it could not express
            raise ModelError(f"ONNX cannot express this model: {type(exc).__name__}: {str(exc)[:300]}") from None
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data


def parity(data: bytes, graph: ProbabilityGraph, images: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference per output between onnxruntime and PyTorch on ``images`` (uint8 batch)."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    try:
        got = session.run(None, {"image": images.numpy()})
    except Exception as exc:  # onnxruntime's own error types
        raise ModelError(f"onnxruntime cannot run the exported graph: {str(exc)[:300]}") from None
    with torch.inference_mode():
        want = graph.eval()(images)
    return {
        name: float(np.abs(a - b.numpy()).max())
        for name, a, b in zip(graph.output_names(), got, want, strict=True)
    }


def preprocess_spec(cfg: Config, names: Sequence[str], folds: Sequence[int]) -> dict[str, Any]:
    """What ``preprocess.json`` records: how an image file becomes the graph's input, and a mask its output."""
    c = cfg.data.channels
    norm: dict[str, Any] = {"mode": cfg.data.normalize, "applied": "inside the graph"}
    if cfg.data.normalize == "imagenet":
        norm["mean"] = list(IMAGENET_MEAN if c == 3 else IMAGENET_GREY_MEAN)
        norm["std"] = list(IMAGENET_STD if c == 3 else IMAGENET_GREY_STD)
    norm["formula"] = {
        "unit": "x / 255",
        "per_image": "(x/255 - mean) / std over each whole input image (padding included); std <= 1e-6: no scaling",
        "imagenet": "(x/255 - mean[c]) / std[c]",
    }[cfg.data.normalize]
    return {
        "input": {"name": "image", "dtype": "uint8", "shape": ["batch", c, cfg.data.image_size, cfg.data.image_size]},
        "outputs": list(names),
        "size": cfg.data.image_size,
        "resize": cfg.data.resize,
        "channels": c,
        "decode": "8-bit (16-bit / 257, rounded); grey replicated / alpha dropped; "
        + ("RGB" if c == 3 else "grey = OpenCV BT.601 of RGB"),
        "letterbox_rule": (
            "scale the longest side to size (round the other), pad with 0 split evenly, the extra pixel at the "
            "bottom/right; INTER_AREA when shrinking, INTER_LINEAR when enlarging"
            if cfg.data.resize == "letterbox"
            else "stretch both sides to size; INTER_AREA when shrinking, INTER_LINEAR when enlarging"
        ),
        "normalization": norm,
        "threshold": cfg.eval.threshold,
        "mask_rule": "crop the padding from lesion, resize bilinearly to the image size, lesion >= threshold",
        "folds": list(folds),
        "ensemble": "mean of the fold models' probabilities" if len(folds) > 1 else None,
        "task": cfg.task.mode,
        "model": cfg.model.name,
        "opset": OPSET,
    }


def export_onnx(
    run_dir: Path,
    fold: int | None = None,
    out: Path | None = None,
    parity_images: int = 8,
    overrides: Sequence[str] = (),
) -> tuple[Path, dict[str, float]]:
    """Export fold ``fold`` (None: the fold ensemble) of ``run_dir``; returns the ONNX path and the parity report."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, [*overrides, "train.device=cpu"])
    if cfg.model.name in NOT_EXPRESSIBLE:
        raise ModelError(f"model {cfg.model.name!r} cannot be exported to ONNX: {NOT_EXPRESSIBLE[cfg.model.name]}")
    if fold is not None and not 0 <= fold < cfg.data.folds:
        raise ConfigError(f"--fold {fold}: {run_dir} has folds 0..{cfg.data.folds - 1}")
    folds = list(range(cfg.data.folds)) if fold is None else [fold]
    out = Path(out) if out else run_dir / "export" / ("ensemble.onnx" if fold is None else f"fold{fold}.onnx")
    models, _ = _load_models(cfg, _fold_checkpoints(run_dir, cfg, folds), _CPU)
    graph = ProbabilityGraph(tasks.build_task(cfg), models).eval()
    ds = build_test_dataset(cfg)
    images = torch.stack([ds[i]["image"] for i in range(min(parity_images, len(ds)))])
    data = to_onnx(graph, images[:1])
    report = parity(data, graph, images)
    worst = max(report.values())
    if not worst <= TOLERANCE:
        raise ModelError(
            f"the ONNX model differs from PyTorch by {worst:.3g} (> {TOLERANCE}) on {len(images)} test images "
            f"({report}); nothing written"
        )
    atomic_write_bytes(out, data)
    spec = preprocess_spec(cfg, graph.output_names(), folds)
    spec["parity"] = {"images": len(images), "max_abs_diff": report, "tolerance": TOLERANCE}
    atomic_write_text(out.with_name(out.stem + ".preprocess.json"), json.dumps(spec, indent=2) + "\n")
    return out, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, metavar="DIR", help="run folder written by busbench train")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, default=None, metavar="K", help="export fold K's model")
    which.add_argument("--ensemble", action="store_true", help="export the fold ensemble (the default)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE", help="default: DIR/export/<which>.onnx")
    parser.add_argument(
        "--parity-images", type=int, default=8, metavar="N", help="test images for the parity check (default 8)"
    )
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="e.g. --set data.data_root=DIR")


def run(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BusbenchError("ONNX export needs onnx and onnxruntime: pip install 'busbench[onnx]'") from None
    path, report = export_onnx(args.run, args.fold, args.out, args.parity_images, args.set)
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in report.items())
    print(f"wrote {path} and {path.with_name(path.stem + '.preprocess.json')}; parity max |diff|: {diffs}")
    return 0
