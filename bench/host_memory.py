"""Host memory while the expert cache fills: how far the process's peak resident memory rises over the
experts' own bytes when a model loaded in host memory is offloaded.

Each case runs in a fresh process on a random-weight Mixtral-shaped model (bf16, every weight in host
memory), and reports the rise of the process's peak RSS (VmHWM) from just before the
offload to just after it (the peak reset to the current RSS first: /proc/self/clear_refs), as a multiple
of the experts' bytes:
  - list:   the expert cache built from a list of the layers, the model's expert weights freed after
            (a caller that does not hand them over: the store and the model's copy coexist);
  - handed: moecache.patch(model, offload=Offload(..., device=D)): each layer is handed over to the
            store as it fills (released at once), and a store in host memory is page-locked only once
            filled.
D is the GPU where there is one (the store is then pinned), else the CPU (the host backend: pageable).

    python bench/host_memory.py --json bench/results/host_memory.jsonl      # GPU
    python bench/host_memory.py --quick                                      # CPU, a small model
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows  # noqa: E402

CASES = ("list", "handed")


def reset_peak_rss() -> bool:
    """Set the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the lifetime peak, kB on Linux


def build(expert_mib: int, layers: int):
    """A Mixtral-shaped bf16 model in host memory whose experts take about `expert_mib` MiB."""
    import transformers

    hidden, experts = 512, 8
    inter = max(64, expert_mib * 2**20 // (layers * experts * 3 * hidden * 2))
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                        num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=64)
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu").eval()  # allocated in bf16 at once
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.02)
        for b in model.buffers():  # rotary inv_freq and the like: made on meta, recomputed here
            if b.is_floating_point():
                b.copy_(1.0 / (10000 ** (torch.arange(b.numel(), dtype=torch.float32) * 2 / (2 * b.numel()))))
    return model


def run_case(case: str, expert_mib: int, layers: int, device: str) -> dict:
    import moecache
    from moecache import Offload
    from moecache.cache import ExpertCache

    model = build(expert_mib, layers)
    blocks = [layer.mlp.experts for layer in model.model.layers]
    expert_bytes = sum(p.numel() * p.element_size() for b in blocks for p in (b.gate_up_proj, b.down_proj))
    if not reset_peak_rss():
        raise SystemExit("host_memory: /proc/self/clear_refs is not writable, so the peak RSS cannot be reset")
    before = rss_bytes("VmRSS")
    start = time.perf_counter()
    if case == "list":
        cache = ExpertCache(blocks, num_slots=4, device=device)
        for b in blocks:
            for p in (b.gate_up_proj, b.down_proj):
                p.data = torch.empty(0, dtype=p.dtype)
        pinned = cache.pinned
    else:
        moecache.patch(model, offload=Offload(gpu_experts=4, device=device))
        cache = moecache.expert_cache(model)
        pinned = cache.pinned
    seconds = time.perf_counter() - start
    rise = max(0, rss_bytes("VmHWM") - before)
    if case == "handed":  # after the measurement: on the CPU the slots it fills are host memory too
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(3, 256, (1, 8), device=device)).logits.float()).all()
    return {"benchmark": "host_memory", "case": case, "offload_device": device, "layers": layers,
            "expert_bytes": expert_bytes, "store_bytes": cache.num_layers * cache.num_experts * cache.record_bytes,
            "pinned": pinned, "peak_rss_before": before, "peak_rss_rise": rise,
            "rise_over_experts": rise / expert_bytes, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # glibc returns a freed block to the system only when it was mapped on its own (>= 32 MiB once its
    # threshold has adapted): the quick model's tensors are that large, so what is freed shows in the RSS
    parser.add_argument("--quick", action="store_true", help="a small model on the CPU (256 MiB of experts)")
    parser.add_argument("--expert-mib", type=int, default=None, help="the experts' size (default 4096; quick 256)")
    parser.add_argument("--layers", type=int, default=None, help="MoE layers (default 8; quick 2)")
    parser.add_argument("--json", default=None, help="append rows here")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    expert_mib = args.expert_mib or (256 if args.quick else 4096)
    layers = args.layers or (2 if args.quick else 8)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.case:
        print(json.dumps(run_case(args.case, expert_mib, layers, device)))
        return 0
    rows = []
    for case in CASES:  # each in a fresh process: its peak RSS starts from the model alone
        proc = subprocess.run([sys.executable, __file__, "--case", case, "--expert-mib", str(expert_mib),
                               "--layers", str(layers)] + (["--quick"] if args.quick else []),
                              capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{case:7s} experts {r['expert_bytes'] / 2**20:8.1f} MiB  peak RSS rise {r['peak_rss_rise'] / 2**20:8.1f} MiB"
              f" = {r['rise_over_experts']:.2f}x the experts  ({'pinned' if r['pinned'] else 'pageable'} store on "
              f"{r['offload_device']}, {r['seconds']:.2f} s)")
    if args.json:
        append_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
