"""One-command GPU check: busbench's mixed precision, ``channels_last`` and ``torch.compile`` against float32.

``bash bench/gpu.sh`` runs it. For a small and a large model (``unext``, 1.5 M parameters, and ``transunet``,
105 M) it trains both folds of a synthetic BUSI-layout dataset twice through busbench's own trainer
(:func:`busbench.engine.train.train`) and tests each run with the evaluator
(:func:`busbench.engine.evaluate.evaluate_run`):

* ``fp32``: ``train.amp=none``, ``train.channels_last=false``, ``train.compile=false``;
* ``fast``: ``train.amp=bf16`` (busbench falls back to float16 with gradient scaling on GPUs without native
  bfloat16), ``train.channels_last=true``, ``train.compile=true``.

Checks, each with its tolerance (the script exits with status 1 when one fails):

1. **Same weights.** The fp32 run's fold models predict the test split once in float32 and once with the fast
   settings (autocast, channels_last, compiled). The thresholded masks must agree: mean Dice between the two masks
   of an image >= ``AGREEMENT`` (0.98), over every test image and fold.
2. **Training.** Same seed, same batches: the fast run's first-epoch training loss is within ``LOSS_RTOL`` (5 %)
   of the fp32 run's, and its ensemble test Dice within ``DICE_ATOL`` (0.05) of the fp32 run's. Mixed precision
   changes rounding, so the runs drift apart; 5 epochs of ~50 training images per fold keep the drift small.

Figures (precision used, training images/s, peak GPU memory, test Dice, agreement) are printed and written to
``bench/results.md`` under ``## gpu``.

``--dry-run`` is the same script on the CPU at toy size (32 px, 1 epoch, the models shrunk, 16 images), so that it
is known to work before GPU time is spent on it; CI runs it. busbench's trainer computes in float32 on the CPU, so
the dry run hands it bfloat16 autocast the way a GPU would (CPU autocast supports it) and leaves compilation out
(the trainer ignores ``train.compile`` on the CPU). It writes its section only where ``--results`` points.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import RESULTS, heading, machine, write_section

from busbench.config import Config, load_config
from busbench.data.loader import build_test_dataset, make_loader
from busbench.data.prepare import prepare
from busbench.data.synth import synthesize
from busbench.engine import checkpoint as ckpt
from busbench.engine import tasks
from busbench.engine import train as train_mod
from busbench.engine.evaluate import evaluate_run
from busbench.engine.inference import amp_dtype

REPO = Path(__file__).resolve().parents[1]

AGREEMENT = 0.98
LOSS_RTOL = 0.05
DICE_ATOL = 0.05

VARIANTS = {
    "fp32": ["train.amp=none", "train.channels_last=false", "train.compile=false"],
    "fast": ["train.amp=bf16", "train.channels_last=true", "train.compile=true"],
}
# (size, images, epochs, batch, models with their overrides)
GPU = (224, 128, 5, 8, {"unext": [], "transunet": []})
DRY = (
    32,
    16,
    1,
    2,
    {
        "unet": ["model.params.base_width=4"],
        "transunet": ["model.params.vit_depth=1", "model.params.decoder_channels=[16,8,8,4]"],
    },
)


def make_data(root: Path, images: int) -> Path:
    synthesize("busi", root / "raw" / "BUSI", n=images, seed=0, overwrite=True)
    prepare(["busi"], data_root=root, folds=2, test_size=0.25, seed=42, progress=False)
    return root


def run_config(data: Path, out: Path, model: str, variant: str, size: int, epochs: int, batch: int,
               extra: list[str]) -> Config:
    return load_config(
        REPO / "configs" / "experiments" / "demo.yaml",
        [
            f"experiment.name=gpu-{variant}",
            f"data.data_root={data}",
            f"output.root={out}",
            f"data.image_size={size}",
            "data.folds=2",
            f"data.num_workers={0 if size <= 64 else 2}",  # toy images: worker processes cost more than they save
            f"model.name={model}",
            "model.params={}",
            *extra,
            f"train.epochs={epochs}",
            f"train.batch_size={batch}",
            "train.lr=1e-3",
            "train.warmup_epochs=0",
            "train.seed=0",
            f"eval.batch_size={batch}",
            "output.tensorboard=false",
            "output.overlays=0",
            *VARIANTS[variant],
        ],
    )


def train_and_test(cfg: Config, device: torch.device) -> dict:
    """Train both folds, test the run; the figures of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    folds = train_mod.train(cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    summary = pd.read_csv(evaluate_run(cfg.run_dir()))
    ensemble = summary[summary["fold"].astype(str) == "ensemble"].iloc[0]
    train_seconds = sum(json.loads((f / "done.json").read_text())["train_seconds"] for f in folds)
    n_train = sum(json.loads((f / "run.json").read_text())["n_train"] for f in folds)
    return {
        "precision": json.loads((folds[0] / "run.json").read_text())["precision"],
        "first_loss": float(pd.read_csv(folds[0] / "train_log.csv")["train_loss"].iloc[0]),
        "test_dice": float(ensemble["dice"]),
        "train_s": train_seconds,
        "wall_s": wall,
        "images_per_s": n_train * cfg.train.epochs / train_seconds,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
    }


def agreement(cfg: Config, device: torch.device, fast_dtype: torch.dtype | None, compile_model: bool) -> dict:
    """The fp32 run's fold models on the test split: float32 against autocast + channels_last (+ compile)."""
    task = tasks.build_task(cfg)
    loader = make_loader(build_test_dataset(cfg), cfg.eval.batch_size, shuffle=False, seed=0, num_workers=0)
    dice, max_diff = [], 0.0
    for fold in range(cfg.data.folds):
        payload = ckpt.load_checkpoint(cfg.run_dir() / f"fold{fold}" / ckpt.BEST)
        plain = tasks.build_model(cfg)
        ckpt.load_model_state(plain, payload, "checkpoint")
        plain = plain.eval().to(device)
        fast = tasks.build_model(cfg)
        ckpt.load_model_state(fast, payload, "checkpoint")
        fast = fast.eval().to(device).to(memory_format=torch.channels_last)
        if compile_model:
            fast = torch.compile(fast)
        for batch in loader:
            a = task.predict([plain], batch["image"], device, None).lesion[0]
            b = task.predict([fast], batch["image"], device, fast_dtype, channels_last=True).lesion[0]
            max_diff = max(max_diff, float((a - b).abs().max()))
            ma, mb = (a >= cfg.eval.threshold).flatten(1), (b >= cfg.eval.threshold).flatten(1)
            inter, total = (ma & mb).sum(1).double(), (ma.sum(1) + mb.sum(1)).double()
            dice += torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)).tolist()
    return {"agreement": float(np.mean(dice)), "worst": float(np.min(dice)), "max_prob_diff": max_diff}


