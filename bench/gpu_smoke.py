"""Correctness of every kernel at the real model shapes, in the production dtype, against the fp32
references: the first thing a GPU run checks. One line per check as it finishes (so a killed run still
tells what passed), and one JSON row per check with --json.

    python bench/gpu_smoke.py --json $OUT/smoke.jsonl                 # GPU: bf16 at the real shapes
    python bench/gpu_smoke.py --tiny --sections moe,route,mla,cache   # small shapes (sanitizer, CPU dry run)

Sections: moe (fused_moe per shape and token count, both paths), map (expert_map with pinned host
experts read in place), gptoss (interleaved gate/up, biases, clamped SwiGLU), route (every scoring
mode), mla (split-KV decode over shuffled pages), determinism (the grouped path's fused combine),
host (in-place pinned reads, GB/s), cache (the C++ copy engine, both pinning modes, GB/s), non_gated
(fc1/fc2 experts: MoE-LLaVA-Phi2's with biases and GELU-tanh, many small ones with a squared ReLU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from moecache import ops  # noqa: E402
from moecache.analysis.costs import expert_bytes  # noqa: E402
from moecache.ops.mla import mla_decode_reference  # noqa: E402
from moecache.ops.reference import fused_moe_reference, route_reference  # noqa: E402
from moecache.testing import TOLERANCES  # noqa: E402

MOE_SHAPES = {  # name: (H, I, E, K)
    "v2lite": (2048, 1408, 64, 6),
    "vl2-base": (2560, 1536, 72, 6),
    "qwen3-30b": (2048, 768, 128, 8),
    "mixtral": (4096, 14336, 8, 2),
    "v3": (7168, 2048, 256, 8),
}
MOE_TOKENS = (1, 16, 17, 64, 512, 4096)
TINY_MOE_SHAPES = {"tiny": (96, 40, 9, 3), "tiny-k1": (64, 48, 4, 1)}
TINY_TOKENS = (1, 5, 20)

# non_gated last: its shapes compile kernels of their own, and a stage cut at its time limit loses the last checks
SECTIONS = ("moe", "map", "gptoss", "route", "mla", "determinism", "host", "cache", "non_gated", "clamped")


class Report:
    def __init__(self, path: str | None):
        self.path = path
        self.rows = []
        self.env = environment()

    def add(self, check: str, ok: bool, seconds: float, **detail):
        row = {"check": check, "ok": bool(ok), "seconds": round(seconds, 3), **detail}
        self.rows.append(row)
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items()
                         if k != "error")
        print(f"{'PASS' if ok else 'FAIL'} {check} ({seconds:.1f}s) {extra}"
              + (f"\n     {detail['error']}" if "error" in detail else ""), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, **self.env}) + "\n")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a - e| / max|e|; inf where the kernel left NaN/Inf (poisoned outputs never pass)."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def run_check(report: Report, name: str, fn):
    t0 = time.perf_counter()
    try:
        detail = fn() or {}
        ok = detail.pop("ok", True)
    except Exception as exc:  # a failing check must not stop the others
        ok = False
        detail = {"error": f"{type(exc).__name__}: {str(exc)[:300]} @ {traceback.extract_tb(exc.__traceback__)[-1].name}"}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    report.add(name, ok, time.perf_counter() - t0, **detail)
    return ok


def random_ids(T, E, K, device, force=None, generator=None):
    """[T, K] distinct experts per row from random scores; `force` is put in every other row."""
    scores = torch.rand(T, E, device=device, generator=generator)
    if force is not None:
        scores[::2, force] = 2.0
    return scores.topk(K, dim=1).indices.to(torch.int32)


def make_weights(H, I, E, dtype, device, generator):
    w_gate_up = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=generator) * H ** -0.5
    w_down = torch.randn(E, H, I, device=device, dtype=dtype, generator=generator) * I ** -0.5
    return w_gate_up, w_down


# ------------------------------------------------------------------ checks
def check_moe(report, device, dtype, tiny):
    shapes = TINY_MOE_SHAPES if tiny else MOE_SHAPES
    tokens = TINY_TOKENS if tiny else MOE_TOKENS
    tol = TOLERANCES[dtype]
    for name, (H, I, E, K) in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        try:
            wgu, wd = make_weights(H, I, E, dtype, device, g)
        except torch.OutOfMemoryError as exc:
            report.add(f"moe:{name}", False, 0.0, error=f"weights do not fit: {exc}")
            continue
        for T in tokens:
            def one(T=T):
                x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
                ids = random_ids(T, E, K, device, force=E - 1, generator=g)
                w = torch.rand(T, K, device=device, generator=g)
                w = w / w.sum(1, keepdim=True)
                out = torch.full_like(x, float("nan"))
                ops.fused_moe(x, wgu, wd, w, ids, out=out, backend="triton")
                err = rel_err(out, fused_moe_reference(x, wgu, wd, w, ids))
                return {"ok": err <= tol, "rel_err": err, "tol": tol}
            run_check(report, f"moe:{name}:T{T}", one)
        wgu = wd = None  # free this shape's experts before the next one's
        if device == "cuda":
            torch.cuda.empty_cache()


def check_map(report, device, dtype, tiny):
    """Half the experts in pinned host memory, read in place by the kernel; slots permuted."""
    H, I, E, K = (96, 40, 9, 3) if tiny else MOE_SHAPES["v2lite"]
    g = torch.Generator(device=device).manual_seed(1)
    wgu, wd = make_weights(H, I, E, dtype, device, g)
    host_gu, host_d = wgu.cpu(), wd.cpu()
    if device == "cuda":
        host_gu, host_d = host_gu.pin_memory(), host_d.pin_memory()
    resident = torch.randperm(E)[: E // 2]
    expert_map = torch.full((E,), -1, dtype=torch.int32)
    expert_map[resident] = torch.arange(len(resident), dtype=torch.int32)
    slots_gu, slots_d = wgu[resident].contiguous(), wd[resident].contiguous()
    emap = expert_map.to(device)
    for T in (TINY_TOKENS if tiny else (1, 16, 64, 512)):
        def one(T=T):
            x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
            ids = random_ids(T, E, K, device, generator=g)
            w = torch.rand(T, K, device=device, generator=g)
            out = torch.full_like(x, float("nan"))
            ops.fused_moe(x, slots_gu, slots_d, w, ids, expert_map=emap, host_w_gate_up=host_gu,
                          host_w_down=host_d, out=out, backend="triton")
            err = rel_err(out, fused_moe_reference(x, wgu, wd, w, ids))
            return {"ok": err <= TOLERANCES[dtype], "rel_err": err}
        run_check(report, f"map:host-half:T{T}", one)


def check_gptoss(report, device, dtype, tiny):
    """GPT-OSS-20B experts: [E, H, 2I] interleaved parameter passed transposed, biases, clamped SwiGLU."""
    H, I, E, K = (64, 32, 8, 2) if tiny else (2880, 2880, 32, 4)
    g = torch.Generator(device=device).manual_seed(2)
    gate_up = torch.randn(E, H, 2 * I, device=device, dtype=dtype, generator=g) * H ** -0.5
    down = torch.randn(E, I, H, device=device, dtype=dtype, generator=g) * I ** -0.5
    b_gu = torch.randn(E, 2 * I, device=device, dtype=dtype, generator=g) * 0.1
    b_d = torch.randn(E, H, device=device, dtype=dtype, generator=g) * 0.1
    for T in (TINY_TOKENS if tiny else (1, 64, 1024)):
        def one(T=T):
            x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
            ids = random_ids(T, E, K, device, generator=g)
            w = torch.rand(T, K, device=device, generator=g)
            args = (x, gate_up.transpose(1, 2), down.transpose(1, 2), w, ids)
            kw = dict(activation="swiglu_oai", b_gate_up=b_gu, b_down=b_d, gate_up_interleaved=True)
            out = torch.full_like(x, float("nan"))
            ops.fused_moe(*args, **kw, out=out, backend="triton")
            err = rel_err(out, fused_moe_reference(*args, **kw))
            return {"ok": err <= TOLERANCES[dtype], "rel_err": err}
        run_check(report, f"gptoss:T{T}", one)


def layer_check(weights, kw, T, K, g):
    """A check: T random tokens, K random experts each, through fused_moe's kernels against the reference."""
    first, _ = weights
    E, H, device, dtype = first.shape[0], first.shape[2], first.device, first.dtype

    def one():
        x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
        ids = random_ids(T, E, K, device, generator=g)
        w = torch.rand(T, K, device=device, generator=g)
        out = torch.full_like(x, float("nan"))
        ops.fused_moe(x, *weights, w, ids, **kw, out=out, backend="triton")
        err = rel_err(out, fused_moe_reference(x, *weights, w, ids, **kw))
        return {"ok": err <= TOLERANCES[dtype], "rel_err": err}
    return one


