"""vLLM with moecache's per-expert offload against vLLM's own `--cpu-offload-gb`, at the same GPU memory for
expert weights: output tokens/s and time to first token at each batch size.

    python bench/bench_vllm.py --model DIR --gpu-expert-gib 8 [--batches 1,4,16,64] [--input-len 512]
        [--output-len 128] [--policy lru|lfu|predictive] [--providers vllm-offload,moecache-offload]
    python bench/bench_vllm.py --quick        # a tiny random Qwen3-MoE through the same code (checks the script)

Providers, each in its own process (vLLM reads the plugin switches once per process):
- `vllm-offload`: vLLM alone, `cpu_offload_gb` = the model's expert bytes minus the budget (vLLM offloads
  whole parameters and streams them back every step);
- `moecache-offload`: `MOECACHE_VLLM=1`, `MOECACHE_VLLM_OFFLOAD=<budget>GiB` (device slots for that many
  bytes of experts, the rest in pinned host memory, prefetched by `--policy`);
- `vllm` and `moecache`: everything on the GPU, the ceiling both offloads approach.
Both engines run eagerly (moecache's backend requires it; vLLM alone is run the same way so the comparison
isolates the offload). TTFT is the time of a request batch generating one token (prefill + first token);
tokens/s is batch x output-len over the time of the whole generation. Rows (bench/results/bench_vllm.jsonl
by default) carry device, versions, commit and date.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROVIDERS = ("vllm-offload", "moecache-offload", "vllm", "moecache")
EXPERT_KEY = ".experts."


def expert_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's routed-expert tensors (names containing '.experts.')."""
    from safetensors import safe_open

    total = 0
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"--model {model_dir}: no .safetensors files")
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if EXPERT_KEY in key:
                    piece = f.get_slice(key)
                    numel = 1
                    for d in piece.get_shape():
                        numel *= d
                    total += numel * _dtype_bytes(piece.get_dtype())
    if total == 0:
        raise SystemExit(f"--model {model_dir}: no tensor named '*{EXPERT_KEY}*' (not an MoE checkpoint?)")
    return total


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1}


