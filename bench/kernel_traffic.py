"""Expert-weight bytes each fused_moe path reads per call, by construction, against the bytes the call
must read (each touched expert once): no GPU, no timing, only the shapes, the routing and the block
configuration the heuristics pick. Routing is uniform random (seeded); real routers are less uniform.

- decode (GEMV) path: each routed row streams its expert's weights (rows that share an expert may hit
  in L2; the count is what the kernels request);
- grouped path: every M tile of an expert reads the expert's weights (requests), and with the tile order
  of _tile (GROUP_M M blocks sweep each N block together) an estimate of what reaches HBM: once per
  group of GROUP_M M tiles, assuming the group's weight tiles stay in L2 while it runs.

    python bench/kernel_traffic.py [--markdown]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import SHAPES  # noqa: E402

from moecache.kernels.fused_moe import GROUP_M, select_config  # noqa: E402
from moecache.ops.reference import route_reference  # noqa: E402


def traffic(T: int, H: int, I: int, E: int, K: int, itemsize: int = 2, seed: int = 0) -> dict:
    _, ids = route_reference(torch.randn(T, E, generator=torch.Generator().manual_seed(seed)), K)
    rows = torch.bincount(ids.reshape(-1).long(), minlength=E)
    expert = 3 * H * I * itemsize
    touched = int((rows > 0).sum())
    config = select_config(T, K, E, H, I, False, itemsize=itemsize)
    block_m = config.get("BLOCK_M", 16)
    m_tiles = [math.ceil(int(r) / block_m) for r in rows if r > 0]
    return {"T": T, "touched": touched, "must_MB": touched * expert / 1e6,
            "decode_MB": T * K * expert / 1e6,
            "grouped_requests_MB": sum(m_tiles) * expert / 1e6,
            "grouped_hbm_MB": sum(math.ceil(m / GROUP_M) for m in m_tiles) * expert / 1e6,
            "block_m": block_m}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--tokens", default="1,16,64,512,4096")
    args = parser.parse_args(argv)
    rows = []
    for name, (H, I, E, K) in SHAPES.items():
        for T in (int(t) for t in args.tokens.split(",")):
            rows.append({"shape": name, **traffic(T, H, I, E, K)})
    if args.markdown:
        print("| shape | T | experts touched | must read (MB) | GEMV path reads | grouped: requests | grouped: HBM (est.) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            must = r["must_MB"]
            print(f"| {r['shape']} | {r['T']} | {r['touched']} | {must:.0f} | {r['decode_MB'] / must:.1f}x | "
                  f"{r['grouped_requests_MB'] / must:.1f}x | {r['grouped_hbm_MB'] / must:.2f}x |")
    else:
        for r in rows:
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
