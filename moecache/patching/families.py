"""Which modules of a model are routed experts, how they keep their weights, and where their routers
are: the model knowledge `patch` needs, found by `config.model_type` and by structure.

Fused experts (transformers 5.x `*Experts`: 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], or
non-gated `up_proj` [E, I, H] and `down_proj` (Nemotron-H), called as experts(hidden, top_k_index,
top_k_weights)) are swapped as modules. Experts kept as a list of
MLPs are stacked once (list_experts.py) and hooked where the family runs them: DeepSeek's own blocks
(`moe_infer` overridden on the instance), DeepSpeed-MoE layers (MoE-LLaVA: the MOELayer's forward, the
layer's own gate still routing) and Switch Transformers' experts (their forward). Llama 4's block, whose
experts take inputs already scaled by the router score, has its forward overridden too (its fused
experts stay in the tree and are read from there).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .. import compat, ops
from ..cache.predictor import SCORE_FUNCTIONS, RouterSpec, TokenIdRouter
from ..layers.experts import ExpertsLayout, MoecacheExperts
from ..ops import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT
from .hooks import HolderRef, bypassed_parts, own_forward, read_as_weights
from .list_experts import KNOWN_NAMES, ListNames, StackedExperts, activation_of, names_of

# config.model_type -> how the family's experts look; unknown types fall back to structural detection.
FAMILIES: dict[str, ExpertsLayout] = {
    "mixtral": ExpertsLayout(),
    "qwen2_moe": ExpertsLayout(),
    "qwen3_moe": ExpertsLayout(),
    "olmoe": ExpertsLayout(),
    "deepseek_v2": ExpertsLayout(),
    "deepseek_v3": ExpertsLayout(),
    "gpt_oss": ExpertsLayout(activation="swiglu_oai", transposed=True, interleaved=True, has_bias=True),
}

# config.hidden_act -> the kernels' activation
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu", "relu2": "relu2"}

@dataclass
class FoundExperts:
    """A routed-experts module and how it is hooked: `kind` "module" (fused 3-D experts, parent.attr
    swapped), "moe_infer" (DeepSeek's own blocks: parent.moe_infer overridden on the instance),
    "deepspeed" (DeepSpeed-MoE's MOELayer: parent.forward overridden), "switch" (Switch Transformers'
    experts: parent.forward overridden) or "llama4" (Llama 4's MoE block: parent.forward overridden).
    `module` holds the experts (for lists, the ModuleList or ModuleDict of MLPs, named by `names`)."""

    name: str
    parent: nn.Module
    attr: str
    module: nn.Module
    kind: str = "module"
    names: ListNames | None = None
    block: nn.Module | None = None  # where the router hangs, when not `parent` (Switch: the sparse MLP)

    @property
    def router_block(self) -> nn.Module:
        return self.block if self.block is not None else self.parent

    @property
    def mlps(self) -> list[nn.Module]:
        return list(self.module.values()) if isinstance(self.module, nn.ModuleDict) else list(self.module)

    @property
    def modules(self) -> list[nn.Module]:
        """The modules holding the experts' parameters: the experts module, or each expert MLP."""
        return [self.module] if self.names is None else self.mlps

    @property
    def keys(self) -> list[str]:
        """The MLPs' names inside `module` (state-dict keys): "0", "1", ... or "expert_0", ..."""
        return list(self.module.keys()) if isinstance(self.module, nn.ModuleDict) else [str(i) for i in range(len(self.module))]


class UnsupportedExperts(ValueError):
    """These experts compute something the kernels do not (the message says what)."""


LACKED_ACTIVATION = "an activation the kernels lack"
ACT_ATTRIBUTES = ("act_fn", "activation_fn", "act", "activation")


def layout_for(model: nn.Module, found: FoundExperts) -> ExpertsLayout:
    """The layout of these experts; raises UnsupportedExperts when the kernels cannot compute them."""
    _check_no_hooks_bypassed(found)
    if found.names is not None:
        first = found.mlps[0]
        _check_list_is_uniform(found)
        act, own = activation_of(first), _own_activation(first)
        if act is None and own is not None:
            raise UnsupportedExperts(f"{LACKED_ACTIVATION} ({_describe(own)})")
        if act is None:  # no activation attribute: the function its forward calls (Qwen-1: silu)
            config = compat.text_config(model, found.name)
            act = ACTIVATIONS.get(getattr(config, "hidden_act", "silu"))
        if act is None or (not found.names.gated and act not in ops.NON_GATED_ACTIVATIONS):
            raise UnsupportedExperts(LACKED_ACTIVATION)
        return ExpertsLayout(activation=act, gated=found.names.gated,
                             has_bias=getattr(first, found.names.gate).bias is not None)
    config = compat.owning_config(model, found.name)
    model_type = getattr(config, "model_type", None)
    text_config = getattr(config, "text_config", None) or getattr(config, "language_config", None)
    if model_type not in FAMILIES and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
        config = text_config
    layout = FAMILIES.get(model_type)
    if layout is None:
        transposed, interleaved, has_bias = compat.experts_flags(found.module)
        layout = ExpertsLayout(transposed=transposed, interleaved=interleaved, has_bias=has_bias,
                               gated=compat.experts_gated(found.module))
    _check_holds_only_weights(found.module)
    if found.kind == "llama4" and found.parent.top_k != 1:
        # each route would need its own scaled input row: every Llama 4 model routes to one expert
        raise UnsupportedExperts(f"Llama 4 experts with top-k {found.parent.top_k}: their input is scaled by the "
                                 "router score, which the kernels support for one expert per token")
    activation = layout.activation if layout.activation == "swiglu_oai" else \
        _activation_of_fused(found.module, config, layout.gated)
    gate = _gate_function(found.module, activation, layout.interleaved) if layout.gated else {}
    return dataclasses.replace(layout, **{"activation": activation, **gate})


def _gate_function(module: nn.Module, activation: str, interleaved: bool) -> dict:
    """ExpertsLayout's activation fields for a fused experts module's own gate function (compat.own_gate_function):
    the first of the kernels' gates, with the module's constants, that computes what it computes on a probe
    crossing every clamp; {} where the module has none (act(gate) * up). Raises UnsupportedExperts where none does."""
    own = compat.own_gate_function(module)
    limit, alpha = compat.gate_constants(module)
    candidates = []
    if activation != "swiglu_oai":
        candidates.append({})
        if limit is not None:
            candidates += [{"activation_limit": limit}, {"activation_limit": limit, "limit_after_activation": True}]
    if limit is not None or activation == "swiglu_oai":
        candidates.append({"activation": "swiglu_oai", "activation_limit": limit or SWIGLU_OAI_LIMIT,
                           "swiglu_alpha": alpha or SWIGLU_OAI_ALPHA})
    if own is None:
        return candidates[0] if activation == "swiglu_oai" else {}
    probe = _gate_probe(limit)
    gate, up = ops.split_gate_up(probe, interleaved)
    try:
        with torch.no_grad():
            got = own(probe)
    except Exception as e:  # noqa: BLE001 - a gate that cannot run on a CPU probe is one the kernels cannot match
        raise UnsupportedExperts(f"a gate function of its own (_apply_gate) that fails on a probe "
                                 f"({type(e).__name__}: {e})") from e
    for candidate in candidates:
        want = ops.activation_reference(gate, up, **{"activation": activation, **candidate})
        if isinstance(got, torch.Tensor) and got.shape == want.shape and \
                torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6):
            return candidate
    constants = ", ".join(f"{k} {v:g}" for k, v in (("limit", limit), ("alpha", alpha)) if v is not None)
    raise UnsupportedExperts(f"a gate function of its own (_apply_gate) that none of the kernels' {activation} "
                             f"gates computes{f' with its {constants}' if constants else ''}")


def _gate_probe(limit: float | None) -> torch.Tensor:
    """gate_up [256, 64] whose gate and up values cross -limit and +limit in every pairing, and reach +-1e6 so
    a clamp the module keeps no limit for shows too."""
    g = torch.Generator().manual_seed(0)
    scale = 3.0 * (limit or 10.0)
    probe = (torch.rand(256, 64, generator=g) * 2.0 - 1.0) * scale
    far = torch.logspace(1.5, 6.0, 64)
    probe[:4] = torch.stack([far, -far, far.flip(0), -far.flip(0)])
    return probe


def bypassed_roots(found: FoundExperts) -> list[tuple[nn.Module, bool]]:
    """(module, include_root): where the parts the kernels do not call are, under `module`. A replaced
    experts module (or an overridden container) is still called; list experts' holder is not."""
    if found.kind in ("module", "switch"):
        return [(found.module, False)]
    return [(found.parent.experts if found.kind == "deepspeed" else found.module, True)]


def _check_no_hooks_bypassed(found: FoundExperts) -> None:
    """The kernels compute the experts without calling their parts (or, for list experts, the module
    holding the MLPs): hooks or other code there would silently stop running. A replaced module
    shares its hook tables with its replacement, but not a forward set on it."""
    bypassed = [part for root, include_root in bypassed_roots(found)
                for part in bypassed_parts(root, include_root=include_root)]
    if found.kind == "module" and own_forward(found.module):
        bypassed.insert(0, f"{type(found.module).__name__}: {own_forward(found.module)}")
    elif found.kind != "module" and found.attr in vars(found.parent):  # the method patch would override
        bypassed.insert(0, f"{type(found.parent).__name__}: a {found.attr} set on the module itself")
    if bypassed:
        raise UnsupportedExperts(f"code around parts the kernels do not call ({'; '.join(bypassed[:3])})")


def _is_activation(name: str, child: nn.Module) -> bool:
    """A child the kernels stand in for: an activation module without parameters of its own."""
    return name in ACT_ATTRIBUTES and not any(True for _ in child.parameters())


def _check_holds_only_weights(module: nn.Module) -> None:
    """What a fused experts module may hold for the kernels to compute it: its two projections and their
    biases; anything else (a norm after the experts, a learned scale) is math they would skip."""
    first, down = compat.fused_weight_names(module)
    allowed = {first, down, f"{first}_bias", f"{down}_bias"}
    extra = sorted({name for name, _ in module.named_parameters(recurse=False)} - allowed)
    extra += sorted(name for name, child in module.named_children() if not _is_activation(name, child))
    if extra or getattr(module, "has_post_expert_norm", False):
        raise UnsupportedExperts(f"parts besides the expert weights ({', '.join(extra) or 'a post-expert norm'})")


def has_dropout(mlps) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for mlp in mlps for m in mlp.modules())


