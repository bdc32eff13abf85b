"""`python -m moecache info|demo` — both work on a machine with no GPU."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time

log = logging.getLogger("moecache.cli")


def _info(_args) -> int:
    import moecache
    from moecache import _C

    import torch

    build = _C.build_info()
    lines = [
        ("moecache", moecache.__version__),
        ("moecache._C", f"{_C.__version__} ({os.path.dirname(_C.__file__)})"),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
    ]
    try:
        import triton

        lines.append(("triton", triton.__version__))
    except ImportError as exc:
        lines.append(("triton", f"not importable ({exc})"))
    try:
        import transformers

        lines.append(("transformers", transformers.__version__))
    except ImportError:
        lines.append(("transformers", "not installed (needed only for moecache.patch)"))
    lines += [
        ("_C built with CUDA", f"{build['built_with_cuda']} (runtime {build['cuda_runtime_version']}, archs {build['cuda_archs'] or '-'})"),
        ("_C build", f"{build['build_type']}, {build['compiler']}" + (f", sanitizer {build['sanitizer']}" if build["sanitizer"] else "")),
        ("_C backend", _C.default_backend()),
        ("_C CUDA available", "yes" if _C.cuda_available() else f"no: {_C.cuda_unavailable_reason()}"),
        ("torch CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(("GPU", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, sm_{props.major}{props.minor}"))
    else:
        lines.append(("GPU", "none"))
    import moecache.kernels as kernels

    lines.append(("Triton mode", "interpreter (TRITON_INTERPRET=1, CPU)" if kernels.INTERPRETING else "compiled (GPU)"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return 0


def _demo(args) -> int:
    import torch

    from moecache import ops
    from moecache.ops.reference import expert_bytes

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    # DeepSeek-V2-Lite / VL2-Small's MoE layer on a GPU; a scaled-down one on CPU.
    H, I, E, K = (2048, 1408, 64, 6) if on_gpu else (256, 176, 16, 4)
    T = args.tokens
    dtype = torch.bfloat16 if on_gpu else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, H, generator=gen).to(device, dtype)
    w_router = torch.randn(E, H, generator=gen).to(device, dtype) / H**0.5
    w_gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(device, dtype)
    w_down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(device, dtype)
    print(f"MoE layer H={H} I={I} E={E} K={K}, T={T} tokens, {dtype} on {device}")

    logits = x @ w_router.t()
    ref = None
    for backend in args.backends.split(","):
        def step():
            weights, ids = ops.route(logits, K, backend=backend)
            return ops.fused_moe(x, w_gate_up, w_down, weights, ids, backend=backend), ids

        out, ids = step()  # warm-up: compiles the Triton kernels once on a GPU
        if on_gpu:
            torch.cuda.synchronize()
        reps = 20 if on_gpu else 1  # the CPU interpreter runs kernels program by program: slow
        start = time.perf_counter()
        for _ in range(reps):
            out, ids = step()
        if on_gpu:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / reps * 1e3
        touched = int(torch.unique(ids).numel())
        gbps = expert_bytes(touched, H, I, x.element_size()) / ms / 1e6
        err = "" if ref is None else f", max |diff| vs {args.backends.split(',')[0]} = {(out.float() - ref).abs().max().item():.2e}"
        ref = out.float() if ref is None else ref
        print(f"  backend={backend:<7} {ms:9.3f} ms/layer  ({touched} experts touched, {gbps:7.1f} GB/s of expert weights){err}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moecache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build flags, CUDA and Triton status")
    demo = sub.add_parser("demo", help="run a random-weight MoE layer through moecache")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    demo.add_argument("--tokens", type=int, default=16)
    demo.add_argument("--backends", default="torch,triton", help="comma-separated: torch, triton")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MOECACHE_LOGLEVEL", "WARNING").upper(), stream=sys.stderr)
    return {"info": _info, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
