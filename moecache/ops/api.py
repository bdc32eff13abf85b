"""Argument checking and backend dispatch for the public ops."""
from __future__ import annotations

import torch

from .._env import backend_override
from .reference import fused_moe_reference, route_reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> MOECACHE_BACKEND if set, else triton for CUDA tensors and torch for CPU tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = backend_override()
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    return backend


def route(router_logits, top_k, *, scoring="softmax", renormalize=True, bias=None, n_group=None,
          topk_group=None, scaling=1.0, backend="auto"):
    resolve_backend(backend, router_logits.device)
    return route_reference(router_logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias,
                           n_group=n_group, topk_group=topk_group, scaling=scaling)


def fused_moe(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, *, activation="silu",
              backend="auto", expert_map=None, host_w_gate_up=None, host_w_down=None):
    resolve_backend(backend, hidden_states.device)
    return fused_moe_reference(hidden_states, w_gate_up, w_down, topk_weights, topk_ids,
                               activation=activation, expert_map=expert_map,
                               host_w_gate_up=host_w_gate_up, host_w_down=host_w_down)
