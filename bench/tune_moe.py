"""Tune fused_moe's block configurations on this GPU and write a table select_config reads.

For each shape and token count, every candidate configuration is first checked against the fp32
reference (a wrong configuration never wins), then timed as a CUDA-graph replay with the L2 flushed;
the fastest is kept. The table goes to moecache's shipped folder (kernels/configs/fused_moe-<device>.json,
picked up automatically on a device of that name after reinstalling) or to --out (use it with
MOECACHE_MOE_CONFIG=path).

    python bench/tune_moe.py                         # GPU: the bench_moe shapes, all token counts (long:
                                                     # ~100 candidates per point, each compiled once)
    python bench/tune_moe.py --quick --out /tmp/t.json   # CPU smoke run (interpreter, tiny shape)
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import SHAPES, TOKENS  # noqa: E402
from common import cuda_graph_fn, environment, time_ms  # noqa: E402

from moecache import kernels  # noqa: E402
from moecache.kernels.fused_moe import fused_moe_launch, select_config, shape_key  # noqa: E402
from moecache.ops.api import device_slug  # noqa: E402
from moecache.ops.reference import fused_moe_reference, route_reference  # noqa: E402
from moecache.testing import TOLERANCES  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def focused_candidates(num_tokens: int, shape: tuple) -> list[dict]:
    """A dozen candidates around the heuristic's choice (a short GPU run): both paths up to 16 tokens."""
    H, I, E, K = shape
    out = [select_config(num_tokens, K, E, H, I, False)]
    if num_tokens <= 16:
        for bn, bn_down, bk, warps in ((16, 16, 256, 4), (32, 32, 128, 4), (8, 8, 256, 4), (16, 32, 256, 8)):
            out.append({"path": "decode", "BLOCK_N": bn, "BLOCK_N_DOWN": bn_down, "BLOCK_K": bk,
                        "num_warps": warps, "num_stages": 3})
        for bn, bk, stages in ((64, 128, 4), (128, 128, 3), (64, 256, 3), (32, 256, 4)):
            out.append({"path": "grouped", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4,
                        "num_stages": stages})
    elif num_tokens <= 256:
        for bm, bn, bk in ((16, 64, 128), (16, 128, 128), (32, 64, 128), (32, 128, 64), (64, 64, 64), (64, 128, 64)):
            out.append({"path": "grouped", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4,
                        "num_stages": 4})
        if K > 1:  # the combine as its own kernel, on the heuristic's tiles
            out.append({**out[0], "COMBINE": "separate"})
    else:
        for bm, bn, bk, warps, stages in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                          (128, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4)):
            out.append({"path": "grouped", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps,
                        "num_stages": stages})
        if K > 1:  # the combine as its own kernel: the down GEMM's epilogue is then a plain store
            distinct = [c for i, c in enumerate(out) if c not in out[:i]]
            out += [{**c, "COMBINE": "separate"} for c in distinct[:2]]
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def candidates(num_tokens: int, quick: bool) -> list[dict]:
    if quick:
        if num_tokens <= 4:
            return [{"path": "decode", "BLOCK_N": bn, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1} for bn in (16, 32)]
        return [{"path": "grouped", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1,
                 **combine} for bn in (16, 32) for combine in ({}, {"COMBINE": "separate"})]
    out = []
    if num_tokens <= 16:
        for bn, bn_down, bk, warps, stages in itertools.product((8, 16, 32), (4, 8, 16, 32), (128, 256), (4, 8), (3, 4)):
            out.append({"path": "decode", "BLOCK_N": bn, "BLOCK_N_DOWN": bn_down, "BLOCK_K": bk,
                        "num_warps": warps, "num_stages": stages})
    if num_tokens >= 4:
        for bm, bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (64, 128, 256), (64, 128), (4, 8), (3, 4)):
            if bm * bn >= 128 * 256 and warps == 4:
                continue
            out.append({"path": "grouped", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps,
                        "num_stages": stages})
            if bm >= 64 and num_tokens >= 256:
                out.append({**out[-1], "COMBINE": "separate"})
    return out


