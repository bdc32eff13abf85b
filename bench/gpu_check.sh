#!/usr/bin/env bash
# The GPU machine's checks in stages, each of which fits one device call (<= 10 minutes); JSON rows go
# to bench/results/ and copies of everything printed to $OUT.
#   STAGE=gpu-tests bash bench/gpu_check.sh     build with CUDA (once per machine), info, the gpu-marked tests
#   STAGE=cpu-tests bash bench/gpu_check.sh     the other tests on this machine
#   STAGE=bench BENCHES="bench_moe bench_mla" bash bench/gpu_check.sh      (then bench_prefetch bench_cache)
#   STAGE=bench BENCHES=bench_e2e E2E_ARGS="--models vl2-small,vl2-base" bash bench/gpu_check.sh
#   STAGE=bench BENCHES=bench_e2e E2E_ARGS="--models mixtral-8x7b,llama-7b,llama-13b" bash bench/gpu_check.sh
#   STAGE=report bash bench/gpu_check.sh        plots + results table from bench_e2e rows, and the demos
#   STAGE=all (default) runs every stage in a row, for a machine without a per-call limit.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1 MOECACHE_REQUIRE_GPU=1
OUTDIR=${OUT:-$ROOT/bench/results}
STAGE=${STAGE:-all}
mkdir -p "$OUTDIR"
log() { echo "=== $* ($(date +%T))"; }
want() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }

build() {
  if (cd /tmp && python3 -c "import moecache._C as c, sys; sys.exit(0 if c.cuda_available() else 1)") 2>/dev/null \
      && [ "${REBUILD:-0}" != 1 ]; then
    log "build: moecache with CUDA already installed here"
  else
    log build
    MOECACHE_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -3
  fi
  (cd /tmp && python3 -m moecache info) 2>&1 | tee "$OUTDIR/info.txt"
}

build
if want gpu-tests; then
  log "gpu tests"
  timeout 540 pytest -q -m gpu > "$OUTDIR/gpu_tests.txt" 2>&1; echo "rc=$?" >> "$OUTDIR/gpu_tests.txt"
  tail -30 "$OUTDIR/gpu_tests.txt"
fi
if want cpu-tests; then
  log "other tests"
  timeout 540 pytest -q -m "not gpu" > "$OUTDIR/tests.txt" 2>&1; echo "rc=$?" >> "$OUTDIR/tests.txt"
  tail -30 "$OUTDIR/tests.txt"
fi
if want bench; then
  for bench in ${BENCHES:-bench_moe bench_mla bench_prefetch bench_cache bench_e2e}; do
    log "$bench"
    extra=""
    [ "$bench" = bench_e2e ] && extra="${E2E_ARGS:-}"
    # shellcheck disable=SC2086
    (cd /tmp && python3 "$ROOT/bench/$bench.py" --json "$ROOT/bench/results/$bench.jsonl" $extra) > "$OUTDIR/$bench.txt" 2>&1
    tail -60 "$OUTDIR/$bench.txt"
    cp "$ROOT/bench/results/$bench.jsonl" "$OUTDIR/" 2>/dev/null || true
  done
fi
if want report; then
  if [ -f "$ROOT/bench/results/bench_e2e.jsonl" ]; then
    log report
    python3 "$ROOT/bench/report.py" "$ROOT/bench/results/bench_e2e.jsonl" --plots "$OUTDIR" > "$OUTDIR/results.md"
  fi
  log demo
  (cd /tmp && python3 -m moecache demo) > "$OUTDIR/demo.txt" 2>&1
  (cd /tmp && python3 -m moecache demo --family trained --batch 4 --prompt 64 --new-tokens 48) >> "$OUTDIR/demo.txt" 2>&1
  tail -20 "$OUTDIR/demo.txt"
fi
log done
