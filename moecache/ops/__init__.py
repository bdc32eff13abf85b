"""Public MoE ops. Shapes: T tokens, H hidden, I intermediate, E experts, K experts per token."""
from .reference import fused_moe_reference, route_reference
from .api import fused_moe, route, resolve_backend
from .mla import mla_decode, mla_decode_reference

__all__ = ["route", "fused_moe", "resolve_backend", "route_reference", "fused_moe_reference",
           "mla_decode", "mla_decode_reference"]
