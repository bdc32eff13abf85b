"""Which modules of a model are routed experts, how they keep their weights, and where their routers
are: the model knowledge `patch` needs, found by `config.model_type` and by structure.

Fused experts (transformers 5.x `*Experts`: 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I],
called as experts(hidden, top_k_index, top_k_weights)) are swapped as modules. Blocks shaped like
DeepSeek's own modelling code (DeepSeek-V2 / DeepSeek-VL2 `DeepseekV2MoE`: a gate, an nn.ModuleList of
expert MLPs, `moe_infer(x, topk_ids, topk_weight)`) get `moe_infer` overridden on the instance, with the
per-expert weights stacked once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import compat
from ..cache.device import mark_static_address
from ..cache.predictor import RouterSpec
from ..layers.experts import ExpertsLayout, MoecacheExperts
from ..ops import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT

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
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

# Linear layer names of an expert MLP in a ModuleList: (gate, up, down).
LIST_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


@dataclass
class FoundExperts:
    """A routed-experts module and where it hangs: parent.attr (attr "moe_infer" for ModuleList blocks,
    whose experts are parent.experts and list_names their linear layers)."""

    name: str
    parent: nn.Module
    attr: str
    module: nn.Module
    list_names: tuple[str, str, str] | None = None


def layout_for(model: nn.Module, found: FoundExperts) -> ExpertsLayout | None:
    """The layout of these experts, or None when their activation is one the kernels lack."""
    config = getattr(model, "config", None) or getattr(found.parent, "config", None)
    model_type = getattr(config, "model_type", None)
    text_config = getattr(config, "text_config", None) or getattr(config, "language_config", None)
    if model_type not in FAMILIES and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
        config = text_config
    layout = FAMILIES.get(model_type)
    if layout is None:
        transposed, interleaved, has_bias = compat.experts_flags(found.module)
        layout = ExpertsLayout(transposed=transposed, interleaved=interleaved, has_bias=has_bias)
    if layout.activation != "swiglu_oai":
        act = getattr(config, "hidden_act", "silu")
        if act not in ACTIVATIONS:
            return None
        return ExpertsLayout(activation=ACTIVATIONS[act], transposed=layout.transposed,
                             interleaved=layout.interleaved, has_bias=layout.has_bias)
    if (getattr(found.module, "alpha", SWIGLU_OAI_ALPHA), getattr(found.module, "limit", SWIGLU_OAI_LIMIT)) != (
            SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT):
        return None
    return layout


def is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        return False
    if compat.experts_flags(module)[0]:
        return gate_up.shape[2] == 2 * down.shape[1] and gate_up.shape[1] == down.shape[2]
    return gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]


def list_expert_names(block: nn.Module) -> tuple[str, str, str] | None:
    """For a block shaped like DeepSeek's own code (a gate, an nn.ModuleList of expert MLPs, `moe_infer`),
    the names of the experts' gate/up/down linear layers; else None."""
    experts = getattr(block, "experts", None)
    if not (isinstance(experts, nn.ModuleList) and len(experts) > 0 and callable(getattr(block, "moe_infer", None))
            and hasattr(block, "gate")):
        return None
    first = experts[0]
    for names in LIST_EXPERT_NAMES:
        if all(isinstance(getattr(first, n, None), nn.Linear) and getattr(first, n).bias is None for n in names):
            return names
    return None


def find_experts(model: nn.Module) -> list[FoundExperts]:
    """Every routed-experts module of the model, patched (a MoecacheExperts) or not, in module order."""
    found = []
    for name, parent in model.named_modules():
        override = parent.__dict__.get("moe_infer")
        if isinstance(override, MoecacheExperts):
            found.append(FoundExperts(f"{name}.moe_infer" if name else "moe_infer", parent, "moe_infer", override,
                                      override.list_names))
            continue
        names = list_expert_names(parent)
        if names is not None:
            found.append(FoundExperts(f"{name}.experts" if name else "experts", parent, "moe_infer", parent.experts,
                                      names))
            continue
        for attr, child in parent.named_children():
            if isinstance(child, MoecacheExperts) or is_fused_experts(child):
                found.append(FoundExperts(f"{name}.{attr}" if name else attr, parent, attr, child))
    return found


def find_router(block: nn.Module, num_experts: int, hidden: int) -> RouterSpec | None:
    """The router of an MoE block, found by shape: a child (not the experts) whose weight is [E, H]; its
    bias (GPT-OSS) and DeepSeek-V3's e_score_correction_bias come along."""
    for name, child in block.named_children():
        if name in ("experts", "shared_experts", "shared_expert"):
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (num_experts, hidden):
            bias = getattr(child, "bias", None)
            correction = getattr(child, "e_score_correction_bias", None)
            return RouterSpec(weight, bias if isinstance(bias, torch.Tensor) else None,
                              correction if isinstance(correction, torch.Tensor) else None)
    return None


def experts_shape(found: FoundExperts) -> tuple[int, int]:
    """(experts, hidden size) of an unpatched experts module."""
    if found.list_names is not None:
        return len(found.module), getattr(found.module[0], found.list_names[0]).weight.shape[1]
    E, a, b = found.module.gate_up_proj.shape
    return E, (a if compat.experts_flags(found.module)[0] else b)


# ------------------------------------------------------------------ ModuleList experts, stacked
def list_params(experts: nn.ModuleList, names: tuple[str, str, str], e: int):
    gate, up, down = names
    m = experts[e]
    return getattr(m, gate).weight, getattr(m, up).weight, getattr(m, down).weight


def stack_list_experts(experts: nn.ModuleList, names: tuple[str, str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-expert linear weights into [E, 2I, H] / [E, H, I] once and point each expert's parameters
    at views of the stack, so the weights exist once (unstack_list_experts gives each its own storage)."""
    gate0, _, down0 = list_params(experts, names, 0)
    inter, hidden = gate0.shape
    E = len(experts)
    gate_up = torch.empty(E, 2 * inter, hidden, dtype=gate0.dtype, device=gate0.device)
    down = torch.empty(E, hidden, inter, dtype=down0.dtype, device=down0.device)
    for e in range(E):
        g, u, d = list_params(experts, names, e)
        gate_up[e, :inter].copy_(g.data)
        gate_up[e, inter:].copy_(u.data)
        down[e].copy_(d.data)
        g.data, u.data, d.data = gate_up[e, :inter], gate_up[e, inter:], down[e]
    for t in (gate_up, down):  # compiled graphs read them like parameters: never copy them per replay
        mark_static_address(t)
    return gate_up, down


def unstack_list_experts(experts: nn.ModuleList, names: tuple[str, str, str]) -> None:
    for e in range(len(experts)):
        for p in list_params(experts, names, e):
            p.data = p.data.clone()


def make_experts(found: FoundExperts, layout: ExpertsLayout) -> MoecacheExperts:
    """The MoecacheExperts that replaces `found` (sharing its parameters; a ModuleList gets stacked)."""
    if found.list_names is not None:
        return MoecacheExperts(found.module, layout, stacked=stack_list_experts(found.module, found.list_names),
                               list_names=found.list_names)
    return MoecacheExperts(found.module, layout)
