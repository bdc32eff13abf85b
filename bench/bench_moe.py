"""Whole MoE layer (route, permute, both expert GEMMs, combine), bf16, against baselines in the same run:
  - hf_loop:    transformers' eager expert loop (one pair of GEMMs per touched expert, softmax top-k routing)
  - grouped_mm: torch routing + argsort permutation + torch._grouped_mm (F.grouped_mm) + index_add combine
  - moecache:   ops.route + ops.fused_moe(validate=False), as a patched model's layer runs it
  - moecache_checked: the same with the op's default value checks (one host sync per call), eager, T <= 64
  - moecache_separate: the same, with the top-k combine as its own kernel (config COMBINE "separate")
                instead of fused into the down GEMM (K > 1); checked bit for bit against moecache first
Each is timed eagerly and, for T <= 64, as a CUDA-graph replay (launch overhead removed), with the L2
flushed before every run. GB/s counts the bytes of the expert weights the batch touches; ratios are to
the HBM and bf16 matmul ceilings measured at the start of the run.

    python bench/bench_moe.py --json bench/results/bench_moe.jsonl      # GPU
    python bench/bench_moe.py --quick                                    # CPU smoke run (interpreter)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, cuda_graph_fn, measure_ceilings, row, time_ms  # noqa: E402

from moecache import ops  # noqa: E402
from moecache.analysis.costs import expert_bytes, expert_loop_reference, moe_flops  # noqa: E402

SHAPES = {  # name: (H, I, E, K)
    "deepseek-v2-lite/vl2-small": (2048, 1408, 64, 6),
    "vl2-base": (2560, 1536, 72, 6),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def random_experts(H, I, E, device, dtype):
    """(w_gate_up [E, 2I, H], w_down [E, H, I], router [E, H]): seeded random weights at unit output scale."""
    g = torch.Generator(device=device).manual_seed(0)
    w_gate_up = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=g) * H**-0.5
    w_down = torch.randn(E, H, I, device=device, dtype=dtype, generator=g) * I**-0.5
    router = torch.randn(E, H, device=device, dtype=dtype, generator=g) * H**-0.5
    return w_gate_up, w_down, router


def torch_route(logits, k):
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def grouped_mm_layer(x, router, w_gate_up_t, w_down_t, k):
    """A capture-safe torch layer on torch's grouped GEMM (weights pre-transposed to [E, H, 2I] / [E, I, H])."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    T = x.shape[0]
    E = w_gate_up_t.shape[0]
    w, ids = torch_route(x @ router.t(), k)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tokens = order // k
    xs = x[tokens]
    h = grouped_mm(xs, w_gate_up_t, offs=offs)
    inter = w_down_t.shape[1]
    h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    y = grouped_mm(h, w_down_t, offs=offs)
    y = y.float() * w.reshape(-1)[order, None]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tokens, y)
    return out.to(x.dtype)


def moecache_layer(x, router, w_gate_up, w_down, k, out, validate=False):
    w, ids = ops.route(x @ router.t(), k, backend="triton")  # the kernels on every device (interpreter on CPU)
    return ops.fused_moe(x, w_gate_up, w_down, w, ids, out=out, backend="triton", validate=validate)


def separate_combine_config(T, k, w_gate_up, x) -> dict:
    """The op's own block configuration for this call, with the combine as a separate kernel."""
    from moecache.ops.api import _moe_config

    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    return {**_moe_config(T, k, E, x.shape[1], I, x.device, x.element_size()), "COMBINE": "separate"}


def moecache_separate_layer(x, router, w_gate_up, w_down, k, out):
    """moecache_layer with the combine as a separate kernel: the op's argument checks (its value checks
    skipped, as in moecache_layer), then its kernels with COMBINE "separate"."""
    from moecache.kernels.fused_moe import fused_moe_launch
    from moecache.ops.api import _check_fused_moe_args

    w, ids = ops.route(x @ router.t(), k, backend="triton")
    _check_fused_moe_args(x, w_gate_up, w_down, w, ids, "silu", None, None, None, None, None, validate=False)
    config = separate_combine_config(x.shape[0], k, w_gate_up, x)
    return fused_moe_launch(x, w_gate_up, w_down, w, ids, out, activation="silu",
                            expert_map=None, host_w_gate_up=None,
                            host_w_down=None, b_gate_up=None, b_down=None, gate_up_interleaved=False, config=config)


