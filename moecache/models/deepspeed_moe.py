"""DeepSpeed-MoE's layer structure for single-process inference, without the deepspeed package.

MoE-LLaVA builds its MoE layers with `deepspeed.moe.layer.MoE`; users who only want to run such a model
need neither DeepSpeed nor a process group. This module has the same module tree and parameter names
(`MoE.deepspeed_moe` = `MOELayer` with `gate` = `TopKGate` (router `wg`, Linear(H, E, bias=False)) and
`experts` = `Experts` (`deepspeed_experts`, an nn.ModuleList of FFN copies)), so checkpoints load into
it, and the same routing, written from DeepSpeed's published `sharded_moe.py` (GShard top-1/top-2
gating in fp32, capacity = max(ceil(S / E * factor), min_capacity), the factor doubled for top-2, routes
beyond an expert's capacity dropped in token order, `l_aux` and `exp_counts` as DeepSpeed computes
them). Random draws use torch's global generator exactly as DeepSpeed does (a Gumbel sample of the
logits' shape for top-2's second expert; a uniform sample of the mask's shape for top-1's random
token selection), so with the same seed both give the same routes.

Expert parallelism (ep_size > 1), tutel and tensor-parallel experts are not modelled.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def _capacity(num_tokens: int, num_experts: int, factor: float, min_capacity: int) -> int:
    # The factor as an fp32 tensor, as DeepSpeed computes it, so that rounding agrees at the edges.
    return max(int(torch.ceil((num_tokens / num_experts) * torch.tensor(factor))), int(min_capacity))


def _gumbel(shape, device) -> torch.Tensor:
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(shape)


def _combine(gates: list[torch.Tensor], masks: list[torch.Tensor], locations: list[torch.Tensor],
             capacity: int) -> torch.Tensor:
    """[S, E, C]: each kept route's gate at (token, expert, its place in the expert's buffer)."""
    combine = 0
    for gate, mask, loc in zip(gates, masks, locations):
        loc_s = (loc * mask).sum(dim=1)
        combine = combine + torch.einsum("se,sc->sec", gate.unsqueeze(1) * mask.float(),
                                         F.one_hot(loc_s, num_classes=capacity).float())
    return combine


def top1gating(logits, capacity_factor, min_capacity, used_token=None, noisy_gate_policy=None, drop_tokens=True,
               use_rts=True):
    """(l_aux, combine_weights [S, E, C], dispatch_mask, exp_counts) for top-1 routing."""
    if noisy_gate_policy == "RSample":
        logits_w_noise = logits + _gumbel(logits.shape, logits.device)
    gates = F.softmax(logits, dim=1)
    S, E = gates.shape
    capacity = _capacity(S, E, capacity_factor, min_capacity)
    indices1 = torch.argmax(logits_w_noise if noisy_gate_policy == "RSample" else gates, dim=1)
    mask1 = F.one_hot(indices1, num_classes=E)
    if used_token is not None:
        mask1 = torch.einsum("s,se->se", used_token, mask1)
    exp_counts = mask1.sum(dim=0).detach()
    if not drop_tokens:
        capacity = min(int(exp_counts.max()), S)
    l_aux = torch.sum(gates.mean(dim=0) * mask1.float().mean(dim=0)) * E
    if use_rts:
        zero, one = torch.tensor(0.0, device=logits.device), torch.tensor(1.0, device=logits.device)
        mask1_rand = mask1 * torch.distributions.uniform.Uniform(zero, one).rsample(mask1.shape)
    else:
        mask1_rand = mask1
    assert S >= min_capacity, ("No. of tokens (batch-size) should be greater than min_capacity. Either set "
                               "min_capacity to 0 or increase your batch size.")
    top_idx = torch.topk(mask1_rand, k=min(capacity, S), dim=0)[1]
    mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    combine = _combine([gates.mul(mask1.float()).sum(dim=1)], [mask1], [locations1], capacity)
    return l_aux, combine, combine.bool(), exp_counts


def top2gating(logits, capacity_factor, min_capacity, drop_tokens=True, top2_2nd_expert_sampling=True):
    """(l_aux, combine_weights [S, E, C], dispatch_mask, exp_counts) for top-2 routing: the first expert
    by softmax, the second by the logits plus Gumbel noise (when sampling), the pair's gates
    renormalised over the routes kept."""
    gates = F.softmax(logits, dim=1)
    S, E = gates.shape
    indices1 = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(indices1, num_classes=E)
    if top2_2nd_expert_sampling:
        logits = logits + _gumbel(logits.shape, logits.device)
    indices2 = torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = F.one_hot(indices2, num_classes=E)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
    l_aux = torch.mean(gates.mean(dim=0) * mask1.float().mean(dim=0)) * E * E
    exp_counts = (mask1 + mask2).sum(dim=0).detach()
    if drop_tokens:
        capacity = _capacity(S, E, capacity_factor * 2, min_capacity)
        mask1 = mask1 * torch.lt(locations1, capacity)
        mask2 = mask2 * torch.lt(locations2, capacity)
    else:
        capacity = int(exp_counts.max())
    gates1 = (gates * mask1.float()).sum(dim=1)
    gates2 = (gates * mask2.float()).sum(dim=1)
    denom = torch.clamp(gates1 + gates2, min=torch.finfo(gates.dtype).eps)
    combine = _combine([gates1 / denom, gates2 / denom], [mask1, mask2], [locations1, locations2], capacity)
    return l_aux, combine, combine.bool(), exp_counts


def multiplicative_jitter(x: torch.Tensor, epsilon: float = 1e-2) -> torch.Tensor:
    """x times a uniform draw in [1 - epsilon, 1 + epsilon) per element (DeepSpeed's "Jitter" gate noise,
    drawn as its torch Uniform(low, high).rsample draws it)."""
    low = torch.tensor(1.0 - epsilon, device=x.device)
    high = torch.tensor(1.0 + epsilon, device=x.device)
    return x * (low + torch.rand(x.shape, dtype=low.dtype, device=x.device) * (high - low))


class TopKGate(nn.Module):
    """The router: wg (Linear(H, E, bias=False)) in fp32, then top-1 or top-2 gating with capacity."""

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 8, noisy_gate_policy: str | None = None,
                 drop_tokens: bool = True, use_rts: bool = True, top2_2nd_expert_sampling: bool = True):
        super().__init__()
        if k not in (1, 2):
            raise ValueError(f"k must be 1 or 2 (DeepSpeed-MoE's top-1 and top-2 gating), got {k}")
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.k, self.capacity_factor, self.eval_capacity_factor = k, capacity_factor, eval_capacity_factor
        self.min_capacity, self.noisy_gate_policy, self.drop_tokens = min_capacity, noisy_gate_policy, drop_tokens
        self.use_rts, self.top2_2nd_expert_sampling = use_rts, top2_2nd_expert_sampling

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None):
        input_fp32 = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            input_fp32 = multiplicative_jitter(input_fp32)
        logits = F.linear(input_fp32, self.wg.weight.float())
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            return top1gating(logits, factor, self.min_capacity, used_token,
                              self.noisy_gate_policy if self.training else None, self.drop_tokens, self.use_rts)
        return top2gating(logits, factor, self.min_capacity, self.drop_tokens, self.top2_2nd_expert_sampling)


class Experts(nn.Module):
    """num_local_experts deep copies of `expert`; each runs on its own chunk of the dispatched tokens."""

    def __init__(self, expert: nn.Module, num_local_experts: int = 1):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk, expert in zip(inputs.chunk(self.num_local_experts, dim=1), self.deepspeed_experts):
            out = expert(chunk)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outputs, dim=1)


class MOELayer(nn.Module):
    """Dispatch each token to its experts' capacity buffers, run the experts, combine by the gates."""

    def __init__(self, gate: TopKGate, experts: Experts, num_local_experts: int):
        super().__init__()
        self.gate, self.experts = gate, experts
        self.num_local_experts, self.ep_size = num_local_experts, 1
        self.l_aux = self.exp_counts = None

    def forward(self, *input: torch.Tensor, **kwargs) -> torch.Tensor:
        d_model = input[0].shape[-1]
        x = input[0].reshape(-1, d_model)
        used_token = input[1] if len(input) > 1 else None
        self.l_aux, combine, dispatch, self.exp_counts = self.gate(x, used_token)
        dispatched = torch.einsum("sec,sm->ecm", dispatch.type_as(x), x)
        expert_output = self.experts(dispatched.reshape(1, self.num_local_experts, -1, d_model))
        expert_output = expert_output.reshape(self.num_local_experts, -1, d_model)
        return torch.einsum("sec,ecm->sm", combine.type_as(x), expert_output).reshape(input[0].shape)


class MoE(nn.Module):
    """deepspeed.moe.layer.MoE: forward(hidden, used_token=None) -> (output, l_aux, exp_counts).
    With use_residual (PR-MoE), output mixes the MoE's and a dense copy of the expert's by a learned
    2-way coefficient."""

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: str | None = None, drop_tokens: bool = True,
                 use_rts: bool = True, top2_2nd_expert_sampling: bool = True):
        super().__init__()
        if ep_size != 1:
            raise ValueError(f"ep_size must be 1 (one process; expert parallelism needs DeepSpeed), got {ep_size}")
        self.use_residual, self.num_experts = use_residual, num_experts
        self.ep_size, self.num_local_experts = 1, num_experts
        gate = TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                        noisy_gate_policy, drop_tokens, use_rts, top2_2nd_expert_sampling)
        self.deepspeed_moe = MOELayer(gate, Experts(expert, num_experts), num_experts)
        if use_residual:
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None):
        output = self.deepspeed_moe(hidden_states, used_token)
        if self.use_residual:
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts
