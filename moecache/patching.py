"""moecache.patch(model): swap a transformers model's routed-experts modules for moecache ones, in place.

Hook chosen: the experts module itself (transformers 5.x `*Experts`, called as
experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])), not the whole MoE block and not
transformers' ExpertsInterface. The router, shared experts and block stay the model's own, so routing
(softmax or sigmoid, groups, correction bias, scaling) and return values (router logits for auxiliary
losses) are the model's exactly. ExpertsInterface selects one function per *config* by name and keeps
no per-layer state; offload needs per-layer state (cache, layer index, prefetching), and module
swapping is reversible object by object, so unpatch can restore the exact originals.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from . import compat
from .layers.experts import ExpertsLayout, MoecacheExperts

logger = logging.getLogger(__name__)

# Registry: config.model_type -> how the family's experts look. Unknown types fall back to structural
# detection (a module with 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I] parameters).
FAMILIES: dict[str, ExpertsLayout] = {
    "mixtral": ExpertsLayout(),
    "qwen2_moe": ExpertsLayout(),
    "qwen3_moe": ExpertsLayout(),
    "olmoe": ExpertsLayout(),
    "deepseek_v2": ExpertsLayout(),
    "deepseek_v3": ExpertsLayout(),
    "gpt_oss": ExpertsLayout(activation="swiglu_oai", transposed=True, interleaved=True, has_bias=True),
}

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_GPT_OSS_SWIGLU = (1.702, 7.0)  # alpha and limit the kernel's clamped SwiGLU uses


@dataclass
class Offload:
    """Keep experts in pinned host memory with only some on the GPU.

    gpu_experts: a fraction of all experts (0 < x <= 1, e.g. 0.25), a count per layer (int), or a byte
        budget ("6GiB", "512MB", or an int with bytes=True).
    policy: "lru" or "lfu" eviction, or "predictive": each layer applies the routers of the next
        `lookahead` layers to its hidden state, prefetches the experts they pick while it computes, and
        the cache evicts experts predicted for the coming layers last.
    prefetch: with lru/lfu, after each layer start copying the experts the next layer used on the
        previous step (temporal locality); with predictive, prefetch the predicted experts.
    lookahead: how many layers ahead the predictive policy looks (1 or 2 are typical).
    predictor: with policy "predictive", the path of a LearnedRoutePredictor (bench/train_predictor.py
        writes one) whose heads replace router reuse where they exist; None: lookahead gating only.
    """

    gpu_experts: float | int | str = 0.25
    policy: str = "lru"
    prefetch: bool = True
    bytes: bool = False
    pin: str = "alloc"
    allow_pageable: bool = False
    lookahead: int = 1
    predictor: str | None = None

    def slots(self, num_layers: int, num_experts: int, record_bytes: int) -> int:
        total = num_layers * num_experts
        budget = self.gpu_experts
        if isinstance(budget, str):
            match = re.fullmatch(r"\s*([0-9.]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*", budget)
            if not match:
                raise ValueError(f"gpu_experts={budget!r}: expected a byte budget such as '6GiB' or '512MB'")
            scale = {None: 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
            budget_bytes = float(match.group(1)) * scale[match.group(2)]
            slots = int(budget_bytes // record_bytes)
        elif isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"gpu_experts must be a fraction, a per-layer count or a byte budget, got {budget!r}")
        elif self.bytes:
            budget_bytes = budget
            slots = int(budget // record_bytes)
        elif isinstance(budget, float):
            if not 0 < budget <= 1:
                raise ValueError(f"gpu_experts={budget}: a fraction must lie in (0, 1]")
            slots = max(1, math.ceil(budget * total))
        else:
            if not 1 <= budget <= num_experts:
                raise ValueError(f"gpu_experts={budget}: a per-layer count must lie in [1, {num_experts}]")
            slots = budget * num_layers
        if (isinstance(budget, str) or self.bytes) and slots < 1:
            raise ValueError(f"gpu_experts={budget!r} is {budget_bytes / 2**20:.2f} MiB, smaller than one expert "
                             f"({record_bytes / 2**20:.2f} MiB)")
        return min(slots, total)


@dataclass
class _PatchState:
    replaced: list = field(default_factory=list)  # (parent, attribute, original, new)
    cache: object = None
    predictor: object = None
    scheduler_seconds: float = 0.0  # host time the token scheduler spent grouping requests


def _layout_for(model: nn.Module, module: nn.Module, block: nn.Module | None = None) -> ExpertsLayout | None:
    config = getattr(model, "config", None) or getattr(block, "config", None)
    model_type = getattr(config, "model_type", None)
    text_config = getattr(config, "text_config", None) or getattr(config, "language_config", None)
    if model_type not in FAMILIES and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
        config = text_config
    layout = FAMILIES.get(model_type)
    if layout is None:
        transposed, interleaved, has_bias = compat.experts_flags(module)
        layout = ExpertsLayout(transposed=transposed, interleaved=interleaved, has_bias=has_bias)
    if layout.activation != "swiglu_oai":
        act = getattr(config, "hidden_act", "silu")
        if act not in _ACTIVATIONS:
            return None
        layout = ExpertsLayout(activation=_ACTIVATIONS[act], transposed=layout.transposed,
                               interleaved=layout.interleaved, has_bias=layout.has_bias)
    elif (getattr(module, "alpha", _GPT_OSS_SWIGLU[0]), getattr(module, "limit", _GPT_OSS_SWIGLU[1])) != _GPT_OSS_SWIGLU:
        return None
    return layout


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        return False
    if compat.experts_flags(module)[0]:
        return gate_up.shape[2] == 2 * down.shape[1] and gate_up.shape[1] == down.shape[2]
    return gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]


_LIST_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _list_expert_names(block: nn.Module) -> tuple[str, str, str] | None:
    """For a block shaped like DeepSeek's own remote code (DeepSeek-V2 / DeepSeek-VL2 `DeepseekV2MoE`: a
    gate, an nn.ModuleList of expert MLPs, optional shared_experts, and `moe_infer(x, topk_ids,
    topk_weight)`), the names of the experts' gate/up/down linear layers; else None."""
    experts = getattr(block, "experts", None)
    if not (isinstance(experts, nn.ModuleList) and len(experts) > 0 and callable(getattr(block, "moe_infer", None))
            and hasattr(block, "gate")):
        return None
    first = experts[0]
    for names in _LIST_NAMES:
        if all(isinstance(getattr(first, n, None), nn.Linear) and getattr(first, n).bias is None for n in names):
            return names
    return None


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module, tuple | None]]:
    """(qualified name, parent, attribute, experts module, list names) for every routed-experts module.

    Fused experts (transformers 5.x) are swapped as modules (attribute "experts"); a ModuleList block
    gets its `moe_infer` method overridden on the instance (attribute "moe_infer"), with list names.
    """
    found = []
    for name, parent in model.named_modules():
        override = parent.__dict__.get("moe_infer")
        if isinstance(override, MoecacheExperts):
            found.append((f"{name}.moe_infer" if name else "moe_infer", parent, "moe_infer", override,
                          override.list_names))
            continue
        names = _list_expert_names(parent)
        if names is not None:
            found.append((f"{name}.experts" if name else "experts", parent, "moe_infer", parent.experts, names))
            continue
        for attr, child in parent.named_children():
            if isinstance(child, MoecacheExperts) or _is_fused_experts(child):
                found.append((f"{name}.{attr}" if name else attr, parent, attr, child, None))
    return found


def patch(model: nn.Module, *, experts: bool = True, attention: bool = True, offload: Offload | None = None,
          strict: bool = False) -> nn.Module:
    """Replace the model's routed-experts modules with moecache's, in place; returns the model.

    Args:
        experts: swap experts modules for MoecacheExperts (same parameters, no copy).
        attention: replace DeepSeek-V2/V3 MLA attention modules (and modules shaped like DeepSeek's own
            code) with MoecacheMLA, and make model.generate use a paged LatentKVCache.
        offload: an Offload to keep experts in pinned host memory with a GPU slot pool.
        strict: raise instead of logging when a layer or the whole model cannot be patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if offload is not None and not isinstance(offload, Offload):
        raise TypeError(f"offload must be a moecache.Offload or None, got {type(offload).__name__}")
    left_alone: list[dict] = []
    try:
        return _patch(model, experts, attention, offload, strict, left_alone)
    finally:
        _report_left_alone(model, left_alone)


def _report_left_alone(model: nn.Module, left_alone: list[dict]) -> None:
    """One warning per patch() call for everything asked for but left alone, with counts and reasons;
    stats(model)["left_alone"] lists each module."""
    if not left_alone:
        model.__dict__.pop("_moecache_left_alone", None)
        return
    model.__dict__["_moecache_left_alone"] = left_alone  # plain attribute: never a submodule or parameter
    by_reason: dict[tuple[str, str], int] = {}
    for item in left_alone:
        by_reason[(item["kind"], item["reason"])] = by_reason.get((item["kind"], item["reason"]), 0) + 1
    parts = [f"{count} {kind} module{'s' if count > 1 else ''} ({reason})" for (kind, reason), count in by_reason.items()]
    logger.warning("moecache.patch: left alone in %s: %s; moecache.stats(model)['left_alone'] names them",
                   type(model).__name__, "; ".join(parts))


def _patch(model, experts, attention, offload, strict, left_alone) -> nn.Module:
    state: _PatchState = getattr(model, "_moecache_patch", None)
    attention_plan = _plan_attention(model, strict, left_alone) if attention else []
    if not experts:
        if attention_plan:
            _apply_attention(model, attention_plan, state or _PatchState())
        return model
    candidates = find_experts(model)
    todo = [(n, p, a, m, l) for n, p, a, m, l in candidates if not isinstance(m, MoecacheExperts)]
    if state is not None and not todo:
        if attention_plan:
            _apply_attention(model, attention_plan, state)
        else:
            logger.info("moecache.patch: %s is already patched; nothing more to do", type(model).__name__)
        if offload is not None and state.cache is None:
            raise ValueError("moecache.patch: the model is already patched without offload; unpatch it first")
        return model
    if not todo:
        msg = (f"moecache.patch: no MoE experts found in {type(model).__name__} "
               f"(model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}); nothing was patched")
        if offload is not None or (strict and not attention_plan):
            raise ValueError(msg)
        if attention_plan:
            logger.info("%s; patching its MLA attention only", msg.replace("; nothing was patched", ""))
            _apply_attention(model, attention_plan, state or _PatchState())
        else:
            logger.warning(msg)
        return model

    plan = []
    for name, parent, attr, module, list_names in todo:
        layout = _layout_for(model, module, parent if list_names else None)
        if layout is None:
            reason = "an activation the kernels lack"
            if strict:
                raise ValueError(f"moecache.patch: {name} ({type(module).__name__}) uses {reason}")
            left_alone.append({"name": name, "kind": "experts", "type": type(module).__name__, "reason": reason})
            continue
        plan.append((name, parent, attr, module, layout, list_names))
    if not plan:
        if strict or offload is not None:
            raise ValueError("moecache.patch: no experts module could be patched")
        return model

    new_state = state or _PatchState()
    if offload is not None:
        _check_offload(plan, offload)  # raises before anything of the model changed
    replacements = [(parent, attr, module, MoecacheExperts(module, layout, list_names))
                    for _, parent, attr, module, layout, list_names in plan]
    if offload is not None:
        try:
            _offload(replacements, offload, new_state)
        except Exception:
            for _, _, _, new in replacements:
                if new.stacked is not None:
                    new.unstack_list_experts()
            raise
    for parent, attr, module, new in replacements:
        if attr == "moe_infer":
            object.__setattr__(parent, "moe_infer", new)  # an instance override, not a submodule
        else:
            setattr(parent, attr, new)
        new_state.replaced.append((parent, attr, module, new))
    model._moecache_patch = new_state
    if attention_plan:
        _apply_attention(model, attention_plan, new_state)
    for (name, _, _, module, layout, _), (_, _, _, new) in zip(plan, replacements):
        logger.info("moecache.patch: %s (%s, %d experts) -> MoecacheExperts(%s)%s", name, type(module).__name__,
                    new.num_experts, layout.activation, " offloaded" if offload else "")
    return model


# ------------------------------------------------------------------ MLA attention
_MLA_PARTS = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")


def _is_mla_attention(module: nn.Module) -> bool:
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in _MLA_PARTS)
            and all(isinstance(getattr(module, a, None), int) for a in ("num_heads", "kv_lora_rank", "qk_rope_head_dim",
                                                                          "qk_nope_head_dim", "v_head_dim")))


def _rope_for(module: nn.Module, config):
    """The model's own rotary embedding, as rope(q_rot [B, H, S, P], k_rot [B, 1, S, P], call) -> (q, k)."""
    import sys

    source = sys.modules[type(module).__module__]
    rotary = getattr(module, "rotary_emb", None)
    if rotary is not None and hasattr(source, "apply_rotary_pos_emb"):
        # DeepSeek's own code (DeepSeek-V2 / DeepSeek-VL2 repositories): the module owns a rotary_emb whose
        # cos/sin tables are indexed by position_ids inside apply_rotary_pos_emb (interleaved pairs).
        apply, table_len = source.apply_rotary_pos_emb, rotary.max_position_embeddings

        def own_rope(q, k, call):
            cos, sin = rotary(q, seq_len=table_len)
            return apply(q, k, cos, sin, call["position_ids"])
        return own_rope
    if hasattr(source, "apply_rotary_emb"):  # transformers DeepSeek-V2: complex freqs_cis, interleaved pairs
        apply = source.apply_rotary_emb
        return lambda q, k, call: apply(q, k, call["position_embeddings"].to(q.device))
    if hasattr(source, "apply_rotary_pos_emb"):  # transformers DeepSeek-V3: (cos, sin)
        interleave = getattr(config, "rope_interleave", False)
        apply = source.apply_rotary_pos_emb_interleave if interleave else source.apply_rotary_pos_emb

        def rope(q, k, call):
            cos, sin = call["position_embeddings"]
            return apply(q, k, cos, sin)
        return rope
    return None


def _plan_attention(model: nn.Module, strict: bool, left_alone: list) -> list:
    """(parent, attribute, attention module, MoecacheMLA kwargs) for every MLA attention not yet patched."""
    from .layers.mla import MoecacheMLA

    text_config = compat.text_config(model)
    plan = []
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, MoecacheMLA) or not _is_mla_attention(child):
                continue
            rope = _rope_for(child, text_config)
            scale = getattr(child, "scaling", getattr(child, "softmax_scale", None))
            names = compat.positional_arguments(child.forward)
            cache_arg = compat.attention_cache_argument(child.forward)
            why = ("no rotary embedding function it uses was recognised" if rope is None else
                   "no softmax scale attribute" if scale is None else
                   f"its forward takes none of the cache arguments {compat.CACHE_ARGUMENTS}" if cache_arg is None
                   else None)
            if why:
                if strict:
                    raise ValueError(f"moecache.patch: MLA attention {name}.{attr} ({type(child).__name__}) "
                                     f"cannot be patched: {why}")
                left_alone.append({"name": f"{name}.{attr}" if name else attr, "kind": "MLA attention",
                                   "type": type(child).__name__, "reason": why})
                continue
            plan.append((f"{name}.{attr}" if name else attr, parent, attr, child,
                         dict(rope=rope, scale=scale, arg_names=names, cache_arg=cache_arg,
                              returns=3 if compat.attention_returns_cache(cache_arg) else 2)))
    return plan


def _apply_attention(model: nn.Module, plan: list, state: _PatchState) -> None:
    from .layers.mla import MoecacheMLA

    for name, parent, attr, module, kwargs in plan:
        new = MoecacheMLA(module, **kwargs)
        setattr(parent, attr, new)
        state.replaced.append((parent, attr, module, new))
        logger.info("moecache.patch: %s (%s, %d heads) -> MoecacheMLA (latent cache of %d values per token)", name,
                    type(module).__name__, new.num_heads, new.kv_lora_rank + new.qk_rope_head_dim)
    model._moecache_patch = state
    _install_latent_cache_default(model, state)


def _install_latent_cache_default(model: nn.Module, state: _PatchState) -> None:
    """Make model.generate build a LatentKVCache where it would build its default cache (dynamic, or
    static with cache_implementation="static"); a cache the caller passes is used as given."""
    prepare = getattr(model, "_prepare_cache_for_generation", None)
    if prepare is None or "_prepare_cache_for_generation" in model.__dict__:
        return
    from ._env import kv_block_size
    from .layers.mla import LatentKVCache, MoecacheMLA

    text_config = compat.text_config(model)
    num_layers = max(m.layer_idx for m in model.modules() if isinstance(m, MoecacheMLA)) + 1
    num_layers = max(num_layers, getattr(text_config, "num_hidden_layers", 0))

    def prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs):
        result = prepare(generation_config, model_kwargs, *args, **kwargs)
        key = compat.generate_cache_key(model_kwargs)
        cache = model_kwargs.get(key) if key else None
        if cache is not None and not getattr(cache, "_is_user_defined", False) and not isinstance(cache, LatentKVCache):
            max_len = cache.get_max_length() if cache.is_compileable else -1
            model_kwargs[key] = LatentKVCache(num_layers, block_size=kv_block_size(),
                                              max_cache_len=max_len if max_len > 0 else None)
        return result

    model._prepare_cache_for_generation = prepare_cache_for_generation


def _check_offload(plan, offload: Offload) -> None:
    if offload.policy not in ("lru", "lfu", "predictive"):
        raise ValueError(f"offload policy must be 'lru', 'lfu' or 'predictive', got {offload.policy!r}")
    if isinstance(offload.lookahead, bool) or not isinstance(offload.lookahead, int) or offload.lookahead < 1:
        raise ValueError(f"offload lookahead must be an int >= 1, got {offload.lookahead!r}")
    if offload.predictor is not None:
        from pathlib import Path

        if offload.policy != "predictive":
            raise ValueError(f"offload predictor={offload.predictor!r} needs policy='predictive'")
        if not Path(offload.predictor).is_file():
            raise ValueError(f"offload predictor={offload.predictor!r}: no such file")
    if offload.policy == "predictive":
        from .cache.predictor import find_router

        def experts_shape(module, list_names):
            if list_names is not None:
                return len(module), getattr(module[0], list_names[0]).weight.shape[1]
            E, a, b = module.gate_up_proj.shape
            return E, (a if compat.experts_flags(module)[0] else b)

        missing = [name for name, parent, _, module, _, list_names in plan
                   if find_router(parent, *experts_shape(module, list_names)) is None]
        if missing:
            raise ValueError(f"offload policy 'predictive' needs each MoE block's router ([E, H] weight); "
                             f"none found beside {missing[0]}")
    devices = set()
    for _, _, _, module, _, list_names in plan:
        if list_names is None:
            devices.add(module.gate_up_proj.device)
        else:
            devices.update(getattr(m, n).weight.device for m in module for n in list_names)
    if len(devices) != 1:
        raise ValueError(f"offload: the experts live on several devices {sorted(map(str, devices))}; one expert "
                         "cache serves one device: load the experts onto one GPU (or the CPU)")
    device = devices.pop()
    if device.type == "meta":
        raise ValueError("offload: the experts are on the meta device (not loaded)")
    from . import _C

    if device.type == "cuda" and not _C.cuda_available():
        raise ValueError(f"offload: experts are on {device} but moecache._C cannot use CUDA "
                         f"({_C.cuda_unavailable_reason()}); pinned host memory needs it")


def _router_of(block: nn.Module, experts: MoecacheExperts) -> "RouterSpec | None":
    from .cache.predictor import find_router

    return find_router(block, experts.num_experts, experts.hidden_size)


def _patched_blocks(model: nn.Module) -> list[tuple[nn.Module, MoecacheExperts]]:
    state: _PatchState = getattr(model, "_moecache_patch", None)
    if state is None:
        raise ValueError("the model is not patched: call moecache.patch(model) first")
    return [(parent, new) for parent, _, _, new in state.replaced if isinstance(new, MoecacheExperts)]


def patched_experts(model: nn.Module) -> list[MoecacheExperts]:
    """The patched experts modules, in layer order (the order routers() and the expert cache use)."""
    return [new for _, new in _patched_blocks(model)]


def routers(model: nn.Module) -> list:
    """The router of every patched MoE layer, in layer order (RouterSpec; None where none was found)."""
    return [_router_of(parent, new) for parent, new in _patched_blocks(model)]