def check_model(data: Path, out: Path, model: str, extra: list[str], size: int, epochs: int, batch: int,
                device: torch.device, dry: bool) -> dict:
    runs = {}
    for variant in VARIANTS:
        cfg = run_config(data, out, model, variant, size, epochs, batch, extra)
        runs[variant] = train_and_test(cfg, device)
        print(f"{model} {variant}: {runs[variant]}", flush=True)
    fp32_cfg = run_config(data, out, model, "fp32", size, epochs, batch, extra)
    fast_dtype = amp_dtype(device, "bf16") if not dry else torch.bfloat16
    agree = agreement(fp32_cfg, device, fast_dtype, compile_model=device.type == "cuda")
    print(f"{model} agreement: {agree}", flush=True)
    fp32, fast = runs["fp32"], runs["fast"]
    checks = {
        "agreement": agree["agreement"] >= AGREEMENT,
        "first_loss": abs(fast["first_loss"] - fp32["first_loss"]) <= LOSS_RTOL * abs(fp32["first_loss"]),
        "test_dice": abs(fast["test_dice"] - fp32["test_dice"]) <= DICE_ATOL,
    }
    return {"model": model, "fp32": fp32, "fast": fast, **agree, "checks": checks}


def device_notes(device: torch.device) -> str:
    if device.type != "cuda":
        return "no GPU (CPU dry run)"
    p = torch.cuda.get_device_properties(device)
    return (
        f"{p.name} ({p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, CUDA "
        f"{torch.version.cuda})"
    )


