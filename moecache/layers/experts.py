"""A drop-in for a model's routed-experts module: forward(hidden [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H], computed by ops.fused_moe on the resident weights, or by a provider
(an OffloadedExperts) once the experts are offloaded.

The router, shared experts and everything around stay the model's own, so routing is exactly what the
model does; only the routed experts' compute changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import ops


@dataclass(frozen=True)
class ExpertsLayout:
    """How a model keeps its experts, in terms ops.fused_moe understands."""

    activation: str = "silu"
    transposed: bool = False  # GPT-OSS: gate_up [E, H, 2I], down [E, I, H]
    interleaved: bool = False  # gate = even rows of gate_up, up = odd rows
    has_bias: bool = False


class MoecacheExperts(nn.Module):
    """Runs the routed experts of one MoE layer with moecache's kernels, on the original parameters.

    original: the module replaced (kept as a plain attribute, not a submodule: the state dict keeps the
    original keys through the shared parameters). stacked: (gate_up [E, 2I, H], down [E, H, I]) built
    from a ModuleList of expert MLPs (list_names: their gate/up/down linear layers). provider: None while
    the weights are resident; a callable (OffloadedExperts) that serves the layer once offloaded.
    """

    def __init__(self, original: nn.Module, layout: ExpertsLayout, *,
                 stacked: tuple[torch.Tensor, torch.Tensor] | None = None,
                 list_names: tuple[str, str, str] | None = None):
        super().__init__()
        object.__setattr__(self, "original", original)
        self.layout = layout
        self.list_names = list_names
        self.stacked = stacked
        if stacked is None:
            self.gate_up_proj = original.gate_up_proj
            self.down_proj = original.down_proj
            if layout.has_bias:
                self.gate_up_proj_bias = original.gate_up_proj_bias
                self.down_proj_bias = original.down_proj_bias
        gate_up, _ = self.weights()
        self.num_experts, self.hidden_size = gate_up.shape[0], gate_up.shape[2]
        self.provider: Callable | None = None
        self.calls = 0
        self.tokens = 0

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, 2I, H], [E, H, I]) views of the resident weights (no copies)."""
        if self.stacked is not None:
            return self.stacked
        if self.layout.transposed:
            return self.gate_up_proj.transpose(1, 2), self.down_proj.transpose(1, 2)
        return self.gate_up_proj, self.down_proj

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        biases = dict(b_gate_up=self.gate_up_proj_bias, b_down=self.down_proj_bias) if layout.has_bias else {}
        if not torch.compiler.is_compiling():
            self.calls += 1
            self.tokens += hidden_states.shape[0]
        if self.provider is not None:
            return self.provider(hidden_states, top_k_index, top_k_weights, activation=layout.activation,
                                 interleaved=layout.interleaved, biases=biases)
        w_gate_up, w_down = self.weights()
        return ops.fused_moe(hidden_states, w_gate_up, w_down, top_k_weights, top_k_index,
                             activation=layout.activation, gate_up_interleaved=layout.interleaved, **biases)

    def extra_repr(self) -> str:
        where = repr(self.provider) if self.provider is not None else "resident"
        return f"experts={self.num_experts}, activation={self.layout.activation}, {where}"