def _own_activation(module: nn.Module):
    return next((getattr(module, a) for a in ACT_ATTRIBUTES if getattr(module, a, None) is not None), None)


def _describe(act) -> str:
    return type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))


def _check_list_is_uniform(found: FoundExperts) -> None:
    """The kernels compute every expert of a layer alike, from one stack: the MLPs must agree in their
    activation, biases, shapes, dtype and device, hold nothing but their linears, an activation and
    dropout, and share no weight with each other. Dropout acts only in training: DeepSpeed and Switch
    layers then run their MLPs' own forward (ExpertsAdapter), and DeepSeek's blocks call moe_infer only
    in eval."""
    names = found.names
    linears = (*names.rows, names.down)
    seen: set[int] = set()
    signature = None
    for key, mlp in zip(found.keys, found.mlps):
        extra = [name for name, child in mlp.named_children()
                 if name not in linears and not isinstance(child, nn.Dropout) and not _is_activation(name, child)]
        if extra:
            raise UnsupportedExperts(f"parts besides the expert weights (expert {key}: {', '.join(extra)})")
        layers = [getattr(mlp, n) for n in linears]
        for n, layer in zip(linears, layers):
            why = read_as_weights(layer)
            if why:
                raise UnsupportedExperts(f"a linear layer the kernels would read as weights has code of its own "
                                         f"(expert {key}.{n}: {why})")
        params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
        if any(id(p) in seen for p in params):
            raise UnsupportedExperts(f"weights shared between experts (expert {key})")
        seen.update(id(p) for p in params)
        act = _own_activation(mlp)
        mine = (activation_of(mlp) or (act is not None and _describe(act)),
                tuple((tuple(layer.weight.shape), layer.bias is not None) for layer in layers),
                {(p.dtype, p.device) for p in params})
        if len(mine[2]) != 1:
            raise UnsupportedExperts(f"weights of several dtypes or devices in one expert (expert {key})")
        if signature is not None and mine != signature:
            raise UnsupportedExperts(f"experts that differ in activation, shapes, biases, dtype or device (expert "
                                     f"{key} and expert {found.keys[0]})")
        signature = mine


