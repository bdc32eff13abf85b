#!/usr/bin/env bash
# The second GPU run: the key benchmark points against the baselines and ceilings measured in the same
# process, <= 9 minutes. JSON rows go to bench/results/<bench>.jsonl and are copied to $OUT after each stage.
#   bash bench/gpu_bench.sh               (moecache already installed with CUDA by gpu_smoke.sh; else built)
#   DRY_RUN=1 bash bench/gpu_bench.sh     (CPU: the plan, the stages and the summary, nothing run)
set -uo pipefail
source "$(dirname "$0")/gpu_lib.sh"
cd "$ROOT"
: > "$SUMMARY"
RES="$ROOT/bench/results"

if [ "$DRY_RUN" != 1 ] && ! (cd /tmp && python3 -c "import moecache._C as c, sys; sys.exit(0 if c.cuda_available() else 1)") 2>/dev/null; then
  stage build 180 env MOECACHE_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps --no-input -q .
fi
collect() { for f in "$RES"/bench_*.jsonl; do [ -f "$f" ] && cp "$f" "$OUTDIR/"; done; }
bench() {  # bench NAME LIMIT ARGS...: one benchmark script, run outside the source tree
  local name=$1 limit=$2; shift 2
  stage "$name $*" "$limit" bash -c "cd /tmp && python3 '$ROOT/bench/$name.py' --json '$RES/$name.jsonl' $*"
  collect
}

bench bench_moe ${MOE_LIMIT:-150} --shapes deepseek-v2-lite/vl2-small,mixtral-8x7b --tokens 1,16,64,4096 --rep 20
bench bench_moe 60 --shapes qwen3-30b-a3b,vl2-base --tokens 1,4096 --rep 20
bench bench_mla 70 --heads 16,128 --points 1x4096,64x4096 --rep 30
bench bench_prefetch 70 --parts h2d,overlap,misses --experts deepseek-v2-lite-17.3MB,mixtral-352MB
bench bench_e2e ${E2E_LIMIT:-150} --models vl2-small --batches 1 --providers hf:eager,moecache,offload50:predictive \
  --new-tokens 16 --max-prompt 1024

log "summary"
grep -E "vs grouped_mm|moecache:(eager|graph)|grouped_mm:(eager|graph)|^ *(16|128) |h2d |overlap|misses T|vl2-small" \
  "$LOG" | head -80 >> "$SUMMARY"
cat "$SUMMARY"
