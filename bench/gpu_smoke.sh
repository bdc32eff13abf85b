#!/usr/bin/env bash
# The first GPU run: correctness before speed, most important facts first, <= 9 minutes with the build.
#   bash bench/gpu_smoke.sh              (logs and JSON under $OUT, else bench/results/gpu-run/)
#   DRY_RUN=1 bash bench/gpu_smoke.sh    (CPU: the plan, the stages and the summary, nothing run)
# Stages: versions and driver; ceilings while moecache builds with CUDA; every kernel at the real shapes
# in bf16 against the fp32 references (bench/gpu_smoke.py); the gpu-marked tests without torch.compile;
# compute-sanitizer memcheck on tiny cases; the torch.compile tests; a summary. Files in $OUT:
# run.log, summary.txt, pytest.xml, pytest-compile.xml, and rows.tgz (smoke.jsonl, ceilings.json).
set -uo pipefail
source "$(dirname "$0")/gpu_lib.sh"
cd "$ROOT"
[ "${APPEND:-0}" = 1 ] || : > "$SUMMARY"
export MOECACHE_REQUIRE_GPU=1

log "versions"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import transformers; print('transformers', transformers.__version__)"; nvcc --version | tail -1; } >> "$LOG" 2>&1

# The build uses the CPUs, the ceilings the GPU: run them side by side.
stage ceilings 90 python3 bench/ceilings.py --json "$ROWS/ceilings.json" &
CEIL=$!
ensure_built
wait $CEIL
stage info 30 bash -c 'cd /tmp && python3 -m moecache info'
stage kernels-bf16 ${SMOKE_LIMIT:-120} bash -c "cd /tmp && python3 '$ROOT/bench/gpu_smoke.py' --json '$ROWS/smoke.jsonl'"
stage gpu-tests ${TESTS_LIMIT:-150} pytest -v --tb=short -p no:cacheprovider -m "gpu and not compile" --durations=15 \
  ${TESTS_K:+-k "$TESTS_K"} \
  --junitxml="$JUNIT_DIR/pytest.xml"
stage sanitizer ${SANITIZER_LIMIT:-80} env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
  --error-exitcode 9 --print-limit 20 python3 "$ROOT/bench/gpu_smoke.py" --tiny --dtype float16 \
  --sections moe,map,route,mla,cache
stage compile-tests ${COMPILE_LIMIT:-150} pytest -v --tb=short -p no:cacheprovider -m "gpu and compile" --durations=10 \
  --junitxml="$JUNIT_DIR/pytest-compile.xml"

log "summary"
{ echo "--- kernel checks"; grep -E "^(FAIL|gpu_smoke:)" "$LOG" | head -40
  echo "--- tests"; grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOG" | head -40
  echo "--- sanitizer"; grep -E "ERROR SUMMARY|Invalid|out of bounds" "$LOG" | head -10; } >> "$SUMMARY"
cat "$SUMMARY"
