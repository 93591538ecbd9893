#!/usr/bin/env bash
# One-command GPU check (bench/gpu.py): a small and a large model trained and tested through busbench with
# bf16 autocast, channels_last and torch.compile against float32; asserts they agree within stated tolerances and
# writes the figures to bench/results.md (## gpu). Exit status 1 when a check fails.
#   bash bench/gpu.sh              on a CUDA machine
#   bash bench/gpu.sh --dry-run    the same script on the CPU at toy size, to know it works first (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
python=python
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  python=.venv/bin/python
fi
case " $* " in
  *" --dry-run "*) ;;
  *) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true ;;
esac
exec "$python" bench/gpu.py "$@"
