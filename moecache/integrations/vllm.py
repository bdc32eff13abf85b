"""moecache as vLLM's MoE expert backend, with per-expert offload, through vLLM's plugin system.

vLLM loads `register` from the `vllm.general_plugins` entry point in every process it starts. Unless
`MOECACHE_VLLM=1`, it does nothing, so installing moecache never changes vLLM. When enabled, it registers an
out-of-tree `UnquantizedFusedMoEMethod`: every unquantized MoE layer then runs its routed experts through
`moecache.ops.fused_moe` (vLLM still routes, runs shared experts and reduces across tensor-parallel ranks).

`MOECACHE_VLLM_OFFLOAD=<budget>` (a fraction of all experts such as 0.25, a per-layer count such as 4, or a
size such as 6GiB, as `moecache.Offload(gpu_experts=...)` takes) also offloads: the experts load into host
memory instead of the GPU, one moecache ExpertCache holds every MoE layer's experts in (pinned) host
memory with that many device slots, and each layer runs through it in forward order, prefetching as
`MOECACHE_VLLM_POLICY` says (lru, the default; lfu; predictive, with `MOECACHE_VLLM_LOOKAHEAD`; budgeted,
with `MOECACHE_VLLM_PREFETCH_LIMIT`).

Tested with vLLM 0.32 (its MoE method API moves between versions). The engine must run eagerly
(`enforce_eager=True`, `--enforce-eager`): the expert cache keeps host-side state per step, which a
captured CUDA graph would freeze.
"""
from __future__ import annotations

import logging
import os
import re
import weakref

import torch

ENABLE_ENV = "MOECACHE_VLLM"
OFFLOAD_ENV = "MOECACHE_VLLM_OFFLOAD"
POLICY_ENV = "MOECACHE_VLLM_POLICY"
LOOKAHEAD_ENV = "MOECACHE_VLLM_LOOKAHEAD"
PREFETCH_LIMIT_ENV = "MOECACHE_VLLM_PREFETCH_LIMIT"
TESTED_VLLM = "0.32"
# vLLM's MoE activations that moecache's kernels compute: gated, act(gate) * up with w13 [E, 2I, H], and
# non-gated ("_no_mul": act(w1 x) with w13 [E, I, H], Nemotron-H's squared ReLU among them).
ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}
NON_GATED_ACTIVATIONS = {"silu_no_mul": "silu", "gelu_no_mul": "gelu", "gelu_tanh_no_mul": "gelu_tanh",
                         "relu2_no_mul": "relu2"}
# vLLM's clamped gates (its apply_moe_activation), on w13 [E, 2I, H] as well: "silu" with the layer's
# swiglu_limit clamps gate and up before the SiLU; "swiglustep" clamps act(gate) and up at 7;
# "swigluoai_uninterleave" computes gate * sigmoid(alpha * gate) * (up + beta) on the clamped halves.
CLAMPED_ACTIVATIONS = ("swiglustep", "swigluoai_uninterleave")
SWIGLUSTEP_LIMIT = 7.0

logger = logging.getLogger(__name__)
_method_class = None
_engines: "weakref.WeakValueDictionary[int, _Engine]" = weakref.WeakValueDictionary()
_last_engine: "weakref.ref[_Engine] | None" = None