def make_inputs(T, H, I, E, K, dtype, device):
    g = torch.Generator(device=device).manual_seed(T)  # on the device: Mixtral's experts are 2.8 GB
    x = torch.randn(T, H, generator=g, device=device).to(dtype)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=g, device=device, dtype=dtype) / H**0.5)
    w_down = (torch.randn(E, H, I, generator=g, device=device, dtype=dtype) / I**0.5)
    weights, ids = route_reference(torch.randn(T, E, generator=g, device=device), K)
    return x, w_gate_up, w_down, weights, ids


def tune_one(T, H, I, E, K, *, dtype, device, quick, focused=False) -> tuple[dict, list]:
    x, wgu, wd, w, ids = make_inputs(T, H, I, E, K, dtype, device)
    ref = fused_moe_reference(x, wgu, wd, w, ids)
    rtol = TOLERANCES[dtype]
    out = torch.empty_like(x)
    tried = []
    for config in (focused_candidates(T, (H, I, E, K)) if focused and not quick else candidates(T, quick)):
        def run(config=config):
            fused_moe_launch(x, wgu, wd, w, ids, out, activation="silu", expert_map=None, host_w_gate_up=None,
                             host_w_down=None, b_gate_up=None, b_down=None, gate_up_interleaved=False, config=config)
        out.fill_(float("nan"))
        try:
            run()
        except Exception as exc:  # e.g. out of shared memory for this tile: skip the candidate
            tried.append({"config": config, "error": type(exc).__name__})
            continue
        err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        if not err <= rtol:
            tried.append({"config": config, "error": f"rel err {err:.2e} > {rtol}"})
            continue
        fn = cuda_graph_fn(run) if device == "cuda" else run
        timing = time_ms(fn, warmup=1 if quick else 5, rep=1 if quick else 30, device=device)
        tried.append({"config": config, "ms": timing["ms"]})
    timed = [t for t in tried if "ms" in t]
    if not timed:
        raise RuntimeError(f"no candidate configuration ran correctly for T={T} {shape_key(H, I, E, K)}: {tried}")
    return min(timed, key=lambda t: t["ms"]), tried


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shape, two token counts")
    p.add_argument("--out", help="table path (default: kernels/configs/fused_moe-<device>.json)")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), help="names from bench_moe.SHAPES")
    p.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    p.add_argument("--focused", action="store_true",
                   help="a dozen candidates per point around the heuristic (minutes, not hours)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        p.error("tuning needs a CUDA device (use --quick for the CPU smoke run)")
    if args.quick:
        shapes, tokens, dtype = {"tiny": (64, 32, 8, 2)}, (2, 24), torch.float32
    else:
        shapes, tokens, dtype = {n: SHAPES[n] for n in args.shapes}, args.tokens, torch.bfloat16
    slug = device_slug(torch.device(device))
    out_path = Path(args.out) if args.out else REPO / "kernels" / "configs" / f"fused_moe-{slug}.json"
    table = json.loads(out_path.read_text()) if out_path.is_file() else {"device_slug": slug, "configs": {}}
    for name, (H, I, E, K) in shapes.items():
        entry = table["configs"].setdefault(shape_key(H, I, E, K), {})
        for T in tokens:
            best, tried = tune_one(T, H, I, E, K, dtype=dtype, device=device, quick=args.quick,
                                   focused=args.focused)
            heuristic = select_config(T, K, E, H, I, kernels.INTERPRETING)
            heuristic_ms = next((t["ms"] for t in tried if t["config"] == heuristic and "ms" in t), None)
            entry[str(T)] = best["config"]
            note = f"heuristic {heuristic_ms:.4f} ms" if heuristic_ms is not None else "heuristic not among candidates"
            print(f"{name} T={T}: {best['ms']:.4f} ms with {best['config']} ({note}; {len(tried)} tried)", flush=True)
            for t in sorted(tried, key=lambda t: t.get("ms", float("inf"))):
                print(f"    {t.get('ms', float('nan')):.4f} ms  {t['config']}  {t.get('error', '')}", flush=True)
            # After each point: a run stopped at its time limit keeps the points it finished.
            table.update({"device_slug": slug, "tuned_with": environment()})
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
