# Shared by gpu_smoke.sh and gpu_bench.sh: stage timing against one deadline, logs under $OUT.
# Every stage appends to $OUTDIR/run.log (through `stage`), so a run killed at any point still reports.
# The rows the stages write (JSON lines, the ceilings, a tuned table) collect in $ROWS, outside $OUT, and
# are packed into $OUTDIR/rows.tgz after every stage: $OUT then holds at most five files, and a stage
# stopped at its own limit keeps every row written so far (a run killed from outside loses the rows of
# the stage then running).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${OUT:-$ROOT/bench/results/gpu-run}
ROWS=${ROWS:-/tmp/moecache-gpu-rows}
mkdir -p "$OUTDIR" "$ROWS"
# A fresh run starts without the rows of an earlier one (only the files the stages write are removed).
[ "${APPEND:-0}" = 1 ] || rm -f "$ROWS"/*.jsonl "$ROWS"/ceilings.json "$ROWS"/fused_moe-*.json
LOG="$OUTDIR/run.log"
SUMMARY="$OUTDIR/summary.txt"   # gpu_smoke.sh starts it, gpu_bench.sh appends
JUNIT_DIR=${JUNIT_DIR:-$OUTDIR}
SKIP=${SKIP:-}                 # stage names to leave out, e.g. SKIP="sanitizer compile-tests"
ONLY=${ONLY:-}                 # if set, only these stages run (names as in SKIP)
START=$(date +%s)
BUDGET=${BUDGET:-520}          # seconds the whole script may take (planned for runs of at most 10 minutes)
DRY_RUN=${DRY_RUN:-0}          # 1: print the plan and run each stage's command through `echo` (CPU check)
export PYTHONUNBUFFERED=1

log() { echo "=== $* (t+$(( $(date +%s) - START ))s)" | tee -a "$LOG"; }

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME SECONDS COMMAND...: run COMMAND for at most min(SECONDS, time left - 5 s), output appended to
# the log; the outcome (ok / rc=N / timeout / skipped) goes to the summary.
stage() {
  local name=$1 limit=$2; shift 2
  if [[ " $SKIP " == *" ${name%% *} "* ]] || { [ -n "$ONLY" ] && [[ " $ONLY " != *" ${name%% *} "* ]]; }; then
    echo "$name: skipped (SKIP/ONLY)" >> "$LOG"
    return 0
  fi
  local left; left=$(( $(remaining) - 5 ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    echo "$name: skipped (no time left)" | tee -a "$SUMMARY"
    return 0
  fi
  log "$name (limit ${limit}s)"
  local t0 rc; t0=$(date +%s)
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY_RUN: timeout $limit $*" >> "$LOG"; rc=0
  else
    timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1; rc=$?
  fi
  pack_rows
  local took=$(( $(date +%s) - t0 ))
  local what="ok"
  (( rc == 124 || rc == 137 )) && what="timeout" || { (( rc != 0 )) && what="rc=$rc"; }
  echo "$name: $what (${took}s)" | tee -a "$SUMMARY"
  return 0
}

# Written aside, then renamed: a call stopped mid-write keeps the previous archive, and the ceilings
# stage (run beside the build) never interleaves with another stage's write.
pack_rows() {
  [ -n "$(ls -A "$ROWS")" ] && tar czf "$OUTDIR/.rows.$BASHPID.tgz" -C "$ROWS" . \
    && mv -f "$OUTDIR/.rows.$BASHPID.tgz" "$OUTDIR/rows.tgz"
  return 0
}

# Build moecache with CUDA unless this machine already has it installed (REBUILD=1 forces a build).
ensure_built() {
  if [ "$DRY_RUN" != 1 ] && [ "${REBUILD:-0}" != 1 ] && (cd /tmp && python3 -c \
      "import moecache._C as c, sys; sys.exit(0 if c.cuda_available() else 1)") 2>/dev/null; then
    echo "build: already installed with CUDA" >> "$LOG"
  else
    stage build 180 env MOECACHE_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps --no-input -q .
  fi
}
