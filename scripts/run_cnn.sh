#!/usr/bin/env bash
# Sweep the CNN models over datasets and folds. Lists from variables or flags, e.g.
#   DATASETS="busi busbra" MODELS="unet unext" FOLDS=5 bash scripts/run_cnn.sh
#   bash scripts/run_cnn.sh --datasets "busi" --models "unet" --dry-run
# See scripts/lib/sweep.sh for every option.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASETS=${DATASETS:-"busi curated_busi busbra bus_uc bus_uclm yap2018"}
MODELS=${MODELS:-"unet attunet unetpp unet3p unext cmunet cmunext"}
CONFIG=${CONFIG:-configs/experiments/benchmark.yaml}
EXPERIMENT=${EXPERIMENT:-benchmark}
# shellcheck source=scripts/lib/sweep.sh
. scripts/lib/sweep.sh
sweep_main "$@"
