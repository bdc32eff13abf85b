"""A drop-in for a transformers experts module: forward(hidden [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H], computed by ops.fused_moe (or through an ExpertCache when offloaded).

The router, shared experts and everything around stay the model's own, so routing is exactly what the
model does; only the routed experts' compute changes.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    """Runs the routed experts of one MoE layer with moecache's kernels, reusing the original parameters."""

    def __init__(self, original: nn.Module, layout: ExpertsLayout):
        super().__init__()
        # Not a submodule: the state dict keeps the original keys through the shared parameters below.
        object.__setattr__(self, "original", original)
        self.layout = layout
        self.gate_up_proj = original.gate_up_proj
        self.down_proj = original.down_proj
        if layout.has_bias:
            self.gate_up_proj_bias = original.gate_up_proj_bias
            self.down_proj_bias = original.down_proj_bias
        self.num_experts = self.gate_up_proj.shape[0]
        self.cache = None  # an ExpertCache once offloaded
        self.cache_layer = -1
        self.calls = 0
        self.tokens = 0
        self.last_experts: torch.Tensor | None = None  # experts used by the last call (offload prefetching)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, 2I, H], [E, H, I]) views of the resident weights (no copies)."""
        if self.layout.transposed:
            return self.gate_up_proj.transpose(1, 2), self.down_proj.transpose(1, 2)
        return self.gate_up_proj, self.down_proj

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        biases = dict(b_gate_up=self.gate_up_proj_bias, b_down=self.down_proj_bias) if layout.has_bias else {}
        if not torch.compiler.is_compiling():
            self.calls += 1
            self.tokens += hidden_states.shape[0]
        if self.cache is not None:
            out = self.cache.moe(self.cache_layer, hidden_states, top_k_weights, top_k_index,
                                 activation=layout.activation, **biases)
            if self.prefetch_next is not None:
                self.prefetch_next(self, top_k_index)
            return out
        w_gate_up, w_down = self.weights()
        return ops.fused_moe(hidden_states, w_gate_up, w_down, top_k_weights, top_k_index,
                             activation=layout.activation, gate_up_interleaved=layout.interleaved, **biases)

    prefetch_next = None  # set by offload: called after each layer with its routing

    def extra_repr(self) -> str:
        E, a, b = self.gate_up_proj.shape if self.cache is None else (self.num_experts, "?", "?")
        where = f"offloaded: layer {self.cache_layer} of an ExpertCache" if self.cache is not None else "resident"
        return f"experts={self.num_experts}, activation={self.layout.activation}, {where}"
