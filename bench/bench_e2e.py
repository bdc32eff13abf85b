"""End-to-end throughput: MoE models with moecache (kernels, expert offload, predictive caching, token
scheduling) against dense 7B / 13B models, on DeepSeek-VL2-style multimodal prompt lengths.

For every model, prompt mix and batch size: prefill tokens/s and decode tokens/s, for
  - MoE models (random weights at full width; `--layers` decoder layers, tokens/s also extrapolated to
    the full depth by scaling the per-layer time: decode time x full layers / measured layers):
      hf:eager         transformers' own expert loop          (unpatched)
      hf:grouped_mm    transformers' grouped_mm experts       (set_experts_implementation)
      moecache         patched, experts resident              (budget 100%)
      offloaded        patched with Offload at 25% / 50% of experts on the GPU, policies:
                       on_demand (1 slot per layer, LRU, no prefetch), lru, predictive, predictive+sched
  - dense Llama-7B- and 13B-shaped models (bf16), same depth rule;
and two ways of running decode, named in every row ("mode"):
      eager   transformers' generate as users get it (CPU-bound launch overhead included)
      graph   static cache + torch.compile(mode="reduce-overhead") forward: CUDA graphs (GPU only)
Per decode step (eager) the time is split with CUDA events around attention and expert modules:
attention, experts, exposed copy stall (cache stats), predictor, scheduler, other. Offloaded rows carry
two bounds from the same run: all experts resident, and the PCIe bound (the misses' expert bytes over
the pinned H2D bandwidth measured at the start, on top of resident decode).
transformers/accelerate CPU offload: accelerate is not installed here, so its scheme is written out as
hooks (hf:cpu-offload: every experts module's weights copied from pinned memory before each call).

    python bench/bench_e2e.py --json bench/results/bench_e2e.jsonl    # GPU
    python bench/bench_e2e.py --quick                                  # CPU smoke run, tiny shapes
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, environment, measure_h2d_gbps, time_ms  # noqa: E402

import moecache  # noqa: E402
from moecache import Offload  # noqa: E402
from moecache.analysis.workloads import sample_prompts  # noqa: E402
from moecache.cache.scheduler import generate_scheduled  # noqa: E402
from moecache.compat import set_experts_implementation  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **_):
        return x

# name -> (transformers class name, config kwargs, full depth). VL2-base is stated as used here.
FULL = {
    "vl2-small": ("DeepseekV2", dict(vocab_size=102400, hidden_size=2048, num_attention_heads=16,
                                     num_key_value_heads=16, intermediate_size=10944, moe_intermediate_size=1408,
                                     n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                                     first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.0,
                                     kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                                     qk_nope_head_dim=128, v_head_dim=128), 27),
    "vl2-base": ("DeepseekV3", dict(vocab_size=129280, hidden_size=2560, num_attention_heads=32,
                                    num_key_value_heads=32, intermediate_size=12288, moe_intermediate_size=1536,
                                    n_routed_experts=72, num_experts_per_tok=6, n_shared_experts=2,
                                    first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                    routed_scaling_factor=2.0, kv_lora_rank=512, q_lora_rank=1536,
                                    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128), 30),
    "mixtral-8x7b": ("Mixtral", dict(vocab_size=32000, hidden_size=4096, num_attention_heads=32,
                                     num_key_value_heads=8, intermediate_size=14336, num_local_experts=8,
                                     num_experts_per_tok=2), 32),
    "llama-7b": ("Llama", dict(vocab_size=32000, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=11008), 32),
    "llama-13b": ("Llama", dict(vocab_size=32000, hidden_size=5120, num_attention_heads=40, num_key_value_heads=40,
                                intermediate_size=13824), 40),
}
QUICK = {
    "vl2-small": ("DeepseekV2", dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                     intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
                                     num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                                     topk_method="greedy", routed_scaling_factor=1.0, kv_lora_rank=16,
                                     q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16), 27),
    "vl2-base": ("DeepseekV3", dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                    intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
                                    num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                    topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0, kv_lora_rank=16,
                                    q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16), 30),
    "mixtral-8x7b": ("Mixtral", dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=64, num_local_experts=8, num_experts_per_tok=2), 32),
    "llama-7b": ("Llama", dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                               intermediate_size=128), 32),
}
DENSE = ("llama-7b", "llama-13b")
GRAPH_PROVIDERS = ("hf:eager", "moecache", "offload50:predictive")


def build(name, table, layers, device, dtype):
    import transformers

    kind, kwargs, full_layers = table[name]
    config = getattr(transformers, f"{kind}Config")(**kwargs, num_hidden_layers=layers,
                                                     max_position_embeddings=16384)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, f"{kind}ForCausalLM")(config).to(dtype).eval()
    if hasattr(model, "set_experts_implementation") and name not in DENSE:
        set_experts_implementation(model, "eager")  # transformers 5.23 defaults to grouped_mm: hf:eager means eager
    return model, full_layers


class StepTimer:
    """Eager-mode split of a forward into attention and expert time (CUDA events; perf_counter on CPU)."""

    def __init__(self, model):
        from moecache.layers import MoecacheExperts

        self.on_gpu = next(model.parameters()).device.type == "cuda"
        self.spans = {"attention": [], "experts": []}
        self.handles = []
        for name, module in model.named_modules():
            kind = ("experts" if isinstance(module, MoecacheExperts) or name.endswith(".experts") else
                    "attention" if name.endswith("self_attn") else None)
            if kind is None:
                continue
            self.handles.append(module.register_forward_pre_hook(lambda m, a, kind=kind: self._start(kind)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, kind=kind: self._stop(kind)))
        self.open = {}

    def _mark(self):
        if self.on_gpu:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _start(self, kind):
        self.open[kind] = self._mark()

    def _stop(self, kind):
        self.spans[kind].append((self.open.pop(kind), self._mark()))

    def totals_ms(self) -> dict:
        if self.on_gpu:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) for k, v in self.spans.items()}
        return {k: sum(b - a for a, b in v) * 1e3 for k, v in self.spans.items()}

    def close(self):
        for h in self.handles:
            h.remove()


class CpuOffloadHooks:
    """The accelerate-style CPU offload baseline, written out (accelerate is not installed here): each
    experts module's weights live in pinned host memory and are copied to the device before every call
    and dropped after it, which is what accelerate's cpu_offload hooks do."""

    def __init__(self, model, device):
        self.device, self.saved, self.handles = device, [], []
        for name, module in model.named_modules():
            if not name.endswith(".experts"):
                continue
            params = list(module.parameters(recurse=False))
            host = [p.data.to("cpu").pin_memory() if device.type == "cuda" else p.data.clone() for p in params]
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype, device=device)
            self.saved.append((params, host))
            self.handles.append(module.register_forward_pre_hook(lambda m, a, ps=params, hs=host: self._load(ps, hs)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, ps=params: self._drop(ps)))

    def _load(self, params, host):
        for p, h in zip(params, host):
            p.data = h.to(self.device, non_blocking=True)

    def _drop(self, params):
        for p in params:
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)

    def remove(self):
        for h in self.handles:
            h.remove()
        for params, host in self.saved:
            for p, h in zip(params, host):
                p.data = h.to(self.device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, prompts, new_tokens, mode, device, scheduled_batch=None):
    """(prefill tokens/s, decode tokens/s, breakdown ms per decode step, generated ids)."""
    B, S = prompts.shape
    mask = torch.ones_like(prompts)
    with torch.no_grad():
        model(prompts[:, : min(S, 8)])  # warm-up
        prefill = time_ms(lambda: model(prompts), warmup=1, rep=3, flush_l2=False, device=device)["ms"]
        kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if mode == "graph":
            # A static cache makes transformers' generate compile the decode step (reduce-overhead: CUDA
            # graphs) and run the prompt eagerly; drop the compiled call a previous configuration left.
            kwargs["cache_implementation"] = "static"
            model.__dict__.pop("_compiled_call", None)
            torch._dynamo.reset()
        scheduler = {"s": 0.0}  # host time the token scheduler spent grouping, on the timed run

        def run():
            if scheduled_batch is None:
                return model.generate(prompts, **kwargs)
            out, info = generate_scheduled(model, prompts, moecache.patched_experts(model), batch_size=scheduled_batch,
                                           max_new_tokens=new_tokens)
            scheduler["s"] = info["scheduler_s"]
            return out
        run()  # warm-up (and compile, in graph mode)
        timer = StepTimer(model) if mode == "eager" else None
        before = _counters(model)
        sync(device)
        start = time.perf_counter()
        out = run()
        sync(device)
        seconds = time.perf_counter() - start
        after = _counters(model)
        breakdown = timer.totals_ms() if timer else {}
        if timer:
            timer.close()

    decode_s = max(seconds - prefill / 1e3, 1e-9)
    steps = new_tokens - 1
    forwards = steps + 1  # the prompt, then one forward per further token
    per_step = {k: v / forwards for k, v in breakdown.items()}
    delta = {k: after[k] - before[k] for k in after}
    per_step.update(stall=delta["stall_ms"] / forwards, predictor=1e3 * delta["predictor_s"] / forwards,
                    scheduler=1e3 * scheduler["s"] / forwards)
    return B * S / (prefill / 1e3), B * steps / decode_s, per_step, delta, out


