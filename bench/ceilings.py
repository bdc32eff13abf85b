"""This GPU's ceilings, measured now: HBM copy and read GB/s, bf16 matmul TFLOP/s, pinned H2D GB/s.
Every benchmark reports its speed as a ratio to these (bench/common.py measures them the same way).

    python bench/ceilings.py --json $OUT/ceilings.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, measure_ceilings, measure_h2d_gbps  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the ceilings here (one JSON object)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ceilings: no CUDA device")
    result = {**measure_ceilings(), "h2d_pinned_gbps": measure_h2d_gbps(), **environment()}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
