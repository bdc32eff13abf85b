"""Where an expert cache reads a layer's experts from: the ways models hold them, one expert at a time.

- a pair of tensors (w_gate_up [E, 2I, H], w_down [E, H, I]);
- a module with fused 3-D `gate_up_proj` / `down_proj` parameters (transformers 5.x experts; GPT-OSS's
  transposed, interleaved layout too; `up_proj` / `down_proj` for non-gated ones);
- an `nn.ModuleList` of expert MLPs with gate_proj/up_proj/down_proj or w1/w3/w2 linear layers
  (transformers 4.x, DeepSeek's own modelling code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..compat import experts_flags, fused_weight_names


@dataclass
class ExpertSource:
    """One MoE layer's routed experts, read one expert at a time: get(e) -> (gate_up [2I, H], down [H, I]),
    or for non-gated experts (gated=False) (fc1 [I, H], fc2 [H, I]). biases: the layer's expert biases
    (b_gate_up [E, 2I or I], b_down [E, H]) where the experts hold them, else None."""

    num_experts: int
    hidden: int
    inter: int
    dtype: torch.dtype
    get: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    gate_up_interleaved: bool = False  # gate = even rows, up = odd rows (GPT-OSS)
    gated: bool = True
    biases: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def gate_up_rows(self) -> int:
        return 2 * self.inter if self.gated else self.inter


def _linear_weight(module, *names):
    for name in names:
        sub = getattr(module, name, None)
        if sub is not None and hasattr(sub, "weight"):
            return sub.weight
    return None


def expert_source(experts) -> ExpertSource:
    """An ExpertSource from the ways models hold experts.

    - a pair of tensors (w_gate_up [E, 2I, H], w_down [E, H, I]), or non-gated (fc1 [E, I, H], fc2 [E, H, I]);
    - a transformers 5.x experts module with fused 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]
      (GPT-OSS's transposed [E, H, 2I] interleaved layout too; non-gated `up_proj` [E, I, H] where it has
      no gate), with `gate_up_proj_bias` / `down_proj_bias` where it has them;
    - a transformers 4.x `nn.ModuleList` of expert MLPs with gate_proj/up_proj/down_proj (Qwen, DeepSeek)
      or w1/w3/w2 (Mixtral) linear layers, all of one shape and dtype, biased alike.
    """
    if isinstance(experts, (tuple, list)) and len(experts) == 2 and all(isinstance(t, torch.Tensor) for t in experts):
        gate_up, down = experts
        return _fused_source(gate_up, down, "w_gate_up", "w_down")
    first_name, down_name = fused_weight_names(experts)
    first, down = getattr(experts, first_name, None), getattr(experts, down_name, None)
    if isinstance(first, torch.Tensor) and isinstance(down, torch.Tensor):
        transposed, interleaved, _ = experts_flags(experts)
        if transposed:
            # GPT-OSS: gate_up [E, H, 2I] interleaved, down [E, I, H]; records hold them as [2I, H] / [H, I].
            source = _fused_source(first.transpose(1, 2), down.transpose(1, 2), first_name, down_name)
            source.gate_up_interleaved = interleaved
        else:
            source = _fused_source(first, down, first_name, down_name)
        source.biases = _fused_biases(experts, source, first_name, down_name)
        return source
    if isinstance(experts, torch.nn.ModuleList) and len(experts) > 0:
        first = experts[0]
        names = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
        for gate_name, up_name, down_name in names:
            if all(_linear_weight(first, n) is not None for n in (gate_name, up_name, down_name)):
                break
        else:
            raise ValueError(f"experts: a ModuleList of {type(first).__name__} has neither gate_proj/up_proj/down_proj "
                             "nor w1/w3/w2 linear layers")
        gate = _linear_weight(first, gate_name)
        inter, hidden = gate.shape
        shapes = {gate_name: (inter, hidden), up_name: (inter, hidden), down_name: (hidden, inter)}
        biased = getattr(getattr(first, gate_name), "bias", None) is not None
        for e, m in enumerate(experts):
            for n, shape in shapes.items():
                w = _linear_weight(m, n)
                if w is None or tuple(w.shape) != shape or w.dtype != gate.dtype:
                    found = "no linear layer" if w is None else f"{tuple(w.shape)} {w.dtype}"
                    raise ValueError(f"experts[{e}].{n}: weight must be {shape} {gate.dtype} as experts[0]'s, got {found}")
                if (getattr(getattr(m, n), "bias", None) is not None) != biased:
                    raise ValueError(f"experts[{e}].{n}: {'no ' if biased else ''}bias, unlike experts[0].{gate_name}: "
                                     "the experts' linear layers must all have biases or none")

        def get(e):
            m = experts[e]
            gu = torch.cat([_linear_weight(m, gate_name), _linear_weight(m, up_name)], dim=0)
            return gu, _linear_weight(m, down_name)

        biases = None
        if biased:
            biases = (torch.stack([torch.cat([getattr(m, gate_name).bias, getattr(m, up_name).bias]) for m in experts]),
                      torch.stack([getattr(m, down_name).bias for m in experts]))
        return ExpertSource(len(experts), hidden, inter, gate.dtype, get, biases=biases)
    raise ValueError(f"experts: cannot read experts from {type(experts).__name__}; pass (w_gate_up [E, 2I, H], "
                     "w_down [E, H, I]), a module with gate_up_proj/down_proj, or a ModuleList of expert MLPs")


def _fused_biases(experts, source: ExpertSource, first_name: str, down_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    first_bias, down_bias = f"{first_name}_bias", f"{down_name}_bias"
    b_gate_up, b_down = getattr(experts, first_bias, None), getattr(experts, down_bias, None)
    if b_gate_up is None and b_down is None:
        return None
    want = {first_bias: (source.num_experts, source.gate_up_rows), down_bias: (source.num_experts, source.hidden)}
    for name, bias in ((first_bias, b_gate_up), (down_bias, b_down)):
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != want[name]:
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else bias
            raise ValueError(f"experts.{name} must be a {list(want[name])} tensor beside the other bias, got {got}")
    return b_gate_up, b_down


def _fused_source(gate_up, down, gu_name, down_name) -> ExpertSource:
    """Gated when gate_up has twice down's intermediate rows, non-gated (fc1/fc2) when as many."""
    if gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"experts: {gu_name} must be [E, 2I, H] (or [E, I, H] non-gated) and {down_name} "
                         f"[E, H, I], got {tuple(gate_up.shape)} and {tuple(down.shape)}")
    E, rows, H = gate_up.shape
    inter = down.shape[2]
    if down.shape[:2] != (E, H) or rows not in (inter, 2 * inter):
        raise ValueError(f"experts: {down_name} must be [E={E}, H={H}, I] with {gu_name} [E, 2I or I, H], got "
                         f"{tuple(gate_up.shape)} and {tuple(down.shape)}")
    if down.dtype != gate_up.dtype:
        raise ValueError(f"experts: {down_name} dtype {down.dtype} differs from {gu_name}'s {gate_up.dtype}")
    return ExpertSource(E, H, inter, gate_up.dtype, lambda e: (gate_up[e], down[e]), gated=rows == 2 * inter)
