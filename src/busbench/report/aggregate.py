"""``busbench aggregate``: gather the ``summary.csv`` of finished runs into one leaderboard.

For every run (one ``summary.csv`` written by ``busbench test``, beside its ``config.yaml``) and every test dataset
it scored, the leaderboard holds the mean and standard deviation over the fold models (sample standard deviation,
``ddof=1``, as papers report "mean ± std of the k fold models") and the fold ensemble's scores.

Three things are refused rather than papered over:

* a run with fewer fold models than its ``data.folds`` (an average over 3 of 5 folds is not comparable);
* runs on the same dataset whose manifests differ (different splits or data make scores incomparable);
* runs on the same dataset scored under different settings: ``data.image_size``, ``eval.resolution``,
  ``eval.hd95_mode``, ``eval.tta`` or ``eval.threshold`` (HD95 in pixels of a 224 px input and of a 256 px input, or
  of the network input and of the original image, are different units).

``--allow-mixed`` tabulates such runs anyway, and the Markdown tables then show the differing settings as columns.
Results of ``busbench test --tag NAME`` (``<run>/test_NAME/summary.csv``) are rows of their own, tagged ``NAME``.

Rows are ranked by the mean lesion-only Dice of the fold models (benign and malignant images; a correctly empty
normal image scores a perfect 1 in the overall Dice, so the overall mean rewards datasets rich in normal images),
with the normal-image false-positive rate beside it; ``--sort-by`` picks another score.

Outputs, in ``--out`` (default: the first folder given): ``leaderboard.csv`` (one row per run and test dataset),
``leaderboard.md`` (one table per test dataset, stating the settings its scores were computed under, followed by
the fold-level table) and ``folds.csv`` (every fold and ensemble row of every run).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from busbench.config import config_from_file
from busbench.engine.results import run_of, tag_of
from busbench.errors import BusbenchError, DataError
from busbench.report.tables import (
    add_results_arguments,
    markdown_lines,
    number,
    results_dirs,
    write_csv,
    write_csv_and_markdown,
)

SUMMARY = "summary.csv"
# the score columns of a summary.csv (busbench.engine.evaluate writes them; kept here so that aggregating
# needs no torch import)
SCORE_COLUMNS = (
    "dice", "iou", "hd95", "precision", "recall", "specificity", "dice_lesion", "iou_lesion", "hd95_lesion",
    "precision_lesion", "recall_lesion", "hd95_penalised", "normal_fp_rate",
)  # fmt: skip
MD_COLUMNS = (
    ("dice_lesion", 4),
    ("normal_fp_rate", 3),
    ("dice", 4),
    ("iou", 4),
    ("hd95", 2),
    ("hd95_penalised", 1),
)
#: scoring settings: scores computed under different values are not comparable
SETTINGS = ("image_size", "resolution", "hd95_mode", "tta", "threshold")
#: ``--sort-by`` choices and whether larger is better
SORT_KEYS = {
    "dice_lesion": False,
    "dice": False,
    "iou": False,
    "iou_lesion": False,
    "hd95": True,
    "hd95_lesion": True,
}


def find_summaries(dirs: list[Path]) -> list[Path]:
    """Every ``summary.csv`` at or below ``dirs``, sorted, each once.

    Scores of a run on another dataset's test split (``<run>/test_on_<B>/summary.csv``, written by ``busbench test
    --dataset``) are left out: a model trained elsewhere does not belong in that dataset's leaderboard
    (``busbench transfer`` tabulates them).
    """
    found: set[Path] = set()
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == SUMMARY:
            found.add(d.resolve())
        elif d.is_dir():
            found.update(p.resolve() for p in d.rglob(SUMMARY) if not p.parent.name.startswith("test_on_"))
        else:
            raise DataError(
                f"{d} does not exist; give run folders (or their parents) written by busbench test"
            )
    return sorted(found)


def _read_run(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"fold": str})
    missing = [c for c in ("dataset", "model", "fold", *SCORE_COLUMNS) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {', '.join(missing)}; rerun busbench test on that run to rewrite it"
        )
    run = run_of(path)
    df.insert(0, "run", str(run))
    df.insert(1, "tag", tag_of(path))
    config = run / "config.yaml"
    if config.is_file():
        cfg = config_from_file(config)
        expected = cfg.data.folds
        df["experiment"] = df.get("experiment", cfg.experiment.name)
        df["train_data"] = df.get("train_data", "+".join(cfg.data.datasets))
        if "image_size" not in df.columns:  # summaries written before the input size was recorded
            df["image_size"] = cfg.data.image_size
    else:
        expected = None
        for col in ("experiment", "train_data"):
            if col not in df.columns:
                df[col] = ""
    missing = [c for c in SETTINGS if c not in df.columns]
    if missing:
        raise DataError(
            f"{path} does not record the scoring setting(s) {', '.join(missing)}; rerun busbench test on {run}"
        )
    df["expected_folds"] = expected
    return df


def _fold_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["fold"].astype(str).str.fullmatch(r"\d+")]


def _check_complete(runs: list[pd.DataFrame]) -> None:
    problems = []
    for df in runs:
        folds = _fold_rows(df)
        for dataset, group in df.groupby("dataset", sort=True):
            have = sorted(int(f) for f in folds[folds["dataset"] == dataset]["fold"])
            expected = df["expected_folds"].iloc[0]
            if expected is None or (isinstance(expected, float) and math.isnan(expected)):
                expected = len(have) if have else 1
            expected = int(expected)
            if have != list(range(expected)):
                lacking = sorted(set(range(expected)) - set(have))
                problems.append(
                    f"{group['run'].iloc[0]} ({dataset}): has fold models {have}, lacks {lacking}"
                )
            if not (group["fold"] == "ensemble").any():
                problems.append(f"{group['run'].iloc[0]} ({dataset}): no ensemble row")
    if problems:
        raise DataError(
            "incomplete runs are not averaged: "
            + "; ".join(problems)
            + ". Train the missing folds (busbench train --fold K) and rerun busbench test on those runs"
        )


def _check_manifests(runs: list[pd.DataFrame], allow_mixed: bool) -> None:
    if allow_mixed:
        return
    seen: dict[str, dict[str, str]] = {}
    for df in runs:
        if "manifest_sha256" not in df.columns:
            continue
        for dataset, value in df.groupby("dataset", sort=True)["manifest_sha256"].first().items():
            seen.setdefault(str(dataset), {}).setdefault(str(value), df["run"].iloc[0])
    mixed = {d: v for d, v in seen.items() if len(v) > 1}
    if mixed:
        text = "; ".join(
            f"{d}: " + ", ".join(f"{h[:12]} ({run})" for h, run in sorted(v.items()))
            for d, v in sorted(mixed.items())
        )
        raise DataError(
            f"runs were tested on different manifests of the same dataset ({text}); their scores are not comparable. "
            "Re-prepare and retrain so they share one manifest, or pass --allow-mixed to tabulate them anyway"
        )


def _setting_text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _settings_of(runs: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per (run, tag, dataset) with its scoring settings as text."""
    frames = [
        df.groupby("dataset", sort=True)[[*SETTINGS, "run", "tag"]].first().reset_index() for df in runs
    ]
    settings = pd.concat(frames, ignore_index=True)
    for col in SETTINGS:
        settings[col] = settings[col].map(_setting_text)
    return settings


