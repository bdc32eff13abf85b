#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run every test (GPU tests must run, not skip), measure
# ceilings, run the benchmarks, leave JSON rows under bench/results/ and copies under $OUT.
#   device run: bash bench/gpu_check.sh            (BENCHES="bench_moe bench_mla bench_prefetch bench_cache bench_e2e" by default)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1 MOECACHE_REQUIRE_GPU=1
OUTDIR=${OUT:-$ROOT/bench/results}
mkdir -p "$OUTDIR"
log() { echo "=== $* ($(date +%T))"; }

log build
MOECACHE_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -3
(cd /tmp && python3 -m moecache info) 2>&1 | tee "$OUTDIR/info.txt"

log tests
pytest -q 2>&1 | tail -30 | tee "$OUTDIR/tests.txt"

for bench in ${BENCHES:-bench_moe bench_mla bench_prefetch bench_cache bench_e2e}; do
  log "$bench"
  (cd /tmp && python3 "$ROOT/bench/$bench.py" --json "$ROOT/bench/results/$bench.jsonl") 2>&1 | tee "$OUTDIR/$bench.txt" | tail -80
  cp "$ROOT/bench/results/$bench.jsonl" "$OUTDIR/" 2>/dev/null || true
done
if [ -f "$ROOT/bench/results/bench_e2e.jsonl" ]; then
  log report
  python3 "$ROOT/bench/report.py" "$ROOT/bench/results/bench_e2e.jsonl" --plots "$OUTDIR" > "$OUTDIR/results.md"
fi
log demo
(cd /tmp && python3 -m moecache demo) 2>&1 | tee "$OUTDIR/demo.txt" | tail -12
(cd /tmp && python3 -m moecache demo --family trained --batch 4 --prompt 64 --new-tokens 48) 2>&1 | tee -a "$OUTDIR/demo.txt" | tail -8
log done
