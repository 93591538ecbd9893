"""``busbench compare``: statistics between models scored on the same test images, with patients kept whole.

Test images are not independent: a BUS-UCLM test split is about 8 patients with about 17 images each, BUS-BRA has
left/right pairs of one patient, BUSI has near-duplicate groups. Every statistic here therefore resamples or
permutes *groups* (the manifest's ``group_id``: the connected component of same-patient and near-duplicate links),
never single images. Simulated with 8 patients x 17 images, an image-level bootstrap covers the true mean about
half of the time; the group-level interval below covers it about 95% of the time (see the tests).

* **Which runs.** Per-image files ``<run>/test/<source>_per_image.csv`` (and ``<run>/test_<tag>/...``). A model is
  identified by ``experiment/model`` (plus ``@tag`` for a tagged test, plus the training data when two runs of
  one experiment and model were trained on different data), so two settings of one architecture compare. The
  dataset of an image is its ``dataset_key``, so a union run is split by dataset, never pooled.
* **Comparable settings.** Within a dataset, every model must be scored at the same ``image_size``,
  ``resolution``, ``hd95_mode``, ``tta`` and ``threshold`` (read from the run's ``summary.csv``) and on the same
  test images; otherwise the comparison is refused (``--allow-mixed`` compares anyway and lists the settings).
* **Metrics.** Dice over all images, lesion-only Dice (benign and malignant images) and HD95 (pixels at the
  evaluation resolution, worst-case penalties included).
* **Confidence intervals** (``confidence_intervals.csv``): cluster bootstrap of the image mean: groups are drawn
  with replacement (``--n-boot`` resamples, fixed seed) and the mean is taken over their images. With few groups a
  percentile interval is too narrow (its variance is (G-1)/G of the unbiased one, and its quantiles are normal
  ones where the mean of G group means follows a t law with G-1 degrees of freedom), so the percentile interval's
  distances from the estimate are scaled by ``sqrt(G/(G-1)) * t(G-1) / z``; the factor tends to 1 as G grows.
* **Paired comparisons** (``pairwise.csv``): for every pair of models on a dataset and every metric, the mean
  per-image difference, its cluster-bootstrap 95% interval (same rule), and the p-value of a two-sided
  sign-flip permutation test that flips whole groups (the sum of each group's differences changes sign; exact
  over all 2^G sign patterns for G <= 16 groups, else ``--n-perm`` random patterns). Holm's step-down correction
  (statsmodels ``multipletests``) runs over the whole family of one dataset: every pair and every metric.
* **Across datasets** (``friedman.csv``, ``mean_rank.csv``, ``cd_diagram.png``): models are ranked by mean
  lesion-only Dice within each dataset (1 = best, ties share the mean rank); on the models scored on every dataset
  (at least 3 models and 2 datasets), a Friedman test on those ranks, the Nemenyi post-hoc test and the critical
  difference diagram of Demsar (2006), drawn with scikit-posthocs.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from busbench.atomic import atomic_path, atomic_write_text
from busbench.config import config_from_file
from busbench.engine.results import SUMMARY, TEST_DIR
from busbench.errors import BusbenchError, DataError
from busbench.metrics import LESION_LABELS
from busbench.report.tables import markdown_lines, write_csv_and_markdown

METRICS = ("dice", "dice_lesion", "hd95")
SETTINGS = ("image_size", "resolution", "hd95_mode", "tta", "threshold")
PAIRWISE_COLUMNS = [
    "dataset",
    "metric",
    "model_a",
    "model_b",
    "n_images",
    "n_groups",
    "mean_diff",
    "diff_ci_low",
    "diff_ci_high",
    "p_value",
    "p_holm",
    "significant",
]
_EXACT_MAX_GROUPS = 16


def _needs(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BusbenchError(
            f"busbench compare needs {module.split('.')[0]}; install it with pip install 'busbench[stats]'"
        ) from None


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values in the input order (statsmodels ``multipletests``)."""
    p = np.asarray(p_values, dtype=float)
    if p.size == 0:
        return p
    multitest = _needs("statsmodels.stats.multitest")
    return multitest.multipletests(p, method="holm")[1]


