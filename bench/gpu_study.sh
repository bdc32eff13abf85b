#!/usr/bin/env bash
# One slice of the end-to-end study on a GPU, <= 9 minutes (bench_e2e.py's GPU_SLICES; slice 1 alone answers
# the headline question at one budget). Rows go to bench/results/study.jsonl and to $OUT, the README section
# text to $OUT/study.md.
#   bash bench/gpu_study.sh 1            (then 2, 3, 4 in later calls, as minutes allow)
#   DRY_RUN=1 bash bench/gpu_study.sh 1  (CPU: the plan, nothing run)
set -uo pipefail
SLICE=${1:?usage: gpu_study.sh SLICE}
source "$(dirname "$0")/gpu_lib.sh"
cd "$ROOT"
RES="$ROOT/bench/results"

ensure_built
# The slice stops starting configurations 60 s before its stage limit: what it did not reach is listed.
LIMIT=${STUDY_LIMIT:-$(( $(remaining) - 25 ))}
stage "study-slice-$SLICE" "$LIMIT" bash -c "cd /tmp && python3 '$ROOT/bench/bench_e2e.py' --slice $SLICE \
  --deadline $(( LIMIT - 60 )) --json '$RES/study.jsonl'"
[ -f "$RES/study.jsonl" ] && cp "$RES/study.jsonl" "$OUTDIR/"
stage report 20 bash -c "cd /tmp && python3 '$ROOT/bench/report.py' '$RES/study.jsonl' \
  --cache-rows '$RES/bench_cache-cpu.jsonl' --plots '$OUTDIR' > '$OUTDIR/study.md'"
log "summary"
grep -E "offload|hf:eager|moecache |SKIPPED|NOT RUN" "$LOG" | tail -60 >> "$SUMMARY"
cat "$SUMMARY"
