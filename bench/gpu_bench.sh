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

# Most important first: the layer against grouped_mm, the whole model's CUDA-graph decode against the HBM
# floor, MLA decode, the prefetcher's overlap; diagnostics and tuning last.
bench bench_moe ${MOE_LIMIT:-90} --shapes deepseek-v2-lite/vl2-small,mixtral-8x7b --tokens 1,16,64,4096 --rep 20
# One point of the study (gpu_study.sh runs its slices), in two stages: the resident graph row first (64 new
# tokens: decode is the run less a one-token generate), then the eager rows. Each stage's deadline (no
# configuration starts after it) follows its limit, cut where little time is left.
e2e() {  # e2e NAME LIMIT ARGS...
  local name=$1 limit=$2; shift 2
  (( limit > $(remaining) - 5 )) && limit=$(( $(remaining) - 5 ))
  local deadline=$(( limit > 40 ? limit - 20 : 20 ))
  stage "$name" "$limit" bash -c "cd /tmp && python3 '$ROOT/bench/bench_e2e.py' --json '$ROWS/study.jsonl' \
    --models vl2-small --batches 1 --mixes mmmu --routing random-weights --requests 1 --deadline $deadline --keep-going $*"
}
e2e e2e-graph ${E2E_GRAPH_LIMIT:-120} ${E2E_GRAPH_ARGS:---new-tokens 64 --providers moecache --graph-providers moecache --modes graph}
bench bench_mla 60 --heads 16,128 --points 64x4096,1x4096,1x32768 --rep 30
bench bench_prefetch 60 --parts overlap,h2d --experts deepseek-v2-lite-17.3MB
bench bench_moe 45 --shapes qwen3-30b-a3b,vl2-base --tokens 1,4096 --rep 20
e2e e2e-eager ${E2E_EAGER_LIMIT:-120} ${E2E_EAGER_ARGS:---new-tokens 16 --providers hf:eager,moecache,offload --policies predictive --modes eager --profile-decode}
# Each kernel's own time in one MoE layer and one MLA step, beside the call's graph replay time.
stage kernel_times ${KT_LIMIT:-90} bash -c "cd /tmp && python3 '$ROOT/bench/kernel_times.py' --json '$ROWS/kernel_times.jsonl'"
bench bench_prefetch 45 --parts misses
# Host time per eager call: direct launches against the custom-op dispatcher, value checks on and off.
bench host_overhead 40
# Host memory while a model loaded in host memory is offloaded onto the GPU (handed over, pinned in place)
bench host_memory 45 --expert-mib 2048
# Block configurations for this GPU (a dozen candidates per point, each checked before it is timed),
# then the layer benchmark again with that table.
stage tune ${TUNE_LIMIT:-120} bash -c "cd /tmp && python3 '$ROOT/bench/tune_moe.py' --focused --out '$TABLE' \
  --shapes ${TUNE_SHAPES:-deepseek-v2-lite/vl2-small mixtral-8x7b} --tokens ${TUNE_TOKENS:-1 16 64}"
[ -f "$TABLE" ] && stage bench_moe-tuned 60 bash -c "cd /tmp && MOECACHE_MOE_CONFIG='$TABLE' python3 \
  '$ROOT/bench/bench_moe.py' --json '$ROWS/bench_moe.jsonl' --shapes deepseek-v2-lite/vl2-small,mixtral-8x7b \
  --tokens 1,4,16,64 --rep 20"

log "summary"
grep -E "vs grouped_mm|moecache(_checked)?:(eager|graph)|grouped_mm:(eager|graph)|^ *(16|128) |\[ *(pass|FAIL|n/a)\]|h2d |overlap|misses T|HBM floor|decode step|us/call|peak RSS rise" \
  "$LOG" | head -200 >> "$SUMMARY"
cat "$SUMMARY"