NON_GATED_CASES = {  # name: ((H, I, E, K), activation, biases)
    "phi2-gelu_tanh-bias": ((2560, 10240, 4, 2), "gelu_tanh", True),
    "relu2-e128k6": ((2048, 1024, 128, 6), "relu2", False),
}


def check_non_gated(report, device, dtype, tiny):
    """fc1 [E, I, H], act, fc2 [E, H, I]: no up projection."""
    for name, ((H, I, E, K), activation, biases) in NON_GATED_CASES.items():
        if tiny:
            H, I, E, K = 64, 48, min(E, 9), min(K, 3)
        g = torch.Generator(device=device).manual_seed(3)
        fc1 = torch.randn(E, I, H, device=device, dtype=dtype, generator=g) * H ** -0.5
        fc2 = torch.randn(E, H, I, device=device, dtype=dtype, generator=g) * I ** -0.5
        kw = dict(activation=activation, gated=False)
        if biases:
            kw.update(b_gate_up=torch.randn(E, I, device=device, dtype=dtype, generator=g) * 0.1,
                      b_down=torch.randn(E, H, device=device, dtype=dtype, generator=g) * 0.1)
        for T in (TINY_TOKENS if tiny else (1, 16, 640)):
            run_check(report, f"non_gated:{name}:T{T}", layer_check((fc1, fc2), kw, T, K, g))


