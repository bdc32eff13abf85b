#!/usr/bin/env bash
# Build moecache._C with ThreadSanitizer (host backend) into a scratch folder and run the cache stress
# test under it. Fails if TSAN reports anything. Takes ~2 minutes on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK") 2>/dev/null || cp -r "$ROOT"/. "$WORK"
(cd "$WORK" && MOECACHE_SANITIZE=thread MOECACHE_BUILD_CUDA=0 python -m pip install --no-build-isolation --no-deps -q --target "$WORK/site" .)
PY=$(python -c "import sys; print(sys.executable)")
TSAN=$(gcc -print-file-name=libtsan.so)
# setarch -R: TSAN cannot map its shadow memory with the kernel's full ASLR entropy.
cd "$WORK" && TSAN_OPTIONS="report_signal_unsafe=0 exitcode=66" LD_PRELOAD=$(readlink -f "$TSAN") PYTHONPATH="$WORK/site" \
  setarch "$(uname -m)" -R "$PY" "$ROOT/tests/sanitizer/stress.py" 2>&1 | tee "$WORK/tsan.log"
if grep -q "WARNING: ThreadSanitizer" "$WORK/tsan.log"; then
  echo "ThreadSanitizer reported races"; exit 1
fi
echo "ThreadSanitizer: no reports"