def _offload(replacements, offload: Offload, state: _PatchState) -> None:
    from .cache import ExpertCache

    modules = [new for _, _, _, new in replacements]
    E = modules[0].num_experts
    gate_up, down = modules[0].weights()
    device = gate_up.device
    record_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    num_slots = offload.slots(len(modules), E, record_bytes)
    predictor = None
    if offload.policy == "predictive":
        from .cache.predictor import LookaheadPredictor

        specs = [_router_of(parent, new) for parent, _, _, new in replacements]
        learned = None
        if offload.predictor is not None:
            from .cache.learned import LearnedRoutePredictor

            learned = LearnedRoutePredictor.load(offload.predictor, device=device)
        predictor = LookaheadPredictor(specs, depth=offload.lookahead, learned=learned) if offload.prefetch else None
    cache = ExpertCache([m.original if m.stacked is None else m.stacked for m in modules], num_slots=num_slots,
                        policy="priority" if offload.policy == "predictive" else offload.policy, device=device,
                        pin=offload.pin, allow_pageable=offload.allow_pageable)
    state.cache = cache
    state.predictor = predictor
    for layer, module in enumerate(modules):
        module.cache, module.cache_layer, module.predictor = cache, layer, predictor
        if offload.prefetch and layer + 1 < len(modules):
            object.__setattr__(module, "next_layer", modules[layer + 1])  # a reference, not a submodule
        # The host store now holds the master copy: free the device memory the experts held.
        if module.stacked is not None:
            params = [p for e in range(E) for p in module.list_params(e)]
            module.stacked = None
        else:
            params = [module.gate_up_proj, module.down_proj]
        for param in params:
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    logger.info("moecache.patch: %d layers x %d experts offloaded to %s host memory; %d slots on %s (%.2f GiB)",
                len(modules), E, "pinned" if cache.pinned else "pageable", num_slots, device,
                num_slots * cache.record_bytes / 2**30)


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original experts modules and weights back exactly; returns the model."""
    state: _PatchState = getattr(model, "_moecache_patch", None)
    if state is None:
        model.__dict__.pop("_moecache_left_alone", None)
        logger.info("moecache.unpatch: %s is not patched", type(model).__name__)
        return model
    cache = state.cache
    if cache is not None:
        cache.synchronize()
        # Restore each layer's weights from the host master copies (bit-exact: they were copied, not cast).
        host = {}
        for layer in range(cache.num_layers):
            gate_up, down = cache.host_weights(layer)
            host[layer] = (gate_up, down)
        for parent, attr, original, new in state.replaced:
            if getattr(new, "cache", None) is None:
                continue
            gate_up, down = host[new.cache_layer]
            if new.list_names is not None:
                inter = gate_up.shape[1] // 2
                for e in range(new.num_experts):
                    g, u, d = new.list_params(e)
                    for param, src in ((g, gate_up[e, :inter]), (u, gate_up[e, inter:]), (d, down[e])):
                        param.data = src.to(device=param.device, dtype=param.dtype).clone()
                continue
            if new.layout.transposed:
                gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            for param, src in ((original.gate_up_proj, gate_up), (original.down_proj, down)):
                param.data = src.to(device=param.device, dtype=param.dtype).contiguous()
    model.__dict__.pop("_prepare_cache_for_generation", None)
    model.__dict__.pop("_moecache_left_alone", None)
    for parent, attr, original, new in reversed(state.replaced):
        if not isinstance(new, MoecacheExperts):
            setattr(parent, attr, original)
            continue
        if attr == "moe_infer":
            del parent.__dict__["moe_infer"]  # the class's own method again
            if new.stacked is not None:
                new.unstack_list_experts()
        else:
            setattr(parent, attr, original)
        new.cache = None
        new.predictor = None
    if cache is not None:
        cache.close()
    del model._moecache_patch
    logger.info("moecache.unpatch: restored %d modules", len(state.replaced))
    return model


def stats(model: nn.Module) -> dict:
    """Per-layer calls and tokens of the patched experts, the expert cache's counters when offloaded, the
    predictor's recall and precision (policy "predictive"), and the patched MLA attention's calls."""
    state: _PatchState = getattr(model, "_moecache_patch", None)
    left_alone = list(model.__dict__.get("_moecache_left_alone", []))
    if state is None:
        return {"patched": False, "layers": [], "cache": None, "attention": [], "left_alone": left_alone}
    names = {id(new): name for name, _, _, new, _ in find_experts(model)}
    layers = [{"name": names.get(id(new), attr), "calls": new.calls, "tokens": new.tokens,
               "activation": new.layout.activation} for _, attr, _, new in state.replaced
              if isinstance(new, MoecacheExperts)]
    attention = [{"layer": new.layer_idx, **new.calls} for _, _, _, new in state.replaced
                 if not isinstance(new, MoecacheExperts)]
    cache = state.cache.stats() if state.cache is not None else None
    if cache is not None:
        cache["wasted_prefetch_bytes"] = cache["wasted_prefetches"] * state.cache.record_bytes
    prediction = state.predictor.summary() if state.predictor is not None else None
    return {"patched": True, "layers": layers, "calls": sum(l["calls"] for l in layers),
            "tokens": sum(l["tokens"] for l in layers), "cache": cache, "prediction": prediction,
            "attention": attention, "left_alone": left_alone, "scheduler_seconds": state.scheduler_seconds}
