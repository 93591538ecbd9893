"""``busbench export``: hand a dataset or a trained run to other tools.

``busbench export nnunet`` writes an nnU-Net v2 raw dataset on busbench's split (:mod:`busbench.engine.export_nnunet`);
``busbench export onnx`` writes a run's fold model or fold ensemble as ONNX with its preprocessing
(:mod:`busbench.engine.export_onnx`). Each format's module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib

FORMATS = {
    "nnunet": ("busbench.engine.export_nnunet", "an nnU-Net v2 raw dataset with busbench's folds and test split"),
    "onnx": ("busbench.engine.export_onnx", "a run's fold model or fold ensemble as ONNX, with preprocess.json"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True, parser_class=type(parser))
    for name, (module, help_text) in FORMATS.items():
        fmt = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(fmt)
        fmt.set_defaults(_export_module=module)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._export_module).run(args) or 0)
