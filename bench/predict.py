"""Benchmark ``busbench predict``: images per second for a small and a large model, the whole command path.

For each model a two-fold run is trained for one epoch on a small synthetic BUSI-layout dataset at ``--size`` px with
the model's full published widths (the weights do not matter for speed), then :func:`busbench.engine.predict.
predict_images` (what ``busbench predict`` runs: input checks, decoding, letterbox, batched inference in
``inference_mode``, restoring each mask to its image's size, atomic PNG writes, predictions.csv) predicts
``--images`` synthetic BUS-BRA-layout images, once with the two-model fold ensemble and once with fold 0 alone. The
best of ``--rounds`` rounds is reported (images per second of wall time, model loading and checkpoint hashing
included).

Results are printed and written to ``bench/results.md`` under ``## predict``.

Run from the repository root with busbench installed:
    python bench/predict.py [--models unext unet] [--size 224] [--images 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import heading, machine, write_section
from PIL import Image

from busbench.config import load_config
from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine.predict import predict_images
from busbench.engine.train import train
from busbench.models import create_model
from busbench.models.cost import count_params
from busbench.report.tables import markdown_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unext", "unet"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize("busi", root / "raw" / "BUSI", n=20, seed=0)
        prepare(["busi"], data_root=root, folds=2, progress=False)
        synthesize("busbra", root / "inputs", n=args.images, seed=1)
        inputs = sorted(p for p in (root / "inputs").rglob("*.png") if "mask" not in p.name.lower())
        inputs = inputs[: args.images]
        sizes = [Image.open(p).size for p in inputs]
        span = f"{min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} px"
        for name in args.models:
            cfg = load_config(
                None,
                [
                    f"model.name={name}",
                    "data.dataset=busi",
                    f"data.data_root={root}",
                    f"output.root={root / 'results'}",
                    f"data.image_size={args.size}",
                    "data.folds=2",
                    "train.epochs=1",
                    "train.batch_size=4",
                    f"eval.batch_size={args.batch_size}",
                    "output.tensorboard=false",
                    "output.overlays=0",
                    "experiment.name=bench",
                ],
            )
            train(cfg)
            run = root / "results" / "bench" / "busi" / name
            params = count_params(create_model(name, in_channels=1, num_classes=1, image_size=args.size)) / 1e6
            for folds in (["all"], ["0"]):
                best = float("inf")
                for _ in range(args.rounds):
                    out = root / "pred"
                    shutil.rmtree(out, ignore_errors=True)
                    start = time.perf_counter()
                    predict_images(run, inputs, out, folds=folds)
                    best = min(best, time.perf_counter() - start)
                rows.append(
                    {
                        "model": name,
                        "params (M)": f"{params:.2f}",
                        "models ensembled": 2 if folds == ["all"] else 1,
                        "images": len(inputs),
                        "seconds": f"{best:.2f}",
                        "images/s": f"{len(inputs) / best:.3g}",
                    }
                )
                print(rows[-1])

    header = list(rows[0])
    table = markdown_lines(header, [[str(r[c]) for c in header] for r in rows])
    text = "\n".join(
        [
            *heading("predict"),
            machine([("torch", "torch")], notes=f"torch threads {torch.get_num_threads()}, device cpu"),
            "",
            f"`busbench predict` on {len(inputs)} synthetic BUS-BRA-layout images ({span}) at network size "
            f"{args.size}, batch {args.batch_size}, full-width models, best of {args.rounds} rounds; wall time of "
            "the whole call (input checks, model loading and checkpoint hashing, decoding, inference, restoring, "
            "PNG and CSV writes).",
            "",
            *table,
            "",
        ]
    )
    print(text)
    write_section("predict", text)


if __name__ == "__main__":
    main()
