#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run every test (GPU tests must run), measure ceilings,
# run the benchmarks, leave JSON under bench/results/ (and copies under $OUT when the device tool runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MOECACHE_REQUIRE_GPU=1
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
log() { echo "=== $* ($(date +%T))"; }

log build
MOECACHE_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -3 || exit 1
(cd /tmp && python3 -m moecache info) | tee "$OUTDIR/info.txt"

log tests
pytest -q -x -m "gpu or not gpu" 2>&1 | tail -25 | tee "$OUTDIR/tests.txt"

log ceilings
if [ -f ../shared/tools/gpu_ceilings.py ]; then (cd /tmp && python3 "$OLDPWD/../shared/tools/gpu_ceilings.py") | tee "$OUTDIR/ceilings.json"; fi

for bench in ${BENCHES:-bench_moe}; do
  if [ -f "bench/$bench.py" ]; then
    log "$bench"
    (cd /tmp && python3 "$OLDPWD/bench/$bench.py" --json "$OLDPWD/bench/results/$bench.jsonl") 2>&1 | tail -60
    cp "bench/results/$bench.jsonl" "$OUTDIR/" 2>/dev/null || true
  fi
done
log done
