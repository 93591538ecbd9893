"""``python -m busbench`` (used by ``torchrun -m busbench train ...``)."""

import sys

from busbench.cli import main

sys.exit(main())
