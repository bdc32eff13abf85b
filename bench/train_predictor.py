"""Record routing of the shipped tiny MoE on its training text and train a LearnedRoutePredictor from it.

For each MoE layer t and depth d (t - d also a MoE layer), a small MLP learns to map the hidden state
entering layer t - d's experts to the experts layer t chooses. Recall (per token, top-k of the scores
against the actual top-k) is measured on the held-out sample for the learned heads and for lookahead
gating (the next router reused), and written next to the predictor.

    python bench/train_predictor.py                 # -> moecache/data/tiny_moe/route_predictor.pt (+ .json)
    python bench/train_predictor.py --quick --out /tmp/p.pt
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_moe import build_stream, split_files, stdlib_files  # noqa: E402

from moecache.analysis.traces import record_layer_inputs  # noqa: E402
from moecache.cache.learned import top_k_recall, train_route_predictor  # noqa: E402
from moecache.data import TINY_MOE_DIR, encode, load_tiny_moe, validation_text  # noqa: E402
from moecache.patching.families import find_router  # noqa: E402


def pairs_from(trace: dict, first_moe: int, num_decoder_layers: int, depth: int) -> dict:
    """{(moe target, depth): (hidden of moe layer target - depth, topk ids of target)}; MoE-layer indices."""
    moe_layers = list(range(first_moe, num_decoder_layers))
    pairs = {}
    for t in range(len(moe_layers)):
        for d in range(1, depth + 1):
            if t - d < 0:
                continue
            pairs[(t, d)] = (trace[moe_layers[t - d]]["hidden"], trace[moe_layers[t]]["topk_ids"])
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(TINY_MOE_DIR / "route_predictor.pt"))
    parser.add_argument("--tokens", type=int, default=256 * 2048, help="training tokens recorded")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="a few thousand tokens, 1 epoch (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.epochs = 256 * 16, 1
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_tiny_moe()
    root, files = stdlib_files()
    train_files, _ = split_files(files, seed=0)  # the split the model was trained with: no held-out file
    stream, _, _ = build_stream(root, train_files)
    offset = stream.numel() // 3  # away from the start, different bytes from the first training crops seen
    ids = stream[offset: offset + args.tokens].long()
    n_layers, first = len(model.model.layers), model.config.first_k_dense_replace
    E = model.config.n_routed_experts
    with torch.no_grad():
        train_pairs = pairs_from(record_layer_inputs(model, ids), first, n_layers, args.depth)
        held = record_layer_inputs(model, encode(validation_text()))
    held_pairs = pairs_from(held, first, n_layers, args.depth)
    record_s = time.perf_counter() - start
    predictor = train_route_predictor(train_pairs, model.config.hidden_size, E, width=args.width,
                                      epochs=args.epochs, log=print)
    train_s = time.perf_counter() - start - record_s

    report = {"tokens": int(ids.numel()), "epochs": args.epochs, "width": args.width, "record_s": record_s,
              "train_s": train_s, "heads": []}
    moe_layers = list(range(first, n_layers))
    print(f"\nheld-out per-token recall (top-{held[moe_layers[0]]['topk_ids'].shape[1]} of {E}):")
    for (t, d), (x, actual) in sorted(held_pairs.items()):
        block = model.model.layers[moe_layers[t]].mlp
        router = find_router(block, E, model.config.hidden_size)
        with torch.no_grad():
            learned = top_k_recall(predictor.scores(t, d, x), actual)
            gating = top_k_recall(router.scores(x), actual)
        report["heads"].append({"target": t, "depth": d, "learned_recall": learned, "lookahead_recall": gating})
        print(f"  MoE layer {t} from {d} back: learned {learned:.3f}   lookahead gating {gating:.3f}")
    predictor.save(args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"-> {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB); record {record_s:.0f} s, train {train_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
