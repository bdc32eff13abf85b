"""Compile moecache's Triton kernels for a GPU target without a GPU (ahead of time), through the
project's own launchers, and report what the compiled code needs: registers, spills, stack, shared
memory, occupancy, and whether the PTX holds fences.

The launchers run on `device="meta"` tensors with a capturing launcher, so grids, constexprs,
num_warps/num_stages and the JIT's specialisations (an int equal to 1 becomes a constant, a multiple
of 16 carries a divisibility hint) are the ones a real launch would use. Each captured launch goes
through triton.compile for the target, and its PTX through the ptxas that ships with Triton (-v).

    TRITON_INTERPRET=0 python tests/aot_compile.py --arch 90 --groups moe,mla --json rows.jsonl

Exit status 1 when a kernel fails to compile, spills registers (production bf16/fp16 configs at the real
model shapes, and the fp32/fp16 configs the tests run on a GPU), needs more shared memory than the
target has, or (align kernel) carries a fence in its PTX.
`--float-type fp64` compiles float scalar arguments as fp64, the type torch.compile's inductor gives
them when it compiles user Triton kernels (triton_op), instead of the JIT's fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("aot_compile: run with TRITON_INTERPRET=0 (interpreted kernels cannot be compiled)")
os.environ["TRITON_INTERPRET"] = "0"  # keeps moecache from switching the interpreter on (no GPU here)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

from moecache.kernels import fused_moe as fm  # noqa: E402
from moecache.kernels import mla_decode as md  # noqa: E402
from moecache.kernels import moe_route as mr  # noqa: E402

# Shared memory a block may use (opt-in maximum) per architecture.
SMEM_LIMIT = {80: 166912, 90: 232448}
ARCH = 90  # the target being compiled for (set from --arch): the heuristics pick tiles per architecture
REGS_PER_SM = 65536

MOE_SHAPES = {  # (H, I, E, K)
    "v2lite": (2048, 1408, 64, 6),
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "v3": (7168, 2048, 256, 8),
}
MOE_TOKENS = (1, 16, 64, 512, 4096)
# MoE-LLaVA's experts (4, top-2): Phi-2's non-gated fc1/fc2 with biases, StableLM's and Qwen's SwiGLU;
# and non-gated squared-ReLU experts without biases, as Nemotron-H keeps them (many small experts).
MOE_LLAVA_SHAPES = {  # name: ((H, I, E, K), activation, gated, biases)
    "phi2": ((2560, 10240, 4, 2), "gelu_tanh", False, True),
    "stablelm": ((2048, 5632, 4, 2), "silu", True, False),
    "qwen": ((2048, 5504, 4, 2), "silu", True, False),
    "relu2-non-gated": ((2048, 1024, 128, 6), "relu2", False, False),
}
# fp32/fp16 shapes and token counts the GPU tests use (they run there in fp32 too).
TEST_MOE_CASES = (((40, 24, 8, 3), 26), ((72, 40, 7, 2), 37), ((64, 32, 8, 2), 3), ((2048, 1408, 64, 6), 4096),
                  ((2048, 1408, 64, 6), 512), ((1024, 768, 8, 2), 300), ((512, 256, 16, 4), 64))
# bf16 shapes and token counts of the gpu-marked tests (test_fused_moe, test_cache).
GPU_TEST_MOE_CASES = tuple(((512, 192, 72, 6), T) for T in (1, 4, 16, 17, 64, 300, 2048)) + tuple(
    ((1024, 768, 8, 2), T) for T in (1, 17, 300, 2048)) + (((1024, 512, 32, 4), 300), ((1024, 512, 64, 8), 4096))
ROUTE_CASES = {  # name: (E, K, sigmoid, bias, n_group, topk_group)
    "v2lite": (64, 6, False, False, None, None),
    "mixtral": (8, 2, False, False, None, None),
    "qwen3": (128, 8, False, False, None, None),
    "v2-group": (160, 6, False, False, 8, 3),
    "v3": (256, 8, True, True, 8, 4),
}


class Capture:
    """A launcher that records (kernel, grid, args, kwargs) instead of launching."""

    def __init__(self):
        self.records = []

    def __call__(self, kernel):
        records = self.records

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: records.append((kernel, grid, args, kwargs))
        return _Grid()


def meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def specialise(fn, args, kwargs, float_type):
    """(signature, constexprs, attrs, options) as the JIT would build them for this call."""
    bound = dict(zip(fn.arg_names, args))
    options = {}
    for k, v in kwargs.items():
        (bound if k in fn.arg_names else options)[k] = v
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, attr = native_specialize_impl(BaseBackend, v, False, True, True)
        if ty == "fp32" and isinstance(v, float):
            ty = float_type
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = v
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs, options


def ptxas_report(ptx: str, arch: int) -> dict:
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        r = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    log = r.stderr + r.stdout

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return {"regs": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def occupancy(regs: int, warps: int, smem: int, arch: int) -> int:
    """Blocks per SM allowed by registers, shared memory and threads."""
    threads = 32 * warps
    by_regs = REGS_PER_SM // (((regs + 7) // 8) * 8 * threads) if regs else 32
    by_smem = (SMEM_LIMIT[arch] + 1024) // (smem + 1024) if smem else 32
    return max(0, min(by_regs, by_smem, 2048 // threads, 32))


_compiled: dict = {}


def compile_launch(tag, kernel, grid, args, kwargs, *, arch, float_type, production, expect=None):
    sig, cex, attrs, opts = specialise(kernel, args, kwargs, float_type)
    key = (kernel.__name__, arch, json.dumps(sig, sort_keys=True), repr(sorted(cex.items())),
           repr(sorted(attrs.items())), repr(sorted(opts.items())))
    row = {"tag": tag, "kernel": kernel.__name__, "arch": arch, "grid": [int(g) for g in grid],
           "float_type": float_type, "production": production, "expect": expect,
           "constexprs": {kernel.arg_names[k[0]]: v if isinstance(v, (int, float, bool, str)) else str(v)
                          for k, v in cex.items()}, **opts}
    if key in _compiled:
        return {**row, **_compiled[key], "cached": True}
    t0 = time.time()
    try:
        compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=cex, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as exc:  # a compile error is the finding
        result = {"error": f"{type(exc).__name__}: {str(exc)[-600:]}"}
    else:
        ptx = compiled.asm["ptx"]
        smem = compiled.metadata.shared
        warps = compiled.metadata.num_warps
        # Shared-memory ring buffers the pipeliner made for rank-2 tiles (memdesc<N x rows x cols>).
        rings = [int(n) for n in re.findall(r"memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])]
        result = {**ptxas_report(ptx, arch), "smem": smem, "num_warps": warps,
                  "num_stages": compiled.metadata.num_stages, "fences": len(re.findall(r"\bfence\.", ptx)),
                  "barriers": len(re.findall(r"\bbar\.sync\b", ptx)), "tile_buffers": max(rings, default=0),
                  "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)), "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx))}
        result["blocks_per_sm"] = occupancy(result["regs"], warps, smem, arch)
    result["compile_s"] = round(time.time() - t0, 2)
    _compiled[key] = result
    return {**row, **result}


def problems(row) -> list[str]:
    """What makes a compiled kernel unacceptable."""
    out = []
    if row.get("error"):
        out.append(row["error"])
        return out
    if row["smem"] > SMEM_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[row['arch']]} B")
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']}/{row['spill_loads']} B")
    if any(g > 65535 for g in row["grid"][1:]):
        out.append(f"grid {row['grid']}: CUDA caps axes 1 and 2 at 65535")
    if row["kernel"] == "_align_kernel" and row["fences"]:
        out.append(f"{row['fences']} fences in the align kernel (atomics must be relaxed)")
    expect = row.get("expect") or {}
    if row["arch"] == 90 and row["blocks_per_sm"] < expect.get("blocks_per_sm", 0):  # the sm_90 footprint
        out.append(f"{row['blocks_per_sm']} programs fit an SM; the split count assumes {expect['blocks_per_sm']}")
    if expect.get("wgmma") and not row["wgmma"]:
        out.append(f"no warpgroup MMA (wgmma) in the PTX ({row['mma_sync']} mma.sync): the configuration is sized for it")
    if row["tile_buffers"] < expect.get("tile_buffers", 0):
        out.append(f"{row['tile_buffers']} buffer(s) per loaded tile; the config means to keep {expect['tile_buffers']} "
                   "(a copy in flight while the previous tile computes)")
    return out


# ---------------------------------------------------------------- the launches
def moe_launches(shape, T, dtype, *, has_map=False, activation="silu", gated=True, biases=False, combine=None,
                 model_routing=False, clamp=None):
    H, I, E, K = shape
    R = 2 * I if gated else I
    cap = Capture()
    config = fm.select_config(T, K, E, H, I, False, itemsize=torch.empty((), dtype=dtype).element_size(), arch=ARCH)
    if combine is not None:
        config["COMBINE"] = combine
    fm.fused_moe_launch(meta((T, H), dtype), meta((E, R, H), dtype), meta((E, H, I), dtype),
                        meta((T, K), dtype if model_routing else torch.float32),
                        meta((T, K), torch.int64 if model_routing else torch.int32), meta((T, H), dtype),
                        activation=activation, expert_map=meta((E,), torch.int32) if has_map else None,
                        host_w_gate_up=meta((E, R, H), dtype) if has_map else None,
                        host_w_down=meta((E, H, I), dtype) if has_map else None,
                        b_gate_up=meta((E, R), dtype) if biases else None, b_down=meta((E, H), dtype) if biases else None,
                        gate_up_interleaved=False, config=config, launcher=cap, gated=gated, **(clamp or {}))
    return cap.records


def route_launches(T, E, K, sigmoid, bias, n_group, topk_group):
    cap = Capture()
    mr.route_launch(meta((T, E), torch.float32), meta((E,), torch.float32) if bias else None,
                    meta((T, K), torch.float32), meta((T, K), torch.int32), K, sigmoid=sigmoid, renormalize=True,
                    n_group=n_group, topk_group=topk_group, scaling=2.5, group_by_top2=bias, launcher=cap)
    return cap.records


def mla_launches(B, Hq, dtype, R=512, P=64, block_size=64, max_blocks=128, sm_count=132):
    cap = Capture()
    config = md.select_config(B, Hq, R, P, block_size, max_blocks, sm_count, False,
                              itemsize=torch.empty((), dtype=dtype).element_size(), arch=ARCH)
    md.mla_decode_launch(meta((B, Hq, R), dtype), meta((B, Hq, P), dtype), meta((4096, block_size, R + P), dtype),
                         meta((B, max_blocks), torch.int32), meta((B,), torch.int32), meta((B, Hq, R), dtype),
                         meta((B, Hq), torch.float32), scale=0.07, config=config, launcher=cap)
    # What the configuration counts on: the split count's programs per SM, and the cache rows of step i + 1
    # copied while step i computes (two buffers).
    expect = {"blocks_per_sm": config["blocks_per_sm"], "tile_buffers": 2}
    # Head blocks of 64 rows are chosen for the warpgroup MMAs (fp32 takes the exact FMA path: no MMA at all).
    if ARCH == 90 and config["BLOCK_H"] >= 64 and dtype != torch.float32:
        expect["wgmma"] = True
    return [(k, g, a, kw, expect if k is md._mla_decode_split_kernel else None) for k, g, a, kw in cap.records]


def launches(group):
    """(tag, production, records) for one group of kernels."""
    if group == "moe":
        for name, shape in MOE_SHAPES.items():
            for T in MOE_TOKENS:
                for dtype in (torch.bfloat16, torch.float16):
                    yield f"moe-{name}-T{T}-{str(dtype)[6:]}", True, moe_launches(shape, T, dtype)
            # The combine as its own kernel (a tuned table may pick it): the down GEMM's plain-store epilogue.
            for T in (64, 4096):
                yield f"moe-{name}-T{T}-separate-combine", True, moe_launches(shape, T, torch.bfloat16,
                                                                              combine="separate")
            # A patched model's routing as its router gives it: int64 ids, weights in the model's dtype.
            for T in (1, 64):
                yield f"moe-{name}-T{T}-model-routing", True, moe_launches(shape, T, torch.bfloat16,
                                                                           model_routing=True)
    elif group == "moe_map":
        for name, shape in MOE_SHAPES.items():
            for T in (1, 64, 4096):
                yield f"moe-map-{name}-T{T}", True, moe_launches(shape, T, torch.bfloat16, has_map=True)
    elif group == "moe_tests":
        for shape, T in TEST_MOE_CASES:
            for dtype in (torch.float32, torch.float16):
                yield (f"moe-test-{'x'.join(map(str, shape))}-T{T}-{str(dtype)[6:]}", dtype != torch.float32,
                       moe_launches(shape, T, dtype))
    elif group == "moe_gpu_tests":
        for shape, T in GPU_TEST_MOE_CASES:
            yield f"moe-gpu-test-{'x'.join(map(str, shape))}-T{T}", True, moe_launches(shape, T, torch.bfloat16)
    elif group == "moe_llava":
        for name, (shape, activation, gated, biases) in MOE_LLAVA_SHAPES.items():
            for T in (1, 16, 640):
                yield (f"moe-llava-{name}-T{T}", True,
                       moe_launches(shape, T, torch.bfloat16, activation=activation, gated=gated, biases=biases))
            yield (f"moe-llava-{name}-map-T1", True, moe_launches(shape, 1, torch.bfloat16, has_map=True,
                                                                   activation=activation, gated=gated, biases=biases))
    elif group == "moe_clamped":
        # Clamped gates (DeepSeek-V4, GLM-5 and HunYuan-V4 before the SiLU; Step and Ling after it; MiniMax-M3's
        # GLU) at the DeepSeek-V3 shape: the clamp adds no registers the GEMMs cannot spare.
        for name, clamp in (("before", dict(activation_limit=10.0)),
                            ("after", dict(activation_limit=7.0, limit_after_activation=True)),
                            ("glu", dict(activation_limit=7.0, swiglu_alpha=1.702))):
            activation = "swiglu_oai" if name == "glu" else "silu"
            for T in (1, 64, 4096):
                yield (f"moe-clamped-{name}-T{T}", True, moe_launches(MOE_SHAPES["v3"], T, torch.bfloat16,
                                                                       activation=activation, clamp=clamp))
    elif group == "route":
        for name, case in ROUTE_CASES.items():
            for T in (1, 4096):
                yield f"route-{name}-T{T}", True, route_launches(T, *case)
    elif group == "mla":
        for Hq in (16, 128):
            for B in (1, 64):
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    yield f"mla-H{Hq}-B{B}-{str(dtype)[6:]}", dtype != torch.float32, mla_launches(B, Hq, dtype)
        # Pages that steps do not divide: each row looks its page up (the GPU test's 24-token pages).
        yield "mla-H16-B8-bs24-bfloat16", True, mla_launches(8, 16, torch.bfloat16, block_size=24, max_blocks=64)
        # 40 heads: one 64-row head block on sm_90, 24 rows of it padding (the GPU test's case).
        yield "mla-H40-B4-bfloat16", True, mla_launches(4, 40, torch.bfloat16)
        # One request of 32K tokens: the most splits, the combine's tallest tile.
        yield "mla-H16-B1-S32K-bfloat16", True, mla_launches(1, 16, torch.bfloat16, max_blocks=512)
    else:
        raise SystemExit(f"unknown group {group!r}: moe, moe_map, moe_llava, moe_clamped, moe_tests, moe_gpu_tests, route, "
                         "mla")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, choices=sorted(SMEM_LIMIT), default=90)
    parser.add_argument("--groups", default="moe,moe_map,moe_llava,moe_clamped,moe_tests,moe_gpu_tests,route,mla")
    parser.add_argument("--float-type", choices=("fp32", "fp64"), default="fp32")
    parser.add_argument("--json", help="write one JSON row per compiled launch here")
    args = parser.parse_args(argv)
    global ARCH
    ARCH = args.arch
    rows, bad = [], []
    for group in args.groups.split(","):
        for tag, production, records in launches(group):
            for kernel, grid, a, kw, *expect in records:
                row = compile_launch(tag, kernel, grid, a, kw, arch=args.arch, float_type=args.float_type,
                                     production=production, expect=expect[0] if expect else None)
                rows.append(row)
                found = problems(row)
                if found:
                    bad.append(f"{tag} {row['kernel']}: {'; '.join(found)}")
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    compiled = [r for r in rows if not r.get("cached")]
    print(f"aot_compile sm_{args.arch} ({args.float_type} floats): {len(rows)} launches, {len(compiled)} compiled, "
          f"{sum(r['compile_s'] for r in compiled):.0f} s")
    for line in bad:
        print("PROBLEM", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
