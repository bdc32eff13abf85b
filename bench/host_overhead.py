"""Host time per eager call of moecache's ops: what a CPU-bound eager decode (transformers' generate
without CUDA graphs) pays per MoE layer and per MLA step before the GPU sees any work.

For each op, in the same process and at the same shapes:
  - direct:     the op as a patched model calls it under torch.no_grad() (argument checks, then the
                kernels launched without the custom-op dispatcher; fused_moe with validate=False)
  - checked:    fused_moe with its default value checks (one host sync per call)
  - dispatcher: the same launches through the registered custom op (torch.ops.moecache.*), as every
                eager call went before (and as calls that autograd must see still go)
Host time is the wall time of a burst of calls issued back to back without synchronising, per call
(the GPU queue does not fill: a burst is far shorter than the queue); device time per call, from the
burst's start to the end of its work, is printed beside it. Shapes: the DeepSeek-V2-Lite / VL2-Small
MoE layer at T = 1, its routing, and MLA decode with 16 heads at B = 1, S = 4K.

    python bench/host_overhead.py --json bench/results/host_overhead.jsonl   # GPU
    python bench/host_overhead.py --quick                                     # CPU: the interpreter, tiny shapes
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mla import make_paged_cache  # noqa: E402
from bench_moe import SHAPES, random_experts  # noqa: E402
from common import append_rows, environment, gpu_or_quick  # noqa: E402

from moecache import ops  # noqa: E402
from moecache.ops import api, mla  # noqa: E402


def burst_us(fn, calls: int, bursts: int, on_gpu: bool) -> tuple[float, float]:
    """(median host us per call, median device-inclusive us per call) over `bursts` bursts of `calls`."""
    host, total = [], []
    for _ in range(bursts):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        if on_gpu:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e6 / calls)
        total.append((t2 - t0) * 1e6 / calls)
    return statistics.median(host), statistics.median(total)


def cases(on_gpu: bool, device, dtype):
    """{op: {variant: fn}} at the benchmark's shapes (tiny ones on CPU)."""
    H, I, E, K = SHAPES["deepseek-v2-lite/vl2-small"] if on_gpu else (64, 32, 8, 2)
    w_gate_up, w_down, router = random_experts(H, I, E, device, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, H, device=device, dtype=dtype, generator=g)
    logits = (x @ router.t()).float()
    weights, ids = ops.route(logits, K, backend="triton")
    out = torch.empty_like(x)
    moe_args = (x, w_gate_up, w_down, weights, ids, *api.gated_activation("silu"), None, None, None, None, None, False,
                True, out)
    R, P, S = (512, 64, 4096) if on_gpu else (32, 8, 40)
    Hq, block_size = (16, 64) if on_gpu else (4, 16)
    kv_cache, block_table, seq_lens = make_paged_cache(1, S, R, P, block_size, dtype, device)
    q_latent = torch.randn(1, Hq, R, device=device, dtype=dtype, generator=g)
    q_rope = torch.randn(1, Hq, P, device=device, dtype=dtype, generator=g)
    mla_args = (q_latent, q_rope, kv_cache, block_table, seq_lens)
    return {
        "fused_moe": {
            "direct": lambda: ops.fused_moe(x, w_gate_up, w_down, weights, ids, out=out, backend="triton",
                                            validate=False),
            "checked": lambda: ops.fused_moe(x, w_gate_up, w_down, weights, ids, out=out, backend="triton"),
            "dispatcher": lambda: (api._check_fused_moe_args(*moe_args[:6], *moe_args[9:14], validate=False),
                                   torch.ops.moecache.fused_moe(*moe_args)),
        },
        "route": {
            "direct": lambda: ops.route(logits, K, backend="triton"),
            "dispatcher": lambda: torch.ops.moecache.route(logits, None, K, False, True, 1, 1, 1.0),
        },
        "mla_decode": {
            "direct": lambda: ops.mla_decode(*mla_args, scale=0.07, backend="triton", validate=False),
            "dispatcher": lambda: (mla._check_mla_args(*mla_args, 0.07, validate=False),
                                   torch.ops.moecache.mla_decode(*mla_args, 0.07)),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="append the rows to this JSON-lines file")
    parser.add_argument("--calls", type=int, default=200, help="calls per burst")
    parser.add_argument("--bursts", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="CPU: tiny shapes on the interpreter")
    args = parser.parse_args(argv)
    on_gpu, device, dtype = gpu_or_quick(args.quick, "host_overhead")
    calls, bursts = (args.calls, args.bursts) if on_gpu else (3, 2)
    env = environment()
    rows = []
    with torch.no_grad():
        for op, variants in cases(on_gpu, device, dtype).items():
            for variant, fn in variants.items():
                for _ in range(3):
                    fn()  # compiled and cached before the clock starts
                host, total = burst_us(fn, calls, bursts, on_gpu)
                rows.append({**env, "benchmark": "host_overhead", "op": op, "variant": variant,
                             "host_us_per_call": host, "device_inclusive_us_per_call": total,
                             "calls_per_burst": calls, "bursts": bursts,
                             "timing_method": "perf_counter around a burst without synchronising, median of bursts"
                             if on_gpu else "interpreter: kernels run on the CPU inside the host time"})
                print(f"{op:<11} {variant:<11} host {host:>9.1f} us/call   with the device's work {total:>9.1f} us/call")
                if args.json:  # row by row: a run stopped at its time limit keeps what it measured
                    append_rows(args.json, rows[-1:])
    if args.json:
        print(f"{len(rows)} rows -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