CLAMPED_CASES = {  # name: clamp keywords; gate and up scaled so the products cross the limit
    "before-limit10": dict(activation="silu", activation_limit=10.0),
    "after-limit7": dict(activation="silu", activation_limit=7.0, limit_after_activation=True),
    "glu-concatenated": dict(activation="swiglu_oai", activation_limit=7.0, swiglu_alpha=1.702),
}


def check_clamped(report, device, dtype, tiny):
    """Clamped gates at the DeepSeek-V3 shape: DeepSeek-V4 / GLM-5 / HunYuan-V4, Step / Ling, MiniMax-M3."""
    H, I, E, K = (64, 32, 8, 2) if tiny else (7168, 2048, 256, 8)
    g = torch.Generator(device=device).manual_seed(4)
    # x ~ N(0, 1) against weights of std 8/sqrt(H): gate and up ~ N(0, 64), so most units cross 7 and 10
    wgu = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=g) * (8 * H ** -0.5)
    wd = torch.randn(E, H, I, device=device, dtype=dtype, generator=g) * I ** -0.5
    for name, kw in CLAMPED_CASES.items():
        for T in (TINY_TOKENS if tiny else (1, 64, 1024)):
            run_check(report, f"clamped:{name}:T{T}", layer_check((wgu, wd), kw, T, K, g))


ROUTE_CASES = {  # name: (E, K, kwargs)
    "softmax-e64k6": (64, 6, {}),
    "mixtral-e8k2": (8, 2, {}),
    "qwen3-e128k8": (128, 8, {}),
    "v2-group-e160k6": (160, 6, {"n_group": 8, "topk_group": 3, "renormalize": False, "scaling": 16.0}),
    "v3-sigmoid-e256k8": (256, 8, {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "scaling": 2.5, "bias": True}),
    "vl2-base-e72k6": (72, 6, {"scoring": "sigmoid", "n_group": 1, "topk_group": 1, "scaling": 2.0, "bias": True}),
}