def mixed_settings(runs: list[pd.DataFrame]) -> dict[str, list[str]]:
    """Per dataset, the settings that differ between its runs (only datasets where some do)."""
    settings = _settings_of(runs)
    mixed = {}
    for dataset, group in settings.groupby("dataset", sort=True):
        # a setting a summary leaves empty (busbench score: another tool's threshold, input size, TTA) is unknown,
        # not different
        differing = [c for c in SETTINGS if group.loc[~group[c].isin(("nan", "")), c].nunique() > 1]
        if differing:
            mixed[str(dataset)] = differing
    return mixed


def _check_settings(runs: list[pd.DataFrame], allow_mixed: bool) -> dict[str, list[str]]:
    mixed = mixed_settings(runs)
    if mixed and not allow_mixed:
        settings = _settings_of(runs)
        parts = []
        for dataset, cols in mixed.items():
            group = settings[settings["dataset"] == dataset]
            shown = ", ".join(
                f"{r['run']}{' @' + r['tag'] if r['tag'] else ''} ("
                + ", ".join(f"{c}={r[c]}" for c in cols)
                + ")"
                for _, r in group.iterrows()
            )
            parts.append(f"{dataset}: {shown}")
        raise DataError(
            "runs scored under different settings are not put in one table: "
            + "; ".join(parts)
            + ". Score them alike (busbench test --run DIR --set eval.KEY=VALUE --tag NAME), or pass --allow-mixed "
            "to tabulate them with the differing settings shown"
        )
    return mixed


