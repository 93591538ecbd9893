"""Where ``busbench test`` writes its results inside a run folder (no torch import: reports read these paths).

==================================================  =================================================================
``<run>/summary.csv``, ``<run>/test/``              the run's own test split at the config's ``eval`` settings
``<run>/test_<tag>/`` (summary.csv inside)          ``busbench test --tag <tag>``: the own test split at other
                                                    settings (e.g. ``--set eval.tta=true --tag tta``), beside the
                                                    default results instead of over them
``<run>/test_on_<B>/`` (summary.csv inside)         ``busbench test --dataset B``: dataset B's held-out test split
==================================================  =================================================================
"""

from __future__ import annotations

import re
from pathlib import Path

from busbench.config import Config, dataset_key_problem
from busbench.errors import ConfigError

SUMMARY = "summary.csv"
TEST_DIR = "test"
TRANSFER_PREFIX = "test_on_"
EXCLUDED = "excluded.csv"
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


#: where ``busbench train`` writes a run (one ``fold<k>/`` folder per fold model inside)
RUN_LAYOUT = "<output.root>/<experiment>/<dataset>/<model>"


def transfer_dir(run_dir: Path, dataset: str) -> Path:
    """Where ``busbench test --run run_dir --dataset dataset`` writes its results."""
    return Path(run_dir) / f"{TRANSFER_PREFIX}{dataset}"


def check_tag(tag: str) -> None:
    if not _TAG.match(tag) or tag.startswith("on_"):
        raise ConfigError(
            f"--tag {tag!r} must be a folder-safe name (letters, digits, '.', '_', '+', '-'; not starting with "
            "'on_'), e.g. --tag tta"
        )


def output_dirs(run_dir: Path, dataset: str | None = None, tag: str | None = None) -> tuple[Path, Path]:
    """(folder of ``summary.csv``, folder of the per-image files) for a test of ``run_dir``."""
    run_dir = Path(run_dir)
    if dataset is not None and tag is not None:
        raise ConfigError(
            "--tag applies to the run's own test split; score another dataset at the run's settings "
            "(busbench test --run DIR --dataset B) or train a run with the settings you want to transfer"
        )
    if dataset is not None:
        folder = transfer_dir(run_dir, dataset)
        return folder, folder
    if tag is not None:
        check_tag(tag)
        folder = run_dir / f"{TEST_DIR}_{tag}"
        return folder, folder
    return run_dir, run_dir / TEST_DIR


def run_of(summary: Path) -> Path:
    """The run folder of a ``summary.csv`` written by ``busbench test`` (its own, tagged or transfer one)."""
    folder = Path(summary).parent
    return folder.parent if folder.name.startswith(f"{TEST_DIR}_") else folder


def tag_of(summary: Path) -> str:
    """``''`` for the default results and transfer results, else the ``--tag`` of a tagged test."""
    name = Path(summary).parent.name
    if name.startswith(TRANSFER_PREFIX) or not name.startswith(f"{TEST_DIR}_"):
        return ""
    return name.removeprefix(f"{TEST_DIR}_")


def check_target(cfg: Config, dataset: str) -> None:
    """``dataset`` must be a dataset key other than the run's own training data."""
    problem = dataset_key_problem(dataset, cfg.data.data_root)
    if problem:
        raise ConfigError(f"--dataset: {problem}")
    if dataset in cfg.data.datasets:
        raise ConfigError(
            f"--dataset {dataset}: the run was trained on {'+'.join(cfg.data.datasets)}, so {dataset}'s test split is "
            "its own test; score it with busbench test --run DIR (without --dataset)"
        )
