#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# Real-data tests read BUSBENCH_REAL_DATA (a folder holding BUSI/, BUSBRA/ and BUS-UCLM/ samples) and skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
bash scripts/setup.sh
set +e
python -m pytest "$@"
status=$?
set -e
[ "$status" -ne 5 ] || echo "test.sh: pytest collected no tests" >&2
exit "$status"
