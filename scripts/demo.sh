#!/usr/bin/env bash
# The main job on built-in synthetic data, end to end:
#   synth (BUSI layout) -> prepare (manifest, patient-grouped test split, 5 folds) -> train 5 folds -> test -> aggregate
# A narrow U-Net at 64 px for 10 epochs per fold: a few minutes on two CPU cores.
#
# Settings (environment): DEMO_DATA (default data/demo), DEMO_RESULTS (default results), DEMO_N (default 100).
# Running it again reuses the data and skips finished folds; delete both folders to start over.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA="${DEMO_DATA:-data/demo}"
RESULTS="${DEMO_RESULTS:-results}"
N="${DEMO_N:-100}"
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" && -f .venv/bin/activate ]]; then
    # scripts/setup.sh installs into ./.venv when no environment was active
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
if command -v busbench >/dev/null 2>&1; then
    BB=(busbench)
else
    BB=(python -m busbench.cli)
fi
start=$(date +%s)

if [[ ! -f "$DATA/manifests/busi.csv" ]]; then
    echo "== synth: $N synthetic images in the BUSI layout -> $DATA/raw/BUSI"
    "${BB[@]}" synth --layout busi --out "$DATA/raw/BUSI" --n "$N" --seed 0 --overwrite
    echo "== prepare: derived masks, manifest and splits -> $DATA/manifests"
    "${BB[@]}" prepare --datasets busi --data-root "$DATA" --folds 5 --test-size 0.2 --seed 42
else
    echo "== using the prepared data in $DATA"
fi

echo "== train: 5 folds (configs/experiments/demo.yaml)"
"${BB[@]}" train --config configs/experiments/demo.yaml --set "data.data_root=$DATA" "output.root=$RESULTS"

RUN="$RESULTS/demo/busi/unet"
echo "== test: fold models and their ensemble on the held-out test split"
"${BB[@]}" test --run "$RUN"

echo "== aggregate"
"${BB[@]}" aggregate "$RESULTS/demo"

elapsed=$(( $(date +%s) - start ))
echo
echo "Done in ${elapsed} s. Files:"
row() { printf '  %-48s %s\n' "$1" "$2"; }
row "$RUN/config.yaml" "resolved configuration"
row "$RUN/fold<k>/" "checkpoints, train_log.csv, val_per_image.csv, run.json, tensorboard/"
row "$RUN/test/*_per_image.csv" "per-image test metrics of each fold model and the ensemble"
row "$RUN/summary.csv" "per-fold, mean, std and ensemble scores"
row "$RESULTS/demo/leaderboard.{csv,md}" "the leaderboard printed above"
echo "Learning curves: tensorboard --logdir $RUN"
