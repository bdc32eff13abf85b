"""The end-to-end study: how do expert prediction's latency and token scheduling's overhead change
end-to-end tokens/s on multimodal reasoning prompts (MMMU, MathVista), for MoE-LLaVA and DeepSeek-VL2
against dense LLaVA-1.5 7B / 13B?

Every row is one configuration measured in this run on the named device, with these axes named in it:
- model: moe-llava-phi2 / -stablelm / -qwen, vl2-small, vl2-base (MoE) and llava-1.5-7b / -13b (dense),
  built from config classes at full depth with random weights (GPU), or scaled down (--quick, CPU);
  `--checkpoint DIR` loads a MoE-LLaVA checkpoint from a local directory instead (its routing is real);
- request: prompts sampled from a mix's whole length distribution (LLaVA: 576 tokens per image; VL2:
  its tiling; at least --requests per configuration), batched B at a time in sampled order and run one
  batch after another, left-padded, each truncated to the model's
  positions minus the new tokens (counted in `truncated`); an output-length sweep (--new-tokens);
- encode: the family's vision tower (CLIP ViT-L/14-336 + projector; SigLIP-SO400M-384 per tile) run on
  the batch's images and timed as part of the request; the language model then reads the same number
  of image tokens as token ids (the tower's output is computed, not consumed: weights are random);
- routing: "random-weights" (the target's own random routers: no locality, the worst case) or
  "replayed:<source>" (routes and lookahead guesses recorded from a model the project trained and
  mapped onto the target by the rule in moecache/analysis/replay.py: tiny DeepSeek-style for VL2
  targets, tiny MoE-LLaVA-style for MoE-LLaVA targets; moecache providers only) or "checkpoint";
- provider: hf:eager (transformers / DeepSpeed-MoE modules as loaded), hf:grouped_mm (transformers'
  experts only), hf:cpu-offload (every experts module's weights copied from pinned memory before each
  call, what accelerate's hooks do), moecache (experts resident), and at each --budgets fraction of
  experts on the GPU: offload{b}:on-demand (LRU, no prefetch), :lru-prefetch (the next layer's last
  experts copied ahead), :predict-only (lookahead gating predicts and steers eviction, no copies: the
  predictor's cost alone), :predict-only-learned (a learned predictor's heads, untrained: cost only),
  :predictive (predict and prefetch), :budgeted (predictions copied only as far as the PCIe time of the
  resident decode's per-layer compute allows, lookahead 2: moecache.prefetch_allowance), and for B > 1
  :in-order / :scheduled (predictive, micro-batches of B/2 in arrival order / grouped by predicted
  routes: the scheduler's cost and gain at equal size);
- mode: eager (generate as users run it) or graph (static KV cache + CUDA graphs, GPU only); a graph
  row of an offloaded model is labelled cache "static" (compiled decode does no cache bookkeeping) and
  is compared with nothing but other static rows.
Prefill and decode are split inside each timed generate (a forward over more than one token per row
is prefill): time, cache counters (hits, misses, prefetches, bytes moved) and, for decode, the per
step breakdown (attention, experts, exposed copy stall, predictor host and GPU time, scheduler,
other). Decode rows carry the PCIe bound: the same routing's resident decode time plus the bytes the
cache moved (demand copies, prefetches and in-place reads) over the pinned H2D rate measured here.
Batch-1 rows with every weight on the GPU also carry the HBM floor: the HBM read rate measured at the
start of the run over the weight bytes one decoded token reads (`decode_weight_bytes`: everything but
the routed experts and the embedding table, plus top-k experts per MoE layer and one embedding row; the
KV cache is not counted), and decode tok/s as a share of it.
A configuration that fails is a skipped row with its reason, and the run exits non-zero unless
--keep-going; one not started before --deadline is listed as not run.

    python bench/bench_e2e.py --quick                       # CPU: every axis, scaled down
    python bench/bench_e2e.py --slice 1 --json bench/results/study.jsonl   # GPU: see GPU_SLICES
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, environment, measure_ceilings, measure_h2d_gbps  # noqa: E402

import moecache  # noqa: E402
from moecache import Offload  # noqa: E402
from moecache.analysis.replay import RoutingReplay, map_routes, record_token_routes  # noqa: E402
from moecache.analysis.workloads import sample_prompts  # noqa: E402
from moecache.cache.scheduler import generate_scheduled  # noqa: E402
from moecache.compat import decode_experts_implementation, set_experts_implementation  # noqa: E402
from moecache.models import llava  # noqa: E402
from moecache.models.vision import VISION, build_vision_tower, scaled_down_vision  # noqa: E402

# DeepSeek-VL2's language models (VL2-base stated as used here); LLaVA-family shapes are llava.SHAPES.
VL2 = {
    "vl2-small": ("DeepseekV2", dict(vocab_size=102400, hidden_size=2048, num_attention_heads=16,
                                     num_key_value_heads=16, intermediate_size=10944, moe_intermediate_size=1408,
                                     n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                                     first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.0,
                                     kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                                     qk_nope_head_dim=128, v_head_dim=128, num_hidden_layers=27,
                                     max_position_embeddings=4096)),
    "vl2-base": ("DeepseekV3", dict(vocab_size=129280, hidden_size=2560, num_attention_heads=32,
                                    num_key_value_heads=32, intermediate_size=12288, moe_intermediate_size=1536,
                                    n_routed_experts=72, num_experts_per_tok=6, n_shared_experts=2,
                                    first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                    routed_scaling_factor=2.0, kv_lora_rank=512, q_lora_rank=1536,
                                    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_hidden_layers=30,
                                    max_position_embeddings=4096)),
}
VL2_QUICK = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                 moe_intermediate_size=32, n_routed_experts=32, num_experts_per_tok=6, n_shared_experts=1,
                 kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=4,
                 max_position_embeddings=512)
MODELS = ("moe-llava-phi2", "moe-llava-stablelm", "moe-llava-qwen", "vl2-small", "vl2-base", "llava-1.5-7b",
          "llava-1.5-13b")
ENCODER = {"vl2-small": "deepseek-vl2", "vl2-base": "deepseek-vl2"}  # else "llava"
ROUTINGS = ("random-weights", "replayed")
POLICIES = ("on-demand", "lru-prefetch", "predict-only", "predict-only-learned", "predictive", "budgeted", "in-order",
            "scheduled")

# Each slice is sized for one GPU call of under 9 minutes (the earlier H200 rows, scaled from 4 layers to
# full depth, put eager decode at roughly 5-12 steps/s: a slice holds a few dozen request batches); --deadline stops starting
# configurations before the limit, and what is left is listed as not run. Rows are written as they are
# measured. Slice 1 alone answers the headline question at one budget, MoE rows next to their dense pair.
GPU_SLICES = {
    1: dict(models="vl2-small,llava-1.5-7b,moe-llava-phi2,llava-1.5-13b", mixes="mmmu", batches="1,16",
            new_tokens="64", budgets="0.5", routing="random-weights", modes="eager", requests=1,
            providers="hf:eager,moecache,offload", policies="on-demand,predictive,in-order,scheduled"),
    2: dict(models="moe-llava-phi2,vl2-small", mixes="mmmu", batches="1,16", new_tokens="16,256", budgets="0.5",
            routing="random-weights,replayed", modes="eager", requests=1, providers="moecache,offload",
            policies="on-demand,predict-only,predict-only-learned,predictive"),
    3: dict(models="vl2-base,moe-llava-stablelm,moe-llava-qwen", mixes="mathvista", batches="1,16",
            new_tokens="64", budgets="0.5", routing="random-weights,replayed", modes="eager", requests=1,
            providers="hf:eager,moecache,offload", policies="on-demand,predictive,in-order,scheduled"),
    4: dict(models="vl2-small,moe-llava-phi2,llava-1.5-7b", mixes="mmmu", batches="1,16", new_tokens="64",
            budgets="0.25,0.5", routing="random-weights", modes="eager,graph", requests=1,
            providers="hf:grouped_mm,hf:cpu-offload,moecache,offload", policies="on-demand,predictive,budgeted"),
}
PROVIDERS = ("hf:eager", "hf:grouped_mm", "hf:cpu-offload", "moecache", "offload")


def check_grid(models: str, routing: str, policies: str, modes: str | None, providers: str,
               graph_providers: str | None = None) -> None:
    """Unknown names in a grid are refused up front, naming the argument (a typo would silently run less)."""
    for arg, given, known in (("--models", models, MODELS), ("--routing", routing, ROUTINGS),
                              ("--policies", policies, POLICIES), ("--modes", modes or "eager", ("eager", "graph")),
                              ("--providers", providers, PROVIDERS),
                              ("--graph-providers", graph_providers or providers, PROVIDERS)):
        unknown = [x for x in given.split(",") if x not in known]
        if unknown:
            raise SystemExit(f"bench_e2e: {arg} {','.join(unknown)} unknown; choose from {','.join(known)}")


def build(name: str, quick: bool, device, dtype):
    """(model, facts): facts name the family, encoder, positions and MoE structure."""
    if name in VL2:
        import transformers

        kind, kwargs = VL2[name]
        if quick:
            kwargs = dict(VL2_QUICK, **({"q_lora_rank": 24, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
                                         "routed_scaling_factor": 2.0} if kind == "DeepseekV3" else
                                        {"q_lora_rank": None, "topk_method": "greedy"}), first_k_dense_replace=1)
        config = getattr(transformers, f"{kind}Config")(**kwargs)
        torch.manual_seed(0)
        with torch.device(device), llava.built_in(dtype):
            model = getattr(transformers, f"{kind}ForCausalLM")(config).to(dtype).eval()
        set_experts_implementation(model, "eager")  # transformers >= 5.23 defaults to grouped_mm: hf:eager is eager
        moe_layers = config.num_hidden_layers - config.first_k_dense_replace
        return model, dict(family="transformers", kind="moe", max_positions=config.max_position_embeddings,
                           moe_layers=moe_layers, num_experts=config.n_routed_experts,
                           top_k=config.num_experts_per_tok, hidden=config.hidden_size,
                           decode_weight_bytes=decode_weight_bytes(model, config.n_routed_experts,
                                                                   config.num_experts_per_tok))
    shape = llava.SHAPES[name]
    if quick:
        shape = llava.scaled_down(shape)
    model = llava.build_language_model(shape, dtype=dtype, device=device)
    return model, dict(family="deepspeed" if shape.num_experts else "dense", kind="moe" if shape.num_experts else "dense",
                       max_positions=shape.max_positions, moe_layers=len(shape.moe_layers) if shape.num_experts else 0,
                       num_experts=shape.num_experts, top_k=shape.top_k, hidden=shape.hidden,
                       decode_weight_bytes=decode_weight_bytes(model, shape.num_experts, shape.top_k))


def decode_weight_bytes(model, num_experts: int | None, top_k: int | None) -> int | None:
    """Weight bytes one decoded token reads at batch 1: every parameter but the routed experts and the input
    embedding table, plus top_k of each MoE layer's experts and one embedding row (a table tied to the
    output head is read whole by the head). None where top_k is unknown."""
    from moecache.patching.families import find_experts

    if num_experts and not top_k:
        return None
    params = {id(p): p for p in model.parameters()}
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    total = nbytes(params.values())
    routed = nbytes({id(p): p for f in find_experts(model) for p in f.module.parameters()}.values())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    active = total - routed + (routed * top_k // num_experts if num_experts else 0)
    if not tied:
        active -= nbytes([embedding]) - embedding.shape[1] * embedding.element_size()
    return active


def load_checkpoint(path: str, device, dtype):
    model = llava.load_language_model(path, dtype=dtype, device=device)
    cfg = model.config
    moecache.patch(model)
    experts = moecache.patched_experts(model)
    facts = dict(family="deepspeed", kind="moe", max_positions=cfg.max_position_embeddings, moe_layers=len(experts),
                 num_experts=experts[0].num_experts, top_k=None, hidden=cfg.hidden_size, decode_weight_bytes=None)
    moecache.unpatch(model)
    return model, facts


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Mark:
    """A point in time on the device's stream (a CUDA event) or the host's clock."""

    def __init__(self, on_gpu: bool):
        if on_gpu:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.event, self.t = None, time.perf_counter()

    def ms_to(self, other: "Mark") -> float:
        return self.event.elapsed_time(other.event) if self.event is not None else (other.t - self.t) * 1e3


class Phases:
    """Splits one timed run into prefill (forwards over more than one token per row) and decode forwards:
    per phase, device time of its forwards, cache and predictor counters, and (decode) the time of
    attention and expert modules. Eager only: its hooks run Python between graph pieces."""

    def __init__(self, model, on_gpu: bool, predictor=None):
        self.model, self.on_gpu = model, on_gpu
        self.phase = None
        self.forward_ms = {"prefill": [], "decode": []}
        self.spans = {"attention": [], "experts": []}
        self.counters = {"prefill": _zero_counters(), "decode": _zero_counters()}
        self.predict_host_s = {"prefill": 0.0, "decode": 0.0}
        self.predict_marks: list = []
        self.forwards = {"prefill": 0, "decode": 0}
        self.handles = [model.register_forward_pre_hook(self._begin, with_kwargs=True),
                        model.register_forward_hook(self._end)]
        # Patched, the experts are the MoecacheExperts (list families call theirs from the block, and the
        # module holding the MLPs, which the kernels stand in for, takes no hooks); unpatched, by name
        patched = moecache.stats(model)["patched"]
        timed = [(module, "experts") for module in (moecache.patched_experts(model) if patched else ())]
        for name, module in model.named_modules():
            kind = ("experts" if not patched and name.endswith(".experts") else
                    "attention" if name.endswith(("self_attn", "self_attention")) else None)
            if kind is not None:
                timed.append((module, kind))
        for module, kind in timed:
            self.handles.append(module.register_forward_pre_hook(lambda m, a, kind=kind: self._open(kind)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, kind=kind: self._close(kind)))
        self.open: dict = {}
        self.predictor = predictor
        self.saved_predict = predictor.__dict__.get("predict") if predictor is not None else None
        if predictor is not None:
            inner = predictor.predict

            def timed_predict(*args, **kwargs):
                begin, t0 = Mark(on_gpu), time.perf_counter()
                out = inner(*args, **kwargs)
                if self.phase is not None:
                    self.predict_host_s[self.phase] += time.perf_counter() - t0
                if self.phase == "decode":
                    self.predict_marks.append((begin, Mark(on_gpu)))
                return out
            predictor.predict = timed_predict

    def _begin(self, module, args, kwargs):
        if "use_cache" not in kwargs:
            # Not a generation step (generate passes use_cache): the scheduler's routing pass, whose time
            # counts as the scheduler's, not as prefill.
            self.phase = None
            return
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs["inputs_embeds"]
        self.phase = "prefill" if ids.shape[1] > 1 else "decode"
        self.forwards[self.phase] += 1
        self.before = _counters(self.model)
        self.start = Mark(self.on_gpu)

    def _end(self, module, args, output):
        if self.phase is None:
            return
        self.forward_ms[self.phase].append((self.start, Mark(self.on_gpu)))
        after = _counters(self.model)
        acc = self.counters[self.phase]
        for k in acc:
            acc[k] += after[k] - self.before[k]

    def _open(self, kind):
        self.open[kind] = Mark(self.on_gpu)

    def _close(self, kind):
        if self.phase == "decode":
            self.spans[kind].append((self.open.pop(kind), Mark(self.on_gpu)))

    def totals(self) -> dict:
        sync(torch.device("cuda" if self.on_gpu else "cpu"))
        ms = {p: sum(a.ms_to(b) for a, b in v) for p, v in self.forward_ms.items()}
        spans = {k: sum(a.ms_to(b) for a, b in v) for k, v in self.spans.items()}
        return {"forward_ms": ms, "spans_ms": spans, "counters": self.counters, "forwards": self.forwards,
                "predictor_host_ms": {p: 1e3 * s for p, s in self.predict_host_s.items()},
                "predictor_gpu_ms": sum(a.ms_to(b) for a, b in self.predict_marks)}

    def close(self):
        for h in self.handles:
            h.remove()
        if self.predictor is not None:
            self.predictor.__dict__.pop("predict", None)
            if self.saved_predict is not None:  # a replay's guesses stay in place
                self.predictor.predict = self.saved_predict


def _zero_counters() -> dict:
    return {"requests": 0, "hits": 0, "misses": 0, "prefetches": 0, "wasted_prefetches": 0, "bytes_copied": 0,
            "in_place_reads": 0, "stall_ms": 0.0}


def _counters(model) -> dict:
    cache = moecache.stats(model).get("cache") or {}
    return {k: cache.get(k, 0) for k in _zero_counters()}


class CpuOffloadHooks:
    """The accelerate-style CPU offload baseline, written out (accelerate is not a dependency): each experts
    module's weights live in pinned host memory, are copied to the device before every call and dropped
    after it."""

    def __init__(self, model, device):
        self.device, self.saved, self.handles = device, [], []
        try:
            for name, module in model.named_modules():
                if not name.endswith(".experts"):
                    continue
                params = list(module.parameters())
                host = [p.data.to("cpu").pin_memory() if device.type == "cuda" else p.data.clone() for p in params]
                for p in params:
                    p.data = torch.empty(0, dtype=p.dtype, device=device)
                self.saved.append((params, host))
                self.handles.append(module.register_forward_pre_hook(lambda m, a, ps=params, hs=host: self._load(ps, hs)))
                self.handles.append(module.register_forward_hook(lambda m, a, o, ps=params: self._drop(ps)))
        except BaseException:  # e.g. pinning ran out of host memory: the model gets its weights back
            self.remove()
            raise

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
        self.saved.clear()
        # torch's pinned-memory allocator keeps freed blocks cached (sizes rounded up to powers of two):
        # give them back, or the next provider's pinned expert store may not fit in host memory.
        if self.device.type == "cuda" and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def providers(facts: dict, budgets: list[float], batch: int, routing: str, policies: list[str],
              learned_path: str | None, wanted=PROVIDERS) -> list[tuple[str, str | None, Offload | None]]:
    """(provider, policy, offload) rows that apply to this model, routing and batch, of the `wanted` kinds
    ("offload" stands for every offload{budget}:{policy})."""
    if facts["kind"] == "dense":
        return [("hf:eager", None, None)] if routing == "random-weights" else []
    return [p for p in _moe_providers(facts, budgets, batch, routing, policies, learned_path)
            if (p[0] if p[2] is None else "offload") in wanted]


def _moe_providers(facts, budgets, batch, routing, policies, learned_path):
    out = []
    if routing == "random-weights":
        out.append(("hf:eager", None, None))
        if facts["family"] == "transformers":
            out.append(("hf:grouped_mm", None, None))
        out.append(("hf:cpu-offload", None, None))
    out.append(("moecache", None, None))
    for b in budgets:
        made = {"on-demand": Offload(gpu_experts=b, policy="lru", prefetch=False),
                "lru-prefetch": Offload(gpu_experts=b, policy="lru", prefetch=True),
                "predict-only": Offload(gpu_experts=b, policy="predictive", prefetch=False),
                "predictive": Offload(gpu_experts=b, policy="predictive"),
                # its allowance is set per run from the resident decode's layer time (measure_row)
                "budgeted": Offload(gpu_experts=b, policy="budgeted", prefetch_limit=0.0, lookahead=2)}
        if learned_path and routing == "random-weights":  # replayed guesses replace any predictor's
            made["predict-only-learned"] = Offload(gpu_experts=b, policy="predictive", prefetch=False,
                                                   predictor=learned_path)
        if batch > 1:
            made["in-order"] = made["scheduled"] = Offload(gpu_experts=b, policy="predictive")
        for policy in policies:
            if policy in made:
                out.append((f"offload{round(b * 100)}:{policy}", policy, made[policy]))
    return out


def untrained_predictor(facts, path) -> str:
    """A learned predictor with untrained heads (one per MoE layer after the first, depth 1): what its
    predictions cost is measured; what they are worth is not (random weights route at random anyway)."""
    from moecache.cache.learned import LearnedRoutePredictor

    heads = LearnedRoutePredictor(facts["hidden"], facts["num_experts"],
                                  [(t, 1) for t in range(1, facts["moe_layers"])])
    heads.save(path)
    return path


def sample_batches(mix, encoder, batch, new_tokens, facts, args):
    """The first `batch` sampled prompts of the mix: token lengths (scaled on --quick), truncated to fit."""
    prompts = sample_prompts(mix, batch, seed=args.seed, encoder=encoder)
    limit = facts["max_positions"] - new_tokens
    lengths = [max(1, round(p.tokens * args.prompt_scale)) for p in prompts]
    truncated = sum(n > limit for n in lengths)
    lengths = [min(n, limit) for n in lengths]
    return prompts, lengths, truncated


def make_inputs(lengths, vocab, device, seed):
    generator = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, S - n:] = torch.randint(3, vocab, (n,), generator=generator)
        mask[i, S - n:] = 1
    return ids.to(device), mask.to(device)


def encode_ms(tower, images: int, device, on_gpu) -> float:
    """Time of the vision tower over `images` inputs (chunks of 16), random pixels."""
    if tower is None or images == 0:
        return 0.0
    side = tower.shape.image
    dtype = next(tower.parameters()).dtype
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, images, 16):
            n = min(16, images - start)
            tower(torch.randn(n, 3, side, side, device=device, dtype=dtype))
        sync(device)
    return (time.perf_counter() - t0) * 1e3


def merge_results(results: list[dict], encode: list[float]) -> dict:
    """The measurements of batches run one after another, added up; each batch's end-to-end time kept."""
    def add(a, b):
        if isinstance(a, dict):
            return {k: add(a[k], b[k]) for k in a}
        return None if a is None or b is None else a + b
    total = results[0]
    for r in results[1:]:
        total = {k: (add(total[k], r[k]) if k != "out" else r[k]) for k in total}
    total["batch_e2e_ms"] = [e + r["wall_ms"] for e, r in zip(encode, results)]
    return total


