"""``busbench transfer``: the cross-dataset transfer matrix of tested runs.

A run trained on dataset A is scored on its own test split by ``busbench test --run DIR`` (``DIR/summary.csv``)
and on dataset B's held-out test split by ``busbench test --run DIR --dataset B`` (``DIR/test_on_B/summary.csv``).
This command gathers both kinds for every run below the given folders into

* ``transfer.csv``: one row per (experiment, training data, test dataset, model, source) with columns
  ``train_dataset, test_dataset, model, source, dice, iou, hd95, n_test`` followed by ``dice_std`` (over the fold
  models; empty for the ensemble), ``experiment``, ``mode``, ``init_dataset`` and ``run``. ``source`` is
  ``ensemble`` (the fold ensemble) or ``fold_mean`` (mean of the fold models). ``mode`` is ``direct`` for a run
  trained from its own initialisation and ``finetune`` for one started from another run (``train.init_from``); a
  fine-tuned run's ``train_dataset`` reads ``A->B`` (source run's training data, then its own) so that it gets its
  own row in the matrix, and ``init_dataset`` holds A.
* ``transfer.md``: per experiment, model and source, a matrix of Dice (rows: training data, columns: test dataset;
  the fold mean with ± std), then IoU and HD95 of the ensemble in the same layout.

The diagonal (A tested on A) comes from the run's own ``summary.csv``; a union run (``data.dataset: [a, b]``) gives
one row per dataset of the union. Draw the heatmap with ``busbench plot transfer transfer.csv``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from busbench.config import DATASET_KEYS, Config, config_from_file
from busbench.data import leakage
from busbench.engine.results import SUMMARY, TRANSFER_PREFIX
from busbench.errors import DataError
from busbench.report.tables import (
    add_results_arguments,
    markdown_lines,
    number,
    results_dirs,
    write_csv_and_markdown,
)

CONFIG = "config.yaml"
COLUMNS = (
    "train_dataset",
    "test_dataset",
    "model",
    "source",
    "dice",
    "iou",
    "hd95",
    "n_test",
    "dice_std",
    "experiment",
    "mode",
    "init_dataset",
    "run",
)
SOURCES = {"ensemble": "ensemble", "mean": "fold_mean"}


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run folders (holding ``config.yaml``) at or below ``dirs``, sorted, each once."""
    found: set[Path] = set()
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise DataError(f"{d} is not a folder; give results folders written by busbench train/test")
        candidates = [d / CONFIG] if (d / CONFIG).is_file() else sorted(d.rglob(CONFIG))
        found.update(p.parent.resolve() for p in candidates)
    return sorted(found)


def _init_dataset(cfg: Config) -> str:
    """The training data of the run ``train.init_from`` points at ('' when it cannot be told)."""
    try:
        folder = leakage.source_run(str(cfg.train.init_from))
    except DataError:
        return ""
    return "+".join(config_from_file(folder / CONFIG).data.datasets)


def _rows_of(summary: Path, cfg: Config, run_dir: Path) -> list[dict[str, object]]:
    df = pd.read_csv(summary, dtype={"fold": str})
    missing = [
        c for c in ("dataset", "model", "fold", "dice", "iou", "hd95", "n_test") if c not in df.columns
    ]
    if missing:
        raise DataError(f"{summary} lacks column(s) {', '.join(missing)}; rerun busbench test on {run_dir}")
    if "n_excluded" not in df.columns:
        learned = {leakage.family(s.dataset) for s in leakage.learned_from(cfg, run_dir)}
        shared = sorted(
            {str(d) for d in df["dataset"]} & {k for k in DATASET_KEYS if leakage.family(k) in learned}
        )
        if shared:
            raise DataError(
                f"{summary} was written before busbench left out test images the run learned from (it learned from "
                f"images {', '.join(shared)} shares); rerun busbench test on {run_dir} "
                f"{'--dataset ' + shared[0] if summary.parent != run_dir else ''}".rstrip()
            )
    own = "+".join(cfg.data.datasets)
    init = _init_dataset(cfg) if cfg.train.init_from else ""
    train_label = f"{init or 'init'}->{own}" if cfg.train.init_from else own
    rows = []
    for _, r in df.iterrows():
        source = SOURCES.get(str(r["fold"]))
        if source is None:
            continue
        std = df[(df["dataset"] == r["dataset"]) & (df["fold"] == "std")]
        rows.append(
            {
                "train_dataset": train_label,
                "test_dataset": str(r["dataset"]),
                "model": str(r["model"]),
                "source": source,
                "dice": float(r["dice"]),
                "iou": float(r["iou"]),
                "hd95": float(r["hd95"]),
                "n_test": int(r["n_test"]),
                "dice_std": float(std["dice"].iloc[0]) if source == "fold_mean" and len(std) else math.nan,
                "experiment": cfg.experiment.name,
                "mode": "finetune" if cfg.train.init_from else "direct",
                "init_dataset": init,
                "run": str(run_dir),
            }
        )
    return rows