def check_route(report, device, dtype, tiny):
    for name, (E, K, kw) in ROUTE_CASES.items():
        for T in ((1, 7) if tiny else (1, 64, 4096)):
            def one(T=T, E=E, K=K, kw=kw):
                g = torch.Generator(device=device).manual_seed(T)
                logits = torch.randn(T, E, device=device, generator=g)
                kw = dict(kw)
                if kw.pop("bias", False):
                    kw["bias"] = torch.randn(E, device=device, generator=g) * 0.1
                w, ids = ops.route(logits, K, backend="triton", **kw)
                ref_w, ref_ids = route_reference(logits, K, **kw)
                same = float((ids == ref_ids).float().mean())
                err = float((w - ref_w).abs().max())
                return {"ok": same == 1.0 and err <= 1e-5 * max(1.0, float(ref_w.abs().max())),
                        "ids_equal": same, "w_abs_err": err}
            run_check(report, f"route:{name}:T{T}", one)


def check_mla(report, device, dtype, tiny):
    R, P, block = (32, 8, 16) if tiny else (512, 64, 64)
    points = [(16, 1, 40), (4, 3, 100)] if tiny else [(16, 1, 4096), (16, 64, 4096), (128, 1, 4096),
                                                      (128, 64, 4096), (16, 2, 32768)]
    for Hq, B, S in points:
        def one(Hq=Hq, B=B, S=S):
            g = torch.Generator(device=device).manual_seed(Hq * B)
            max_blocks = -(-S // block)
            num_blocks = B * max_blocks + 3
            kv = torch.randn(num_blocks, block, R + P, device=device, dtype=dtype, generator=g)
            table = torch.randperm(num_blocks, device=device, generator=g)[: B * max_blocks].view(B, max_blocks)
            table = table.to(torch.int32).contiguous()
            lens = torch.randint(1, S + 1, (B,), device=device, generator=g, dtype=torch.int32)
            lens[0] = S
            q_latent = torch.randn(B, Hq, R, device=device, dtype=dtype, generator=g)
            q_rope = torch.randn(B, Hq, P, device=device, dtype=dtype, generator=g)
            scale = (128 + P) ** -0.5
            out, lse = ops.mla_decode(q_latent, q_rope, kv, table, lens, scale=scale, backend="triton",
                                      return_lse=True)
            ref, ref_lse = mla_decode_reference(q_latent, q_rope, kv, table, lens, scale=scale, return_lse=True)
            err = rel_err(out, ref)
            lse_err = float((lse - ref_lse).abs().max())
            return {"ok": err <= TOLERANCES[dtype] and lse_err <= 1e-2, "rel_err": err, "lse_abs_err": lse_err}
        run_check(report, f"mla:H{Hq}:B{B}:S{S}", one)


def check_determinism(report, device, dtype, tiny):
    for name, T in ((("tiny", 20),) if tiny else (("v2lite", 4096), ("qwen3-30b", 512))):
        def one(name=name, T=T):
            H, I, E, K = (TINY_MOE_SHAPES | MOE_SHAPES)[name]
            g = torch.Generator(device=device).manual_seed(3)
            wgu, wd = make_weights(H, I, E, dtype, device, g)
            x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
            ids = random_ids(T, E, K, device, generator=g)
            w = torch.rand(T, K, device=device, generator=g)
            first = ops.fused_moe(x, wgu, wd, w, ids, backend="triton")
            same = all(torch.equal(ops.fused_moe(x, wgu, wd, w, ids, backend="triton"), first) for _ in range(5))
            err = rel_err(first, fused_moe_reference(x, wgu, wd, w, ids))
            return {"ok": same and err <= TOLERANCES[dtype], "bitwise_equal_5_runs": same, "rel_err": err}
        run_check(report, f"determinism:{name}:T{T}", one)


def _events_ms(fn, rep):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rep):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / rep


