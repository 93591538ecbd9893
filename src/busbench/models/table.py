"""``busbench models``: the registered models with their parameter count, GMACs and source.

Each model is built with its default settings for a 1-channel input and one output channel, the setting in which
public benchmark tables count them (``docs/models.md`` compares the transformer models with those tables); MACs are counted on one ``1 x 1 x size x size`` forward pass (see
:mod:`busbench.models.cost`). Models that cannot be built at that size (fixed input sizes, required options) are
listed with the reason instead of numbers. Models from plugins (:mod:`busbench.plugins`) are listed like the
built-in ones, with the plugin module as their source.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import sys

from busbench.errors import ModelError
from busbench.models.cost import count_macs, count_params
from busbench.models.registry import create_model, get_spec, list_models

COLUMNS = ("key", "paper", "params_m", "gmacs", "input_sizes", "pretrained", "source", "note")
HEADERS = {
    "key": "model",
    "paper": "paper",
    "params_m": "params (M)",
    "gmacs": "GMACs",
    "input_sizes": "input sizes",
    "pretrained": "pretrained",
    "source": "source",
    "note": "note",
}


def select_models(names: list[str] | None) -> list[str]:
    """Registered names matching ``names`` (exact names or shell patterns such as ``smp_*``), in order given."""
    if not names:
        return list_models()
    available = list_models()
    selected: list[str] = []
    for name in names:
        matches = [n for n in available if fnmatch.fnmatch(n, name)]
        if not matches:
            get_spec(name)  # raises ModelError listing the valid names
        selected += [m for m in matches if m not in selected]
    return selected


def models_table(names: list[str] | None = None, size: int = 224) -> list[dict]:
    """One row per model: key, paper, params_m, gmacs (at ``1 x 1 x size x size``), input_sizes, pretrained,
    source (``busbench``, or the plugin module that registered it) and note.

    ``params_m`` and ``gmacs`` are ``None`` (and ``note`` says why) for models that cannot be built at ``size``
    with their defaults.
    """
    rows = []
    for name in select_models(names):
        spec = get_spec(name)
        row = {
            "key": name,
            "paper": spec.paper,
            "params_m": None,
            "gmacs": None,
            "input_sizes": spec.input_sizes,
            "pretrained": spec.pretrained,
            "source": spec.source,
            "note": "",
        }
        try:
            model = create_model(name, in_channels=1, num_classes=1, image_size=size)
        except ModelError as exc:
            row["note"] = str(exc)
        else:
            row["params_m"] = round(count_params(model) / 1e6, 2)
            row["gmacs"] = round(count_macs(model, in_channels=1, size=size) / 1e9, 2)
            del model
        rows.append(row)
    return rows


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def format_markdown(rows: list[dict], size: int = 224) -> str:
    """A Markdown table; the GMACs header names the input it was counted at."""
    headers = {**HEADERS, "gmacs": f"GMACs (1x1x{size}x{size})"}
    columns = [c for c in COLUMNS if c != "note" or any(r["note"] for r in rows)]
    lines = [
        "| " + " | ".join(headers[c] for c in columns) + " |",
        "|" + "|".join("---:" if c in ("params_m", "gmacs") else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r[k] is None else r[k]) for k in COLUMNS} for r in rows)
    return buf.getvalue()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size", type=int, default=224, help="input height and width for the MAC count (default: 224)"
    )
    parser.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="models to list; shell patterns allowed, e.g. 'smp_*' (default: all)",
    )
    parser.add_argument("--format", choices=("md", "csv"), default="md", help="output format (default: md)")


def run(args: argparse.Namespace) -> int:
    if args.size <= 0:
        raise ModelError(f"--size must be a positive number of pixels, got {args.size}")
    rows = models_table(args.names, size=args.size)
    sys.stdout.write(format_markdown(rows, args.size) if args.format == "md" else format_csv(rows))
    return 0