def transfer_table(dirs: list[Path]) -> pd.DataFrame:
    """Every tested (run, test dataset) pair below ``dirs`` as rows of ``transfer.csv`` (sorted)."""
    runs = find_runs(dirs)
    if not runs:
        raise DataError(
            f"no run folders ({CONFIG}) under {', '.join(map(str, dirs))}; train and test runs first"
        )
    rows: list[dict[str, object]] = []
    for run_dir in runs:
        cfg = config_from_file(run_dir / CONFIG)
        summaries = [run_dir / SUMMARY] if (run_dir / SUMMARY).is_file() else []
        summaries += sorted(p for p in run_dir.glob(f"{TRANSFER_PREFIX}*/{SUMMARY}"))
        for summary in summaries:
            rows += _rows_of(summary, cfg, run_dir)
    if not rows:
        raise DataError(
            f"none of the {len(runs)} run(s) under {', '.join(map(str, dirs))} has been tested; run "
            "busbench test --run DIR (own test split) and busbench test --run DIR --dataset B (another dataset's)"
        )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.sort_values(
        ["experiment", "model", "source", "train_dataset", "test_dataset"], kind="mergesort"
    ).reset_index(drop=True)


def _matrix(group: pd.DataFrame, metric: str, digits: int, with_std: bool) -> list[str]:
    trains = sorted(set(group["train_dataset"]))
    tests = sorted(set(group["test_dataset"]))
    cells = {(r["train_dataset"], r["test_dataset"]): r for _, r in group.iterrows()}
    rows = []
    for tr in trains:
        out = []
        for te in tests:
            r = cells.get((tr, te))
            if r is None:
                out.append("")
                continue
            text = number(float(r[metric]), digits)
            if with_std and not math.isnan(float(r["dice_std"])):
                text += f" ± {number(float(r['dice_std']), digits)}"
            out.append(f"**{text}**" if tr == te else text)
        rows.append([tr, *out])
    return markdown_lines(["train \\ test", *tests], rows)


def to_markdown(table: pd.DataFrame) -> str:
    """Matrices of Dice (fold mean ± std and ensemble), IoU and HD95 (ensemble) per experiment and model."""
    parts = [
        "# Cross-dataset transfer",
        "",
        "Rows: training data (`A->B`: started from a run trained on A, then fine-tuned on B); columns: the test "
        "dataset whose held-out test split was scored. Bold: in-domain (trained and tested on the same data). "
        "Fold mean ± std (ddof=1) over the fold models, or the fold ensemble. HD95 in pixels at the evaluation "
        "resolution.",
        "",
    ]
    for (experiment, model), group in table.groupby(["experiment", "model"], sort=True):
        parts += [f"## {experiment} / {model}", ""]
        for title, source, metric, digits in (
            ("Dice, fold mean ± std", "fold_mean", "dice", 4),
            ("Dice, ensemble", "ensemble", "dice", 4),
            ("IoU, ensemble", "ensemble", "iou", 4),
            ("HD95, ensemble", "ensemble", "hd95", 2),
        ):
            part = group[group["source"] == source]
            if len(part):
                parts += [f"### {title}", "", *_matrix(part, metric, digits, source == "fold_mean"), ""]
    return "\n".join(parts)


def write_transfer(dirs: list[Path], out: Path | None = None) -> tuple[Path, Path]:
    """Write ``transfer.csv`` and ``transfer.md`` for every tested run below ``dirs`` into ``out``."""
    dirs = results_dirs(dirs, "busbench transfer results/transfer")
    table = transfer_table(dirs)
    out = Path(out) if out is not None else dirs[0]
    return write_csv_and_markdown(out, "transfer", table, to_markdown(table))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_results_arguments(
        parser,
        dirs_help="results folders holding tested runs (or run folders)",
        out_help="where to write transfer.csv/.md (default: first DIR)",
    )


def run(args: argparse.Namespace) -> int:
    csv_path, md_path = write_transfer(args.dirs, args.out)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {csv_path} and {md_path}; heatmap: busbench plot transfer {csv_path}")
    return 0