def check_host_reads(report, device, dtype, tiny):
    """Every expert non-resident: the kernel streams the routed experts from pinned memory over PCIe."""
    if device != "cuda":
        report.add("host:in-place", True, 0.0, skipped="no GPU")
        return
    H, I, E, K = MOE_SHAPES["v2lite"]
    g = torch.Generator(device=device).manual_seed(4)
    wgu, wd = make_weights(H, I, E, dtype, device, g)
    host_gu, host_d = wgu.cpu().pin_memory(), wd.cpu().pin_memory()
    emap = torch.full((E,), -1, dtype=torch.int32, device=device)
    for T in (1, 4, 16):
        def one(T=T):
            x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
            ids = random_ids(T, E, K, device, generator=g)
            w = torch.rand(T, K, device=device, generator=g)
            call = lambda: ops.fused_moe(x, wgu[:1], wd[:1], w, ids, expert_map=emap, host_w_gate_up=host_gu,
                                         host_w_down=host_d, backend="triton")
            err = rel_err(call(), fused_moe_reference(x, wgu, wd, w, ids))
            touched = int(torch.unique(ids).numel())
            ms = _events_ms(call, 10)
            return {"ok": err <= TOLERANCES[dtype], "rel_err": err, "experts": touched, "ms": ms,
                    "pcie_gbps": expert_bytes(touched, H, I, 2) / ms / 1e6}
        run_check(report, f"host:in-place:v2lite:T{T}", one)


def check_cache(report, device, dtype, tiny):
    """The C++ prefetcher: every expert of a layer copied to the pool, both pinning modes, data checked."""
    from moecache.cache import ExpertCache

    H, I, E = (96, 40, 8) if tiny else MOE_SHAPES["v2lite"][:3]
    layers = [make_weights(H, I, E, dtype, "cpu", torch.Generator().manual_seed(5 + i)) for i in range(2)]
    for pin in ("alloc", "register"):
        def one(pin=pin):
            with ExpertCache(layers, num_slots=E, pin=pin, device=device) as cache:
                for layer in (0, 1, 0):  # each pass evicts the other layer's experts
                    t0 = time.perf_counter()
                    cache.prefetch(layer, range(E))
                    cache.synchronize()
                    seconds = time.perf_counter() - t0
                bad = []
                slot_gu, slot_d = cache.slot_weights()
                for e in range(E):
                    s = cache.slot_of(0, e)
                    if s < 0 or not (torch.equal(slot_gu[s].cpu(), layers[0][0][e]) and
                                     torch.equal(slot_d[s].cpu(), layers[0][1][e])):
                        bad.append(e)
                stats = cache.stats()
                return {"ok": not bad and (cache.pinned or device != "cuda"), "bad_experts": len(bad), "pinned": cache.pinned,
                        "gbps_wall": E * cache.record_bytes / seconds / 1e9,
                        "copy_gbps_events": stats.get("copy_gbps", 0.0), "pin_s": cache.pin_seconds}
        run_check(report, f"cache:copy-engine:{pin}", one)
    if device == "cuda":
        def peak():
            src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
            dst = torch.empty_like(src, device="cuda")
            ms = _events_ms(lambda: dst.copy_(src, non_blocking=True), 3)
            return {"gbps": src.numel() / ms / 1e6}
        run_check(report, "cache:torch-pinned-1GB-reference", peak)


CHECKS = {"moe": check_moe, "map": check_map, "gptoss": check_gptoss, "non_gated": check_non_gated,
          "clamped": check_clamped,
          "route": check_route, "mla": check_mla,
          "determinism": check_determinism, "host": check_host_reads, "cache": check_cache}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="append one JSON row per check here")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--tiny", action="store_true", help="small shapes (sanitizer runs, CPU dry runs)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bf16 on a GPU, fp32 on CPU (the interpreter computes bf16 dots wrongly)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    tiny = args.tiny or device == "cpu"
    report = Report(args.json)
    print(f"gpu_smoke on {report.env['device']} ({dtype}, {'tiny' if tiny else 'real'} shapes)", flush=True)
    for section in args.sections.split(","):
        if section not in CHECKS:
            raise SystemExit(f"--sections: unknown {section!r}; choose from {', '.join(SECTIONS)}")
        CHECKS[section](report, device, dtype, tiny)
    failed = [r["check"] for r in report.rows if not r["ok"]]
    print(f"gpu_smoke: {len(report.rows) - len(failed)}/{len(report.rows)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
