#!/usr/bin/env bash
# Install busbench and its test tools into the active Python environment (a virtualenv or conda env);
# without one, into ./.venv (created here; activate it afterwards with `. .venv/bin/activate`).
# PyTorch: an installed build (e.g. your CUDA build) is kept. Otherwise BUSBENCH_TORCH is installed
# (default "torch torchvision"; CI pins e.g. BUSBENCH_TORCH="torch==2.14.1 torchvision==0.29.1").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  python -m pip install -q ${BUSBENCH_TORCH:-torch torchvision}
fi
python -m pip install -q -e ".[dev]"
python -c "import busbench, torch; print(f'busbench {busbench.__version__} with torch {torch.__version__} ready')"
