"""Plain PyTorch references for every kernel: fp32 accumulation, no cleverness.

They define what the Triton kernels must compute and run as backend="torch" (the default for CPU
tensors). Shapes: T tokens, H hidden, I expert intermediate size, E experts, K experts per token.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu", "relu2", "swiglu_oai")  # swiglu_oai: gated experts only
# GPT-OSS's clamped SwiGLU constants (transformers GptOssExperts: alpha=1.702, limit=7.0).
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0

def route_reference(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights fp32 [T, K], ids int32 [T, K]), sorted by selection score, descending.

    softmax/sigmoid scores; `bias` is added for selection only (DeepSeek-V3 e_score_correction_bias);
    with n_group/topk_group, experts outside the best `topk_group` groups are excluded. A group's score is
    the sum of its top-2 selection scores when `bias` is given (noaux_tc), else its maximum
    (group_limited_greedy). Weights are the unbiased scores, renormalised if asked, times `scaling`.
    """
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores + bias.float() if bias is not None else scores
    if n_group is not None and n_group > 1 and topk_group is not None and topk_group < n_group:
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)
        if bias is not None:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        group_idx = _topk_lowest_index_first(group_scores, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        # Experts of the picked groups come first even where their choice is -inf (a -inf bias).
        order = torch.sort(choice, dim=-1, descending=True, stable=True).indices
        allowed_first = torch.sort(expert_mask.gather(1, order).to(torch.int8), dim=-1, descending=True, stable=True)
        ids = order.gather(1, allowed_first.indices[:, :top_k])
    else:
        ids = _topk_lowest_index_first(choice, top_k)
    return route_weights_reference(router_logits, ids, scoring=scoring, renormalize=renormalize,
                                   scaling=scaling), ids.to(torch.int32)


def route_weights_reference(router_logits: torch.Tensor, ids: torch.Tensor, *, scoring: str = "softmax",
                            renormalize: bool = True, scaling: float = 1.0) -> torch.Tensor:
    """The fp32 [T, K] weights of the experts `ids` [T, K] picked from [T, E] logits (the selection, with
    its bias and groups, is route_reference's): unbiased scores, renormalised if asked, times `scaling`."""
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    weights = scores.gather(1, ids.long())
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling

def _topk_lowest_index_first(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, ties to the lower index (torch.topk's CUDA order;
    its CPU order among ties is unspecified)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def act_reference(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation alone: non-gated experts, and the gate of gated ones."""
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "relu2":
        return F.relu(h).square()
    raise ValueError(f"activation {activation!r} has no non-gated form; choose from {ACTIVATIONS[:-1]}")


def activation_reference(gate: torch.Tensor, up: torch.Tensor, activation: str, *,
                         activation_limit: float | None = None, limit_after_activation: bool = False,
                         swiglu_alpha: float | None = None) -> torch.Tensor:
    """act(gate) * up, or GPT-OSS's clamped SwiGLU, (up + 1) * gate * sigmoid(alpha * gate).

    With activation_limit L the gate is clamped to at most L and up to [-L, L] first (DeepSeek-V4,
    GLM-5, HunYuan-V4; swiglu_oai always clamps, at 7.0 unless given), or, with limit_after_activation,
    act(gate) is clamped to at most L instead of the gate (Step 3.5/3.7, Ling)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "swiglu_oai" and activation_limit is None:
        activation_limit = SWIGLU_OAI_LIMIT
    if activation_limit is not None:
        up = up.clamp(min=-activation_limit, max=activation_limit)
        if not limit_after_activation:
            gate = gate.clamp(max=activation_limit)
    if activation == "swiglu_oai":
        alpha = SWIGLU_OAI_ALPHA if swiglu_alpha is None else swiglu_alpha
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    act = act_reference(gate, activation)
    if activation_limit is not None and limit_after_activation:
        act = act.clamp(max=activation_limit)
    return act * up

def split_gate_up(h: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h [..., 2I] -> gate, up: rows [0,I) and [I,2I), or even and odd rows when interleaved (GPT-OSS)."""
    if interleaved:
        return h[..., 0::2], h[..., 1::2]
    inter = h.shape[-1] // 2
    return h[..., :inter], h[..., inter:]

def in_stated_precision(fn):
    """The references compute in the precision they state (fp32 math) also inside a torch.autocast region,
    which would run their products in its lower dtype; outside one, the call is left as it is."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        device_type = first.device.type
        if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


@in_stated_precision
def fused_moe_reference(
    hidden_states: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    expert_map: torch.Tensor | None = None,
    host_w_gate_up: torch.Tensor | None = None,
    host_w_down: torch.Tensor | None = None,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    gate_up_interleaved: bool = False,
    gated: bool = True,
    activation_limit: float | None = None,
    limit_after_activation: bool = False,
    swiglu_alpha: float | None = None,
) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * down_e(act(gate_e x_t) * up_e x_t), e = ids[t,k]; fp32 math, input dtype out.
    With gated=False, w_gate_up is fc1 [E, I, H] and the expert is down_e(act(fc1_e x_t)). The gated
    product is activation_reference's, with its clamp (activation_limit, limit_after_activation) and
    swiglu_alpha.

    With `expert_map`, expert e lives in slot expert_map[e] of the weight tensors, or in the host
    tensors (indexed by e) when the slot is -1. Biases are indexed by expert id.
    Ids outside [0, E) and slots past the pool (or -1 without host tensors) are clamped as the kernels
    clamp them, so both backends compute the same thing where the op's value checks are skipped.
    """
    T, H = hidden_states.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device)
    x = hidden_states.float()
    num_slots = w_gate_up.shape[0]
    num_experts = expert_map.numel() if expert_map is not None else num_slots
    ids = topk_ids.long().clamp(0, num_experts - 1)
    # Under a trace (torch.compile, torch.export) every expert is visited: the set routed to is data the
    # graph cannot branch on, while each expert's token rows (torch.where) are a size it can carry.
    experts = range(num_experts) if torch.compiler.is_compiling() else torch.unique(ids).tolist()
    for e in experts:
        slot = e if expert_map is None else min(int(expert_map[e]), num_slots - 1)
        if slot < 0 and host_w_gate_up is None:
            slot = 0
        if slot >= 0:
            wgu, wd = w_gate_up[slot], w_down[slot]
        else:
            wgu, wd = host_w_gate_up[e], host_w_down[e]
        wgu = wgu.to(x.device).float()
        wd = wd.to(x.device).float()
        token_idx, k_idx = torch.where(ids == e)
        h = x[token_idx] @ wgu.t()
        if b_gate_up is not None:
            h = h + b_gate_up[e].float()
        if gated:
            gate, up = split_gate_up(h, gate_up_interleaved)
            y = activation_reference(gate, up, activation, activation_limit=activation_limit,
                                     limit_after_activation=limit_after_activation,
                                     swiglu_alpha=swiglu_alpha) @ wd.t()
        else:
            y = act_reference(h, activation) @ wd.t()
        if b_down is not None:
            y = y + b_down[e].float()
        out.index_add_(0, token_idx, y * topk_weights[token_idx, k_idx].float().unsqueeze(-1))
    return out.to(hidden_states.dtype)