def enabled() -> bool:
    """MOECACHE_VLLM: 1 runs vLLM's unquantized MoE layers through moecache; unset or 0 leaves vLLM alone."""
    value = os.environ.get(ENABLE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENABLE_ENV}={value!r}: expected 1 (run vLLM's MoE layers through moecache) or 0")


def offload_from_env():
    """The Offload the MOECACHE_VLLM_* variables ask for, or None (experts stay where vLLM puts them)."""
    from ..patching.offload import POLICIES, Offload, gpu_experts_from_text

    budget = os.environ.get(OFFLOAD_ENV, "").strip()
    policy = os.environ.get(POLICY_ENV, "").strip() or "lru"
    lookahead = os.environ.get(LOOKAHEAD_ENV, "").strip() or "1"
    limit = os.environ.get(PREFETCH_LIMIT_ENV, "").strip()
    if not budget:
        stray = [name for name in (POLICY_ENV, LOOKAHEAD_ENV, PREFETCH_LIMIT_ENV) if os.environ.get(name, "").strip()]
        if stray:
            raise ValueError(f"{stray[0]} is set but {OFFLOAD_ENV} is not: set {OFFLOAD_ENV}=<budget> (e.g. 0.25) "
                             "to offload experts")
        return None
    gpu_experts = gpu_experts_from_text(budget)
    if policy not in POLICIES:
        raise ValueError(f"{POLICY_ENV}={policy!r}: expected one of {', '.join(POLICIES)}")
    if not re.fullmatch(r"[0-9]+", lookahead) or int(lookahead) < 1:
        raise ValueError(f"{LOOKAHEAD_ENV}={lookahead!r}: expected an integer >= 1 (layers predicted ahead)")
    prefetch_limit = None
    if policy == "budgeted":
        try:
            prefetch_limit = float(limit)
        except ValueError:
            raise ValueError(f"{POLICY_ENV}=budgeted needs {PREFETCH_LIMIT_ENV}=<experts copied per layer of "
                             f"compute> (moecache.prefetch_allowance derives it), got {limit!r}") from None
        if not prefetch_limit >= 0 or prefetch_limit == float("inf"):
            raise ValueError(f"{PREFETCH_LIMIT_ENV}={limit!r}: expected a finite number >= 0")
    elif limit:
        raise ValueError(f"{PREFETCH_LIMIT_ENV} is set but {POLICY_ENV} is {policy!r}; it applies to 'budgeted' only")
    return Offload(gpu_experts=gpu_experts, policy=policy, lookahead=int(lookahead), prefetch_limit=prefetch_limit)


def register() -> None:
    """vLLM's plugin entry point: registers moecache's MoE method when MOECACHE_VLLM=1, else does nothing."""
    global _method_class
    if not enabled() or _method_class is not None:
        return
    import vllm
    from vllm.model_executor.custom_op import op_registry_oot

    if not vllm.__version__.startswith(TESTED_VLLM + "."):
        logger.warning("moecache's vLLM backend is tested with vLLM %s.x; this is vLLM %s", TESTED_VLLM,
                       vllm.__version__)
    offload_from_env()  # a malformed switch fails here, at engine start, not at the first forward
    _show_info_line()
    other = op_registry_oot.get("UnquantizedFusedMoEMethod")
    if other is not None:
        raise RuntimeError(f"{ENABLE_ENV}=1, but another vLLM plugin already replaced UnquantizedFusedMoEMethod "
                           f"({other.__module__}.{other.__qualname__}); enable one of them")
    _method_class = _register(_define_method())


def method_class():
    """The registered MoE method class (None until `register` ran with MOECACHE_VLLM=1)."""
    return _method_class


def stats() -> dict | None:
    """This process's last engine: how many MoE layers moecache runs, how many calls, and with offload the
    expert cache's counters (hits, misses, bytes copied...); None before the first forward."""
    engine = _current_engine()
    return None if engine is None else engine.stats()


def reset_stats() -> None:
    """Zero the counters `stats` reports (calls, and the expert cache's hits, misses, bytes...)."""
    engine = _current_engine()
    if engine is not None:
        engine.calls = 0
        if engine.cache is not None:
            engine.cache.reset_stats()


def _current_engine() -> "_Engine | None":
    return _last_engine() if _last_engine is not None else None


def _register(method):
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    return UnquantizedFusedMoEMethod.register_oot(method)


def _show_info_line() -> None:
    """The one line the backend logs is INFO; show it by default, as vLLM shows its own INFO lines."""
    if os.environ.get("MOECACHE_LOGLEVEL"):
        return  # the user chose moecache's level
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _check_config(moe, vllm_config) -> tuple[dict, bool]:
    """What moecache cannot run raises here, while vLLM builds the layer; returns (the activation as
    ops.fused_moe's keyword arguments, gated)."""
    parallel = moe.moe_parallel_config
    if getattr(parallel, "use_ep", False) or getattr(parallel, "ep_size", 1) > 1:
        raise ValueError("moecache's vLLM backend does not run expert parallelism (enable_expert_parallel): its "
                         "expert cache holds all of a layer's experts for one device. Use tensor parallelism "
                         f"(each rank runs its shard of every expert through moecache), or unset {ENABLE_ENV}")
    if getattr(parallel, "dp_size", 1) > 1:
        raise ValueError(f"moecache's vLLM backend does not run data-parallel MoE (dp_size={parallel.dp_size}); "
                         f"use tensor parallelism or unset {ENABLE_ENV}")
    if getattr(moe, "is_lora_enabled", False):
        raise ValueError(f"moecache's vLLM backend does not run MoE LoRA adapters; unset {ENABLE_ENV} to use them")
    if getattr(moe, "has_bias", False):
        raise ValueError(f"moecache's vLLM backend does not run MoE layers with expert biases; unset {ENABLE_ENV}")
    activation_args, gated = _activation_args(moe)
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None and not model_config.enforce_eager:
        raise ValueError(f"{ENABLE_ENV}=1 needs an eager engine: pass enforce_eager=True (--enforce-eager). "
                         "moecache keeps host-side state per step, which compiled CUDA graphs would freeze")
    return activation_args, gated


def _activation_args(moe) -> tuple[dict, bool]:
    """The function vLLM's MoE layer computes between its two GEMMs, as ops.fused_moe's activation keywords."""
    activation = getattr(moe.activation, "value", moe.activation)
    gated = activation in ACTIVATIONS or activation in CLAMPED_ACTIVATIONS
    if not gated and activation not in NON_GATED_ACTIVATIONS:
        raise ValueError(f"moecache's vLLM backend runs the activations {sorted(ACTIVATIONS)}, "
                         f"{list(CLAMPED_ACTIVATIONS)} and, non-gated, {sorted(NON_GATED_ACTIVATIONS)}; this MoE "
                         f"layer uses {activation!r}: unset {ENABLE_ENV} for this model")
    constants = {k: v for k in ("swiglu_limit", "swiglu_alpha", "swiglu_beta") if (v := getattr(moe, k, None)) is not None}
    limit, alpha, beta = constants.get("swiglu_limit"), constants.get("swiglu_alpha", 1.0), constants.get("swiglu_beta", 0.0)
    if activation == "swiglustep":
        return dict(activation="silu", activation_limit=SWIGLUSTEP_LIMIT, limit_after_activation=True), True
    if activation == "swigluoai_uninterleave" and limit is not None and beta in (0.0, 1.0):
        if beta == 1.0:  # GPT-OSS's GLU, gate and up concatenated (MiniMax-M3)
            return dict(activation="swiglu_oai", activation_limit=limit, swiglu_alpha=alpha), True
        if alpha == 1.0:
            return dict(activation="silu", activation_limit=limit), True
    if activation == "silu" and limit is not None:  # vLLM's clamped SiLU reads the limit alone
        return dict(activation="silu", activation_limit=limit), True
    if constants or activation in CLAMPED_ACTIVATIONS:
        raise ValueError(f"moecache's vLLM backend runs {activation!r} with other clamp constants than this MoE "
                         f"layer sets ({constants or 'none'}): unset {ENABLE_ENV} for this model")
    return dict(activation=(ACTIVATIONS if gated else NON_GATED_ACTIVATIONS)[activation]), gated


def _layer_order(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"(?<=\.)[0-9]+(?=\.|$)", name))


