"""Figures from result files (PNG, matplotlib's Agg backend; only the overlays run a model again).

- learning curves per fold, from ``fold<k>/train_log.csv``;
- per-image Dice distributions per model (box plot with the points), from ``test/*_per_image.csv``;
- test-set overlay grids per model (best, median, worst case: image, ground-truth contour, prediction contour),
  chosen by the per-image test Dice and predicted again by the run's fold models (:mod:`busbench.report.overlays`);
- the transfer-matrix heatmap, from ``transfer.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from busbench.atomic import atomic_path  # noqa: E402
from busbench.errors import DataError  # noqa: E402

DPI = 120


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _model_dirs(dirs: list[Path]) -> list[Path]:
    """Run folders (``<exp>/<dataset>/<model>``, recognised by their config.yaml) below ``dirs``."""
    found = set()
    for root in dirs:
        root = Path(root)
        if not root.exists():
            raise DataError(f"{root} does not exist; pass run folders or a results root")
        if (root / "config.yaml").is_file():
            found.add(root)
        found.update(p.parent for p in root.rglob("config.yaml") if any(p.parent.glob("fold*")))
    return sorted(found)


def learning_curves(run_dir: Path, out: Path) -> Path:
    """Training loss and validation Dice per epoch, one line per fold."""
    logs = sorted(Path(run_dir).glob("fold*/train_log.csv"))
    if not logs:
        raise DataError(f"no fold*/train_log.csv in {run_dir}; train the run first")
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    for log in logs:
        df = pd.read_csv(log)
        fold = log.parent.name
        ax_loss.plot(df["epoch"], df["train_loss"], label=fold)
        if "val_dice" in df:
            valid = df.dropna(subset=["val_dice"])
            ax_dice.plot(valid["epoch"], valid["val_dice"], marker="o", ms=3, label=fold)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_dice.set(xlabel="epoch", ylabel="validation Dice", title="validation Dice", ylim=(0, 1))
    ax_dice.legend(fontsize=8)
    run_dir = Path(run_dir)
    fig.suptitle(f"{run_dir.parent.name} / {run_dir.name}")
    return _save(fig, out)


def dice_distribution(dirs: list[Path], out: Path, source: str = "ensemble") -> Path:
    """Box plot of per-image test Dice per model (one panel per dataset), with the individual images."""
    frames = []
    # trained runs, and result folders without a config (busbench score: another tool's masks)
    scored = {p.parent.parent for d in dirs if Path(d).is_dir() for p in Path(d).rglob(f"test/{source}_per_image.csv")}
    for run in sorted({*_model_dirs(dirs), *scored}):
        path = run / "test" / f"{source}_per_image.csv"
        if path.is_file():
            df = pd.read_csv(path)
            frames.append(df.assign(model=run.name, dataset=run.parent.name))
    if not frames:
        raise DataError(
            f"no test/{source}_per_image.csv below {', '.join(map(str, dirs))}; run `busbench test` first"
        )
    table = pd.concat(frames, ignore_index=True)
    datasets = sorted(table["dataset"].unique())
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(max(4.0, 2.2 * table["model"].nunique()) * len(datasets), 3.8)
    )
    axes = np.atleast_1d(axes)
    rng = np.random.default_rng(0)
    for ax, dataset in zip(axes, datasets, strict=True):
        sub = table[table["dataset"] == dataset]
        models = sorted(sub["model"].unique())
        values = [sub.loc[sub["model"] == m, "dice"].to_numpy() for m in models]
        ax.boxplot(values, showfliers=False)
        ax.set_xticks(range(1, len(models) + 1), models)
        for i, v in enumerate(values, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, v.size), v, s=6, alpha=0.5)
        ax.set(title=dataset, ylabel=f"per-image Dice ({source})", ylim=(-0.02, 1.02))
    return _save(fig, out)


def heatmap_matrix(df: pd.DataFrame, metric: str = "dice") -> tuple[pd.DataFrame, list[str]]:
    """Transfer matrix of one experiment's rows (train dataset x test dataset) and the models it averages.

    Ensemble rows only when there are any (never mixed with fold means). A cell is the mean over the models present
    in *every* cell, so each cell averages the same models; models missing from some cell are left out of all.
    """
    if "source" in df.columns and (df["source"] == "ensemble").any():
        df = df[df["source"] == "ensemble"]
    if "model" not in df.columns:
        return df.pivot_table(
            index="train_dataset", columns="test_dataset", values=metric, aggfunc="mean"
        ), []
    cells = df.groupby(["train_dataset", "test_dataset"])["model"].agg(frozenset)
    common = sorted(frozenset.intersection(*cells.tolist())) if len(cells) else []
    if not common:
        raise DataError(
            "no model was scored in every cell of the transfer matrix, so no cell average compares like with like; "
            "test every model on every dataset, or plot one model (filter transfer.csv by its model column)"
        )
    df = df[df["model"].isin(common)]
    return df.pivot_table(
        index="train_dataset", columns="test_dataset", values=metric, aggfunc="mean"
    ), common


def mixed_cells(df: pd.DataFrame) -> bool:
    """Whether some (training data, test dataset) cell holds rows of more than one experiment."""
    if "experiment" not in df.columns:
        return False
    return bool((df.groupby(["train_dataset", "test_dataset"])["experiment"].nunique() > 1).any())


def transfer_heatmap(
    transfer_csv: Path, out: Path, metric: str = "dice", experiment: str | None = None
) -> Path:
    """Heatmap of a transfer matrix: rows = training dataset, columns = test dataset.

    A cell averages only within one experiment (``experiment`` must be named when a cell holds rows of several;
    fine-tuned ``A->B`` rows of their own experiments share no cell with the direct ones) and only over the models
    present in every cell (:func:`heatmap_matrix`).
    """
    df = pd.read_csv(transfer_csv)
    if not {"train_dataset", "test_dataset", metric} <= set(df.columns):
        raise DataError(f"{transfer_csv} needs columns train_dataset, test_dataset, {metric}")
    experiments = sorted(df["experiment"].astype(str).unique()) if "experiment" in df.columns else []
    if experiment is not None:
        df = df[df["experiment"].astype(str) == experiment]
        if df.empty:
            raise DataError(f"{transfer_csv} has no rows of experiment {experiment!r}; it has {experiments}")
    elif mixed_cells(df):
        raise DataError(
            f"{transfer_csv} holds several experiments ({', '.join(experiments)}) in one cell; scores are averaged "
            "within one experiment only, so name it (busbench plot transfer draws one heatmap per experiment)"
        )
    matrix, models = heatmap_matrix(df, metric)
    fig, ax = plt.subplots(figsize=(1.2 * matrix.shape[1] + 2.5, 1.0 * matrix.shape[0] + 1.8))
    image = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    which = models[0] if len(models) == 1 else f"mean over {', '.join(models)}" if models else ""
    name = experiment or "+".join(experiments)
    ax.set(
        xlabel="test dataset", ylabel="training dataset", title=f"{name} transfer {metric} {which}".strip()
    )
    for (i, j), v in np.ndenumerate(matrix.to_numpy()):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, out)


def overlay_grid(cases: list[dict], out: Path, title: str = "") -> Path:
    """One row per case: the image with the ground-truth contour (green) and the predicted contour (red).

    Each case is ``{"name": str, "image": HxW(x3) uint8, "gt": HxW bool, "pred": HxW bool, "dice": float}``.
    """
    if not cases:
        raise DataError("no cases to draw")
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        image = case["image"]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        height, width = image.shape[:2]
        for mask, colour in ((case["gt"], "lime"), (case["pred"], "red")):
            if mask.any():
                # padded by one background pixel, so a mask touching the border (or covering the whole
                # image, a common failure) still gets a closed contour along the image edge
                xs, ys = np.arange(-1, width + 1), np.arange(-1, height + 1)
                ax.contour(xs, ys, np.pad(mask.astype(float), 1), levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(f"{case['name']}\nDice {case['dice']:.3f}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(f"{title}  (green: ground truth, red: prediction)", fontsize=10)
    return _save(fig, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind", choices=["curves", "dice", "overlays", "transfer", "all"], help="which figure(s) to draw"
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="run folders, results roots, or a transfer.csv")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: next to the inputs)")
    parser.add_argument("--source", default="ensemble", help="ensemble or fold<k> per-image results")


def run(args: argparse.Namespace) -> int:
    written: list[Path] = []
    kinds = ["curves", "dice", "overlays"] if args.kind == "all" else [args.kind]
    if "transfer" in kinds:
        for csv in args.dirs:
            table = pd.read_csv(csv)
            if not mixed_cells(table):
                written.append(transfer_heatmap(csv, (args.out or csv.parent) / f"{csv.stem}_heatmap.png"))
                continue
            for name in sorted(table["experiment"].astype(str).unique()):
                out = (args.out or csv.parent) / f"{csv.stem}_heatmap_{name}.png"
                written.append(transfer_heatmap(csv, out, experiment=name))
    runs = _model_dirs(args.dirs) if set(kinds) & {"curves", "overlays"} else []
    if "curves" in kinds:
        for r in runs:
            written.append(learning_curves(r, (args.out or r) / f"curves_{r.parent.name}_{r.name}.png"))
    if "dice" in kinds:
        out_dir = args.out or Path(args.dirs[0])
        written.append(dice_distribution(args.dirs, out_dir / f"dice_{args.source}.png", source=args.source))
    if "overlays" in kinds:
        from busbench.report.overlays import overlay_cases

        for r in runs:
            if args.kind == "all" and not (r / "test" / f"{args.source}_per_image.csv").is_file():
                print(f"skipping overlays of {r}: not tested yet (busbench test --run {r})", file=sys.stderr)
                continue
            out = (args.out or r) / f"overlays_{r.parent.name}_{r.name}.png"
            cases = overlay_cases(r, source=args.source)
            written.append(overlay_grid(cases, out, title=f"{r.parent.name} / {r.name} ({args.source})"))
    for path in written:
        print(path)
    return 0