def decode_profile(run, new_tokens: int, on_gpu: bool) -> dict:
    """Where a decode step's GPU time goes: each kernel group's own time and launches (kernel_times'
    groups) per decode step of a generate of new_tokens, profiled from the first logits on (after the
    prefill forward, its kernels finished: exactly the new_tokens - 1 decode forwards and their sampling);
    on a CPU the ops' own CPU time."""
    from kernel_times import grouped_kernel_time
    from torch.profiler import ProfilerActivity, profile
    from transformers import LogitsProcessor, LogitsProcessorList

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []))

    class StartAfterPrefill(LogitsProcessor):
        started = False

        def __call__(self, input_ids, scores):
            if not self.started:
                sync(scores.device)
                prof.start()
                self.started = True
            return scores

    start = StartAfterPrefill()
    run(new_tokens, LogitsProcessorList([start]))
    if not start.started:
        raise RuntimeError("decode_profile: generate never called its logits processors")
    sync(torch.device("cuda") if on_gpu else torch.device("cpu"))
    prof.stop()
    steps = new_tokens - 1
    groups = {g: {"us_per_step": v["us"] / steps, "launches_per_step": v["count"] / steps}
              for g, v in sorted(grouped_kernel_time(prof.key_averages(), on_gpu).items())}
    return {"groups": groups, "kernel_us_per_step": sum(g["us_per_step"] for g in groups.values()),
            "launches_per_step": sum(g["launches_per_step"] for g in groups.values()),
            "what": "GPU kernels' own time (CUPTI)" if on_gpu else "ops' own CPU time"}