class _GateScores:
    """A layer's routing scores from vLLM's own gate module, for the lookahead predictor: vLLM may repack the
    gate's weight for its GEMM (its CPU build empties `weight`), so the module is called, not its weight read."""

    def __init__(self, gate: torch.nn.Module, correction: torch.Tensor | None, score_function: str):
        self.gate = gate
        self.correction = correction  # DeepSeek-V3-style selection bias, added to score_function(logits) to rank
        self.score_function = score_function  # the layer's scoring_func

    def router_input(self, experts_input: torch.Tensor) -> torch.Tensor:
        return experts_input  # vLLM's runner gives the gate and the experts the same hidden states

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from ..cache.predictor import ranking_scores

        out = self.gate(hidden_states)
        return ranking_scores(out[0] if isinstance(out, tuple) else out, self.correction, self.score_function)


class _Engine:
    """The MoE layers of one vLLM model run by moecache in this process, and their expert cache if offloaded."""

    def __init__(self, forward_context: dict, offload):
        self.forward_context = forward_context  # vLLM's layer name -> MoE runner (holds the router, if any)
        self.offload = offload
        self.layers: list = []  # vLLM RoutedExperts, in the order their weights were processed
        self.cache = None
        self.predictor = None
        self.providers: dict[int, object] = {}
        self.calls = 0
        self.started = False

    def add(self, layer) -> None:
        if any(known is layer for known in self.layers):  # vLLM processed this layer's weights again
            if self.cache is not None:
                raise RuntimeError(f"moecache: the experts of {layer.layer_name} live in moecache's expert cache; "
                                   "reloading vLLM's weights into an offloaded model is not supported")
            return
        if self.started:
            raise RuntimeError(f"moecache: MoE layer {layer.layer_name} was processed after the model's first "
                               "forward; the expert cache covers the layers present then")
        self.layers.append(layer)

    def start(self, device: torch.device) -> None:
        global _last_engine
        self.started = True
        _last_engine = weakref.ref(self)
        self.layers = [layer for _, layer in sorted(enumerate(self.layers),
                                                    key=lambda item: (_layer_order(item[1].layer_name), item[0]))]
        if self.offload is not None:
            self._offload(device)
            return
        first = self.layers[0]
        logger.info("moecache runs %d vLLM MoE layers (%d experts each, top-%d) with its fused_moe kernels; experts "
                    "resident on %s (no offload: %s unset)", len(self.layers), first.w13_weight.shape[0],
                    first.top_k, device, OFFLOAD_ENV)

    def _offload(self, device: torch.device) -> None:
        from ..cache import ExpertCache
        from ..cache.expert_cache import record_size
        from ..cache.offloaded import OffloadedExperts, PrefetchBudget
        from ..cache.predictor import SCORE_FUNCTIONS, LookaheadPredictor
        from ..patching.offload import PREDICTING

        offload, layers = self.offload, self.layers
        w13, w2 = layers[0].w13_weight, layers[0].w2_weight
        num_experts = w13.shape[0]
        record_bytes = record_size(w13[0].numel() * w13.element_size(), w2[0].numel() * w2.element_size())
        try:
            num_slots = offload.slots(len(layers), num_experts, record_bytes)
        except ValueError as exc:
            raise ValueError(f"{OFFLOAD_ENV}={str(offload.gpu_experts)!r}: {exc}") from None
        if offload.policy in PREDICTING:
            routers = []
            for layer in layers:
                gate = getattr(self.forward_context.get(layer.layer_name), "gate", None)
                if not isinstance(gate, torch.nn.Module):
                    raise ValueError(f"{POLICY_ENV}={offload.policy!r} needs each MoE layer's router, and vLLM's "
                                     f"runner for {layer.layer_name} holds none (this model routes outside it): "
                                     "use MOECACHE_VLLM_POLICY=lru or lfu")
                correction = getattr(layer, "e_score_correction_bias", None)
                score_function = getattr(layer, "scoring_func", "softmax")
                if correction is not None and score_function not in SCORE_FUNCTIONS:
                    raise ValueError(f"{POLICY_ENV}={offload.policy!r}: {layer.layer_name} ranks experts by "
                                     f"{score_function!r} scores plus a selection bias, which the predictor does not "
                                     "compute: use MOECACHE_VLLM_POLICY=lru or lfu")
                routers.append(_GateScores(gate, correction, score_function))
            self.predictor = LookaheadPredictor(routers, depth=offload.lookahead)
        # A generator, and vLLM's host tensors dropped layer by layer as the store takes them: host memory
        # holds about one copy of the experts while the store fills, not two.
        self.cache = ExpertCache(((layer.w13_weight.data, layer.w2_weight.data) for layer in layers),
                                 num_slots=num_slots, device=device, pin=offload.pin,
                                 policy="priority" if offload.policy in PREDICTING else offload.policy,
                                 allow_pageable=offload.allow_pageable, release_sources=_HandOver(layers))
        budget = PrefetchBudget(offload.prefetch_limit, offload.lookahead) if offload.policy == "budgeted" else None
        providers = [OffloadedExperts(self.cache, i, predictor=self.predictor, prefetch=offload.prefetch, budget=budget)
                     for i in range(len(layers))]
        for provider, nxt in zip(providers, providers[1:]):
            provider.next = nxt
        self.providers = {id(layer): provider for layer, provider in zip(layers, providers)}
        logger.info("moecache runs %d vLLM MoE layers (%d experts each, top-%d) with its fused_moe kernels; experts "
                    "offloaded to %s host memory, %d of %d in device slots on %s (%.2f GiB), policy %s",
                    len(layers), num_experts, layers[0].top_k, "pinned" if self.cache.pinned else "pageable",
                    num_slots, len(layers) * num_experts, device, num_slots * self.cache.record_bytes / 2**30,
                    offload.policy)

    def run(self, layer, x, topk_weights, topk_ids, activation_args: dict, gated: bool) -> torch.Tensor:
        if not self.started:
            self.start(x.device)
        self.calls += 1
        provider = self.providers.get(id(layer))
        if provider is None:
            if self.cache is not None:
                raise RuntimeError(f"moecache: MoE layer {layer.layer_name} is not in this model's expert cache")
            from .. import ops

            # vLLM's own router picked the ids: no value checks (their host sync) on them.
            return ops.fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, **activation_args,
                                 gated=gated, validate=False)
        return provider(x, topk_ids, topk_weights, activation_args=activation_args, interleaved=False, biases={})

    def stats(self) -> dict:
        out = {"layers": len(self.layers), "calls": self.calls, "offloaded": self.cache is not None}
        if self.cache is not None:
            out.update(policy=self.offload.policy, slots=self.cache.num_slots, cache=self.cache.stats())
        return out


