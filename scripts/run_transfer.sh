#!/usr/bin/env bash
# Cross-dataset transfer: train every model on every dataset, score each run on every other dataset's held-out
# test split, optionally fine-tune each run on every other dataset, and tabulate the transfer matrix.
#   DATASETS="busi busbra bus_uclm" MODELS="unet" FOLDS=5 bash scripts/run_transfer.sh [--finetune]
#       [--freeze-encoder] [--ft-set a.b=v ...] [--dry-run] [any option of scripts/lib/sweep.sh]
# Sweep options: --datasets "a b" --models "x y" --folds K --config FILE --experiment NAME (default transfer)
#   --results DIR --set a.b=v (every training run) ; MODEL_SET_<model>="a.b=v" (that model's runs).
# Steps; each skips what is already done, so rerunning after a failure only does what is left:
#   1. the normal sweep: train and test <results>/<experiment>/<A>/<model> for every dataset A, leaderboard
#   2. busbench test --run <results>/<experiment>/<A>/<model> --dataset B for every B != A (-> test_on_B/)
#   3. --finetune: for every A != B, train on B's folds starting from A's run (fold k from A's fold k:
#      train.init_from) into <results>/<experiment>-from-<A>/<B>/<model>, then test it on B's test split and on
#      A's (what it kept). --freeze-encoder adds train.freeze_encoder=true (and implies --finetune); --ft-set
#      overrides apply to the fine-tuning runs only, e.g. --ft-set train.lr=1e-5 --ft-set train.epochs=30
#   4. busbench transfer -> <results>/<experiment>/transfer.csv and transfer.md (rows: training data, columns:
#      test dataset; fine-tuned runs appear as rows "A->B"), and the heatmap transfer_heatmap.png
# No row is scored on an image a run learned from: busbench test leaves out every test image that is, or shares a
# near-duplicate group or patient with, a training or validation image of the run or of the run it was fine-tuned
# from (BUSI and Curated BUSI share images), lists them in excluded.csv, and busbench transfer refuses summaries
# written before that rule.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASETS=${DATASETS:-"busi busbra bus_uclm"}
MODELS=${MODELS:-"unet"}
CONFIG=${CONFIG:-configs/experiments/benchmark.yaml}
EXPERIMENT=${EXPERIMENT:-transfer}
FINETUNE=${FINETUNE:-0}
FREEZE=${FREEZE_ENCODER:-0}
FT_SET=()
sweep_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --finetune) FINETUNE=1; shift ;;
    --freeze-encoder) FREEZE=1; FINETUNE=1; shift ;;
    --ft-set) FT_SET+=("$2"); shift 2 ;;
    -h|--help) awk 'NR == 1 {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "$0"; exit 0 ;;
    *) sweep_args+=("$1"); shift ;;
  esac
done
# shellcheck source=scripts/lib/sweep.sh
. scripts/lib/sweep.sh
sweep_parse_args ${sweep_args[@]+"${sweep_args[@]}"}
BASE=$EXPERIMENT
SWEEP_SET=(${EXTRA_SET[@]+"${EXTRA_SET[@]}"})

# Print (--dry-run) or run one command given as a quoted string (the form sweep_train_cmd returns).
step() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "$1"
  else
    eval "$1" || { echo "$(basename "$0"): stopped: '$1' failed; fix the error above and rerun" >&2; exit 1; }
  fi
}

# The training command of model $3 on dataset $2 (every fold), started from the run trained on dataset $1.
ft_train_cmd() {
  local a=$1 b=$2 m=$3
  local EXPERIMENT="$BASE-from-$a"
  local -a EXTRA_SET=(${SWEEP_SET[@]+"${SWEEP_SET[@]}"} "train.init_from=$RESULTS/$BASE/$a/$m")
  [ "$FREEZE" = 1 ] && EXTRA_SET+=("train.freeze_encoder=true")
  EXTRA_SET+=(${FT_SET[@]+"${FT_SET[@]}"})
  sweep_train_cmd "$b" "$m"
}

# 1. train and test every (dataset, model) on its own test split
sweep_main ${sweep_args[@]+"${sweep_args[@]}"}

# 2. every run on every other dataset's test split
for a in $DATASETS; do
  for m in $MODELS; do
    for b in $DATASETS; do
      [ "$a" = "$b" ] || step "$(printf '%q ' busbench test --run "$RESULTS/$BASE/$a/$m" --dataset "$b")"
    done
  done
done

# 3. fine-tune every run on every other dataset
transfer_dirs=("$RESULTS/$BASE")
if [ "$FINETUNE" = 1 ]; then
  for a in $DATASETS; do
    transfer_dirs+=("$RESULTS/$BASE-from-$a")
    for b in $DATASETS; do
      [ "$a" != "$b" ] || continue
      for m in $MODELS; do
        step "$(ft_train_cmd "$a" "$b" "$m")"
        run=$RESULTS/$BASE-from-$a/$b/$m
        step "$(printf '%q ' busbench test --run "$run")"
        step "$(printf '%q ' busbench test --run "$run" --dataset "$a")"
      done
    done
  done
fi

# 4. the transfer matrix and its heatmap
step "$(printf '%q ' busbench transfer "${transfer_dirs[@]}" --out "$RESULTS/$BASE")"
step "$(printf '%q ' busbench plot transfer "$RESULTS/$BASE/transfer.csv" --out "$RESULTS/$BASE")"
[ "$DRY_RUN" = 1 ] || echo "transfer matrix: $RESULTS/$BASE/transfer.md (and transfer.csv, transfer_heatmap.png)"
