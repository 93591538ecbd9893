"""What the report commands share: Markdown tables, number cells, CSV files written atomically, and the
``DIR... --out`` arguments of the commands that read results folders."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from busbench.atomic import atomic_write_text
from busbench.errors import BusbenchError


def number(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` decimals; a missing value (None or NaN) is an en dash."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-style Markdown table of ready-made cell texts, one line per table row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def write_csv(path: Path, table: pd.DataFrame, float_format: str | None = None) -> Path:
    """``table`` as CSV (no index, ``\\n`` line ends) at ``path``, written atomically."""
    atomic_write_text(path, table.to_csv(index=False, float_format=float_format, lineterminator="\n"))
    return path


def write_csv_and_markdown(
    out: Path, name: str, table: pd.DataFrame, markdown: str, float_format: str | None = None
) -> tuple[Path, Path]:
    """``<out>/<name>.csv`` (:func:`write_csv`) and ``<out>/<name>.md`` holding ``markdown``, in that order."""
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    write_csv(csv_path, table, float_format)
    atomic_write_text(md_path, markdown)
    return csv_path, md_path


def results_dirs(dirs: Sequence[Path], example: str) -> list[Path]:
    """The results folders a command was given; none is an error that shows ``example``, a command line."""
    if not dirs:
        raise BusbenchError(f"give at least one results folder, e.g. {example}")
    return [Path(d) for d in dirs]


def add_results_arguments(parser: argparse.ArgumentParser, dirs_help: str, out_help: str) -> None:
    """The ``DIR...`` results folders and the ``--out`` folder (default None: the command picks one)."""
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help=dirs_help)
    parser.add_argument("--out", type=Path, default=None, help=out_help)