class _HandOver:
    """ExpertCache's release_sources for vLLM's layers: a layer's loaded weights are dropped once the host
    store holds them, and copied back from it if the cache cannot be made."""

    def __init__(self, layers: list):
        self.layers = layers

    def release(self, layer: int) -> None:
        for param in (self.layers[layer].w13_weight, self.layers[layer].w2_weight):
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def restore(self, layer: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        for param, master in ((self.layers[layer].w13_weight, gate_up), (self.layers[layer].w2_weight, down)):
            param.data = master.to(device=param.device, dtype=param.dtype, copy=True)


def _engine_for(vllm_config) -> _Engine:
    """One engine per model (per vLLM config) in this process."""
    context = vllm_config.compilation_config.static_forward_context
    engine = _engines.get(id(context))  # a live engine keeps its context alive, so the id is not reused
    if engine is None:
        engine = _Engine(context, offload_from_env())
        _engines[id(context)] = engine
    return engine


def _define_method():
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    class MoecacheFusedMoEMethod(UnquantizedFusedMoEMethod):
        """vLLM's unquantized MoE method with the routed experts computed by moecache (and, with
        MOECACHE_VLLM_OFFLOAD, served from its expert cache)."""

        def __init__(self, moe):
            super().__init__(moe)
            config = get_current_vllm_config()
            self.activation_args, self.gated = _check_config(moe, config)
            self.engine = _engine_for(config)
            # Offloaded experts stay in host memory while vLLM post-processes weights (by default it moves a
            # layer's host parameters to the GPU for that, and back).
            self.requires_device_loading = self.engine.offload is None
            # Weights saved after a vLLM backend's own conversion (swapped or shuffled halves) are not the
            # layout moecache reads.
            self.supports_pre_processed_weights = False

        def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
            # vLLM's backends pad the sizes for their kernels and zero the padding in their own weight
            # conversion, which moecache skips: unpadded sizes, so no uninitialised row is ever read.
            return hidden_size, intermediate_size_per_partition

        @property
        def is_monolithic(self) -> bool:
            return False  # vLLM routes; apply gets topk weights and ids

        @property
        def supports_eplb(self) -> bool:
            return False

        def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                           **extra_weight_attrs):
            if self.engine.offload is None:
                return super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
                                              params_dtype, **extra_weight_attrs)
            # Offloaded experts are loaded into host memory: the GPU never holds them all.
            with torch.device("cpu"):
                return super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
                                              params_dtype, **extra_weight_attrs)

        def process_weights_after_loading(self, layer) -> None:
            # vLLM's kernel setup (repacking, its kernel object) is skipped: moecache reads the layout as
            # loaded, w13 [E, 2I, H] (gate rows, then up) and w2 [E, H, I].
            if layer.expert_map is not None:
                raise ValueError(f"moecache: MoE layer {layer.layer_name} has an expert map (expert parallelism); "
                                 f"unset {ENABLE_ENV}")
            if layer.apply_router_weight_on_input:
                raise ValueError(f"moecache: MoE layer {layer.layer_name} applies router weights to its input "
                                 f"(apply_router_weight_on_input); moecache applies them to expert outputs: unset "
                                 f"{ENABLE_ENV} for this model")
            self.engine.add(layer)

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            # Shared experts are run by vLLM's runner (this method has no vLLM kernel to overlap them in).
            return self.engine.run(layer, x, topk_weights, topk_ids, self.activation_args, self.gated)

    MoecacheFusedMoEMethod.__qualname__ = "MoecacheFusedMoEMethod"  # as vLLM's logs and users name it
    return MoecacheFusedMoEMethod
