#!/usr/bin/env bash
# One prepared GPU check: training images/s of every model at 224/256 px, batch 16, fp32 vs bf16 autocast,
# with and without channels_last, and whether it fits in memory. Writes a CSV (default bench/gpu_results.csv).
# On a machine without CUDA it runs the tiny CPU version (64 px, batch 2), so it is known to work beforehand.
#   bash bench/gpu.sh [--out FILE] [--models unet unext ...]
set -euo pipefail
cd "$(dirname "$0")/.."
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  exec timeout 450 python bench/gpu.py "$@"
else
  echo "no CUDA device: running the tiny CPU version"
  exec python bench/gpu.py --tiny --out "${OUT:-bench/gpu_results_cpu.csv}" "$@"
fi
