"""The ``busbench`` command line.

Each subcommand lives in the module that does the work; that module exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs, so ``busbench --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from busbench import __version__
from busbench.errors import BusbenchError

# name -> (module, one-line help). A command is offered only when its module is installed.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("busbench.data.synth", "write a synthetic BUS-like dataset in a public dataset's raw layout"),
    "prepare": ("busbench.data.prepare", "raw data -> derived masks, manifest CSV and summary JSON"),
    "audit": (
        "busbench.data.audit",
        "check a prepared dataset for leakage, missing files and bad masks, or any split file (--split-file)",
    ),
    "train": ("busbench.engine.train", "train one fold, or all folds, of an experiment"),
    "test": (
        "busbench.engine.evaluate",
        "evaluate fold models and their ensemble on the held-out test split",
    ),
    "predict": ("busbench.engine.predict", "masks of new images from a trained run's fold ensemble"),
    "score": (
        "busbench.engine.score",
        "score any tool's predicted masks on a dataset's held-out test split, into the results layout",
    ),
    "export": (
        "busbench.engine.export",
        "export an nnU-Net v2 raw dataset with busbench's folds, or a run's models as ONNX",
    ),
    "aggregate": ("busbench.report.aggregate", "gather run summaries into a leaderboard"),
    "transfer": ("busbench.report.transfer", "cross-dataset transfer matrix of tested runs"),
    "compare": ("busbench.report.stats", "paired statistics between models on the same test images"),
    "plot": (
        "busbench.report.plots",
        "figures: learning curves, Dice distributions, overlays, transfer heatmap",
    ),
    "models": ("busbench.models.table", "table of registered models with parameters and GMACs"),
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors on one line with the command's name."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``selected``'s module is imported to add its arguments (none for the top-level help)."""
    parser = _Parser(
        prog="busbench", description="busbench: a benchmark for breast-ultrasound lesion segmentation"
    )
    parser.add_argument("--version", action="version", version=f"busbench {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.set_defaults(_commands={})
    for name, (module, help_text) in COMMANDS.items():
        if not _available(module):
            continue
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if selected == name:
            importlib.import_module(module).add_arguments(cmd)
        cmd.set_defaults(_module=module)
        parser.get_default("_commands")[name] = cmd
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # report unknown options against the subcommand that was given them, not the top level
        target = parser.get_default("_commands").get(getattr(args, "command", None) or "", parser)
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except BusbenchError as exc:
        if args.verbose:
            raise
        print(f"busbench {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"busbench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