def run_config(model, ids, mask, new_tokens, mode, device, on_gpu, sched_batch, schedule, replay, predictor,
               offset=0, profile=False):
    """One timed request batch (after a short warm-up); returns measurements. offset: the index of the batch's
    first request among the configuration's requests (a replay gives each request its own routes). profile:
    after the timed run, also profile the decode steps' kernels (decode_profile)."""
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if mode == "graph":
        kwargs["cache_implementation"] = "static"
    info = {"scheduler_s": 0.0}
    groups: list = []

    def before_group(requests):
        groups.append(requests)
        if replay is not None:
            replay.requests = [offset + r for r in requests]

    def run(tokens, logits_processor=None):
        if replay is not None:
            replay.reset()
            replay.requests = list(range(offset, offset + ids.shape[0]))
        if sched_batch is None:
            extra = {"logits_processor": logits_processor} if logits_processor is not None else {}
            return model.generate(ids, **{**kwargs, "max_new_tokens": tokens, "min_new_tokens": tokens}, **extra)
        out, i = generate_scheduled(model, ids, moecache.patched_experts(model), batch_size=sched_batch,
                                    schedule=schedule, max_new_tokens=tokens, min_new_tokens=tokens, attention_mask=mask,
                                    before_group=before_group,
                                    **({"cache_implementation": "static"} if mode == "graph" else {}))
        info["scheduler_s"] = i["scheduler_s"]
        return out

    with torch.no_grad():
        run(2 if mode == "eager" else new_tokens)  # warm-up: kernels compiled, graphs captured
        if replay is not None:  # routes mapped before the clock starts
            replay.prepare([[offset + r for r in g] for g in groups] or [list(range(offset, offset + ids.shape[0]))],
                           ids.shape[1], new_tokens, ids.device)
        prefill_graph_ms = None
        if mode == "graph":  # no hooks inside compiled decode: prefill is timed as a one-token generate
            # (the median of three: decode's time is the run's less this one)
            prefill_times = []
            for _ in range(3):
                if replay is not None:
                    replay.reset()
                    replay.requests = list(range(offset, offset + ids.shape[0]))
                sync(device)
                t0 = time.perf_counter()
                model.generate(ids, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
                sync(device)
                prefill_times.append((time.perf_counter() - t0) * 1e3)
            prefill_graph_ms = sorted(prefill_times)[1]
        phases = Phases(model, on_gpu, predictor) if mode == "eager" else None
        before = _counters(model)
        sync(device)
        t0 = time.perf_counter()
        try:
            out = run(new_tokens)
            sync(device)
        finally:
            if phases is not None:
                phases.close()
        wall_ms = (time.perf_counter() - t0) * 1e3
        after = _counters(model)
        profiled = decode_profile(run, new_tokens, on_gpu) if profile and new_tokens > 1 else None
    split = phases.totals() if phases else None
    return dict(out=out, wall_ms=wall_ms, split=split, scheduler_ms=1e3 * info["scheduler_s"],
                prefill_graph_ms=prefill_graph_ms, total_counters={k: after[k] - before[k] for k in after},
                decode_profile=profiled)


def record_sources(args, device, dtype, batch, new_tokens):
    """Per family, the trained source model's routes recorded once: {"transformers": rec, "deepspeed": rec}."""
    from moecache import data

    sources = {}
    loaders = {"transformers": ("trained-tiny-moe", data.load_tiny_moe),
               "deepspeed": ("trained-tiny-moe-llava", data.load_tiny_moe_llava)}
    text = data.encode(data.validation_text())[0]
    for family, (label, load) in loaders.items():
        model = load(device=device, dtype=torch.float32)
        length = 64
        steps = min(new_tokens, model.config.max_position_embeddings - length)
        prompts = torch.stack([text[i * 997: i * 997 + length] for i in range(batch)]).to(device)
        moecache.patch(model)
        torch.manual_seed(args.seed)  # DeepSpeed's top-2 gate samples its second expert, in eval mode too
        sources[family] = record_token_routes(model, prompts, moecache.patched_experts(model), moecache.routers(model),
                                              max_new_tokens=steps, depth=1, source=label)
        moecache.unpatch(model)
        del model
    return sources


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU: models, towers and prompt lengths scaled down")
    parser.add_argument("--slice", type=int, choices=sorted(GPU_SLICES), help="a prepared GPU slice's grid")
    parser.add_argument("--json", default=None)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--checkpoint", default=None, help="a local MoE-LLaVA checkpoint directory (real routing)")
    parser.add_argument("--mixes", default="mmmu,mathvista")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", default="16,128,512", help="the output-length sweep")
    parser.add_argument("--budgets", default="0.5", help="fractions of all experts on the GPU")
    parser.add_argument("--routing", default=",".join(ROUTINGS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="kinds of rows: hf:eager, hf:grouped_mm, hf:cpu-offload, moecache, offload (every "
                             "offload{budget}:{policy}); dense models always get hf:eager")
    parser.add_argument("--graph-providers", default=None,
                        help="the kinds that also run in graph mode (default: --providers); hf:eager there is "
                             "transformers' own static cache + compile, whose compile of a full-depth model is long")
    parser.add_argument("--modes", default=None, help="eager,graph (graph on a GPU only)")
    parser.add_argument("--prompt-scale", type=float, default=1.0, help="prompt lengths multiplied by this")
    parser.add_argument("--requests", type=int, default=4,
                        help="requests per configuration at least (whole batches, run one after another)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--h2d-gbps", type=float, default=None,
                        help="pinned H2D GB/s for the PCIe bound when none can be measured (CPU); a GPU measures it")
    parser.add_argument("--deadline", type=float, default=None, help="seconds; start no configuration after it")
    parser.add_argument("--keep-going", action="store_true", help="exit 0 even when configurations were skipped")
    parser.add_argument("--profile-decode", action="store_true",
                        help="batch-1 rows: profile the decode steps' kernels after the timed run (kernel groups' "
                             "own time and launches per step, beside the step's wall time)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    if args.slice:
        for k, v in GPU_SLICES[args.slice].items():
            setattr(args, k, v)
    if args.quick:
        args.models = "moe-llava-phi2,vl2-small,llava-1.5-7b"
        args.batches, args.new_tokens, args.prompt_scale, args.requests = "1,4", "4,8", 1 / 16, 2
        if args.checkpoint is None:  # the shipped trained MoE-LLaVA-style model is a checkpoint directory
            from moecache.data import TINY_MOE_LLAVA_DIR

            args.checkpoint = str(TINY_MOE_LLAVA_DIR)
        args.h2d_gbps = args.h2d_gbps or 55.0  # the H200's pinned rate, assumed: the CPU has no PCIe link to time
        args.mixes = "mmmu,mathvista"
    check_grid(args.models, args.routing, args.policies, args.modes, args.providers, args.graph_providers)
    if not args.quick and not on_gpu:
        raise SystemExit("bench_e2e: full sizes need a GPU; use --quick on CPU")
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    modes = [m for m in (args.modes or ("eager,graph" if on_gpu else "eager")).split(",") if on_gpu or m == "eager"]
    env = environment()
    h2d, h2d_source = measure_h2d_gbps(), "measured"
    if h2d is None and args.h2d_gbps:
        h2d, h2d_source = args.h2d_gbps, "assumed (--h2d-gbps)"
    env = {**env, "h2d_source": h2d_source if h2d else None,
           "hbm_read_gbps": measure_ceilings().get("hbm_read_gbps") if on_gpu else None}
    batches = [int(b) for b in args.batches.split(",")]
    sweep = [int(n) for n in args.new_tokens.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    routings = args.routing.split(",")
    policies = args.policies.split(",")
    wanted = args.providers.split(",")
    in_graph = (args.graph_providers or args.providers).split(",")
    rows, not_run = [], []

    def emit(row):  # each row is written when measured, so a run killed at its time limit keeps its rows
        rows.append(row)
        if args.json:
            append_rows(args.json, [row])

    def late() -> bool:
        return bool(args.deadline) and time.perf_counter() - started > args.deadline

    sources = record_sources(args, device, dtype, max(batches), max(sweep)) if "replayed" in routings else {}
    predictors = tempfile.TemporaryDirectory(prefix="moecache-study-")  # removed when the run ends
    tmp = predictors.name
    names = args.models.split(",") + (["checkpoint"] if args.checkpoint else [])
    for name in names:
        if late():  # not even built: the models left are listed as not run
            not_run.append(dict(model=name))
            continue
        if name == "checkpoint":
            model, facts = load_checkpoint(args.checkpoint, device, dtype)
            model_routings = ["checkpoint"]
            name = f"checkpoint:{Path(args.checkpoint).name}"
        else:
            model, facts = build(name, args.quick, device, dtype)
            model_routings = routings
        encoder = ENCODER.get(name, "llava")
        vision = scaled_down_vision(VISION[encoder]) if args.quick else VISION[encoder]
        tower = build_vision_tower(encoder, facts["hidden"], scaled=args.quick, dtype=dtype, device=device)
        assert tower.shape == vision
        learned = untrained_predictor(facts, os.path.join(tmp, f"{name}.pt")) if facts["kind"] == "moe" else None
        vocab = model.config.vocab_size
        for routing in model_routings:
            mapped = None
            if routing == "replayed":
                source = sources.get(facts["family"]) if facts["kind"] == "moe" else None
                if facts["kind"] == "moe" and source is None:
                    emit({**env, "benchmark": "bench_e2e.skipped", "model": name, "routing": routing,
                          "reason": f"no trained source model recorded for the {facts['family']} family"})
                    continue
                if source is not None:
                    mapped = map_routes(source, facts["moe_layers"], facts["num_experts"], facts["top_k"], seed=args.seed)
            label = f"replayed:{mapped.recording.source}" if mapped else routing
            for mix in args.mixes.split(","):
                for B in batches:
                    for new_tokens in sweep:
                        todo = providers(facts, budgets, B, routing, policies, learned, wanted)
                        runs = [(mode, p) for mode in modes for p in todo
                                if mode == "eager" or (p[0] if p[2] is None else "offload") in in_graph
                                or facts["kind"] == "dense"]
                        keys = [dict(model=name, routing=label, mix=mix, batch=B, new_tokens=new_tokens,
                                     provider=p[0], mode=mode) for mode, p in runs]
                        if late():  # nothing of this point starts: no vision tower run either
                            not_run.extend(keys)
                            continue
                        R = -(-max(B, args.requests) // B) * B  # whole batches of B, at least --requests requests
                        prompts, lengths, truncated = sample_batches(mix, encoder, R, new_tokens, facts, args)
                        chunks = []
                        for start in range(0, R, B):
                            ids, mask = make_inputs(lengths[start:start + B], vocab, device, args.seed + start)
                            images = sum(p.encoder_inputs for p in prompts[start:start + B])
                            chunks.append(dict(ids=ids, mask=mask, offset=start, images=images,
                                               encode_ms=encode_ms(tower, images, device, on_gpu)))
                        resident = {}
                        # Eager rows first (every mode's resident row precedes its offload rows).
                        for key, (_, (provider, policy, offload)) in zip(keys, runs):
                            if late():
                                not_run.append(key)
                                continue
                            row = measure_row(model, facts, provider, policy, offload, key["mode"], chunks,
                                              new_tokens, device, on_gpu, mapped, resident, h2d, env, key,
                                              profile=args.profile_decode)
                            row.update(requests=R, prompt_tokens=lengths, truncated=truncated, encoder=encoder,
                                       encoder_inputs=sum(c["images"] for c in chunks),
                                       encode_ms=sum(c["encode_ms"] for c in chunks), kind=facts["kind"],
                                       family=facts["family"], quick=args.quick,
                                       decode_weight_bytes=facts["decode_weight_bytes"])
                            if row["benchmark"] == "bench_e2e.study":
                                finish_row(row)
                            emit(row)
                            print(_line(row), flush=True)
        del model, tower
        if on_gpu:
            import gc

            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
    skipped = [r for r in rows if r["benchmark"] == "bench_e2e.skipped"]
    for key in not_run:
        emit({**env, **key, "benchmark": "bench_e2e.not_run", "reason": f"--deadline {args.deadline} s passed"})
    if args.json:
        print(f"{len(rows)} rows -> {args.json}")
    for r in skipped:
        print(f"SKIPPED {r.get('model')} {r.get('routing')} {r.get('provider', '')} {r.get('mode', '')}: {r['reason']}",
              file=sys.stderr)
    if not_run:
        print(f"NOT RUN (deadline): {len(not_run)} configurations", file=sys.stderr)
    return 1 if skipped and not args.keep_going else 0


def measure_row(model, facts, provider, policy, offload, mode, chunks, new_tokens, device, on_gpu,
                mapped, resident, h2d, env, key, profile=False) -> dict:
    """Set the provider up, run, take it down; a row (or a skipped row with the reason). profile: a batch-1
    row also gets its decode steps' kernel profile (decode_profile)."""
    hooks = replay = None
    if mode == "graph":  # compiled once per configuration, for all its request batches
        model.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()
    row = {**env, "benchmark": "bench_e2e.study", **key, "policy": policy,
           "budget": offload.gpu_experts if offload else (1.0 if provider == "moecache" else None),
           "cache": ("static" if mode == "graph" else "dynamic") if offload else None}
    try:
        if policy == "budgeted":
            offload = budgeted(offload, model, facts, resident.get(mode), h2d, new_tokens)
            row["prefetch_limit"] = offload.prefetch_limit
        if provider == "hf:grouped_mm":
            set_experts_implementation(model, "grouped_mm")
            row["hf_decode_experts"] = decode_experts_implementation(model)
        elif provider == "hf:cpu-offload":
            hooks = CpuOffloadHooks(model, device)
        elif provider != "hf:eager":
            moecache.patch(model, offload=offload)
            if mapped is not None:
                replay = RoutingReplay(model, moecache.patched_experts(model), mapped).__enter__()
        predictor = getattr(getattr(moecache.patched_experts(model)[0], "provider", None), "predictor", None) \
            if offload is not None else None
        results = []
        for i, chunk in enumerate(chunks):  # the batches of requests, one after another
            ids = chunk["ids"]
            sched = ids.shape[0] // 2 if policy in ("in-order", "scheduled") else None
            results.append(run_config(model, ids, chunk["mask"], new_tokens, mode, device, on_gpu, sched,
                                      policy == "scheduled", replay, predictor, chunk["offset"],
                                      profile=profile and i == 0 and ids.shape[0] == 1 and sched is None))
        row["decode_profile"] = results[0].pop("decode_profile")  # the first batch's, not added up
        for r in results[1:]:
            r.pop("decode_profile")
        result = merge_results(results, [c["encode_ms"] for c in chunks])
        cache = moecache.expert_cache(model) if offload is not None else None
        row["record_bytes"] = cache.record_bytes if cache else None
        row["gpu_weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()
                                      if p.device.type == device.type) + (cache.num_slots * cache.record_bytes if cache else 0)
        if provider == "hf:cpu-offload":
            row["gpu_weight_bytes"] = None  # experts held on the GPU for one layer at a time
        prediction = moecache.stats(model).get("prediction") if offload is not None else None
        row["recall"] = prediction["by_depth"][1]["recall"] if prediction and prediction["by_depth"] else None
    except Exception as err:  # noqa: BLE001 - an OOM or a capture failure is a result, reported and counted
        return {**env, "benchmark": "bench_e2e.skipped", **key, "reason": repr(err)[:300]}
    finally:
        if replay is not None:
            replay.__exit__(None, None, None)
        if provider == "hf:grouped_mm":
            set_experts_implementation(model, "eager")
        elif hooks is not None:
            hooks.remove()
        elif provider not in ("hf:eager", "hf:cpu-offload") and moecache.stats(model)["patched"]:
            moecache.unpatch(model)
    row.update(result=result, h2d_gbps=h2d)
    if provider == "moecache":
        resident[mode] = result
    row["_resident"] = resident.get(mode)
    return row


def resident_layer_ms(resident: dict, moe_layers: int, new_tokens: int) -> float:
    """The resident run's decode time per step and MoE layer, in its own mode: eager runs count their decode
    forwards; graph runs time the compiled decode as a whole (prefill in a separate eager forward), one step
    per new token after the first, per request batch."""
    split = resident["split"]
    if split is not None:
        decode_ms = resident["wall_ms"] - split["forward_ms"]["prefill"] - resident["scheduler_ms"]
        steps = split["forwards"]["decode"]
    else:
        decode_ms = resident["wall_ms"] - resident["prefill_graph_ms"] - resident["scheduler_ms"]
        steps = len(resident["batch_e2e_ms"]) * (new_tokens - 1)
    return decode_ms / max(steps, 1) / moe_layers


def budgeted(offload, model, facts, resident, h2d, new_tokens):
    """The budgeted policy's Offload with its allowance: experts copied per layer of compute, from the resident
    run's decode time per MoE layer (same mode), one expert's bytes and the H2D rate."""
    import dataclasses

    if resident is None or not h2d:
        raise RuntimeError("the budgeted policy needs this run's resident decode time (same mode) and an H2D rate")
    layer_ms = resident_layer_ms(resident, facts["moe_layers"], new_tokens)
    moecache.patch(model)
    try:
        w_gate_up, w_down = moecache.patched_experts(model)[0].weights()
        record_bytes = (w_gate_up[0].numel() + w_down[0].numel()) * w_gate_up.element_size()
    finally:
        moecache.unpatch(model)
    return dataclasses.replace(offload, prefetch_limit=moecache.prefetch_allowance(layer_ms, h2d, record_bytes))


def finish_row(row) -> None:
    """Times, rates, counters and bounds from a run's measurements (the result is dropped from the row)."""
    result, resident = row.pop("result"), row.pop("_resident")
    R, new = row["requests"], row["new_tokens"]
    split = result["split"]
    scheduler_ms = result["scheduler_ms"]
    if split is not None:
        prefill_ms = split["forward_ms"]["prefill"]
        decode_ms = max(result["wall_ms"] - prefill_ms - scheduler_ms, 1e-6)
        counters = split["counters"]
        forwards = split["forwards"]["decode"]
        per_step = {k: v / max(forwards, 1) for k, v in split["spans_ms"].items()}
        per_step["stall"] = counters["decode"]["stall_ms"] / max(forwards, 1)
        per_step["predictor_host"] = split["predictor_host_ms"]["decode"] / max(forwards, 1)
        per_step["predictor_gpu"] = split["predictor_gpu_ms"] / max(forwards, 1)
        per_step["scheduler"] = scheduler_ms / max(forwards, 1)
        step_ms = decode_ms / max(forwards, 1)
        # stall and predictor time fall inside the experts' span; the scheduler's is outside every forward
        per_step["other"] = max(step_ms - per_step["attention"] - per_step["experts"] - per_step["scheduler"], 0.0)
        row["breakdown_ms"] = per_step
        row["forwards"] = split["forwards"]  # generation forwards only: a routing pass is the scheduler's
        row["prefill_counters"], row["decode_counters"] = counters["prefill"], counters["decode"]
        row["prefill_timing"] = "prefill forwards' own time, inside the timed run"
    else:
        prefill_ms = result["prefill_graph_ms"]
        decode_ms = max(result["wall_ms"] - prefill_ms - scheduler_ms, 1e-6)
        row["breakdown_ms"] = None
        row["prefill_counters"], row["decode_counters"] = None, None
        row["prefill_timing"] = "a separate eager prefill forward (no hooks inside compiled decode)"
    tokens_in = sum(row["prompt_tokens"])
    row.update(wall_ms=result["wall_ms"], prefill_ms=prefill_ms, decode_ms=decode_ms, scheduler_ms=scheduler_ms,
               prefill_tok_s=tokens_in / (prefill_ms / 1e3), decode_tok_s=R * (new - 1) / (decode_ms / 1e3),
               e2e_ms=sum(result["batch_e2e_ms"]) / len(result["batch_e2e_ms"]),
               e2e_tok_s_per_request=sum(new / (ms / 1e3) for ms in result["batch_e2e_ms"]) / len(result["batch_e2e_ms"]))
    # The HBM floor: batch 1, every weight on the GPU (offload rows are bound by PCIe, not HBM).
    resident_weights = row.get("budget") in (None, 1.0) and row["provider"] != "hf:cpu-offload"
    if row["batch"] == 1 and resident_weights and row.get("decode_weight_bytes") and row.get("hbm_read_gbps"):
        row["hbm_floor_tok_s"] = row["hbm_read_gbps"] * 1e9 / row["decode_weight_bytes"]
        row["frac_hbm_floor"] = row["decode_tok_s"] / row["hbm_floor_tok_s"]
    profile = row.get("decode_profile")
    if profile is not None:  # batch 1: one decode step per new token after the first, per request
        profile["wall_us_per_step"] = decode_ms * 1e3 / (R * (new - 1))
        profile["outside_kernels_us_per_step"] = profile["wall_us_per_step"] - profile["kernel_us_per_step"]
    decode = row["decode_counters"]
    if decode is not None and row.get("record_bytes"):
        moved = decode["bytes_copied"] + decode["in_place_reads"] * row["record_bytes"]
        row["decode_bytes_moved"] = moved
        row["decode_hit_rate"] = decode["hits"] / decode["requests"] if decode["requests"] else None
        row["misses_per_token"] = decode["misses"] / (R * (new - 1))
        row["experts_moved_per_token"] = moved / row["record_bytes"] / (R * (new - 1))
        res_split = resident["split"] if resident else None
        if res_split is not None and row["h2d_gbps"]:
            res_decode_ms = resident["wall_ms"] - res_split["forward_ms"]["prefill"] - resident["scheduler_ms"]
            bound_ms = res_decode_ms + moved / (row["h2d_gbps"] * 1e9) * 1e3
            row["resident_decode_tok_s"] = R * (new - 1) / (res_decode_ms / 1e3)
            row["pcie_bound_decode_tok_s"] = R * (new - 1) / (bound_ms / 1e3)


def _line(row) -> str:
    if row["benchmark"] != "bench_e2e.study":
        return f"SKIPPED {row['model']} {row.get('provider')} {row.get('mode')}: {row['reason']}"
    hit = row.get("decode_hit_rate")
    return (f"{row['model']:<19} {row['routing']:<32} {row['mix']:<9} B={row['batch']:<3} new={row['new_tokens']:<4} "
            f"{row['provider']:<30} {row['mode']:<5} prefill {row['prefill_tok_s']:>9.1f} tok/s  decode "
            f"{row['decode_tok_s']:>8.1f} tok/s  e2e/request {row['e2e_tok_s_per_request']:>7.2f} tok/s"
            + (f"  hit {hit:.0%}" if hit is not None else "")
            + (f"  {row['frac_hbm_floor']:.0%} of the HBM floor ({row['hbm_floor_tok_s']:.0f} tok/s)"
               if row.get("frac_hbm_floor") is not None else "") + _profile_line(row.get("decode_profile")))


def _profile_line(profile) -> str:
    if profile is None:
        return ""
    groups = sorted(profile["groups"].items(), key=lambda kv: -kv[1]["us_per_step"])
    parts = ", ".join(f"{g} {v['us_per_step']:.0f} us x{v['launches_per_step']:.0f}" for g, v in groups)
    return (f"\n    decode step {profile['wall_us_per_step']:.0f} us, {profile['what']} {profile['kernel_us_per_step']:.0f} us "
            f"in {profile['launches_per_step']:.0f}: {parts}")


if __name__ == "__main__":
    sys.exit(main())
