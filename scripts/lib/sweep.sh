# Shared sweep logic for run_cnn.sh / run_vit.sh / slurm_sweep.sh. Source it; don't run it.
#
# Lists come from variables or flags:  DATASETS="busi busbra" MODELS="unet unext" FOLDS=5 bash scripts/run_cnn.sh
#   --datasets "a b"  --models "x y"  --folds K  --config FILE  --experiment NAME  --results DIR  --dry-run
#   --set a.b=v (repeatable, passed to busbench train for every model)
#   MODEL_SET_<model>="a.b=v c.d=w": overrides for that model only (model.params differ between models), e.g.
#   MODEL_SET_unet="model.params.base_width=8" MODEL_SET_unext="model.params.widths=[8,16,32,32,64]"
# Each (dataset, model) is one `busbench train` call that trains its folds in turn (a cluster array job runs one
# `busbench train --fold K` per fold instead): busbench skips folds that already finished and resumes interrupted
# ones from their last checkpoint, so re-running a sweep only does what is left. After the folds of a
# (dataset, model) finish, `busbench test` scores them (recomputed on every run; it reads only finished folds);
# at the end `busbench aggregate` writes the leaderboard. The first failing command stops the sweep with a message
# naming the step; nothing after it runs. Results are read from files (summary.csv, leaderboard.csv), never parsed
# from printed output.

sweep_parse_args() {
  DRY_RUN=${DRY_RUN:-0}
  EXTRA_SET=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --datasets) DATASETS=$2; shift 2 ;;
      --models) MODELS=$2; shift 2 ;;
      --folds) FOLDS=$2; shift 2 ;;
      --config) CONFIG=$2; shift 2 ;;
      --experiment) EXPERIMENT=$2; shift 2 ;;
      --results) RESULTS=$2; shift 2 ;;
      --set) EXTRA_SET+=("$2"); shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) awk 'NR == 1 {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "${BASH_SOURCE[0]}"; exit 0 ;;
      *) echo "$(basename "$0"): unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
  done
  : "${DATASETS:?set DATASETS or --datasets}" "${MODELS:?set MODELS or --models}"
  FOLDS=${FOLDS:-5}
  RESULTS=${RESULTS:-results}
  if ! [[ "$FOLDS" =~ ^[0-9]+$ ]] || [ "$FOLDS" -lt 2 ]; then
    echo "$(basename "$0"): FOLDS must be an integer >= 2, got '$FOLDS'" >&2
    exit 2
  fi
  if [ ! -f "$CONFIG" ]; then
    echo "$(basename "$0"): config $CONFIG not found" >&2
    exit 2
  fi
}

# One line per task, "dataset model fold", in a fixed order (the order of array indices too).
sweep_plan() {
  local d m k
  for d in $DATASETS; do
    for m in $MODELS; do
      for ((k = 0; k < FOLDS; k++)); do
        echo "$d $m $k"
      done
    done
  done
}

sweep_run_dir() { echo "$RESULTS/$EXPERIMENT/$1/$2"; }

# The training command of model $2 on dataset $1: fold $3 only when given, otherwise every fold in one process.
sweep_train_cmd() {
  local d=$1 m=$2 k=${3:-}
  local cmd=(busbench train --config "$CONFIG")
  [ -z "$k" ] || cmd+=(--fold "$k")
  cmd+=(--set "data.dataset=$d" "model.name=$m" "data.folds=$FOLDS" "experiment.name=$EXPERIMENT"
    "output.root=$RESULTS")
  [ ${#EXTRA_SET[@]} -eq 0 ] || cmd+=("${EXTRA_SET[@]}")
  local per_model="MODEL_SET_$m" extra=()
  [[ "$m" =~ ^[A-Za-z0-9_]+$ ]] && read -r -a extra <<< "${!per_model:-}"
  [ ${#extra[@]} -eq 0 ] || cmd+=("${extra[@]}")
  printf '%q ' "${cmd[@]}"
}

# Stop the sweep after a failed step: the command's own error is printed above this line.
sweep_fail() {
  echo "$(basename "$0"): stopped: $1 failed (exit status $2); later steps were not run." \
    "Fix the error above and rerun the same command: finished folds are skipped." >&2
  exit "$2"
}

sweep_main() {
  sweep_parse_args "$@"
  local d m k run
  if [ "$DRY_RUN" = 1 ]; then
    echo "# plan: $(sweep_plan | wc -l | tr -d ' ') folds ($FOLDS per run); experiment '$EXPERIMENT' under $RESULTS/"
    for d in $DATASETS; do
      for m in $MODELS; do
        echo "$(sweep_train_cmd "$d" "$m")"
        echo "busbench test --run $(sweep_run_dir "$d" "$m")"
      done
    done
    echo "busbench aggregate $RESULTS/$EXPERIMENT --out $RESULTS/$EXPERIMENT"
    return 0
  fi
  for d in $DATASETS; do
    for m in $MODELS; do
      eval "$(sweep_train_cmd "$d" "$m")" || sweep_fail "busbench train ($d, $m)" $?
      run=$(sweep_run_dir "$d" "$m")
      busbench test --run "$run" || sweep_fail "busbench test --run $run" $?
    done
  done
  busbench aggregate "$RESULTS/$EXPERIMENT" --out "$RESULTS/$EXPERIMENT" || sweep_fail "busbench aggregate" $?
  echo "leaderboard: $RESULTS/$EXPERIMENT/leaderboard.csv"
}