def _counters(model) -> dict:
    """Cache and predictor counters of a patched model (zeros otherwise), to difference around a run."""
    stats = moecache.stats(model)
    cache = stats.get("cache") or {}
    return {"requests": cache.get("requests", 0), "hits": cache.get("hits", 0), "misses": cache.get("misses", 0),
            "stall_ms": cache.get("stall_ms", 0.0),
            "predictor_s": (stats.get("prediction") or {}).get("predictor_seconds", 0.0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers built per model (GPU)")
    # The default grid runs in under ten minutes on one GPU; the whole study is --batches 1,4,16,64
    # --mixes mmmu,mathvista,text, run per --models across calls (rows append).
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--mixes", default="mmmu")
    parser.add_argument("--models", default="vl2-small,vl2-base,mixtral-8x7b,llama-7b,llama-13b")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=2048, help="prompt tokens are capped here")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to run (default: all), e.g. hf:eager,moecache")
    parser.add_argument("--modes", default=None, help="eager,graph (default: both on a GPU)")
    parser.add_argument("--graph-providers", default=",".join(GRAPH_PROVIDERS),
                        help="providers also run in graph mode (each costs a compile)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    table = FULL
    if args.quick:
        table, args.layers, args.batches, args.mixes = QUICK, 3, "1,2", "mathvista"
        args.models, args.new_tokens, args.max_prompt = "vl2-small,vl2-base,mixtral-8x7b,llama-7b", 6, 48
    elif not on_gpu:
        raise SystemExit("bench_e2e: full sizes need a GPU; use --quick on CPU")
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    modes = ("eager", "graph") if on_gpu else ("eager",)
    if args.modes:
        modes = tuple(m for m in args.modes.split(",") if m in modes)
    env = environment()
    h2d = measure_h2d_gbps()
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    mixes = args.mixes.split(",")
    for name in tqdm(args.models.split(","), desc="models"):
        model, full_layers = build(name, table, args.layers, device, dtype)
        depth_scale = full_layers / args.layers
        is_moe = name not in DENSE
        configs = [("hf:eager", None, None)]
        if is_moe:
            configs += [("hf:grouped_mm", None, None), ("moecache", None, None), ("hf:cpu-offload", None, 0.0)]
            for budget in (0.25, 0.5):
                configs += [(f"offload{int(budget * 100)}:on_demand", Offload(gpu_experts=1, prefetch=False), budget),
                            (f"offload{int(budget * 100)}:lru", Offload(gpu_experts=budget, prefetch=False), budget),
                            (f"offload{int(budget * 100)}:predictive",
                             Offload(gpu_experts=budget, policy="predictive"), budget),
                            (f"offload{int(budget * 100)}:predictive+sched",
                             Offload(gpu_experts=budget, policy="predictive"), budget)]
        if args.providers:
            wanted = args.providers.split(",")
            configs = [c for c in configs if c[0] in wanted]
        for mix in mixes:
            length = min(args.max_prompt, sorted(p.tokens for p in sample_prompts(mix, 101))[50])  # median
            for B in batches:
                prompts = torch.randint(3, model.config.vocab_size, (B, length), device=device)
                resident_decode = None
                for provider, offload, budget in configs:
                    for mode in modes:
                        if mode == "graph" and provider not in args.graph_providers.split(","):
                            continue  # each compiled configuration costs a compile; these carry the comparison
                        if provider == "hf:grouped_mm":
                            try:
                                set_experts_implementation(model, "grouped_mm")
                            except Exception as err:  # noqa: BLE001 - recorded, not hidden
                                rows.append({**env, "benchmark": "bench_e2e.skipped", "model": name,
                                             "provider": provider, "reason": str(err)})
                                continue
                        elif provider == "hf:cpu-offload":
                            hooks = CpuOffloadHooks(model, device)
                        elif provider != "hf:eager":
                            moecache.patch(model, offload=offload)
                        sched = B // 2 if provider.endswith("+sched") and B > 1 else None
                        try:
                            prefill, decode, per_step, delta, _ = measure(model, prompts, args.new_tokens, mode,
                                                                          device, scheduled_batch=sched)
                        except Exception as err:  # noqa: BLE001 - an OOM or a capture failure is a result
                            rows.append({**env, "benchmark": "bench_e2e.skipped", "model": name, "mix": mix,
                                         "batch": B, "provider": provider, "mode": mode, "reason": repr(err)[:300]})
                            per_step = None
                        record_bytes = moecache.expert_cache(model).record_bytes if offload is not None else 0
                        gpu_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                                        if p.device.type == device.type)
                        if offload is not None:
                            gpu_bytes += moecache.expert_cache(model).num_slots * record_bytes
                        if provider == "hf:grouped_mm":
                            set_experts_implementation(model, "eager")
                        elif provider == "hf:cpu-offload":
                            hooks.remove()
                        elif provider != "hf:eager":
                            moecache.unpatch(model)
                        if per_step is None:
                            continue
                        if provider == "moecache" and mode == "eager":
                            resident_decode = decode
                        tokens = B * args.new_tokens
                        misses_per_token = delta["misses"] / tokens
                        hit_rate = delta["hits"] / delta["requests"] if delta["requests"] else None
                        bound = None
                        if offload is not None and resident_decode and h2d:
                            per_token = 1 / resident_decode + misses_per_token * record_bytes / (h2d * 1e9)
                            bound = 1 / per_token  # tokens/s if every miss cost its PCIe transfer on top
                        step_ms = 1e3 * B / decode if decode else None
                        other = max(step_ms - sum(per_step.values()), 0.0) if step_ms and mode == "eager" else None
                        rows.append({**env, "benchmark": "bench_e2e", "model": name, "kind": "moe" if is_moe else "dense",
                                     "layers": args.layers, "full_layers": full_layers, "mix": mix, "prompt": length,
                                     "batch": B, "provider": provider, "mode": mode, "budget": 1.0 if budget is None else budget,
                                     "prefill_tok_s": prefill, "decode_tok_s": decode,
                                     "decode_tok_s_full_depth": decode / depth_scale,
                                     "prefill_tok_s_full_depth": prefill / depth_scale,
                                     "hit_rate": hit_rate, "misses_per_token": misses_per_token,
                                     "resident_decode_tok_s": resident_decode,
                                     "pcie_bound_decode_tok_s": bound, "h2d_gbps": h2d,
                                     "step_ms": step_ms, "breakdown_ms": {**per_step, "other": other},
                                     "note": ("time includes the scheduler's routing forward and each group's own "
                                              "prefill" if sched else
                                              "compiled decode does no cache bookkeeping: slots hold what eager "
                                              "warm-up left, misses are read in place over PCIe"
                                              if offload is not None and mode == "graph" else None),
                                     "gpu_weight_bytes": gpu_bytes,
                                     "gpu_weight_bytes_full_depth": gpu_bytes * depth_scale})
        del model
        if on_gpu:  # compiled graphs and their memory pools hold GPU memory until reset
            import gc

            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
    done = [r for r in rows if r["benchmark"] == "bench_e2e"]
    print(f"\n{'model':<13} {'mix':<10} {'B':>3} {'provider':<28} {'mode':<6} {'prefill tok/s':>13} {'decode tok/s':>12}"
          f" {'(full depth)':>12} {'hit':>6}")
    for r in done:
        hit = f"{r['hit_rate']:.0%}" if r["hit_rate"] is not None else ""
        print(f"{r['model']:<13} {r['mix']:<10} {r['batch']:>3} {r['provider']:<28} {r['mode']:<6} "
              f"{r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.1f} {r['decode_tok_s_full_depth']:>12.1f} {hit:>6}")
    if args.json:
        append_rows(args.json, rows)
        print(f"{len(rows)} rows -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