def leaderboard(runs: list[pd.DataFrame], sort_by: str = "dice_lesion") -> pd.DataFrame:
    """One row per run and test dataset: ``<score>_mean``, ``<score>_std`` over fold models, ``ensemble_<score>``."""
    rows = []
    for df in runs:
        for dataset, group in df.groupby("dataset", sort=True):
            folds = _fold_rows(group)
            ens = group[group["fold"] == "ensemble"]
            first = group.iloc[0]
            row: dict[str, object] = {
                "experiment": first["experiment"],
                "train_data": first["train_data"],
                "dataset": dataset,
                "model": first["model"],
                "tag": first["tag"],
                "n_folds": len(folds),
                "n_test": int(folds["n_test"].iloc[0]) if "n_test" in folds else np.nan,
            }
            for col in SCORE_COLUMNS:
                values = folds[col].astype(float)
                row[f"{col}_mean"] = float(values.mean())
                row[f"{col}_std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
            for col in SCORE_COLUMNS:
                row[f"ensemble_{col}"] = float(ens[col].iloc[0]) if len(ens) else np.nan
            for col in ("params_m", "gmacs"):
                row[col] = float(folds[col].iloc[0]) if col in folds else np.nan
            row["train_seconds"] = (
                float(folds["train_seconds"].astype(float).sum()) if "train_seconds" in folds else np.nan
            )
            for col in (*SETTINGS, "selection_threshold"):
                row[col] = _setting_text(first[col]) if col in first else ""
            row["manifest_sha256"] = first.get("manifest_sha256", "")
            row["run"] = first["run"]
            rows.append(row)
    board = pd.DataFrame(rows)
    if sort_by not in SORT_KEYS:
        raise BusbenchError(f"--sort-by {sort_by!r}: choose one of {', '.join(SORT_KEYS)}")
    return board.sort_values(
        ["dataset", f"{sort_by}_mean", "model"], ascending=[True, SORT_KEYS[sort_by], True], kind="mergesort"
    )


_RESOLUTION_TEXT = {
    "original": "each image's original resolution (ground truth not resampled)",
    "network": "the network's input resolution, letterbox padding excluded",
}


def _settings_sentence(r: pd.Series) -> str:
    resolution = _RESOLUTION_TEXT.get(str(r["resolution"]), f"resolution {r['resolution']}")
    tta = "with" if str(r["tta"]).lower() in ("true", "1") else "without"
    return (
        f"Scored at {resolution}; input {r['image_size']} px; threshold {r['threshold']}; {tta} flip TTA; "
        f"HD95 {r['hd95_mode']}, in pixels at that resolution."
    )


def to_markdown(
    board: pd.DataFrame,
    folds: pd.DataFrame,
    mixed: dict[str, list[str]] | None = None,
    sort_by: str = "dice_lesion",
) -> str:
    """Per test dataset: its scoring settings, mean ± std over fold models and the ensemble; then the fold-level
    scores. ``mixed`` names, per dataset, settings that differ between its rows (shown as columns)."""
    mixed = mixed or {}
    parts = [
        "# Leaderboard",
        "",
        "Mean ± std (ddof=1) over the fold models on the held-out test split; `ens` is the fold ensemble "
        "(mean of the fold models' probabilities). `Dice lesion` is the mean over benign and malignant images; "
        "`Dice` over all images, where a correctly empty normal image counts 1. `pen.` counts images charged the "
        "worst-case HD95 (diagonal of the image); `FP normal` is the share of normal images with any predicted "
        f"lesion pixel. Rows ranked by {sort_by} (fold mean).",
        "",
    ]
    for dataset, group in board.groupby("dataset", sort=True):
        n_test = group["n_test"].iloc[0]
        differing = mixed.get(str(dataset), [])
        parts += [f"## {dataset} (test images: {number(float(n_test), 0)})", ""]
        if differing:
            parts += [
                f"**Mixed settings ({', '.join(differing)} differ between rows; tabulated with --allow-mixed): "
                "these scores are not directly comparable.**",
                "",
            ]
        else:
            parts += [_settings_sentence(group.iloc[0]), ""]
        header = [
            "model",
            "experiment",
            "train data",
            *(["tag"] if (group["tag"] != "").any() else []),
            *differing,
            "folds",
            "Dice lesion",
            "FP normal",
            "Dice",
            "IoU",
            "HD95",
            "pen.",
            "ens Dice lesion",
            "ens Dice",
            "ens HD95",
            "params (M)",
            "GMACs",
        ]
        body = []
        for _, r in group.iterrows():
            cells = [str(r["model"]), str(r["experiment"]), str(r["train_data"])]
            cells += [str(r["tag"])] if (group["tag"] != "").any() else []
            cells += [str(r[c]) for c in differing]
            cells += [str(r["n_folds"])]
            for col, digits in MD_COLUMNS:
                cells.append(f"{number(r[f'{col}_mean'], digits)} ± {number(r[f'{col}_std'], digits)}")
            cells += [
                number(r["ensemble_dice_lesion"], 4),
                number(r["ensemble_dice"], 4),
                number(r["ensemble_hd95"], 2),
                number(r["params_m"], 2),
                number(r["gmacs"], 2),
            ]
            body.append(cells)
        parts += [*markdown_lines(header, body), ""]
    parts += ["## Fold models", ""]
    header = ["dataset", "model", "experiment", "fold", "Dice", "IoU", "HD95", "pen.", "best epoch"]
    body = []
    for _, r in folds.iterrows():
        body.append(
            [
                str(r["dataset"]),
                str(r["model"]),
                str(r["experiment"]),
                str(r["fold"]),
                number(float(r["dice"]), 4),
                number(float(r["iou"]), 4),
                number(float(r["hd95"]), 2),
                number(float(r["hd95_penalised"]), 0),
                number(float(r["best_epoch"]), 0) if "best_epoch" in r and pd.notna(r["best_epoch"]) else "–",
            ]
        )
    parts += [*markdown_lines(header, body), ""]
    return "\n".join(parts)


def aggregate(
    dirs: list[Path], out: Path | None = None, allow_mixed: bool = False, sort_by: str = "dice_lesion"
) -> tuple[Path, Path]:
    """Write ``leaderboard.csv``, ``leaderboard.md`` and ``folds.csv`` for every run under ``dirs`` into ``out``."""
    dirs = results_dirs(dirs, "busbench aggregate results/demo")
    paths = find_summaries(dirs)
    if not paths:
        raise DataError(
            f"no {SUMMARY} found under {', '.join(map(str, dirs))}; run busbench test --run <run dir> first"
        )
    runs = [_read_run(p) for p in paths]
    _check_complete(runs)
    _check_manifests(runs, allow_mixed)
    mixed = _check_settings(runs, allow_mixed)
    board = leaderboard(runs, sort_by)
    every = pd.concat(runs, ignore_index=True)
    every = every[every["fold"].astype(str).str.fullmatch(r"\d+|ensemble")]
    every = every.drop(columns=["expected_folds"])
    lead = ["experiment", "train_data", "dataset", "model", "fold"]
    every = every[lead + [c for c in every.columns if c not in lead]]
    out = Path(out) if out is not None else dirs[0] if dirs[0].is_dir() else dirs[0].parent
    fold_rows = every[every["fold"] != "ensemble"]
    write_csv(out / "folds.csv", every)
    return write_csv_and_markdown(out, "leaderboard", board, to_markdown(board, fold_rows, mixed, sort_by))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_results_arguments(
        parser,
        dirs_help="results folders: runs (holding summary.csv) or folders above them",
        out_help="where to write the leaderboard (default: first DIR)",
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="tabulate runs of one dataset even when their manifests (splits) or scoring settings differ "
        "(the differing settings are shown as columns)",
    )
    parser.add_argument(
        "--sort-by",
        default="dice_lesion",
        choices=list(SORT_KEYS),
        help="fold-mean score that ranks the rows (default: %(default)s; hd95 ranks smallest first)",
    )


def run(args: argparse.Namespace) -> int:
    csv_path, md_path = aggregate(args.dirs, args.out, allow_mixed=args.allow_mixed, sort_by=args.sort_by)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {csv_path}, {md_path} and {csv_path.parent / 'folds.csv'}")
    return 0
