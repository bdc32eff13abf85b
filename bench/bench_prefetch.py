"""Expert prefetcher: host-to-device bandwidth, overlap with compute, and in-place vs copied misses.

1. pin:      time to allocate and pin the host store, cudaHostAlloc vs cudaHostRegister (1 GiB).
2. h2d:      expert-sized transfers (1, 9.4, 17.3, 352 MB: a small expert, Qwen3-30B, DeepSeek-V2-Lite,
             Mixtral) through the prefetcher (one expert per call, and a whole batch packed into one
             transfer) vs a plain torch pinned copy vs a pageable copy; ratio to the pinned peak
             measured in the same run (a 1 GiB torch pinned copy).
3. overlap:  a DeepSeek-V2-Lite grouped-GEMM layer on the compute stream while the prefetcher copies
             the next layer's experts: exposed stall (compute stream waiting, from events) and compute
             slowdown, next to a plain torch side-stream copy.
4. misses:   a layer whose experts are all non-resident, T in {1, 4, 16, 64, 256}: read in place by the
             kernel (expert_map -1) vs copied into slots first (ensure), end to end.

    python bench/bench_prefetch.py --json bench/results/bench_prefetch.jsonl   # GPU
    python bench/bench_prefetch.py --quick                                      # CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, row, time_ms  # noqa: E402

from moecache import _C, ops  # noqa: E402
from moecache.cache import ExpertCache  # noqa: E402
from moecache.ops.reference import route_reference  # noqa: E402

EXPERTS = {  # name: (H, I) of one bf16 expert (3 * H * I * 2 bytes)
    "small-1MB": (1024, 176),
    "qwen3-30b-9.4MB": (2048, 768),
    "deepseek-v2-lite-17.3MB": (2048, 1408),
    "mixtral-352MB": (4096, 14336),
}


def expert_mb(H, I, itemsize=2):
    return 3 * H * I * itemsize / 1e6


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, device, rep):
    times = []
    for _ in range(rep):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": times[len(times) // 2], "ms_min": times[0], "ms_max": times[-1], "reps": rep}


def random_layers(L, E, H, I, dtype):
    """Scaled normals (a kernel reads them in the overlap and misses parts), drawn on the GPU where there
    is one: the CPU draws a few GB far more slowly than the benchmark runs."""
    gen = "cuda" if torch.cuda.is_available() else "cpu"
    return [((torch.randn(E, 2 * I, H, dtype=dtype, device=gen) * H**-0.5).cpu(),
             (torch.randn(E, H, I, dtype=dtype, device=gen) * I**-0.5).cpu()) for _ in range(L)]


def bench_pin(device, quick):
    rows = []
    nbytes = (16 << 20) if quick else (1 << 30)
    for pin in ("alloc", "register"):
        seconds = []
        for _ in range(3):
            store = _C.HostStore(nbytes, backend="cuda" if device == "cuda" else "host", pin=pin)
            seconds.append(store.pin_seconds)
            mode = store.pin_mode  # the host backend never pins: it reports "pageable"
            del store
        ms = sorted(seconds)[1] * 1e3
        rows.append(row("bench_prefetch.pin", {"bytes": nbytes, "pin": pin, "pin_mode": mode}, f"HostStore:{pin}",
                        {"ms": ms, "ms_min": min(seconds) * 1e3, "ms_max": max(seconds) * 1e3, "reps": 3},
                        bytes_moved=nbytes))
        print(f"pin {pin:<9} {nbytes >> 20} MiB: {ms:8.1f} ms ({mode}, {nbytes / ms / 1e6:.1f} GB/s)")
    return rows


def pinned_peak(device, quick):
    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    t = time_ms(lambda: dst.copy_(src, non_blocking=True), warmup=2, rep=5, flush_l2=False)
    return src.numel() / t["ms"] / 1e6


def bench_h2d(device, quick, peak, names=None):
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    experts = {"tiny": (64, 32), "small": (128, 96)} if quick else {n: EXPERTS[n] for n in names or EXPERTS}
    rep = 2 if quick else 5
    for name, (H, I) in experts.items():
        E = max(2, min(64, int(1.5e9 // (3 * H * I * 2))))  # ~1.5 GB of experts per layer (4 of Mixtral's)
        layers = random_layers(2, E, H, I, dtype)
        cache = ExpertCache(layers, num_slots=E, device=device)
        nbytes = E * cache.record_bytes
        state = {"layer": 0}

        def one_per_call():
            state["layer"] ^= 1  # the other layer's experts are resident: every copy evicts one
            for e in reversed(range(E)):  # reversed: no two adjacent, so no packing
                cache.prefetch(state["layer"], [e])
            cache.synchronize()

        def batch():
            state["layer"] ^= 1
            cache.prefetch(state["layer"], range(E))
            cache.synchronize()

        shape = {"expert": name, "H": H, "I": I, "experts": E, "expert_mb": cache.record_bytes / 1e6}
        results = {}
        for provider, fn in (("prefetcher:one-per-call", one_per_call), ("prefetcher:batch-packed", batch)):
            fn()
            cache.reset_stats()
            timing = wall_ms(fn, device, rep)
            s = cache.stats()
            results[provider] = timing["ms"]
            rows.append(row("bench_prefetch.h2d", shape, provider, timing, bytes_moved=nbytes,
                            event_copy_gbps=s["copy_gbps"], transfers_per_call=s["transfers"] / rep,
                            frac_pinned_peak=(nbytes / timing["ms"] / 1e6 / peak) if peak else None))
        pinned_src = [torch.empty(cache.record_bytes, dtype=torch.uint8).pin_memory() if device == "cuda"
                      else torch.empty(cache.record_bytes, dtype=torch.uint8) for _ in range(E)]
        pageable_src = [torch.empty(cache.record_bytes, dtype=torch.uint8) for _ in range(E)]
        dst = torch.empty(E, cache.record_bytes, dtype=torch.uint8, device=device)
        for provider, srcs in (("torch:pinned-copy", pinned_src), ("torch:pageable-copy", pageable_src)):
            def copies(srcs=srcs):
                for e in range(E):
                    dst[e].copy_(srcs[e], non_blocking=True)
            timing = wall_ms(copies, device, rep)
            results[provider] = timing["ms"]
            rows.append(row("bench_prefetch.h2d", shape, provider, timing, bytes_moved=nbytes,
                            frac_pinned_peak=(nbytes / timing["ms"] / 1e6 / peak) if peak else None))
        line = "  ".join(f"{p} {nbytes / ms / 1e6:6.1f} GB/s" for p, ms in results.items())
        print(f"h2d {name:<24} x{E:<3} {line}")
        cache.close()
    return rows


def bench_overlap(device, quick):
    """Compute on the current stream while copies run; exposed stall and compute slowdown."""
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    H, I, E, K, T = (64, 32, 8, 2, 16) if quick else (2048, 1408, 64, 6, 4096)
    prefetch_n = 4 if quick else 24  # ~415 MB: ~8 ms at 52 GB/s
    # The layer computed with stays on the device; the cache holds only what it prefetches (two layers of
    # prefetch_n experts, alternated), so the run pins and fills a fraction of E experts' host store.
    resident = random_layers(1, E, H, I, dtype)[0]
    resident = (resident[0].to(device), resident[1].to(device))
    layers = random_layers(2, prefetch_n, H, I, dtype)
    x = torch.randn(T, H, device=device, dtype=dtype)
    w, ids = route_reference(torch.randn(T, E, device=device), K)
    rep = 2 if quick else 10
    repeats = 1 if quick else 6  # layer calls per measurement, so compute >= copy time

    def compute():
        for _ in range(repeats):
            ops.fused_moe(x, *resident, w, ids)

    compute()
    alone = wall_ms(compute, device, rep)
    cache = ExpertCache(layers, num_slots=prefetch_n, device=device)
    state = {"layer": 0}

    def copy_alone():
        state["layer"] ^= 1
        cache.prefetch(state["layer"], range(prefetch_n))
        cache.synchronize()

    copy_alone()
    copy = wall_ms(copy_alone, device, rep)

    def overlapped():
        state["layer"] ^= 1
        cache.prefetch(state["layer"], range(prefetch_n))
        compute()
        with cache.ensure(state["layer"], range(prefetch_n)):  # the next layer needs them now
            pass

    overlapped()
    cache.reset_stats()
    both = wall_ms(overlapped, device, rep)
    s = cache.stats()
    stall_ms = s["stall_ms"] / rep
    shape = {"H": H, "I": I, "E": E, "K": K, "T": T, "layer_calls": repeats, "prefetched_experts": prefetch_n,
             "copy_mb": prefetch_n * cache.record_bytes / 1e6}
    rows.append(row("bench_prefetch.overlap", shape, "compute-alone", alone))
    rows.append(row("bench_prefetch.overlap", shape, "copy-alone", copy))
    # The target's denominator is the layer time the prefetches overlap (here `repeats` layer calls);
    # the share of one call and of the copy time are kept beside it.
    rows.append(row("bench_prefetch.overlap", shape, "prefetcher:compute+copy", both, stall_ms=stall_ms,
                    stall_frac_of_layer_time=stall_ms / alone["ms"],
                    stall_frac_of_one_call=stall_ms / (alone["ms"] / repeats),
                    stall_frac_of_copy=stall_ms / copy["ms"], slowdown=both["ms"] / alone["ms"] - 1))
    print(f"overlap: compute {alone['ms']:.2f} ms ({repeats} layer calls), copy {copy['ms']:.2f} ms, both "
          f"{both['ms']:.2f} ms (slowdown {100 * (both['ms'] / alone['ms'] - 1):.1f}%), exposed stall "
          f"{stall_ms:.3f} ms = {100 * stall_ms / alone['ms']:.1f}% of the layer time it overlaps "
          f"({100 * stall_ms / (alone['ms'] / repeats):.1f}% of one call, {100 * stall_ms / copy['ms']:.1f}% of the copy)")
    cache.close()

    if device == "cuda":  # the plain torch way: a side-stream copy of the same bytes
        nbytes = int(shape["copy_mb"] * 1e6)
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        side = torch.cuda.Stream()

        def torch_overlapped():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                dst.copy_(src, non_blocking=True)
            compute()
            torch.cuda.current_stream().wait_stream(side)

        torch_overlapped()
        t = wall_ms(torch_overlapped, device, rep)
        rows.append(row("bench_prefetch.overlap", shape, "torch-side-stream:compute+copy", t,
                        slowdown=t["ms"] / alone["ms"] - 1))
        print(f"overlap (torch side stream): both {t['ms']:.2f} ms (slowdown {100 * (t['ms'] / alone['ms'] - 1):.1f}%)")
    return rows


def bench_misses(device, quick):
    """Every routed expert non-resident: read in place by the kernel vs copied into slots first."""
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    H, I, E, K = (64, 32, 8, 2) if quick else (2048, 1408, 64, 6)
    tokens = (1, 8) if quick else (1, 4, 16, 64, 256)
    rep = 2 if quick else 5
    layers = random_layers(2, E, H, I, dtype)
    in_place = ExpertCache(layers, num_slots=1, device=device)  # nothing of these layers ever resident
    copying = ExpertCache(layers, num_slots=E, device=device)  # one layer's worth: alternate layers
    state = {"layer": 0}
    for T in tokens:
        x = torch.randn(T, H, device=device, dtype=dtype)
        w, ids = route_reference(torch.randn(T, E, device=device), K)
        touched = int(torch.unique(ids).numel())

        def read_in_place():
            in_place.moe(0, x, w, ids, misses="in_place", track_usage=False)

        def copy_first():
            state["layer"] ^= 1
            copying.moe(state["layer"], x, w, ids, misses="copy")

        shape = {"H": H, "I": I, "E": E, "K": K, "T": T, "experts_touched": touched}
        nbytes = touched * copying.record_bytes
        line = []
        for provider, fn in (("misses:in-place", read_in_place), ("misses:copy-then-compute", copy_first)):
            fn()
            timing = wall_ms(fn, device, rep)
            rows.append(row("bench_prefetch.misses", shape, provider, timing, bytes_moved=nbytes))
            line.append(f"{provider} {timing['ms']:8.3f} ms ({nbytes / timing['ms'] / 1e6:5.1f} GB/s)")
        print(f"misses T={T:<4} {touched:>2} experts: " + "  ".join(line))
    in_place.close()
    copying.close()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="append JSON rows to this file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the host backend (checks the script)")
    parser.add_argument("--parts", default="pin,h2d,overlap,misses")
    parser.add_argument("--experts", default=",".join(EXPERTS), help="h2d expert sizes, from: " + ", ".join(EXPERTS))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and _C.cuda_available() and not args.quick else "cpu"
    peak = pinned_peak(device, args.quick)
    if peak:
        print(f"pinned H2D peak (torch, 1 GiB): {peak:.1f} GB/s")
    rows = []
    parts = {"pin": bench_pin, "h2d": lambda d, q: bench_h2d(d, q, peak, args.experts.split(",")), "overlap": bench_overlap,
             "misses": bench_misses}
    for part in args.parts.split(","):
        part_rows = parts[part](device, args.quick)
        rows += part_rows
        if args.json:  # after each part, so a run stopped at its time limit keeps what it measured
            path = append_rows(args.json, [{**r, "pinned_peak_gbps": peak} for r in part_rows])
            print(f"{len(part_rows)} rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