def hf_loop_layer(x, router, w_gate_up, w_down, k):
    w, ids = torch_route(x @ router.t(), k)
    return expert_loop_reference(x, w_gate_up, w_down, w.to(x.dtype), ids)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="append JSON rows to this file")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from: " + ", ".join(SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--rep", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU (checks the script, measures nothing useful)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.quick
    device = "cuda" if on_gpu else "cpu"
    if args.quick:
        shapes = {"tiny": (64, 32, 8, 2)}
        tokens = [1, 8]
        dtype, rep = torch.float32, 2
        providers = ("hf_loop", "moecache", "moecache_checked", "moecache_separate")
    else:
        shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
        tokens = [int(t) for t in args.tokens.split(",")]
        dtype, rep = torch.bfloat16, args.rep
        providers = ("hf_loop", "grouped_mm", "moecache", "moecache_checked", "moecache_separate")
    ceilings = measure_ceilings() if on_gpu else {}
    if ceilings:
        print(f"ceilings: HBM copy {ceilings['hbm_gbps']:.0f} GB/s, HBM read {ceilings['hbm_read_gbps']:.0f} GB/s, "
              f"bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s")
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(it, **_):
            return it
    work = [(name, T) for name in shapes for T in tokens]
    header = f"{'shape':<28}{'T':>6}  {'provider':<18}{'ms':>9}{'GB/s':>9}{'TFLOP/s':>9}{'read%':>7}  vs grouped_mm"
    lines = []
    cache = {}
    for name, T in tqdm(work, desc="bench_moe", disable=not on_gpu):
        H, I, E, K = shapes[name]
        if name not in cache:
            cache.clear()
            if on_gpu:
                torch.cuda.empty_cache()
            w_gate_up, w_down, router = random_experts(H, I, E, device, dtype)
            cache[name] = (w_gate_up, w_down, router, w_gate_up.transpose(1, 2).contiguous() if on_gpu else None,
                           w_down.transpose(1, 2).contiguous() if on_gpu else None)
        w_gate_up, w_down, router, wgu_t, wd_t = cache[name]
        x = torch.randn(T, H, device=device, dtype=dtype)
        _, ids = torch_route(x @ router.t(), K)
        touched = int(torch.unique(ids).numel())
        nbytes = expert_bytes(touched, H, I, x.element_size())
        flops = moe_flops(T * K, H, I)
        out = torch.empty_like(x)
        fns = {
            "hf_loop": lambda: hf_loop_layer(x, router, w_gate_up, w_down, K),
            "grouped_mm": lambda: grouped_mm_layer(x, router, wgu_t, wd_t, K),
            "moecache": lambda: moecache_layer(x, router, w_gate_up, w_down, K, out),
            "moecache_checked": lambda: moecache_layer(x, router, w_gate_up, w_down, K, out, validate=True),
            "moecache_separate": lambda: moecache_separate_layer(x, router, w_gate_up, w_down, K, out),
        }
        shape = {"name": name, "T": T, "H": H, "I": I, "E": E, "K": K, "dtype": str(dtype).replace("torch.", ""),
                 "experts_touched": touched}
        base_ms = {}
        first_row = len(rows)
        for provider in providers:
            if provider == "hf_loop" and T > 4096:
                continue  # minutes per shape; its trend is clear well before
            if provider == "moecache_checked" and T > 64:
                continue  # the checks' cost is the host sync, which matters where the layer is short
            if provider == "moecache_separate":
                if K == 1 or T < 8 or separate_combine_config(T, K, w_gate_up, x)["path"] != "grouped":
                    continue  # no combine to separate; at a few tokens the extra launch only adds
                fused = moecache_layer(x, router, w_gate_up, w_down, K, torch.empty_like(x))
                separate = moecache_separate_layer(x, router, w_gate_up, w_down, K, torch.empty_like(x))
                if not torch.equal(fused, separate):
                    raise AssertionError(f"{name} T={T}: the separate combine differs from the fused one")
            variants = [("eager", fns[provider])]
            if on_gpu and T <= 64 and provider not in ("hf_loop", "moecache_checked"):  # checks skip in capture
                try:
                    variants.append(("graph", cuda_graph_fn(fns[provider])))
                except Exception as exc:  # report, do not hide: a provider that cannot be captured
                    print(f"  {provider} T={T}: CUDA graph capture failed: {type(exc).__name__}: {exc}")
            for mode, fn in variants:
                try:
                    timing = time_ms(fn, warmup=3, rep=rep if provider != "hf_loop" else max(3, rep // 5), device=device)
                except Exception as exc:
                    print(f"  {provider} {mode} T={T}: failed: {type(exc).__name__}: {exc}")
                    continue
                r = row("bench_moe", shape, f"{provider}:{mode}", timing, bytes_moved=nbytes, flops=flops, ceilings=ceilings)
                rows.append(r)
                base_ms[(provider, mode)] = timing["ms"]
                vs = base_ms.get(("grouped_mm", mode))
                speedup = f"{vs / timing['ms']:.2f}x" if vs and provider.startswith("moecache") else ""
                lines.append(f"{name:<28}{T:>6}  {provider + ':' + mode:<18}{timing['ms']:>9.4f}{r['gbps']:>9.0f}"
                             f"{r['tflops']:>9.1f}{100 * r.get('frac_hbm_read', 0):>6.0f}%  {speedup}")
        if args.json:  # after each point: a run stopped at its time limit keeps the points it finished
            table = os.environ.get("MOECACHE_MOE_CONFIG")  # a tuned block-config table, if one was used
            rows_here = [{**r, "ceilings": ceilings, "config_table": table} for r in rows[first_row:]]
            path = append_rows(args.json, rows_here)
    print(header)
    print("\n".join(lines))
    if args.json and rows:
        print(f"{len(rows)} rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
