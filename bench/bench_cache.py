"""Expert caching policies, all in one run: hit rate, loads and tokens/s against GPU expert budgets.

1. trace:  the model's routing while it greedy-decodes held-out text (recorded once, in order and
           regrouped by the token scheduler) replayed through every policy at budgets of 12.5/25/50/100%
           of all experts: on-demand (nothing kept), LRU, LFU, predictive (lookahead gating, depth 1
           and 2), predictive + scheduling, budgeted (prefetch only the surest guesses that land before
           their layer runs), and Belady's MIN (the fewest loads any demand-loading cache can do,
           knowing the future). Also the predictor's recall and precision by depth. Timing model
           (simulate.Timing): one FIFO copy engine moving a target model's expert (--expert-bytes,
           default a DeepSeek-VL2-Small expert, 3 x 2048 x 1408 bf16) at --h2d-gbps (default 55, pinned
           H2D on an H100/H200) against --layer-ms of compute per layer (default 0.04, a decode step's
           MoE layer): stall ms per token (the compute waiting on copies) beside loads per token, both per
           decoded token over the decode steps (each micro-batch's prompt step left out).
2. live:   the patched, offloaded model generating for real at each budget and policy (the C++ cache;
           its host backend on CPU): measured hit rate, prefetches, wasted prefetches, stall, tokens/s,
           next to all experts resident, and next to the tokens/s Belady's hit rate would give if every
           miss cost its PCIe transfer on top of resident decode (PCIe from the measured ceiling).
3. full:   (GPU) the same live comparison on a random-weight model shaped like DeepSeek-V2-Lite
           (H 2048, I 1408, 64 experts, top-6, 2 shared), a few layers.

Model for 1 and 2: the small MoE the project trained (moecache.data.load_tiny_moe) when it is there,
else a random tiny DeepSeek-V2 (said in every row: random routing has no structure to predict).

    python bench/bench_cache.py --json bench/results/bench_cache.jsonl   # GPU
    python bench/bench_cache.py --quick                                   # CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, environment  # noqa: E402

import moecache  # noqa: E402
from moecache import Offload, prefetch_allowance  # noqa: E402
from moecache.analysis.simulate import Timing, simulate  # noqa: E402
from moecache.analysis.traces import record_routing  # noqa: E402
from moecache.cache.scheduler import group_by_routes, prompt_routes  # noqa: E402

BUDGETS = (0.125, 0.25, 0.5, 1.0)
VL2_SMALL_EXPERT_BYTES = 3 * 2048 * 1408 * 2  # gate, up, down of one DeepSeek-VL2-Small expert in bf16


PHI2_EXPERT_BYTES = 2 * 2560 * 10240 * 2  # fc1 and fc2 of one MoE-LLaVA-Phi2 expert in bf16


def load_model(device, dtype, quick, which="tiny-moe"):
    if which == "tiny-moe-llava":
        from moecache.data import encode, load_tiny_moe_llava, validation_text

        torch.manual_seed(0)  # DeepSpeed's top-2 gate samples its second expert, in eval mode too
        return load_tiny_moe_llava(device=device, dtype=dtype), encode(validation_text())[0], "trained-tiny-moe-llava"
    try:
        from moecache.data import encode, load_tiny_moe, validation_text
    except ImportError:
        encode = load_tiny_moe = validation_text = None
    if load_tiny_moe is not None:
        try:
            model = load_tiny_moe(device=device, dtype=dtype)
            ids = encode(validation_text())[0]
            return model, ids, "trained-tiny-moe"
        except OSError as err:  # the checkpoint is missing from this tree
            print(f"bench_cache: no trained checkpoint ({err}); using a random model", file=sys.stderr)
    import transformers

    config = transformers.DeepseekV2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, topk_method="greedy", routed_scaling_factor=1.0)
    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(config).to(device, dtype).eval()
    return model, torch.randint(3, 256, (4096,)), "random-tiny-deepseek"


def prompts_from(ids: torch.Tensor, n: int, length: int, device) -> torch.Tensor:
    stride = max(1, (ids.numel() - length) // max(n, 1))
    return torch.stack([ids[i * stride: i * stride + length] for i in range(n)]).to(device)


def shipped_predictor(label):
    """The learned routing-path predictor shipped with the trained model, or None."""
    if label != "trained-tiny-moe":
        return None
    from moecache.data import TINY_MOE_DIR

    path = TINY_MOE_DIR / "route_predictor.pt"
    return path if path.is_file() else None


def _percent(share) -> str:
    return "n/a" if share is None else f"{share:.1%}"


def record(model, prompts, batch, new_tokens, depth, groups=None, learned=None):
    """Routing traces of generating every prompt in micro-batches (in order, or the given groups), one
    after another, and the indices of their prompt steps (each micro-batch's first)."""
    groups = groups or [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    steps, predictions, scores, tokens, prompt_steps = [], [], [], [], []
    trace = None
    for group in groups:
        trace, _ = record_routing(model, prompts[group], moecache.patched_experts(model), moecache.routers(model),
                                  max_new_tokens=new_tokens, depth=depth, learned=learned)
        prompt_steps.append(len(steps))
        steps += trace.steps
        predictions += trace.predictions
        scores += trace.scores
        tokens += trace.tokens
    trace.steps, trace.predictions, trace.scores, trace.tokens = steps, predictions, scores, tokens
    return trace, prompt_steps


def trace_rows(model, prompts, args, label, env):
    moecache.patch(model)
    routes = prompt_routes(model, prompts, moecache.patched_experts(model), batch_size=args.batch)
    t0 = time.perf_counter()
    groups = group_by_routes(routes, args.batch)
    scheduler_s = time.perf_counter() - t0
    in_order, prompt_steps = record(model, prompts, args.batch, args.new_tokens, depth=2)
    scheduled, scheduled_prompt_steps = record(model, prompts, args.batch, args.new_tokens, depth=2, groups=groups)
    learned_path, learned_in_order, learned_scheduled = shipped_predictor(label), None, None
    if learned_path is not None:
        from moecache.cache.learned import LearnedRoutePredictor

        learned = LearnedRoutePredictor.load(learned_path, device=prompts.device)
        learned_in_order, _ = record(model, prompts, args.batch, args.new_tokens, depth=2, learned=learned)
        learned_scheduled, _ = record(model, prompts, args.batch, args.new_tokens, depth=2, groups=groups,
                                      learned=learned)
        assert learned_in_order.steps == in_order.steps  # same routing, other guesses
    moecache.unpatch(model)
    L, E = in_order.num_layers, in_order.num_experts
    # Per decoded token: the decode steps' figures (every micro-batch's prompt step left out, its loads too)
    # over the tokens they produced
    decode_tokens = len(prompts) * (args.new_tokens - 1)
    rows = []
    predictors = [("lookahead", in_order)] + ([("learned", learned_in_order)] if learned_in_order else [])
    for name, trace in predictors:
        for depth in (1, 2):
            rec = trace.recall(depth=depth, skip_steps=prompt_steps)
            rows.append({**env, "benchmark": "bench_cache.recall", "model": label, "predictor": name,
                         "depth": depth, "batch": args.batch, "recall": rec["overall"], "per_layer": rec["per_layer"]})
            print(f"[{label}] {name} recall per step (batch {args.batch}), depth {depth}: {_percent(rec['overall'])} "
                  f"per layer " + ", ".join(f"{l}: {r:.1%}" for l, r in rec["per_layer"].items()))
    print(f"scheduler {scheduler_s * 1e3:.1f} ms for {len(prompts)} requests (target: next-layer recall >= 85% on "
          "the trained model)")
    timing = Timing.from_pcie(args.layer_ms, args.expert_bytes, args.h2d_gbps)
    print(f"timing model (assumed): {args.layer_ms} ms of compute per layer, experts of {args.expert_bytes / 1e6:.1f} MB "
          f"at {args.h2d_gbps} GB/s = {timing.load_ms:.3f} ms each, one FIFO copy engine")
    print("cells, over decode steps (prompt steps left out): hit rate, loads (experts moved) per decoded token, "
          "exposed stall ms per decoded token")

    def sim(trace, slots, policy, predicted=None, depth=1):
        return simulate(trace.steps, slots, policy, depth=depth, timing=timing,
                        warmup_steps=scheduled_prompt_steps if trace is scheduled else prompt_steps,
                        predictions=None if predicted is None else predicted.predictions,
                        scores=None if predicted is None else predicted.scores)

    rows_by_budget = {}
    for budget in BUDGETS:
        slots = max(1, round(budget * L * E))
        results = {
            "on_demand": sim(in_order, slots, "on_demand"),
            "lru": sim(in_order, slots, "lru"),
            "lfu": sim(in_order, slots, "lfu"),
            "predictive-d1": sim(in_order, slots, "predictive", in_order, 1),
            "predictive-d2": sim(in_order, slots, "predictive", in_order, 2),
            "pred-d2+sched": sim(scheduled, slots, "predictive", scheduled, 2),
            "budgeted-d2": sim(in_order, slots, "budgeted", in_order, 2),
            **({} if not learned_in_order else {
                "learned-d1": sim(in_order, slots, "predictive", learned_in_order, 1),
                "learned-d2": sim(in_order, slots, "predictive", learned_in_order, 2),
                "learned-d2+sched": sim(scheduled, slots, "predictive", learned_scheduled, 2),
                "learned-budgeted-d2": sim(in_order, slots, "budgeted", learned_in_order, 2)}),
            "belady": sim(in_order, slots, "belady"),
            "belady+sched": sim(scheduled, slots, "belady"),
        }
        rows_by_budget[(budget, slots)] = results
        for name, r in results.items():
            rows.append({**env, "benchmark": "bench_cache.trace", "model": label, "budget": budget, "slots": slots,
                         "batch": args.batch, "requests": len(prompts), "new_tokens": args.new_tokens,
                         "provider": name, **r.as_dict(), "decode_hit_rate": r.hit_rate_after_warmup,
                         "loads_per_token": r.loads_after_warmup / decode_tokens,
                         "stall_ms_per_token": r.stall_ms_after_warmup / decode_tokens, "layer_ms": args.layer_ms,
                         "h2d_gbps": args.h2d_gbps, "expert_bytes": args.expert_bytes, "load_ms": timing.load_ms,
                         "scheduler_ms": scheduler_s * 1e3 if "sched" in name else None})
    columns = list(next(iter(rows_by_budget.values())))
    print(f"{'policy':>20}  " + "  ".join(f"{f'{b:.3f} ({s} slots)':>24}" for b, s in rows_by_budget))
    for name in columns:
        cells = [f"{r[name].hit_rate_after_warmup:6.1%} {r[name].loads_after_warmup / decode_tokens:6.2f}l/t "
                 f"{r[name].stall_ms_after_warmup / decode_tokens:6.3f}ms" for r in rows_by_budget.values()]
        print(f"{name:>20}  " + "  ".join(f"{c:>24}" for c in cells))
    return rows


def live_rows(model, prompts, args, label, env, ceilings, policies, budgets):
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    rows = []

    def run(name, offload):
        moecache.patch(model, offload=offload)
        with torch.no_grad():
            mask = torch.ones_like(prompts[: args.batch])
            model.generate(prompts[: args.batch], attention_mask=mask, max_new_tokens=2, min_new_tokens=2,
                           do_sample=False)  # warm-up
            before = moecache.stats(model)["cache"] or {}
            if on_gpu:
                torch.cuda.synchronize()
            torch.manual_seed(0)  # a sampling gate (DeepSpeed's top-2) draws the same noise in every run
            after_prompt = []  # the counters once the prompt step ran: the rest is decode

            def note_prompt_done(*_):
                if not after_prompt:
                    after_prompt.append(moecache.stats(model)["cache"] or {})

            hook = model.register_forward_hook(note_prompt_done)
            try:
                t0 = time.perf_counter()
                out = model.generate(prompts[: args.batch], attention_mask=mask, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False)
                if on_gpu:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
            finally:
                hook.remove()
        stats = moecache.stats(model)
        cache = stats["cache"] or {}
        delta = {k: cache.get(k, 0) - before.get(k, 0) for k in ("requests", "hits", "misses", "prefetches",
                                                                   "prefetch_hits", "wasted_prefetches")}
        decode = {k: cache.get(k, 0) - after_prompt[0].get(k, 0) for k in ("requests", "hits", "misses")}
        record_bytes = moecache.expert_cache(model).record_bytes if offload else 0
        moecache.unpatch(model)
        tokens = args.batch * args.new_tokens
        decode_tokens = args.batch * (args.new_tokens - 1)
        return {"provider": name, "tokens_per_s": tokens / seconds, "seconds": seconds,
                "hit_rate": delta["hits"] / delta["requests"] if delta["requests"] else 1.0,
                "misses_per_token": delta["misses"] / tokens, **delta,
                "decode_hit_rate": decode["hits"] / decode["requests"] if decode["requests"] else 1.0,
                "decode_misses_per_token": decode["misses"] / decode_tokens if decode_tokens else None,
                "stall_ms": cache.get("stall_ms"), "record_bytes": record_bytes,
                "prefetch_limit": getattr(offload, "prefetch_limit", None),
                "recall_d1": (stats.get("prediction") or {}).get("by_depth", {}).get(1, {}).get("recall")}, out

    resident, ref = run("resident", None)
    rows.append({**env, "benchmark": "bench_cache.live", "model": label, "budget": 1.0, **resident})
    print(f"\n[{label}] live, batch {args.batch}, {args.new_tokens} tokens on {device.type}: "
          f"all experts resident {resident['tokens_per_s']:.1f} tokens/s")
    pcie = (ceilings.get("h2d_gbps") or 0) * 1e9
    for budget in budgets:
        for name, offload in policies(budget):
            result, out = run(name, offload)
            same = bool(torch.equal(out, ref))
            bound = None
            if pcie and result["record_bytes"]:
                per_token = 1 / resident["tokens_per_s"] + result["misses_per_token"] * result["record_bytes"] / pcie
                bound = 1 / per_token
            rows.append({**env, "benchmark": "bench_cache.live", "model": label, "budget": budget, **result,
                         "tokens_identical": same, "pcie_bound_tokens_per_s": bound})
            print(f"  budget {budget:5.3f} {name:<22} {result['tokens_per_s']:8.1f} tokens/s  hit {result['hit_rate']:6.1%}"
                  f"  decode hit {result['decode_hit_rate']:6.1%}"
                  f"  misses/token {result['misses_per_token']:5.2f}  prefetches {result['prefetches']:5d}"
                  f"  wasted {result['wasted_prefetches']:4d}" + (f"  PCIe-bound {bound:8.1f} tok/s" if bound else "")
                  + ("" if same else "  TOKENS DIFFER"))
    return rows


def policies(budget, learned_path=None, *, layer_ms=0.04, h2d_gbps=55.0, expert_bytes=VL2_SMALL_EXPERT_BYTES):
    """The live policies at one budget. The budgeted ones copy what the timing model's PCIe budget allows
    (prefetch_allowance of the target model's expert, as in the trace part)."""
    learned = [("learned-d1", Offload(gpu_experts=budget, policy="predictive", lookahead=1,
                                      predictor=str(learned_path)))] if learned_path else []
    limit = prefetch_allowance(layer_ms, h2d_gbps, expert_bytes)
    learned += [("learned-budgeted-d2", Offload(gpu_experts=budget, policy="budgeted", lookahead=2,
                                                prefetch_limit=limit, predictor=str(learned_path)))] if learned_path else []
    return learned + [
        ("on_demand(1 slot/layer)", Offload(gpu_experts=1, policy="lru", prefetch=False)),
        ("lru", Offload(gpu_experts=budget, policy="lru", prefetch=False)),
        ("lru+temporal-prefetch", Offload(gpu_experts=budget, policy="lru", prefetch=True)),
        ("lfu", Offload(gpu_experts=budget, policy="lfu", prefetch=False)),
        ("predictive-d1", Offload(gpu_experts=budget, policy="predictive", lookahead=1)),
        ("predictive-d2", Offload(gpu_experts=budget, policy="predictive", lookahead=2)),
        ("budgeted-d2", Offload(gpu_experts=budget, policy="budgeted", lookahead=2, prefetch_limit=limit)),
    ]


def full_size_model(layers, device):
    import transformers

    config = transformers.DeepseekV2Config(
        vocab_size=4096, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6,
        n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy", routed_scaling_factor=1.0)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.DeepseekV2ForCausalLM(config).to(torch.bfloat16).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: few requests and tokens")
    parser.add_argument("--json", default=None, help="append JSON rows here")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--full-layers", type=int, default=6)
    parser.add_argument("--layer-ms", type=float, default=0.04,
                        help="timing model: compute per MoE layer per decode step, ms (assumed; default 0.04)")
    parser.add_argument("--h2d-gbps", type=float, default=55.0,
                        help="timing model: pinned host-to-device rate, GB/s (assumed; default 55)")
    parser.add_argument("--expert-bytes", type=int, default=None,
                        help="timing model: bytes of one expert of the target model (default: DeepSeek-VL2-Small, "
                             f"{VL2_SMALL_EXPERT_BYTES}, for tiny-moe; MoE-LLaVA-Phi2, {PHI2_EXPERT_BYTES}, for "
                             "tiny-moe-llava)")
    parser.add_argument("--model", choices=("tiny-moe", "tiny-moe-llava"), default="tiny-moe",
                        help="the trained model whose routing is studied")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.quick:
        args.requests, args.batch, args.prompt, args.new_tokens = 4, 2, 16, 6
    elif not on_gpu:
        print("bench_cache: no GPU; running the trace part and a CPU live part (host-backend cache)", file=sys.stderr)
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    env = environment()
    ceilings = {}
    if on_gpu:
        from common import measure_ceilings, measure_h2d_gbps

        ceilings = measure_ceilings()
        ceilings["h2d_gbps"] = measure_h2d_gbps()
    env = {**env, **{f"ceiling_{k}": v for k, v in ceilings.items()}}

    if args.expert_bytes is None:
        args.expert_bytes = PHI2_EXPERT_BYTES if args.model == "tiny-moe-llava" else VL2_SMALL_EXPERT_BYTES
    model, ids, label = load_model(device, dtype, args.quick, args.model)
    prompts = prompts_from(ids, args.requests, args.prompt, device)
    rows = trace_rows(model, prompts, args, label, env)
    learned_path = shipped_predictor(label)
    timing_args = dict(layer_ms=args.layer_ms, h2d_gbps=args.h2d_gbps, expert_bytes=args.expert_bytes)
    if args.quick:
        def quick_policies(budget):
            return [p for p in policies(budget, **timing_args) if p[0] in ("lru", "predictive-d2", "budgeted-d2")]
        rows += live_rows(model, prompts, args, label, env, ceilings, quick_policies, (0.25,))
    else:
        rows += live_rows(model, prompts, args, label, env, ceilings, lambda b: policies(b, learned_path, **timing_args),
                          BUDGETS[:-1])
    if on_gpu and not args.quick:
        del model
        torch.cuda.empty_cache()
        big = full_size_model(args.full_layers, device)
        big_prompts = torch.randint(3, 4096, (args.batch, args.prompt), device=device)
        rows += live_rows(big, big_prompts, args, f"deepseek-v2-lite-shape-{args.full_layers}L-random", env,
                          ceilings, lambda b: policies(b, **timing_args), (0.125, 0.25, 0.5))
    if args.json:
        append_rows(args.json, rows)
        print(f"\n{len(rows)} rows -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
