"""Public MoE ops. Shapes: T tokens, H hidden, I intermediate, E experts, K experts per token."""
from .api import (
    NON_GATED_ACTIVATIONS,
    check_topk_ids,
    fused_moe,
    gated_activation,
    resolve_backend,
    route,
    streams_each_expert_once,
)
from .mla import mla_decode, mla_decode_reference
from .reference import (
    ACTIVATIONS,
    SWIGLU_OAI_ALPHA,
    SWIGLU_OAI_LIMIT,
    activation_reference,
    fused_moe_reference,
    route_reference,
    split_gate_up,
)

__all__ = ["route", "fused_moe", "check_topk_ids", "gated_activation", "mla_decode", "resolve_backend", "streams_each_expert_once",
           "route_reference", "fused_moe_reference", "activation_reference", "split_gate_up", "mla_decode_reference", "SWIGLU_OAI_ALPHA", "SWIGLU_OAI_LIMIT", "ACTIVATIONS",
           "NON_GATED_ACTIVATIONS"]
