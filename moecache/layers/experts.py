"""A drop-in for a model's routed-experts module: forward(hidden [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H], computed by ops.fused_moe on the resident weights, or by a provider
(an OffloadedExperts) once the experts are offloaded.

The router, shared experts and everything around stay the model's own, so routing is exactly what the
model does; only the routed experts' compute changes.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import ops

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class WeakLink:
    """A weak reference that copies and pickles as the strong one it stands for: a deep copy links to the
    referent's copy, an unpickled one to the unpickled referent. For links that would otherwise close a
    reference cycle through a module, which keeps a dropped model (its device memory with it) alive
    until the cycle collector runs."""

    __slots__ = ("_ref",)

    def __init__(self, referent):
        self._ref = weakref.ref(referent) if referent is not None else None

    def __call__(self):
        return self._ref() if self._ref is not None else None

    def __reduce__(self):
        return WeakLink, (self(),)

    def __deepcopy__(self, memo):
        return WeakLink(copy.deepcopy(self(), memo))


@dataclass(frozen=True)
class ExpertsLayout:
    """How a model keeps its experts, in terms ops.fused_moe understands."""

    activation: str = "silu"
    transposed: bool = False  # GPT-OSS: gate_up [E, H, 2I], down [E, I, H]
    interleaved: bool = False  # gate = even rows of gate_up, up = odd rows
    has_bias: bool = False
    gated: bool = True  # False: fc1 [E, I, H], act(fc1 x), no up projection
    activation_limit: float | None = None  # the clamp of gate and up (ops.fused_moe's)
    limit_after_activation: bool = False
    swiglu_alpha: float | None = None  # swiglu_oai's

    @property
    def activation_args(self) -> dict:
        """ops.fused_moe's (and ExpertCache.moe's) keyword arguments for the activation."""
        return dict(activation=self.activation, activation_limit=self.activation_limit,
                    limit_after_activation=self.limit_after_activation, swiglu_alpha=self.swiglu_alpha)

    @property
    def activation_text(self) -> str:
        """The activation as reports name it: "silu", "silu, clamped at 10 before the activation", ..."""
        text = self.activation
        if self.activation == "swiglu_oai" and (self.activation_limit, self.swiglu_alpha) in (
                (None, None), (ops.SWIGLU_OAI_LIMIT, ops.SWIGLU_OAI_ALPHA)):
            return text  # GPT-OSS's own constants
        if self.swiglu_alpha is not None:
            text += f", alpha {self.swiglu_alpha:g}"
        if self.activation_limit is not None:
            text += f", clamped at {self.activation_limit:g} {'after' if self.limit_after_activation else 'before'} " \
                    "the activation"
        return text

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """A fused experts module's parameters (transformers' names): the first projection (gate_up_proj,
        or up_proj without a gate), down_proj, then their biases where it has them."""
        first = "gate_up_proj" if self.gated else "up_proj"
        return (first, "down_proj") + ((f"{first}_bias", "down_proj_bias") if self.has_bias else ())


class MoecacheExperts(nn.Module):
    """Runs the routed experts of one MoE layer with moecache's kernels, on the original parameters.

    original: the module replaced (kept as a plain attribute, not a submodule: the state dict keeps the
    original keys through the shared parameters). stacked: for experts kept as a list of MLPs, an object
    whose weights() / biases() give the stacked tensors the patcher built (the MLPs' parameters are views
    of them). provider: None while the weights are resident; a callable (OffloadedExperts) that serves
    the layer once offloaded. reads_original: the original stays in the model tree (a family whose block
    forward is overridden instead, Llama 4's): its parameters are read from it, where loads put them.
    """

    def __init__(self, original: nn.Module, layout: ExpertsLayout, *, stacked=None, reads_original: bool = False):
        super().__init__()
        object.__setattr__(self, "_original", original)
        self.training = original.training
        self.layout = layout
        self.stacked = stacked
        self.reads_original = reads_original
        if stacked is None:
            # Its submodules (an activation module) are the original's, in one table both hold: the
            # model's module tree (named_modules, get_submodule) reads as unpatched
            object.__setattr__(self, "_modules", original._modules)
        if stacked is None and not reads_original:
            # The original's order (GPT-OSS puts each bias after its weight): optimizers and their saved
            # states address parameters by position.
            order = list(original._parameters)
            for name in sorted(layout.parameter_names, key=lambda n: order.index(n) if n in order else len(order)):
                setattr(self, name, getattr(original, name))
        gate_up, _ = self.weights()
        self.num_experts, self.hidden_size = gate_up.shape[0], gate_up.shape[2]
        self.provider: Callable | None = None
        # [hooks registered on the parts the kernels do not call], counted by their tables (patch watches them)
        self.hook_count = [0]
        self.calls = 0
        self.tokens = 0

    @property
    def original(self) -> nn.Module:
        original = self.__dict__["_original"]
        return original() if isinstance(original, WeakLink) else original

    def hold_original_weakly(self) -> None:
        """Where the original holds this module (its forward set to call it), a strong reference back
        would close a cycle: the model tree keeps the original alive."""
        object.__setattr__(self, "_original", WeakLink(self.original))

    def train(self, mode: bool = True):
        # model.train() / eval() reach this module in the original's place: the original (back at unpatch)
        # keeps the flag; its children are this module's and follow through super().train.
        self.original.training = mode
        return super().train(mode)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, 2I or I, H], [E, H, I]) views of the resident weights (no copies)."""
        if self.stacked is not None:
            return self.stacked.weights()
        first, down = self.fused_parameters()
        if self.layout.transposed:
            return first.transpose(1, 2), down.transpose(1, 2)
        return first, down

    @property
    def parameter_holder(self) -> nn.Module:
        """The module in the model tree that holds a fused layer's parameters: this one, or the original
        it reads them from."""
        return self.original if self.reads_original else self

    def fused_parameters(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The fused module's two weight Parameters as it stores them (gate_up_proj or up_proj, down_proj)."""
        first, down = self.layout.parameter_names[:2]
        return getattr(self.parameter_holder, first), getattr(self.parameter_holder, down)

    def biases(self) -> dict:
        if not self.layout.has_bias:
            return {}
        if self.stacked is not None:
            b_gate_up, b_down = self.stacked.biases()
        else:
            b_gate_up, b_down = (getattr(self.parameter_holder, name) for name in self.layout.parameter_names[2:])
        return dict(b_gate_up=b_gate_up, b_down=b_down)

    @staticmethod
    def routes_by_token(hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """The ids as [T, K]: blocks that flatten their routes token by token (DeepSeek-MoE's moe_infer)
        pass [T*K] ids (what a forward pre-hook on this module sees)."""
        if top_k_index.dim() != 1:
            return top_k_index
        T = hidden_states.shape[0]
        return top_k_index.view(T, top_k_index.numel() // T if T else 1)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("torch.jit.trace records the experts this call's routes chose, and drops those other "
                               "inputs route to: trace the model unpatched (moecache.unpatch(model)), or use "
                               "torch.compile")
        if hidden_states.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"moecache's experts compute in fp16, bf16 or fp32, and this model runs in "
                            f"{hidden_states.dtype}: run it unpatched (moecache.unpatch(model))")
        layout = self.layout
        if top_k_index.dim() == 1:
            top_k_index = self.routes_by_token(hidden_states, top_k_index)
            top_k_weights = top_k_weights.reshape(top_k_index.shape)
        if not torch.compiler.is_compiling():
            if self.hook_count[0]:
                raise ValueError("a hook was registered after moecache.patch on a part of these experts the kernels "
                                 "do not call (an expert MLP, its linear layers or activation): it could never run. "
                                 "Remove it, or unpatch first (patch then leaves this layer alone)")
            if self.stacked is not None:
                self.stacked.check_layers()
            self.calls += 1
            self.tokens += hidden_states.shape[0]
        biases = self.biases()  # after the checks: a layer replaced since patch may hold no weight
        if self.provider is not None:
            return self.provider(hidden_states, top_k_index, top_k_weights, activation_args=layout.activation_args,
                                 interleaved=layout.interleaved, biases=biases)
        w_gate_up, w_down = self.weights()
        # The ids are the model's own top-k: valid by construction, so no value checks (a host sync).
        return ops.fused_moe(hidden_states, w_gate_up, w_down, top_k_weights, top_k_index,
                             **layout.activation_args, gate_up_interleaved=layout.interleaved,
                             gated=layout.gated, validate=False, **biases)

    def extra_repr(self) -> str:
        where = repr(self.provider) if self.provider is not None else "resident"
        kind = "" if self.layout.gated else ", not gated"
        return f"experts={self.num_experts}, activation={self.layout.activation_text}{kind}, {where}"