def _dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise SystemExit(f"--model: expert tensors of safetensors dtype {name}; sizes known for {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def run_child(args) -> dict:
    """One provider in this process: time TTFT and generation at each batch size."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=args.model, skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=True,
                  max_model_len=args.input_len + args.output_len + 8, seed=0)
    if args.cpu_offload_gb > 0:
        kwargs["cpu_offload_gb"] = args.cpu_offload_gb
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    start = time.perf_counter()
    llm = LLM(**kwargs)
    init_s = time.perf_counter() - start
    vocab = llm.llm_engine.model_config.get_vocab_size()
    try:
        from moecache.integrations import vllm as backend
    except ImportError:
        backend = None
    rng = random.Random(0)
    out = {"init_s": init_s, "points": []}
    for batch in args.batches:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(args.input_len)])
                   for _ in range(batch)]
        first = SamplingParams(temperature=0, max_tokens=1, detokenize=False, ignore_eos=True)
        whole = SamplingParams(temperature=0, max_tokens=args.output_len, detokenize=False, ignore_eos=True)
        llm.generate(prompts, whole, use_tqdm=False)  # warm-up: caches, allocator, prefetch state
        if backend is not None:
            backend.reset_stats()
        ttft, gen = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            llm.generate(prompts, first, use_tqdm=False)
            ttft.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            results = llm.generate(prompts, whole, use_tqdm=False)
            gen.append((time.perf_counter() - t) * 1e3)
            produced = sum(len(r.outputs[0].token_ids) for r in results)
            if produced != batch * args.output_len:
                raise RuntimeError(f"batch {batch}: {produced} tokens generated, expected {batch * args.output_len}")
        ms = statistics.median(gen)
        out["points"].append({"batch": batch, "ms": ms, "ttft_ms": statistics.median(ttft),
                              "tok_s": batch * args.output_len / ms * 1e3, "reps": args.reps,
                              # the moecache engine's counters over this batch's timed runs (None: vLLM alone)
                              "moecache": backend.stats() if backend is not None else None})
    return out


def provider_env(provider: str, args, budget_gib: float) -> tuple[dict, float]:
    """The environment and cpu_offload_gb of a provider's process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOECACHE_VLLM")}
    cpu_offload_gb = 0.0
    if provider.startswith("moecache"):
        env["MOECACHE_VLLM"] = "1"
    if provider == "moecache-offload":
        env["MOECACHE_VLLM_OFFLOAD"] = f"{budget_gib:.6f}GiB"
        env["MOECACHE_VLLM_POLICY"] = args.policy
    if provider == "vllm-offload":
        cpu_offload_gb = max(0.0, args.expert_gib - budget_gib)
    if args.quick:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default sizes it from host memory
    return env, cpu_offload_gb


def tiny_model(root: Path) -> Path:
    """A random-weight Qwen3-MoE small enough for a CPU (head_dim 32: vLLM's CPU attention needs >= 32)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                            tie_word_embeddings=False, initializer_range=0.15)
    torch.manual_seed(0)
    path = root / "tiny-qwen3-moe"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local checkpoint directory (safetensors)")
    p.add_argument("--gpu-expert-gib", type=float, help="GPU memory for expert weights, both providers")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--policy", default="lru", choices=("lru", "lfu", "predictive"))
    p.add_argument("--providers", default="vllm-offload,moecache-offload")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--out", default=None, help="JSON lines file (default bench/results/bench_vllm.jsonl)")
    p.add_argument("--quick", action="store_true", help="a tiny random model through the same code (CPU)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cpu-offload-gb", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.child:
        print("BENCH_VLLM " + json.dumps(run_child(args)), flush=True)
        return 0

    providers = [s for s in args.providers.split(",") if s]
    unknown = [s for s in providers if s not in PROVIDERS]
    if unknown:
        p.error(f"--providers: unknown {unknown}; choose from {PROVIDERS}")
    tmp = None
    if args.quick:
        tmp = tempfile.TemporaryDirectory()
        args.model = str(tiny_model(Path(tmp.name)))
        args.batches, args.input_len, args.output_len, args.reps = [1, 4], 16, 8, 1
        args.dtype = "float32"
    if not args.model:
        p.error("--model is required (or --quick)")
    args.expert_gib = expert_bytes(Path(args.model)) / 2**30
    if args.gpu_expert_gib is None:
        args.gpu_expert_gib = args.expert_gib / 4 if args.quick else None
    if args.gpu_expert_gib is None or not 0 < args.gpu_expert_gib:
        p.error("--gpu-expert-gib: a positive budget (GiB of expert weights on the GPU) is required")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import append_rows, row

    rows = []
    for provider in providers:
        env, cpu_offload_gb = provider_env(provider, args, args.gpu_expert_gib)
        cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--child", provider, "--model", args.model,
               "--batches", ",".join(map(str, args.batches)), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--reps", str(args.reps), "--dtype", args.dtype,
               "--cpu-offload-gb", str(cpu_offload_gb)]
        if args.gpu_memory_utilization:
            cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_VLLM ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-4000:], file=sys.stderr)
            print(f"{provider}: failed (rc {proc.returncode})", file=sys.stderr)
            return 1
        result = json.loads(lines[-1][len("BENCH_VLLM "):])
        for point in result["points"]:
            shape = {"model": Path(args.model).name, "batch": point["batch"], "input_len": args.input_len,
                     "output_len": args.output_len, "gpu_expert_gib": round(args.gpu_expert_gib, 6),
                     "expert_gib": round(args.expert_gib, 6)}
            rows.append(row("bench_vllm", shape, provider, {"ms": point["ms"], "reps": point["reps"]},
                            tok_s=point["tok_s"], ttft_ms=point["ttft_ms"], cpu_offload_gb=cpu_offload_gb,
                            policy=args.policy if provider == "moecache-offload" else None,
                            moecache_stats=point["moecache"], init_s=result["init_s"]))
            print(f"{provider:>17}  batch {point['batch']:>3}: {point['tok_s']:9.1f} tok/s, "
                  f"TTFT {point['ttft_ms']:8.1f} ms")
    out = Path(args.out) if args.out else Path("bench_vllm.jsonl")
    print(f"rows -> {append_rows(out, rows)}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
