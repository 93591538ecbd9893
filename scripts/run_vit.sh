#!/usr/bin/env bash
# Sweep the transformer models (fixed 224 px input) over datasets and folds. Lists from variables or flags, e.g.
#   DATASETS="busi" MODELS="transunet swinunet" FOLDS=5 bash scripts/run_vit.sh --dry-run
# See scripts/lib/sweep.sh for every option.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASETS=${DATASETS:-"busi curated_busi busbra bus_uc bus_uclm yap2018"}
MODELS=${MODELS:-"transunet medt swinunet"}
CONFIG=${CONFIG:-configs/experiments/benchmark_vit.yaml}
EXPERIMENT=${EXPERIMENT:-benchmark}
# shellcheck source=scripts/lib/sweep.sh
. scripts/lib/sweep.sh
sweep_main "$@"
