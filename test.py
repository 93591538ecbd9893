#!/usr/bin/env python
"""Thin wrapper: ``python test.py ARGS`` is ``busbench test ARGS``."""

import sys

from busbench.cli import main

if __name__ == "__main__":
    sys.exit(main(["test", *sys.argv[1:]]))
