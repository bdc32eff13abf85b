"""Where one call's GPU time goes: each kernel's own time (CUPTI, through torch.profiler) in an MoE layer
(router matmul, route, align (not for one token), gate/up, down with the combine) and in an MLA decode step, beside the
call's CUDA-graph replay time measured in the same run (L2 flushed before each replay, as bench_moe and
bench_mla time it). Replay time minus the kernels' own time is what launches, dependencies between
kernels and the graph itself add.

Kernel times come from eager calls with value checks off (validate=False: no host sync between the
kernels), each preceded by the same L2 flush, so the weights come from HBM as in the replays.
`grouped_kernel_time` sums a profile's kernels by group (moecache's kernels, matmuls, compiled fusions,
copies, the rest); bench_e2e --profile-decode uses it for a whole model's decode steps.

    python bench/kernel_times.py --json bench/results/kernel_times.jsonl   # GPU
    python bench/kernel_times.py --quick                                    # CPU: the interpreter; op times only
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mla import make_paged_cache  # noqa: E402
from bench_moe import SHAPES, moecache_layer, random_experts  # noqa: E402
from common import _flush_l2, append_rows, cuda_graph_fn, environment, gpu_or_quick, time_ms  # noqa: E402

from moecache import ops  # noqa: E402

MOE_CASES = (("deepseek-v2-lite/vl2-small", 1), ("deepseek-v2-lite/vl2-small", 64), ("mixtral-8x7b", 1),
             ("qwen3-30b-a3b", 1))
MLA_CASES = ((16, 1, 4096), (16, 1, 32768), (16, 64, 4096))  # (heads, requests, tokens each)
QUICK_MOE = {"tiny": (64, 32, 8, 2)}


def moe_call(name, T, shapes, device, dtype):
    H, I, E, K = shapes[name]
    w_gate_up, w_down, router = random_experts(H, I, E, device, dtype)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(1))
    out = torch.empty_like(x)
    return lambda: moecache_layer(x, router, w_gate_up, w_down, K, out)


def mla_call(Hq, B, S, device, dtype, R=512, P=64, block_size=64):
    kv_cache, block_table, seq_lens = make_paged_cache(B, S, R, P, block_size, dtype, device)
    g = torch.Generator(device=device).manual_seed(1)
    q_latent = torch.randn(B, Hq, R, device=device, dtype=dtype, generator=g)
    q_rope = torch.randn(B, Hq, P, device=device, dtype=dtype, generator=g)
    return lambda: ops.mla_decode(q_latent, q_rope, kv_cache, block_table, seq_lens, scale=192**-0.5,
                                  backend="triton", validate=False)


def _device_us(event) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):  # the name changed across torch versions
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def _profile(fn, reps: int, on_gpu: bool, flush: bool):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            if flush:
                _flush_l2()
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    return prof.key_averages()


KERNEL_GROUPS = (  # (group, pattern searched in a kernel's or op's name); the first that matches names it
    ("moecache experts", r"_align_kernel|_grouped_gate_up_kernel|_grouped_down_kernel|_sum_partials_kernel|"
                         r"_gemv_kernel|moecache::fused_moe"),
    ("moecache route", r"_route_kernel|moecache::route"),
    ("moecache mla", r"_mla_decode_|moecache::mla_decode"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|aten::(mm|addmm|bmm|baddbmm|matmul|linear|einsum)$"),
    ("compiled fusions", r"^triton_"),
    ("copy and fill", r"(?i)memcpy|memset|fill_|copy_|Memcpy|Memset"),
)


def kernel_group(name: str) -> str:
    return next((group for group, pattern in KERNEL_GROUPS if re.search(pattern, name)), "other")


def grouped_kernel_time(events, on_gpu: bool) -> dict:
    """{group: {"us": own time, "count": launches}} of a profile's key_averages(): the GPU kernels (CUPTI,
    graph replays included) on a GPU, the ops' own CPU time on a CPU."""
    from torch.autograd import DeviceType

    groups: dict = {}
    for e in events:
        if on_gpu and e.device_type != DeviceType.CUDA:
            continue
        us = _device_us(e) if on_gpu else float(e.self_cpu_time_total)
        group = groups.setdefault(kernel_group(e.key), {"us": 0.0, "count": 0})
        group["us"] += us
        group["count"] += e.count
    return groups


