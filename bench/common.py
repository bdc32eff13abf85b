"""Shared benchmark helpers: timing (CUDA events with an L2 flush on GPU, perf_counter on CPU),
ceilings, and JSON rows (benchmark, shape, provider, ms, GB/s, TFLOP/s, device, versions, commit, date)."""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100/H200: 50-60 MB by their specifications)
_flush_buffer = _flush_sum = None
# one id per benchmark process: the rows of one run share their ceilings and conditions, so a report pairs
# a point's providers from one run only, even after runs were appended to the same file
RUN_ID = f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


def _flush_l2(device="cuda"):
    """Evict L2 by reading a buffer four times its size. A read, not a write (zero_, as triton's do_bench
    flushes): written lines stay dirty in L2, and the timed kernel would pay their write-back in HBM
    traffic that the read ceiling (a plain sum) never pays."""
    global _flush_buffer, _flush_sum
    if _flush_buffer is None or _flush_buffer.device.type != torch.device(device).type:
        _flush_buffer = torch.ones(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        _flush_sum = torch.empty((), dtype=torch.int64, device=device)
    torch.sum(_flush_buffer, dim=0, dtype=torch.int64, out=_flush_sum)
    return _flush_sum


def time_ms(fn, *, warmup: int = 5, rep: int = 50, flush_l2: bool = True, device=None) -> dict:
    """Median, min and max milliseconds of fn() over `rep` runs after `warmup` runs.

    On CUDA each run is bracketed by events, with the L2 flushed before it by a read (so weights come
    from HBM, as they do in a real model where each layer's experts are touched once per step).
    On CPU, perf_counter around each run.
    """
    on_gpu = (device is None and torch.cuda.is_available()) or (device is not None and torch.device(device).type == "cuda")
    for _ in range(warmup):
        fn()
    times = []
    if on_gpu:
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for s, e in zip(starts, ends):
            if flush_l2:
                _flush_l2()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    result = {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "reps": rep}
    if on_gpu and flush_l2:
        result["l2_flush"] = "read"
    return result


def gpu_or_quick(quick: bool, name: str) -> tuple[bool, torch.device, torch.dtype]:
    """(on_gpu, device, dtype) of a GPU benchmark: bf16 on the GPU, fp32 on the CPU for --quick (the
    interpreter); without a GPU and without --quick the script exits, naming itself."""
    on_gpu = torch.cuda.is_available() and not quick
    if not on_gpu and not quick:
        raise SystemExit(f"{name}: needs a GPU (or --quick on CPU)")
    return on_gpu, torch.device("cuda" if on_gpu else "cpu"), torch.bfloat16 if on_gpu else torch.float32


def cuda_graph_fn(fn, warmup: int = 3):
    """Capture fn into a CUDA graph and return a replay callable (fn must not sync the host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_digest() -> str | None:
    """sha1 (12 hex digits) of the installed moecache package's Python sources and kernels: which code
    ran, even where the git metadata beside a copied working tree names an older commit."""
    import hashlib

    try:
        import moecache
    except ImportError:
        return None
    root = Path(moecache.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> dict:
    env = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the runtime torch was built with (None for a CPU build)
        "python": platform.python_version(),
        "commit": git_commit(),
        "source_digest": source_digest(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": RUN_ID,
    }
    for name in ("triton", "transformers", "moecache"):  # transformers: the hf baselines depend on it
        try:
            env[name] = importlib.import_module(name).__version__
        except ImportError:
            env[name] = None
    return env


def row(benchmark: str, shape: dict, provider: str, timing: dict, *, bytes_moved: float | None = None,
        flops: float | None = None, ceilings: dict | None = None, **extra) -> dict:
    """One result row; GB/s and TFLOP/s derived from the median time, ratios to measured ceilings."""
    ms = timing["ms"]
    r = {"benchmark": benchmark, "shape": shape, "provider": provider, **timing}
    if bytes_moved is not None:
        r["gbps"] = bytes_moved / ms / 1e6
    if flops is not None:
        r["tflops"] = flops / ms / 1e9
    if ceilings:
        if bytes_moved is not None and ceilings.get("hbm_gbps"):
            r["frac_hbm"] = r["gbps"] / ceilings["hbm_gbps"]
        if bytes_moved is not None and ceilings.get("hbm_read_gbps"):
            r["frac_hbm_read"] = r["gbps"] / ceilings["hbm_read_gbps"]
        if flops is not None and ceilings.get("bf16_tflops"):
            r["frac_matmul"] = r["tflops"] / ceilings["bf16_tflops"]
    r.update(extra)
    return r


def append_rows(path: str | Path, rows: list[dict]) -> Path:
    """Append rows (each stamped with the environment) as JSON lines."""
    path = Path(path)
    if not path.is_absolute() and path.parent == Path("."):
        path = RESULTS_DIR / path
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps({**r, **env}) + "\n")
    return path


def _copy_ms(nbytes: int) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return time_ms(lambda: b.copy_(a), warmup=3, rep=10, flush_l2=False)["ms"]


def _read_ms(nbytes: int) -> float:
    big = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    return time_ms(lambda: big.sum(), warmup=3, rep=10, flush_l2=False)["ms"]


def _matmul_ms(m: int) -> float:
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    return time_ms(lambda: x @ y, warmup=3, rep=10, flush_l2=False)["ms"]


def measure_ceilings() -> dict:
    """This GPU's ceilings, measured now ({} on CPU): HBM copy GB/s (read+write), HBM read GB/s (a sum over
    2 GiB: read-only traffic, what weight-streaming kernels do), and bf16 8192^3 matmul TFLOP/s."""
    if not torch.cuda.is_available():
        return {}
    n, m = 1 << 30, 8192
    result = {"hbm_gbps": 2 * n / _copy_ms(n) / 1e6, "hbm_read_gbps": 2 * n / _read_ms(2 * n) / 1e6,
              "bf16_tflops": 2 * m**3 / _matmul_ms(m) / 1e9}
    torch.cuda.empty_cache()
    return result


def measure_h2d_gbps(nbytes: int = 1 << 30) -> float | None:
    """Pinned host-to-device copy GB/s on this GPU, measured now (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(pinned, device="cuda")
    ms = time_ms(lambda: dev.copy_(pinned, non_blocking=True), warmup=2, rep=5, flush_l2=False)["ms"]
    return nbytes / ms / 1e6
