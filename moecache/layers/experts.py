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

    def __init__(self, original: nn.Module, layout: ExpertsLayout, list_names: tuple[str, str, str] | None = None):
        super().__init__()
        # Not a submodule: the state dict keeps the original keys through the shared parameters below.
        object.__setattr__(self, "original", original)
        self.layout = layout
        self.list_names = list_names
        self.stacked = None
        if list_names is not None:  # an nn.ModuleList of expert MLPs (4.x layout, DeepSeek-VL2's own code)
            self.num_experts = len(original)
            self.stack_list_experts()
        else:
            self.gate_up_proj = original.gate_up_proj
            self.down_proj = original.down_proj
            if layout.has_bias:
                self.gate_up_proj_bias = original.gate_up_proj_bias
                self.down_proj_bias = original.down_proj_bias
            self.num_experts = self.gate_up_proj.shape[0]
        self.hidden_size = self.weights()[0].shape[2]
        self.cache = None  # an ExpertCache once offloaded
        self.cache_layer = -1
        self.calls = 0
        self.tokens = 0
        self.last_experts: torch.Tensor | None = None  # experts used by the last call (offload prefetching)
        # With offload and prefetch: the layer after this one (a reference, not a submodule).
        object.__setattr__(self, "next_layer", None)
        self.predictor = None  # a LookaheadPredictor shared by the layers (policy "predictive")

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, 2I, H], [E, H, I]) views of the resident weights (no copies)."""
        if self.stacked is not None:
            return self.stacked
        if self.layout.transposed:
            return self.gate_up_proj.transpose(1, 2), self.down_proj.transpose(1, 2)
        return self.gate_up_proj, self.down_proj

    def list_params(self, e: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        gate, up, down = self.list_names
        m = self.original[e]
        return getattr(m, gate).weight, getattr(m, up).weight, getattr(m, down).weight

    def stack_list_experts(self) -> None:
        """Stack per-expert linear weights into [E, 2I, H] / [E, H, I] once, and point each expert's
        parameters at views of the stack, so the weights exist once (unstack_list_experts undoes it)."""
        gate0, _, down0 = self.list_params(0)
        inter, hidden = gate0.shape
        E = self.num_experts
        gate_up = torch.empty(E, 2 * inter, hidden, dtype=gate0.dtype, device=gate0.device)
        down = torch.empty(E, hidden, inter, dtype=down0.dtype, device=down0.device)
        for e in range(E):
            g, u, d = self.list_params(e)
            gate_up[e, :inter].copy_(g.data)
            gate_up[e, inter:].copy_(u.data)
            down[e].copy_(d.data)
            g.data, u.data, d.data = gate_up[e, :inter], gate_up[e, inter:], down[e]
        self.stacked = (gate_up, down)
        from ..cache.expert_cache import mark_static_address

        for t in self.stacked:  # compiled graphs read them like parameters: never copy them per replay
            mark_static_address(t)

    def unstack_list_experts(self) -> None:
        for e in range(self.num_experts):
            for p in self.list_params(e):
                p.data = p.data.clone()
        self.stacked = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        biases = dict(b_gate_up=self.gate_up_proj_bias, b_down=self.down_proj_bias) if layout.has_bias else {}
        if not torch.compiler.is_compiling():
            self.calls += 1
            self.tokens += hidden_states.shape[0]
        if self.cache is not None and torch.compiler.is_compiling():
            # Traced: no host syncs or Python-side bookkeeping; misses are read in place through the map.
            gate_up, down = self.cache.slot_weights()
            host_gate_up, host_down = self.cache.host_weights(self.cache_layer, on_device=True)
            return ops.fused_moe(hidden_states, gate_up, down, top_k_weights, top_k_index,
                                 activation=layout.activation, gate_up_interleaved=layout.interleaved,
                                 expert_map=self.cache.expert_map(self.cache_layer), host_w_gate_up=host_gate_up,
                                 host_w_down=host_down, **biases)
        if self.cache is not None:
            predict = None
            if self.predictor is not None:
                def predict(used, x=hidden_states, top_k=top_k_index.shape[1]):
                    self._predict_and_prefetch(x, top_k, used)
            out = self.cache.moe(self.cache_layer, hidden_states, top_k_weights, top_k_index,
                                 activation=layout.activation, before_compute=predict, **biases)
            if self.next_layer is not None and self.predictor is None:
                self._prefetch_next_layer(top_k_index)
            return out
        w_gate_up, w_down = self.weights()
        return ops.fused_moe(hidden_states, w_gate_up, w_down, top_k_weights, top_k_index,
                             activation=layout.activation, gate_up_interleaved=layout.interleaved, **biases)

    def _prefetch_next_layer(self, top_k_index: torch.Tensor) -> None:
        """Temporal locality: the next layer will likely route to what it routed to on the previous step."""
        nxt = self.next_layer
        if nxt.last_experts is not None:
            self.cache.prefetch(nxt.cache_layer, nxt.last_experts)
        self.last_experts = torch.unique(top_k_index).cpu()

    def _predict_and_prefetch(self, hidden_states: torch.Tensor, top_k: int, used: list[int]) -> None:
        """Lookahead gating: score this layer's guess, release its priorities, then raise the priorities
        of the experts the next layers' routers pick for these tokens and start copying them."""
        predictor, cache, layer = self.predictor, self.cache, self.cache_layer
        predictor.observe(layer, used)
        cache.set_priorities(layer, predictor.prior(layer, self.num_experts))  # done with it until the next step
        tokens = hidden_states.shape[0]
        for target, depth, counts in predictor.predict(layer, hidden_states, top_k):
            # Nearer layers outrank farther ones; within a layer, experts more tokens chose come first.
            base = 2.0 * (predictor.depth - depth + 1)
            cache.set_priorities(target, (base + counts.float() / tokens) * (counts > 0))
            cache.prefetch(target, torch.nonzero(counts).reshape(-1))

    def extra_repr(self) -> str:
        where = f"offloaded: layer {self.cache_layer} of an ExpertCache" if self.cache is not None else "resident"
        return f"experts={self.num_experts}, activation={self.layout.activation}, {where}"
