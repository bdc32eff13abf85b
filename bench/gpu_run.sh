#!/usr/bin/env bash
# Both GPU scripts, one after the other on the same machine (the build and the warm-up paid once):
# gpu_smoke.sh within SMOKE_BUDGET seconds, then gpu_bench.sh within what is left of TOTAL. Allow the
# whole command TOTAL + 30 s or more. Files under $OUT: run.log, summary.txt, pytest.xml,
# pytest-compile.xml and rows.tgz (every JSON row, the ceilings and a tuned table).
#   bash bench/gpu_run.sh
#   DRY_RUN=1 bash bench/gpu_run.sh     (CPU: the plan of both, nothing run)
set -uo pipefail
HERE=$(dirname "$0")
TOTAL=${TOTAL:-570}
SMOKE_BUDGET=${SMOKE_BUDGET:-350}
T0=$(date +%s)
BUDGET=$SMOKE_BUDGET bash "$HERE/gpu_smoke.sh"
LEFT=$(( TOTAL - ($(date +%s) - T0) ))
APPEND=1 BUDGET=$LEFT bash "$HERE/gpu_bench.sh"