def kernel_table(fn, reps: int, on_gpu: bool) -> list[dict]:
    """[{name, us_per_call, launches_per_call}], largest first: the GPU kernels (copies and memsets too) of
    one call on a GPU, the L2 flush's own kernels taken out (profiled alone, subtracted by name, so a
    kernel of the call that shares a name with one of them keeps its own launches); moecache's ops (CPU
    time) on the interpreter."""
    from torch.autograd import DeviceType

    for _ in range(2):
        fn()
    table = []
    if on_gpu:
        flush = {e.key: e for e in _profile(lambda: None, reps, True, True) if e.device_type == DeviceType.CUDA}
        if not flush:
            raise RuntimeError("kernel_times: the profiler saw no kernel of the L2 flush (is CUPTI tracing on?)")
        for e in _profile(fn, reps, True, True):
            if e.device_type != DeviceType.CUDA:
                continue
            us, count = _device_us(e), e.count
            if e.key in flush:
                us, count = us - _device_us(flush[e.key]), count - flush[e.key].count
            if count > 0:
                table.append({"name": e.key, "us_per_call": max(us, 0.0) / reps, "launches_per_call": count / reps})
    else:
        for e in _profile(fn, reps, False, False):
            if e.key.startswith("moecache::"):
                table.append({"name": e.key, "us_per_call": e.cpu_time_total / reps, "launches_per_call": e.count / reps})
    return sorted(table, key=lambda r: -r["us_per_call"])


def measure(case: str, fn, reps: int, on_gpu: bool, env: dict) -> dict:
    kernels = kernel_table(fn, reps, on_gpu)
    own = sum(k["us_per_call"] for k in kernels)
    row = {**env, "benchmark": "kernel_times", "case": case, "kernels": kernels, "kernel_us_sum": own,
           "timing_method": ("kernels: CUPTI (torch.profiler), eager, L2 flushed; call: CUDA-graph replay, "
                             "CUDA events, L2 flushed" if on_gpu else "interpreter: moecache ops' CPU time")}
    if on_gpu:
        replay_us = time_ms(cuda_graph_fn(fn), warmup=3, rep=reps)["ms"] * 1e3
        row.update(graph_us=replay_us, outside_kernels_us=replay_us - own)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="append the rows to this JSON-lines file")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="CPU: tiny shapes on the interpreter")
    args = parser.parse_args(argv)
    on_gpu, device, dtype = gpu_or_quick(args.quick, "kernel_times")
    env = environment()
    cases = []
    if on_gpu:
        cases += [(f"moe {name} T={T}", lambda n=name, t=T: moe_call(n, t, SHAPES, device, dtype)) for name, T in MOE_CASES]
        cases += [(f"mla {Hq} heads B={B} S={S}", lambda h=Hq, b=B, s=S: mla_call(h, b, s, device, dtype))
                  for Hq, B, S in MLA_CASES]
    else:
        cases += [("moe tiny T=3", lambda: moe_call("tiny", 3, QUICK_MOE, device, dtype)),
                  ("mla 4 heads B=2 S=40", lambda: mla_call(4, 2, 40, device, dtype, R=32, P=8, block_size=16))]
    rows = []
    for case, make in cases:
        row = measure(case, make(), 3 if args.quick else args.reps, on_gpu, env)
        rows.append(row)
        if args.json:
            append_rows(args.json, [row])
        total = f"  replay {row['graph_us']:.1f} us, outside the kernels {row['outside_kernels_us']:.1f} us" \
            if on_gpu else ""
        print(f"{case}: kernels {row['kernel_us_sum']:.1f} us{total}")
        for k in row["kernels"]:
            print(f"    {k['us_per_call']:>9.1f} us  x{k['launches_per_call']:.0f}  {k['name'][:90]}")
        if on_gpu:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
