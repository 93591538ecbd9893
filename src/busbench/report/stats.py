"""Paired statistics between models evaluated on the same test images.

- Paired Wilcoxon signed-rank tests (scipy) on per-image Dice between every pair of models on a dataset, with the
  Holm step-down correction over the pairs of that dataset.
- Percentile bootstrap 95% confidence intervals of the mean Dice and mean HD95 per model (fixed seed).
- Mean rank of each model across datasets (rank 1 = highest mean Dice on that dataset; ties share the mean rank).

Input is a long table with one row per (dataset, model, sample_id) and the per-image metrics; rows for one dataset must
cover the same images for every model, or the comparison is refused (a paired test on different images is meaningless).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from busbench.atomic import atomic_write_text
from busbench.errors import DataError

PAIRWISE_COLUMNS = [
    "dataset",
    "model_a",
    "model_b",
    "n",
    "mean_diff",
    "statistic",
    "p_value",
    "p_holm",
    "significant",
]


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (monotone, capped at 1), in the input order."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        adjusted[idx] = running
    return adjusted


def wilcoxon_paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired samples; identical samples give p = 1."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    if np.all(a == b):
        return 0.0, 1.0
    res = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (deterministic for a seed)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap of an empty sample")
    res = stats.bootstrap(
        (values,),
        np.mean,
        n_resamples=n_boot,
        confidence_level=level,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=True,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _check_paired(table: pd.DataFrame) -> None:
    for dataset, group in table.groupby("dataset", sort=True):
        ids = {model: frozenset(g["sample_id"]) for model, g in group.groupby("model", sort=True)}
        reference_model, reference = next(iter(ids.items()))
        for model, sample_ids in ids.items():
            if sample_ids != reference:
                raise DataError(
                    f"dataset {dataset}: models {reference_model} and {model} were evaluated on different test images "
                    f"({len(reference ^ sample_ids)} differ); re-run them on the same manifest before comparing"
                )
        dup = group.duplicated(["model", "sample_id"])
        if dup.any():
            raise DataError(
                f"dataset {dataset}: duplicate (model, sample_id) rows, e.g. {group[dup].iloc[0].to_dict()}"
            )


def pairwise_tests(table: pd.DataFrame, metric: str = "dice", alpha: float = 0.05) -> pd.DataFrame:
    """Wilcoxon tests between every pair of models per dataset, Holm-corrected within each dataset."""
    _check_paired(table)
    rows = []
    for dataset, group in table.groupby("dataset", sort=True):
        wide = group.pivot(index="sample_id", columns="model", values=metric).sort_index()
        models = sorted(wide.columns)
        block = []
        for a, b in itertools.combinations(models, 2):
            stat, p = wilcoxon_paired(wide[a].to_numpy(), wide[b].to_numpy())
            diff = float((wide[a] - wide[b]).mean())
            block.append([dataset, a, b, len(wide), diff, stat, p])
        adjusted = holm([r[-1] for r in block])
        for r, p_adj in zip(block, adjusted, strict=True):
            rows.append([*r, float(p_adj), bool(p_adj < alpha)])
    return pd.DataFrame(rows, columns=PAIRWISE_COLUMNS)


def confidence_intervals(table: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean and bootstrap 95% CI of Dice and HD95 per dataset and model."""
    rows = []
    for (dataset, model), group in table.groupby(["dataset", "model"], sort=True):
        row = {"dataset": dataset, "model": model, "n": len(group)}
        for metric in ("dice", "hd95"):
            values = group[metric].to_numpy(dtype=float)
            low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            row |= {metric: float(values.mean()), f"{metric}_ci_low": low, f"{metric}_ci_high": high}
        rows.append(row)
    return pd.DataFrame(rows)


def mean_ranks(table: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Rank models by mean ``metric`` within each dataset (1 = best) and average the ranks across datasets."""
    means = table.groupby(["dataset", "model"], sort=True)[metric].mean().unstack("model")
    ranks = means.rank(axis=1, ascending=False, method="average")
    out = pd.DataFrame(
        {
            "model": list(ranks.columns),
            "mean_rank": ranks.mean(axis=0).to_numpy(),
            "n_datasets": ranks.notna().sum(axis=0).to_numpy(),
        }
    )
    return out.sort_values(["mean_rank", "model"]).reset_index(drop=True)


def to_markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A plain GitHub-style Markdown table (no optional dependencies)."""
    cols = list(df.columns)

    def fmt(v: object) -> str:
        if isinstance(v, (float, np.floating)):
            return format(float(v), floatfmt)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Reading per-image results from run folders


def collect_per_image(dirs: list[Path], source: str = "ensemble") -> pd.DataFrame:
    """Long per-image table from ``<run>/test/<source>_per_image.csv`` files below ``dirs``.

    ``source`` is ``ensemble`` or ``fold<k>``; the dataset and model come from the run's folder names
    (``<root>/<experiment>/<dataset>/<model>/``).
    """
    frames = []
    for root in dirs:
        root = Path(root)
        if not root.exists():
            raise DataError(f"{root} does not exist; pass run folders or a results root")
        for path in sorted(root.rglob(f"test/{source}_per_image.csv")):
            run = path.parent.parent
            df = pd.read_csv(path)
            df.insert(0, "model", run.name)
            df.insert(0, "dataset", run.parent.name)
            df.insert(0, "experiment", run.parent.parent.name)
            frames.append(df)
    if not frames:
        raise DataError(
            f"no test/{source}_per_image.csv below {', '.join(map(str, dirs))}; run `busbench test` first"
        )
    table = pd.concat(frames, ignore_index=True)
    return table


def compare(
    dirs: list[Path], out: Path, source: str = "ensemble", n_boot: int = 2000, seed: int = 0
) -> list[Path]:
    """Write pairwise tests, confidence intervals and mean ranks as CSV + Markdown into ``out``."""
    table = collect_per_image(dirs, source)
    results = {
        "pairwise_wilcoxon": pairwise_tests(table),
        "bootstrap_ci": confidence_intervals(table, n_boot=n_boot, seed=seed),
        "mean_rank": mean_ranks(table),
    }
    written = []
    for name, df in results.items():
        csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
        atomic_write_text(csv_path, df.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
        atomic_write_text(md_path, to_markdown(df))
        written += [csv_path, md_path]
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", type=Path, help="run folders or results roots to compare")
    parser.add_argument(
        "--out", type=Path, default=Path("results/compare"), help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--source", default="ensemble", help="ensemble or fold<k> per-image results (default: %(default)s)"
    )
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    written = compare(args.dirs, args.out, source=args.source, n_boot=args.n_boot, seed=args.seed)
    for path in written:
        if path.suffix == ".md":
            print(f"## {path.stem}\n{path.read_text()}")
    print(f"wrote {len(written)} files to {args.out}")
    return 0