def section(rows: list[dict], device: torch.device, size: int, images: int, epochs: int, batch: int) -> str:
    lines = [
        *heading("gpu"),
        machine([("torch", "torch")], notes=device_notes(device)),
        "",
        f"{images} synthetic BUSI-layout images at {size} px (25 % test, the rest in 2 folds), {epochs} epoch(s), "
        f"batch {batch}, both folds trained and tested per run. 'fp32': train.amp=none; 'fast': train.amp=bf16, "
        "channels_last, torch.compile. Agreement: the fp32 run's fold models on the test split in float32 and with "
        "the fast settings, mean Dice between the two thresholded masks (worst image in brackets).",
        "",
        "| model | precision (fast) | fp32 img/s | fast img/s | speed-up | fp32 GB | fast GB | first loss fp32 / fast | "
        "test Dice fp32 / fast | agreement (worst) | max Δp | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["fp32"], r["fast"]
        failed = [name for name, ok in r["checks"].items() if not ok]
        lines.append(
            f"| {r['model']} | {b['precision']} | {a['images_per_s']:.1f} | {b['images_per_s']:.1f} | "
            f"{b['images_per_s'] / a['images_per_s']:.2f}× | {_gb(a['peak_gb'])} | {_gb(b['peak_gb'])} | "
            f"{a['first_loss']:.4f} / {b['first_loss']:.4f} | {a['test_dice']:.4f} / {b['test_dice']:.4f} | "
            f"{r['agreement']:.4f} ({r['worst']:.4f}) | {r['max_prob_diff']:.2e} | "
            f"{'pass' if not failed else 'FAIL: ' + ', '.join(failed)} |"
        )
    lines += [
        "",
        f"Tolerances: agreement ≥ {AGREEMENT}; first-epoch loss within {100 * LOSS_RTOL:.0f} % relative; ensemble "
        f"test Dice within {DICE_ATOL} absolute. Images/s count training images over the trainer's epoch time "
        "(which includes the first epoch's compilation in the fast run), not validation.",
    ]
    if device.type != "cuda":
        lines += [
            "",
            "CPU dry run (bfloat16 CPU autocast, channels_last, no compilation): it shows that the script works; its "
            "speeds mean nothing. `bash bench/gpu.sh` on a CUDA machine replaces this section with the GPU's figures.",
        ]
    return "\n".join(lines) + "\n"


def _gb(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy-size CPU run of the whole script")
    parser.add_argument("--results", type=Path, default=None, help="markdown file for the section "
                        "(default bench/results.md on CUDA; the dry run writes none unless given)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cpu" and not args.dry_run:
        parser.error("no CUDA device is visible; use --dry-run for the CPU version")
    size, images, epochs, batch, models = DRY if args.dry_run else GPU
    results = args.results if args.results or args.dry_run else RESULTS
    if args.dry_run:
        torch.set_num_threads(1)
        real = train_mod.amp_dtype  # the trainer's CPU branch is float32: hand it bfloat16 like a GPU would
        train_mod.amp_dtype = lambda dev, amp: torch.bfloat16 if amp != "none" else real(dev, amp)

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = args.workdir or Path(tmp)
        data = make_data(work / "data", images)
        rows = [
            check_model(data, work / "runs", name, extra, size, epochs, batch, device, args.dry_run)
            for name, extra in models.items()
        ]
    text = section(rows, device, size, images, epochs, batch)
    print(text)
    if results is not None:
        write_section("gpu", text, results)
    failed = [f"{r['model']}: {name}" for r in rows for name, ok in r["checks"].items() if not ok]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