# --------------------------------------------------------------------------------------------------------------
# group-level resampling


def _group_sums(values: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap of an empty sample")
    if groups is None:
        return values, np.ones_like(values)
    codes, _ = pd.factorize(np.asarray(groups), sort=True)
    return np.bincount(codes, weights=values), np.bincount(codes).astype(float)


def bootstrap_ci(
    values: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Cluster-bootstrap CI of the mean of ``values`` (one per image), resampling whole ``groups``.

    ``groups=None`` treats every value as its own group. Groups are drawn with replacement, the mean is taken over
    their images, and the percentile interval's distances from the estimate are scaled by
    ``sqrt(G/(G-1)) * t_{G-1} / z`` (see the module docstring). Deterministic for a seed.
    """
    sums, counts = _group_sums(values, groups)
    g = sums.size
    estimate = float(sums.sum() / counts.sum())
    if g < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, g, size=(n_boot, g))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = 1.0 - level
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    factor = math.sqrt(g / (g - 1)) * stats.t.ppf(1 - alpha / 2, g - 1) / stats.norm.ppf(1 - alpha / 2)
    return estimate + factor * (low - estimate), estimate + factor * (high - estimate)


def permutation_p(
    differences: np.ndarray, groups: np.ndarray | None = None, n_perm: int = 10000, seed: int = 0
) -> float:
    """Two-sided p-value of a mean paired difference of zero, flipping the signs of whole groups.

    Under the null hypothesis the two models are exchangeable within each group, so each group's summed
    difference is equally likely to have either sign. Exact (all 2^G patterns) for G <= 16, else ``n_perm``
    random patterns plus the observed one.
    """
    sums, _ = _group_sums(differences, groups)
    observed = abs(sums.sum())
    if observed == 0.0:
        return 1.0
    g = sums.size
    if g <= _EXACT_MAX_GROUPS:
        signs = 1 - 2 * ((np.arange(2**g)[:, None] >> np.arange(g)) & 1)
        totals = np.abs(signs @ sums)
        return float(np.mean(totals >= observed * (1 - 1e-12)))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, g))
    totals = np.abs(signs @ sums)
    return float((1 + np.sum(totals >= observed * (1 - 1e-12))) / (1 + n_perm))


# --------------------------------------------------------------------------------------------------------------
# tables


def _metric_rows(group: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The images a metric is averaged over, with the column ``value``: lesion images only for ``dice_lesion``."""
    if metric == "dice_lesion":
        group = group[group["label"].isin(LESION_LABELS)]
        return group.assign(value=group["dice"].astype(float))
    return group.assign(value=group[metric].astype(float))


def _check_paired(table: pd.DataFrame) -> None:
    for dataset, group in table.groupby("dataset", sort=True):
        dup = group.duplicated(["model", "sample_id"])
        if dup.any():
            row = group[dup].iloc[0]
            raise DataError(
                f"dataset {dataset}: model {row['model']} has two rows for image {row['sample_id']}; give each "
                "run once"
            )
        ids = {model: frozenset(g["sample_id"]) for model, g in group.groupby("model", sort=True)}
        reference_model, reference = next(iter(ids.items()))
        for model, sample_ids in ids.items():
            if sample_ids != reference:
                raise DataError(
                    f"dataset {dataset}: models {reference_model} and {model} were evaluated on different test images "
                    f"({len(reference ^ sample_ids)} differ); re-run them on the same manifest before comparing"
                )


def pairwise_tests(
    table: pd.DataFrame, alpha: float = 0.05, n_boot: int = 2000, n_perm: int = 10000, seed: int = 0
) -> pd.DataFrame:
    """Paired differences of every pair of models per dataset and metric (see the module docstring)."""
    _check_paired(table)
    rows = []
    for dataset, group in table.groupby("dataset", sort=True):
        block = []
        models = sorted(set(group["model"]))
        for metric in METRICS:
            part = _metric_rows(group, metric)
            if part.empty:
                continue
            wide = part.pivot(index="sample_id", columns="model", values="value").sort_index()
            groups = part.drop_duplicates("sample_id").set_index("sample_id")["group_id"].reindex(wide.index)
            for a, b in itertools.combinations(models, 2):
                diff = (wide[a] - wide[b]).to_numpy()
                low, high = bootstrap_ci(diff, groups.to_numpy(), n_boot=n_boot, seed=seed)
                p = permutation_p(diff, groups.to_numpy(), n_perm=n_perm, seed=seed)
                block.append(
                    [dataset, metric, a, b, len(diff), groups.nunique(), float(diff.mean()), low, high, p]
                )
        adjusted = holm([r[-1] for r in block])
        rows += [[*r, float(q), bool(q < alpha)] for r, q in zip(block, adjusted, strict=True)]
    return pd.DataFrame(rows, columns=PAIRWISE_COLUMNS)


def confidence_intervals(table: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean and cluster-bootstrap 95% CI of every metric per dataset and model."""
    rows = []
    for (dataset, model), group in table.groupby(["dataset", "model"], sort=True):
        row: dict[str, object] = {
            "dataset": dataset,
            "model": model,
            "n_images": len(group),
            "n_groups": group["group_id"].nunique(),
        }
        for metric in METRICS:
            part = _metric_rows(group, metric)
            if part.empty:
                row |= {metric: math.nan, f"{metric}_ci_low": math.nan, f"{metric}_ci_high": math.nan}
                continue
            values = part["value"].to_numpy()
            low, high = bootstrap_ci(values, part["group_id"].to_numpy(), n_boot=n_boot, seed=seed)
            row |= {metric: float(values.mean()), f"{metric}_ci_low": low, f"{metric}_ci_high": high}
        rows.append(row)
    return pd.DataFrame(rows)


def _dataset_means(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    parts = [_metric_rows(g, metric) for _, g in table.groupby("dataset", sort=True)]
    long = pd.concat(parts, ignore_index=True)
    return long.groupby(["dataset", "model"], sort=True)["value"].mean().unstack("model")


def mean_ranks(table: pd.DataFrame, metric: str = "dice_lesion") -> pd.DataFrame:
    """Rank models by mean ``metric`` within each dataset (1 = best) and average the ranks across datasets."""
    means = _dataset_means(table, metric)
    ranks = means.rank(axis=1, ascending=metric == "hd95", method="average")
    out = pd.DataFrame(
        {
            "model": list(ranks.columns),
            "mean_rank": ranks.mean(axis=0).to_numpy(),
            "n_datasets": ranks.notna().sum(axis=0).to_numpy(),
        }
    )
    return out.sort_values(["mean_rank", "model"]).reset_index(drop=True)


def friedman(table: pd.DataFrame, metric: str = "dice_lesion", alpha: float = 0.05) -> dict[str, object]:
    """Friedman test on per-dataset ranks of the models scored on every dataset, with Nemenyi's post-hoc test.

    Returns ``statistic, p_value, n_datasets, n_models, critical_difference`` and, when the test could run,
    ``ranks`` (mean rank per model) and ``nemenyi`` (the matrix of post-hoc p-values); ``note`` says why not.
    """
    means = _dataset_means(table, metric).dropna(axis=1)
    n, k = means.shape
    result: dict[str, object] = {
        "metric": metric,
        "n_datasets": n,
        "n_models": k,
        "statistic": math.nan,
        "p_value": math.nan,
        "critical_difference": math.nan,
        "note": "",
    }
    if n < 2 or k < 3:
        result["note"] = (
            f"needs at least 3 models scored on each of at least 2 datasets (have {k} model(s) on all {n})"
        )
        return result
    scores = -means if metric != "hd95" else means  # rank 1 = best
    stat = stats.friedmanchisquare(*[scores[c].to_numpy() for c in scores.columns])
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    posthoc = _needs("scikit_posthocs")
    result |= {
        "statistic": float(stat.statistic),
        "p_value": float(stat.pvalue),
        "critical_difference": float(q * math.sqrt(k * (k + 1) / (6 * n))),
        "ranks": scores.rank(axis=1, method="average").mean(axis=0),
        "nemenyi": posthoc.posthoc_nemenyi_friedman(scores.to_numpy())
        .set_axis(scores.columns, axis=0)
        .set_axis(scores.columns, axis=1),
    }
    return result


def cd_diagram(result: dict[str, object], out: Path) -> Path:
    """Critical difference diagram (Demsar 2006) of a :func:`friedman` result, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    posthoc = _needs("scikit_posthocs")
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.3 * int(result["n_models"])))  # type: ignore[arg-type]
    posthoc.critical_difference_diagram(result["ranks"], result["nemenyi"], ax=ax)
    ax.set_title(
        f"mean rank by {result['metric']} over {result['n_datasets']} datasets; Friedman p = "
        f"{float(result['p_value']):.3g}, Nemenyi CD = {float(result['critical_difference']):.2f}",  # type: ignore[arg-type]
        fontsize=9,
    )
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return out


def to_markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A plain GitHub-style Markdown table (no optional dependencies)."""
    cols = list(df.columns)

    def fmt(v: object) -> str:
        if isinstance(v, float | np.floating):
            return format(float(v), floatfmt)
        return str(v)

    rows = [[fmt(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join(markdown_lines([str(c) for c in cols], rows)) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Reading per-image results from run folders


def _settings(run: Path, folder: Path) -> dict[str, str]:
    summary = folder / SUMMARY if folder.name != TEST_DIR else run / SUMMARY
    if not summary.is_file():
        raise DataError(f"{summary} not found; rerun busbench test on {run}")
    df = pd.read_csv(summary, dtype=str, keep_default_na=False)
    missing = [c for c in SETTINGS if c not in df.columns]
    if missing:
        raise DataError(
            f"{summary} does not record {', '.join(missing)}; rerun busbench test on {run} to rewrite it"
        )
    return {c: str(df[c].iloc[0]) for c in SETTINGS}


def collect_per_image(dirs: list[Path], source: str = "ensemble") -> pd.DataFrame:
    """Long per-image table of every tested run below ``dirs`` (own and ``--tag`` tests, not transfer tests).

    Columns: ``experiment, train_data, tag, model`` (the identity, see the module docstring), ``dataset`` (the
    image's ``dataset_key``), the run's scoring settings, then the per-image columns.
    """
    frames = []
    paths: set[Path] = set()
    for root in dirs:
        root = Path(root)
        if not root.exists():
            raise DataError(f"{root} does not exist; pass run folders or a results root")
        paths.update(p.resolve() for p in root.rglob(f"{TEST_DIR}*/{source}_per_image.csv"))
    for path in sorted(paths):
        folder = path.parent
        if folder.name != TEST_DIR and not folder.name.startswith(f"{TEST_DIR}_"):
            continue
        if folder.name.startswith("test_on_"):
            continue
        run = folder.parent
        if not (run / "config.yaml").is_file():
            continue
        cfg = config_from_file(run / "config.yaml")
        df = pd.read_csv(path, dtype={"sample_id": str, "patient_id": str, "group_id": str})
        missing = [c for c in ("dataset_key", "group_id", "label", "dice", "hd95") if c not in df.columns]
        if missing:
            raise DataError(
                f"{path} lacks column(s) {', '.join(missing)}; rerun busbench test on {run} to rewrite it"
            )
        info = {
            "experiment": cfg.experiment.name,
            "train_data": "+".join(cfg.data.datasets),
            "tag": folder.name.removeprefix(TEST_DIR).removeprefix("_"),
            "arch": cfg.model.name,
            **_settings(run, folder),
            "run": str(run),
        }
        frames.append(df.assign(**info, dataset=df["dataset_key"].astype(str)))
    if not frames:
        raise DataError(
            f"no test/{source}_per_image.csv below {', '.join(map(str, dirs))}; run `busbench test` first"
        )
    table = pd.concat(frames, ignore_index=True)
    ident = table["experiment"] + "/" + table["arch"]
    runs_per_ident = table.groupby(ident)["train_data"].transform("nunique")
    ident = ident.where(
        runs_per_ident == 1, table["experiment"] + "/" + table["train_data"] + "/" + table["arch"]
    )
    table["model"] = ident + np.where(table["tag"] != "", "@" + table["tag"], "")
    return table


def check_settings(table: pd.DataFrame, allow_mixed: bool) -> pd.DataFrame:
    """Per dataset, the models' scoring settings; refused when they differ unless ``allow_mixed``."""
    settings = table.drop_duplicates(["dataset", "model"])[["dataset", "model", *SETTINGS]]
    problems = []
    for dataset, group in settings.groupby("dataset", sort=True):
        differing = [c for c in SETTINGS if group[c].nunique() > 1]
        if differing:
            shown = "; ".join(
                f"{r['model']}: " + ", ".join(f"{c}={r[c]}" for c in differing) for _, r in group.iterrows()
            )
            problems.append(f"{dataset} ({shown})")
    if problems and not allow_mixed:
        raise DataError(
            "models scored under different settings are not compared: "
            + "; ".join(problems)
            + ". Rescore them alike (busbench test --set eval.KEY=VALUE --tag NAME), or pass --allow-mixed"
        )
    return settings.reset_index(drop=True)


def compare(
    dirs: list[Path],
    out: Path,
    source: str = "ensemble",
    n_boot: int = 2000,
    seed: int = 0,
    allow_mixed: bool = False,
    n_perm: int = 10000,
) -> list[Path]:
    """Write pairwise tests, confidence intervals, ranks and the Friedman test as CSV + Markdown into ``out``."""
    table = collect_per_image(dirs, source)
    settings = check_settings(table, allow_mixed)
    test = friedman(table)
    results = {
        "pairwise": pairwise_tests(table, n_boot=n_boot, n_perm=n_perm, seed=seed),
        "confidence_intervals": confidence_intervals(table, n_boot=n_boot, seed=seed),
        "mean_rank": mean_ranks(table),
        "friedman": pd.DataFrame([{k: v for k, v in test.items() if k not in ("ranks", "nemenyi")}]),
        "settings": settings,
    }
    written = []
    for name, df in results.items():
        written += write_csv_and_markdown(out, name, df, to_markdown(df), float_format="%.6g")
    if "nemenyi" in test:
        nemenyi = test["nemenyi"]
        path = out / "nemenyi.csv"
        atomic_write_text(path, nemenyi.to_csv(float_format="%.6g", lineterminator="\n"))  # type: ignore[union-attr]
        written += [path, cd_diagram(test, out / "cd_diagram.png")]
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
    parser.add_argument(
        "--n-perm",
        type=int,
        default=10000,
        help="random sign patterns of the permutation test above 16 groups (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="compare models scored under different settings (listed in settings.csv)",
    )


def run(args: argparse.Namespace) -> int:
    written = compare(args.dirs, args.out, args.source, args.n_boot, args.seed, args.allow_mixed, args.n_perm)
    for path in written:
        if path.suffix == ".md":
            print(f"## {path.stem}\n{path.read_text()}")
    print(f"wrote {len(written)} files to {args.out}")
    return 0
