"""What a MoE layer costs and what stock code does, for benchmarks and analysis: FLOPs and the bytes of
touched experts, and transformers' eager expert loop (the baseline users get by default)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.reference import activation_reference


def expert_loop_reference(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, activation="silu"):
    """transformers' eager expert loop in the input dtype (the baseline users get by default)."""
    out = torch.zeros_like(hidden_states)
    num_experts = w_gate_up.shape[0]
    mask = F.one_hot(topk_ids.long(), num_classes=num_experts).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        e = e[0]
        k_idx, token_idx = torch.where(mask[e])
        gate, up = F.linear(hidden_states[token_idx], w_gate_up[e]).chunk(2, dim=-1)
        y = F.linear(activation_reference(gate, up, activation), w_down[e])
        out.index_add_(0, token_idx, (y * topk_weights[token_idx, k_idx, None]).to(out.dtype))
    return out

def moe_flops(num_routed_rows: int, hidden: int, inter: int) -> float:
    """FLOPs of both expert GEMMs for T*K routed rows (2 per multiply-add)."""
    return 2.0 * num_routed_rows * (2 * inter * hidden + hidden * inter)

def expert_bytes(num_experts_touched: int, hidden: int, inter: int, itemsize: int) -> int:
    return num_experts_touched * 3 * hidden * inter * itemsize

