# Shared sweep logic for run_cnn.sh / run_vit.sh / slurm_sweep.sh. Source it; don't run it.
#
# Lists come from variables or flags:  DATASETS="busi busbra" MODELS="unet unext" FOLDS=5 bash scripts/run_cnn.sh
#   --datasets "a b"  --models "x y"  --folds K  --config FILE  --experiment NAME  --results DIR  --dry-run
#   --set a.b=v (repeatable, passed to busbench train)
# Each (dataset, model, fold) is one `busbench train --fold K` call: busbench skips folds that already finished and
# resumes interrupted ones from their last checkpoint, so re-running a sweep only does what is left. After the folds of
# a (dataset, model) finish, `busbench test` scores them; at the end `busbench aggregate` writes the leaderboard.
# Results are read from files (summary.csv, leaderboard.csv), never parsed from printed output.

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
      -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

sweep_train_cmd() {
  local d=$1 m=$2 k=$3
  local cmd=(busbench train --config "$CONFIG" --fold "$k" --set "data.dataset=$d" "model.name=$m"
    "data.folds=$FOLDS" "experiment.name=$EXPERIMENT" "output.root=$RESULTS")
  [ ${#EXTRA_SET[@]} -eq 0 ] || cmd+=("${EXTRA_SET[@]}")
  printf '%q ' "${cmd[@]}"
}

sweep_main() {
  sweep_parse_args "$@"
  local d m k run
  if [ "$DRY_RUN" = 1 ]; then
    echo "# plan: $(sweep_plan | wc -l | tr -d ' ') fold runs; experiment '$EXPERIMENT' under $RESULTS/"
    while read -r d m k; do
      echo "$(sweep_train_cmd "$d" "$m" "$k")"
    done < <(sweep_plan)
    for d in $DATASETS; do
      for m in $MODELS; do echo "busbench test --run $(sweep_run_dir "$d" "$m")"; done
    done
    echo "busbench aggregate $RESULTS/$EXPERIMENT --out $RESULTS/$EXPERIMENT"
    return 0
  fi
  for d in $DATASETS; do
    for m in $MODELS; do
      for ((k = 0; k < FOLDS; k++)); do
        eval "$(sweep_train_cmd "$d" "$m" "$k")"
      done
      run=$(sweep_run_dir "$d" "$m")
      busbench test --run "$run"
    done
  done
  busbench aggregate "$RESULTS/$EXPERIMENT" --out "$RESULTS/$EXPERIMENT"
  echo "leaderboard: $RESULTS/$EXPERIMENT/leaderboard.csv"
}
