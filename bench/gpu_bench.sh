#!/usr/bin/env bash
# The second GPU run: the key benchmark points against the baselines and ceilings measured in the same
# process, <= 9 minutes. Each benchmark's new JSON rows go to <bench>.jsonl in $OUT/rows.tgz (gpu_lib.sh).
#   bash bench/gpu_bench.sh               (moecache already installed with CUDA by gpu_smoke.sh; else built)
#   DRY_RUN=1 bash bench/gpu_bench.sh     (CPU: the plan, the stages and the summary, nothing run)
set -uo pipefail
source "$(dirname "$0")/gpu_lib.sh"
cd "$ROOT"

ensure_built
bench() {  # bench NAME LIMIT ARGS...: one benchmark script, run outside the source tree
  local name=$1 limit=$2; shift 2
  stage "$name $*" "$limit" bash -c "cd /tmp && python3 '$ROOT/bench/$name.py' --json '$ROWS/$name.jsonl' $*"
}
TABLE="$ROWS/fused_moe-$(cd /tmp && python3 -c 'import torch; from moecache.ops.api import device_slug; print(device_slug(torch.device("cuda")))' 2>/dev/null || echo cpu).json"

bench bench_moe ${MOE_LIMIT:-150} --shapes deepseek-v2-lite/vl2-small,mixtral-8x7b --tokens 1,16,64,4096 --rep 20
bench bench_moe 60 --shapes qwen3-30b-a3b,vl2-base --tokens 1,4096 --rep 20
# The study's slices have their own script (gpu_study.sh); here one point of it, resident and graph mode.
# Its deadline (no configuration starts after it) follows the stage's limit, cut where little time is left.
E2E_LIMIT=${E2E_LIMIT:-150}
(( E2E_LIMIT > $(remaining) - 5 )) && E2E_LIMIT=$(( $(remaining) - 5 ))
E2E_DEADLINE=$(( E2E_LIMIT > 40 ? E2E_LIMIT - 20 : 20 ))
stage bench_e2e $E2E_LIMIT bash -c "cd /tmp && python3 '$ROOT/bench/bench_e2e.py' --json '$ROWS/study.jsonl' \
  ${E2E_ARGS:---models vl2-small --batches 1 --mixes mmmu --new-tokens 16 --routing random-weights --requests 1 \
  --providers hf:eager,moecache,offload --graph-providers moecache --policies predictive --modes eager,graph \
  --profile-decode --deadline $E2E_DEADLINE --keep-going}"
bench bench_mla 80 --heads 16,128 --points 1x4096,64x4096,1x32768 --rep 30
# Each kernel's own time in one MoE layer and one MLA step, beside the call's graph replay time.
stage kernel_times ${KT_LIMIT:-90} bash -c "cd /tmp && python3 '$ROOT/bench/kernel_times.py' --json '$ROWS/kernel_times.jsonl'"
bench bench_prefetch 70 --parts h2d,overlap,misses --experts qwen3-30b-9.4MB,deepseek-v2-lite-17.3MB
# Host time per eager call: direct launches against the custom-op dispatcher, value checks on and off.
bench host_overhead 40
# Block configurations for this GPU (a dozen candidates per point, each checked before it is timed),
# then the layer benchmark again with that table.
stage tune ${TUNE_LIMIT:-120} bash -c "cd /tmp && python3 '$ROOT/bench/tune_moe.py' --focused --out '$TABLE' \
  --shapes ${TUNE_SHAPES:-deepseek-v2-lite/vl2-small mixtral-8x7b} --tokens ${TUNE_TOKENS:-1 16 64}"
[ -f "$TABLE" ] && stage bench_moe-tuned 60 bash -c "cd /tmp && MOECACHE_MOE_CONFIG='$TABLE' python3 \
  '$ROOT/bench/bench_moe.py' --json '$ROWS/bench_moe.jsonl' --shapes deepseek-v2-lite/vl2-small,mixtral-8x7b \
  --tokens 1,4,16,64 --rep 20"

log "summary"
grep -E "vs grouped_mm|moecache(_checked)?:(eager|graph)|grouped_mm:(eager|graph)|^ *(16|128) |h2d |overlap|misses T|vl2-small|decode step|us/call" \
  "$LOG" | head -80 >> "$SUMMARY"
cat "$SUMMARY"
