#!/usr/bin/env python
"""Thin wrapper: ``python train.py ARGS`` is ``busbench train ARGS``."""

import sys

from busbench.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