def _activation_of_fused(module: nn.Module, config, gated: bool) -> str:
    """The module's own activation where it has one (some families take it from another config field
    than hidden_act), else the config's."""
    act = activation_of(module)
    if act is None:
        own = _own_activation(module)
        if own is not None:
            raise UnsupportedExperts(f"{LACKED_ACTIVATION} ({_describe(own)})")
        name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
        if name not in ACTIVATIONS:
            raise UnsupportedExperts(f"{LACKED_ACTIVATION} ({name})")
        act = ACTIVATIONS[name]
    if not gated and act not in ops.NON_GATED_ACTIVATIONS:
        raise UnsupportedExperts(f"{LACKED_ACTIVATION} ({act} without a gate)")
    return act


PARAMETRIZED = ("parametrized (torch.nn.utils.parametrize): the kernels read parameters, not what a "
                "parametrization computes from them")


def fused_weights(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A fused experts module's (first projection, down projection) as it stores them, None where missing."""
    return tuple(getattr(module, name, None) for name in compat.fused_weight_names(module))


def is_fused_experts(module: nn.Module) -> bool:
    first, down = fused_weights(module)
    if not (isinstance(first, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    return _fused_shapes(module, first, down)


def is_parametrized_fused_experts(module: nn.Module) -> bool:
    """Fused experts whose gate_up_proj or down_proj a torch parametrization computes."""
    from torch.nn.utils import parametrize

    if not any(parametrize.is_parametrized(module, name) for name in compat.fused_weight_names(module)):
        return False
    first, down = fused_weights(module)
    return isinstance(first, torch.Tensor) and isinstance(down, torch.Tensor) and _fused_shapes(module, first, down)


def _fused_shapes(module: nn.Module, first: torch.Tensor, down: torch.Tensor) -> bool:
    """first [E, 2I, H] (gated; [E, I, H] without a gate) and down [E, H, I], or both transposed."""
    if first.dim() != 3 or down.dim() != 3 or first.shape[0] != down.shape[0]:
        return False
    rows = 2 if compat.experts_gated(module) else 1
    if compat.experts_flags(module)[0]:
        return first.shape[2] == rows * down.shape[1] and first.shape[1] == down.shape[2]
    return first.shape[1] == rows * down.shape[2] and first.shape[2] == down.shape[1]


def _mlp_names(mlps) -> ListNames | None:
    """The naming every expert MLP shares, or None. MLPs that carry a known naming whose layers are not all
    plain nn.Linear with biases alike (an adapter such as PEFT's LoRA put on before patch) raise
    UnsupportedExperts: they are a list-experts layer the kernels cannot read, not something else."""
    mlps = list(mlps)
    if not mlps:
        return None
    names = names_of(mlps[0])
    if names is not None and all(names_of(m) == names for m in mlps):
        return names
    for known in KNOWN_NAMES:
        attrs = (*known.rows, known.down)
        if all(isinstance(getattr(m, a, None), nn.Module) for m in mlps for a in attrs):
            raise UnsupportedExperts(_why_not_linears(mlps, attrs))
    return None


def _why_not_linears(mlps, attrs: tuple[str, ...]) -> str:
    for i, mlp in enumerate(mlps):
        for a in attrs:
            layer = getattr(mlp, a)
            if not isinstance(layer, nn.Linear):
                cls = type(layer)
                return f"expert linear layers that are not nn.Linear (expert {i}.{a}: {cls.__module__}.{cls.__qualname__})"
        if len({getattr(mlp, a).bias is None for a in attrs}) != 1:
            return f"expert linear layers with and without biases (expert {i})"
    return "experts whose linear layers are named differently"


def _deepseek_block(block: nn.Module) -> ListNames | None:
    """A block shaped like DeepSeek's own remote code (DeepSeek-V2 / DeepSeek-VL2 `DeepseekV2MoE`: a gate,
    an nn.ModuleList of expert MLPs, optional shared_experts, `moe_infer(x, topk_ids, topk_weight)`;
    DeepSeek-MoE's passes the routes flattened, `moe_infer(x, flat_expert_indices, flat_expert_weights)`)."""
    experts = getattr(block, "experts", None)
    if isinstance(experts, nn.ModuleList) and callable(getattr(block, "moe_infer", None)) and hasattr(block, "gate"):
        return _mlp_names(experts)
    return None


def _deepspeed_layer(layer: nn.Module) -> ListNames | None:
    """DeepSpeed-MoE's MOELayer (`MoE.deepspeed_moe`): gate.wg (the router), experts.deepspeed_experts."""
    gate, experts = getattr(layer, "gate", None), getattr(layer, "experts", None)
    mlps = getattr(experts, "deepspeed_experts", None)
    if isinstance(getattr(gate, "wg", None), nn.Linear) and isinstance(mlps, nn.ModuleList):
        return _mlp_names(mlps)
    return None


def _switch_experts(experts: nn.Module) -> ListNames | None:
    """Switch Transformers' experts: a ModuleDict of expert_0..expert_{E-1} dense MLPs (wi, wo), called as
    experts(hidden, one-hot router mask [T, 1, E], routing weights [T, 1]); the router is their parent's."""
    return _mlp_names(experts.values()) if _is_switch_dict(experts) else None


def _is_switch_dict(module: nn.Module) -> bool:
    return (isinstance(module, nn.ModuleDict) and type(module).__name__.startswith("SwitchTransformers")
            and list(module.keys()) == [f"expert_{i}" for i in range(len(module))])


# Families whose experts moecache does not run, with the reason (they are left alone, and said so).
UNSUPPORTED = {
    "NllbMoeExperts": "NLLB-MoE's experts module (transformers 5.x) one-hot-encodes an already one-hot router "
                      "mask, so which expert runs depends on the mask's values, not on the router's choice",
    "JetMoeMoE": "JetMoE's MoE block calls its experts (input_linear / output_linear) on rows its own router "
                 "sorted and counted, not with top-k ids and weights",
    "DbrxExperts": "DBRX's experts keep each projection flattened over the experts (mlp.w1, v1 and w2, each "
                   "[E * I, H], w2 transposed), a layout moecache does not read",
}


def find_experts(model: nn.Module, unsupported: list | None = None) -> list[FoundExperts]:
    """Every routed-experts module of the model, patched or not, in module order. Experts of a family
    moecache does not run go to `unsupported` as (name, class, reason)."""
    found = []
    owner_of = {id(child): module for module in model.modules() for child in module.children()}
    for name, parent in model.named_modules():
        prefix = f"{name}." if name else ""
        for attr in ("moe_infer", "forward"):
            override = parent.__dict__.get(attr)
            if isinstance(override, (MoecacheExperts, ExpertsAdapter)):
                experts = override if isinstance(override, MoecacheExperts) else override.experts
                kind = _kind_of(override)
                found.append(FoundExperts(prefix + attr, parent, attr, experts.original, kind,
                                          experts.stacked.names if experts.stacked is not None else None,
                                          owner_of.get(id(parent)) if kind == "switch" else None))
                break
        else:
            try:
                names = _deepseek_block(parent)
                if names is not None:
                    found.append(FoundExperts(prefix + "experts", parent, "moe_infer", parent.experts, "moe_infer", names))
                    continue
                names = _deepspeed_layer(parent)
                if names is not None:
                    found.append(FoundExperts(prefix + "experts", parent, "forward", parent.experts.deepspeed_experts,
                                              "deepspeed", names))
                    continue
                names = _switch_experts(parent)
                if names is not None:
                    found.append(FoundExperts(name, parent, "forward", parent, "switch", names, owner_of.get(id(parent))))
                    continue
                if compat.is_llama4_moe(parent) and is_fused_experts(parent.experts):
                    found.append(FoundExperts(prefix + "experts", parent, "forward", parent.experts, "llama4"))
                    continue
            except UnsupportedExperts as why:
                if unsupported is not None:
                    experts = parent if _is_switch_dict(parent) else parent.experts
                    unsupported.append((name if experts is parent else prefix + "experts", type(experts).__name__, str(why)))
                continue
            if type(parent).__name__ in UNSUPPORTED and unsupported is not None:
                unsupported.append((name, type(parent).__name__, UNSUPPORTED[type(parent).__name__]))
            for attr, child in parent.named_children():
                if isinstance(child, MoecacheExperts) or is_fused_experts(child):
                    found.append(FoundExperts(prefix + attr, parent, attr, child))
                elif unsupported is not None and is_parametrized_fused_experts(child):
                    unsupported.append((prefix + attr, type(child).__name__, PARAMETRIZED))
    return found


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _kind_of(override) -> str:
    if isinstance(override, MoecacheExperts):
        return "moe_infer"
    return override.kind


def find_router(block: nn.Module, num_experts: int, hidden: int) -> RouterSpec | TokenIdRouter | None:
    """The router of an MoE block, found by shape: a child (not the experts), or a child of a child
    (DeepSpeed's gate.wg, Switch's router.classifier), whose weight is [E, H] (or holds those rows: Inkling's
    scores its shared experts too; LongCat-Flash's scores its zero-computation experts after the routed
    ones, E + Z rows); its bias (GPT-OSS), its selection bias (DeepSeek-V3's e_score_correction_bias and
    the like) and Gemma 4's input scales come along. A router that picks by
    token id (compat.token_id_table) gives a TokenIdRouter: its weight does not pick the experts."""
    zero = compat.zero_expert_rows(block)
    for child in _router_candidates(block):
        table = compat.token_id_table(child)
        if table is not None:
            return TokenIdRouter(table, num_experts)
        for module in (child, *child.children()):
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue
            weight = compat.routed_rows(module, weight, num_experts + zero, hidden)
            if weight is not None:
                bias = getattr(module, "bias", None)
                correction, score_function = compat.router_selection_bias(block, child)
                score_function = _declared_score_function(child) or score_function
                input_scale, experts_input_scale = compat.router_input_scales(block, child)
                return RouterSpec(weight, bias if isinstance(bias, torch.Tensor) else None, correction,
                                  score_function, input_scale, experts_input_scale, zero_experts=zero)
    return None


def _declared_score_function(router: nn.Module) -> str | None:
    """The SCORE_FUNCTIONS name of the function a router declares it ranks by (compat.router_score_fn), found
    by computing it on probe logits; None where it declares none or none of them matches."""
    own = compat.router_score_fn(router)
    if own is None:
        return None
    probe = torch.linspace(-12.0, 12.0, 48).reshape(3, 16)
    try:
        with torch.no_grad():
            got = own(probe)
    except Exception:  # noqa: BLE001 - a score function that cannot run on a CPU probe is matched by none
        return None
    for name, fn in SCORE_FUNCTIONS.items():
        if name != "logits" and isinstance(got, torch.Tensor) and got.shape == probe.shape and \
                torch.allclose(got.float(), fn(probe), rtol=1e-5, atol=1e-6):
            return name
    return None


def _router_candidates(block: nn.Module):
    """The children of an MoE block that may be its router: all but its experts."""
    return (child for name, child in block.named_children()
            if name not in ("experts", "shared_experts", "shared_expert"))


def experts_shape(found: FoundExperts) -> tuple[int, int]:
    """(experts, hidden size) of an unpatched experts module."""
    if found.names is not None:
        mlps = found.mlps
        return len(mlps), getattr(mlps[0], found.names.gate).weight.shape[1]
    E, a, b = fused_weights(found.module)[0].shape
    return E, (a if compat.experts_flags(found.module)[0] else b)


def make_experts(found: FoundExperts, layout: ExpertsLayout) -> MoecacheExperts:
    """The MoecacheExperts that replaces `found` (sharing its parameters; a list of MLPs gets stacked)."""
    if found.names is not None:
        return MoecacheExperts(found.module, layout, stacked=StackedExperts(found.mlps, found.names, found.keys))
    return MoecacheExperts(found.module, layout, reads_original=found.kind != "module")


def installed(found: FoundExperts, experts: MoecacheExperts):
    """What goes where `found` was: the experts module itself, or an adapter that turns the family's
    routing format into top-k ids and weights."""
    if found.kind in ("module", "moe_infer"):
        return experts
    return ExpertsAdapter(found.kind, found.parent, experts)


class ExpertsAdapter:
    """Stands in for a forward method whose routing comes in another format.

    deepspeed: MOELayer.forward(x, used_token=None): the layer's own gate (capacity drops included)
    gives combine weights [S, E, C]; a token's weight for expert e is their sum over C (0 when dropped),
    its top-k ids the k largest; l_aux and exp_counts are set on the layer as DeepSpeed does.
    switch: experts.forward(hidden, one-hot mask [T, 1, E], weights [T, 1]): the masked expert, weight
    times the mask (0 for a token over capacity).
    llama4: Llama4TextMoe.forward(hidden) -> (output, router logits): the router's top-1 expert on the input
    scaled by its score, plus the shared expert.
    """

    def __init__(self, kind: str, owner: nn.Module, experts: MoecacheExperts):
        # the owner holds this adapter as its forward: a weak reference back (see HolderRef)
        self.kind, self._owner, self.experts = kind, HolderRef(owner), experts
        # DeepSpeed >= 0.18's TopKGate can return its routes sparsely ([K, S] ids, -1 when dropped, and
        # gates), which spares building the dense [S, E, capacity] combine tensor.
        gate = getattr(owner, "gate", None)
        self._sparse_routes = kind == "deepspeed" and "sparse_routes" in _parameters(gate.forward)
        self._dropout = experts.stacked is not None and has_dropout(experts.stacked.experts)

    @property
    def owner(self) -> nn.Module:
        return self._owner.get(self)

    def __deepcopy__(self, memo):
        # a deep copy of the owner is in the memo already: the copy serves it
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__getstate__().items()})
        copied._owner = HolderRef(copied.__dict__.pop("owner"))
        return copied

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k != "_owner"}
        return {**state, "owner": self.owner}

    def __setstate__(self, state):
        state = dict(state)
        self._owner = HolderRef(state.pop("owner"))
        self.__dict__.update(state)

    def __call__(self, *args, **kwargs):
        if self._dropout and self.owner.training:
            # The kernels apply no dropout: in training the MLPs run as the family runs them (offloaded,
            # their weights are gone, and the MLPs' own hook says so).
            return type(self.owner).forward(self.owner, *args, **kwargs)
        if self.kind == "llama4":
            return self._llama4(*args, **kwargs)
        return self._deepspeed(*args, **kwargs) if self.kind == "deepspeed" else self._switch(*args, **kwargs)

    def _deepspeed(self, hidden_states, used_token=None, *args, **kwargs):
        layer = self.owner
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        E = self.experts.num_experts
        if self._sparse_routes:
            l_aux, _, _, ids, _, gates, exp_counts = layer.gate(flat, used_token, sparse_routes=True)
            kept = ids >= 0  # [K, S]
            per_expert = torch.zeros(flat.shape[0], E, dtype=torch.float32, device=flat.device)
            per_expert.scatter_add_(1, ids.long().clamp(min=0).t(), (gates.float() * kept).t())
        else:
            l_aux, combine, _, exp_counts = layer.gate(flat, used_token)
            per_expert = combine.sum(dim=-1).float()  # [S, E]: a dropped route's weight is 0
        # The k largest per token: the chosen experts (a dropped route keeps an expert with weight 0).
        weights, ids = per_expert.topk(min(layer.gate.k, E), dim=-1)
        layer.l_aux, layer.exp_counts = l_aux, exp_counts
        return self.experts(flat, ids, weights).reshape(hidden_states.shape)

    def _llama4(self, hidden_states):
        block = self.owner
        flat = hidden_states.reshape(-1, block.hidden_dim)
        scores, router_logits = block.router(flat)  # [T, E]: the chosen expert's sigmoid score, 0 elsewhere
        # top-1: the expert runs on the input scaled by its score (a score that underflows to 0 scales the
        # input to 0, and any expert then gives 0, as the model's dense pass does), its output unweighted
        score, ids = scores.max(dim=-1, keepdim=True)
        routed = self.experts(flat * score, ids, torch.ones_like(score))
        out = block.shared_expert(flat)
        out.add_(routed)
        return out, router_logits

    def _switch(self, hidden_states, selected_experts, routing_weights):
        mask = selected_experts.reshape(hidden_states.shape[0], -1)  # [T, E] one-hot, or zeros when dropped
        ids = mask.argmax(dim=-1, keepdim=True)
        weights = routing_weights.reshape(-1, 1).float() * mask.sum(dim=-1, keepdim=True).float()
        return self.experts(hidden_states, ids, weights)

    def __repr__(self) -> str:
        return f"ExpertsAdapter({self.kind}, {self.experts!r})"


HOOKS = (MoecacheExperts, ExpertsAdapter)  # what patch sets where a list family's method was
