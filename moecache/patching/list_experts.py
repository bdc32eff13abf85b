"""Experts kept as an nn.ModuleList of MLPs (DeepSeek's own code, DeepSpeed-MoE, transformers 4.x layouts):
which linear layers they have, and their weights stacked once into the [E, R, H] / [E, H, I] tensors the
kernels read, with each layer's parameters re-pointed at views of the stack (still one copy)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..cache.device import mark_static_address


@dataclass(frozen=True)
class ListNames:
    """An expert MLP's linear layers: out = down(act(gate(x)) * up(x)), or with up None (non-gated),
    out = down(act(gate(x))), gate then being fc1."""

    gate: str
    up: str | None
    down: str

    @property
    def gated(self) -> bool:
        return self.up is not None

    @property
    def rows(self) -> tuple[str, ...]:
        return (self.gate, self.up) if self.gated else (self.gate,)


# Checked in order. Qwen-1 (MoE-LLaVA-Qwen): intermediate = w1(x) * silu(w2(x)), so w2 is the gate.
KNOWN_NAMES = (
    ListNames("gate_proj", "up_proj", "down_proj"),  # Llama, Qwen2, StableLM, DeepSeek, transformers 4.x
    ListNames("w2", "w1", "c_proj"),                 # Qwen-1
    ListNames("w1", "w3", "w2"),                     # Mixtral 4.x
    ListNames("fc1", None, "fc2"),                   # Phi-2 (MoE-LLaVA-Phi2), NLLB
    ListNames("wi", None, "wo"),                     # Switch Transformers
)

# Activation modules (by class name) and functions -> the kernels' activation.
_ACTIVATION_CLASSES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                       "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh", "GELUActivation": "gelu",
                       "ReLU": "relu", "ReLUSquaredActivation": "relu2"}


def names_of(expert: nn.Module) -> ListNames | None:
    """The known linear-layer naming this expert MLP has, or None."""
    for names in KNOWN_NAMES:
        layers = [getattr(expert, n, None) for n in (*names.rows, names.down)]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            if len({layer.bias is None for layer in layers}) == 1:  # all biased or none
                return names
    return None


def activation_of(expert: nn.Module) -> str | None:
    """The activation an expert MLP applies, read from its own act module or function (None if unknown)."""
    for attr in ("act_fn", "activation_fn", "act", "activation"):
        act = getattr(expert, attr, None)
        if act is None:
            continue
        if isinstance(act, nn.GELU):
            return "gelu_tanh" if act.approximate == "tanh" else "gelu"
        name = type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", "")
        if name in _ACTIVATION_CLASSES:
            return _ACTIVATION_CLASSES[name]
        if name in ("silu", "relu", "gelu"):
            return name
    return None


class StackedExperts:
    """The weights (and biases) of a ModuleList of expert MLPs, stacked once; the layers' parameters
    become views of the stacks. weights() -> (gate_up [E, R, H], down [E, H, I]) with R = 2I (gated:
    gate rows then up rows) or I; biases() -> ([E, R], [E, H]) or None."""

    def __init__(self, experts: list[nn.Module], names: ListNames, keys: list[str] | None = None):
        self.experts, self.names = list(experts), names
        self.keys = keys if keys is not None else [str(i) for i in range(len(self.experts))]
        self.has_bias = getattr(experts[0], names.gate).bias is not None
        rows0, down0 = self._linears(0)
        self._first_layers = [(layer, type(layer)) for layer in (*rows0, down0)]  # as patch checked them
        self.stack()

    def _linears(self, e: int) -> tuple[list[nn.Linear], nn.Linear]:
        m = self.experts[e]
        return [getattr(m, n) for n in self.names.rows], getattr(m, self.names.down)

    def stack(self) -> None:
        self._weights = self._biases = None  # a stack the layers no longer view is freed before the new one
        rows0, down0 = self._linears(0)
        inter, hidden = rows0[0].weight.shape
        E, R = len(self.experts), inter * len(rows0)
        like = dict(dtype=down0.weight.dtype, device=down0.weight.device)
        gate_up, down = torch.empty(E, R, hidden, **like), torch.empty(E, hidden, inter, **like)
        b_gate_up = torch.empty(E, R, **like) if self.has_bias else None
        b_down = torch.empty(E, hidden, **like) if self.has_bias else None
        for e in range(E):
            rows, d = self._linears(e)
            for i, layer in enumerate(rows):
                block = slice(i * inter, (i + 1) * inter)
                gate_up[e, block].copy_(layer.weight.data)
                layer.weight.data = gate_up[e, block]
                if self.has_bias:
                    b_gate_up[e, block].copy_(layer.bias.data)
                    layer.bias.data = b_gate_up[e, block]
            down[e].copy_(d.weight.data)
            d.weight.data = down[e]
            if self.has_bias:
                b_down[e].copy_(d.bias.data)
                d.bias.data = b_down[e]
        for t in (gate_up, down, b_gate_up, b_down):  # compiled graphs read them like parameters: never copy
            mark_static_address(t)
        self._weights, self._biases = (gate_up, down), ((b_gate_up, b_down) if self.has_bias else None)
        self._first = rows0[0].weight
        self._addresses = self._current_addresses()  # the first is self._first's

    def _current_addresses(self) -> list[int]:
        return [p.data_ptr() for p in (*self.weight_params(), *(self.bias_params() if self.has_bias else ()))]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacks; where autograd records, ones whose gradients reach the layers' weights (every
        expert's, zeros for an expert no token chose, as fused-experts models give)."""
        self._follow_conversions()
        if self._weights is not None and self._swapped():
            return self._stacked_now(self.weight_params())
        if self._weights is None or not torch.is_grad_enabled():
            return self._weights
        return self._tracked(self._weights, self.weight_params())

    def biases(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        self._follow_conversions()
        if self._biases is not None and self._swapped():
            return self._stacked_now(self.bias_params())
        if self._biases is None or not torch.is_grad_enabled():
            return self._biases
        return self._tracked(self._biases, self.bias_params())

    def _swapped(self) -> bool:
        """Whether the first expert's first weight is another tensor than the one stacked: what
        torch.func.functional_call (and torch.nn.utils.stateless) does for the length of a call."""
        return not torch.compiler.is_compiling() and self._linears(0)[0][0].weight is not self._first

    def _stacked_now(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacks of the tensors the layers hold at this moment (copies, differentiable), in the stacks'
        order: each expert's row tensors concatenated, then its down tensors."""
        per_expert = len(params) // len(self.experts)
        rows = [torch.cat(params[e * per_expert:(e + 1) * per_expert - 1]) for e in range(len(self.experts))]
        return torch.stack(rows), torch.stack(params[per_expert - 1::per_expert])

    def _follow_conversions(self) -> None:
        """model.half(), .to(device) and the like give each parameter new storage in place of its view of
        the stack: the layers' weights (and biases) are stacked again, in their new dtype and device."""
        if self._weights is not None and not torch.compiler.is_compiling() \
                and self._first.data_ptr() != self._addresses[0]:
            self.stack()

    def _changed_layer(self) -> nn.Module | None:
        """The first of the first expert's linear layers that is not the module (of the class) patch stacked."""
        rows, down = self._linears(0)
        for (was, kind), layer in zip(self._first_layers, (*rows, down)):
            if layer is not was or type(layer) is not kind:
                return layer
        return None

    def layers_as_patched(self) -> bool:
        return self._changed_layer() is None

    def check_layers(self) -> None:
        """An adapter (PEFT's LoRA), a parametrization or a quantized layer put on the experts' linear
        layers after patch computes more than their weights: refused, not skipped. Like the weights, only
        the first expert's layers are looked at each forward, where changes applied by layer name all show."""
        changed = self._changed_layer()
        if changed is not None:
            raise ValueError(f"the experts' linear layers were replaced or changed after moecache.patch (now a "
                             f"{type(changed).__name__}), and the kernels compute only from the weights stacked at "
                             "patch: unpatch first (or merge the adapter into the weights)")

    def weight_params(self) -> list[nn.Parameter]:
        return [p for e in range(len(self.experts)) for p in self._params(e)]

    def bias_params(self) -> list[nn.Parameter]:
        return [layer.bias for e in range(len(self.experts)) for layer in self._layers(e)]

    @staticmethod
    def _tracked(stacks: tuple[torch.Tensor, torch.Tensor], params: list[nn.Parameter]):
        # The stacks are plain tensors the parameters view (shared storage, not autograd's views).
        if not any(p.requires_grad for p in params):
            return stacks
        return _StackOfParameters.apply(stacks, *params)

    def _params(self, e: int) -> list[nn.Parameter]:
        return [layer.weight for layer in self._layers(e)]

    def _layers(self, e: int) -> list[nn.Linear]:
        """Expert e's linear layers in the stacks' order: its row layers, then its down layer."""
        rows, down = self._linears(e)
        return [*rows, down]

    def is_current(self) -> bool:
        """Whether every layer's weight and bias still views the stacks (load_state_dict(assign=True)
        replaces those it loads, any expert's, with new tensors). Each forward checks only the first
        weight, which a conversion of the model (.half(), .to()) replaces with all the others."""
        return self._current_addresses() == self._addresses

    def is_stacked(self) -> bool:
        """Whether the layers' weights view stacks this object holds (not offloaded or unstacked)."""
        return self._weights is not None

    def unstack(self) -> None:
        """Give every parameter its own storage again (the stack is dropped). A layer replaced since (a
        quantized one, whose weight is a method) holds nothing of the stack and is left as it is."""
        for e in range(len(self.experts)):
            rows, d = self._linears(e)
            for layer in (*rows, d):
                for name in ("weight", "bias") if self.has_bias else ("weight",):
                    param = getattr(layer, name, None)
                    if isinstance(param, torch.Tensor):
                        param.data = param.data.clone()
        self._weights = self._biases = None

    def per_layer(self, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'<key>.<linear>.weight': tensor} for stacked-shaped (gate_up, down), e.g. an offloaded layer's
        master copies; views, no copies."""
        inter = down.shape[2]
        out = {}
        for e, key in enumerate(self.keys):
            for i, name in enumerate(self.names.rows):
                out[f"{key}.{name}.weight"] = gate_up[e, i * inter:(i + 1) * inter]
            out[f"{key}.{self.names.down}.weight"] = down[e]
        return out

    def load_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Each layer's weight gets its own copy of its part of (gate_up, down) (an offloaded layer's
        masters, put back by unpatch)."""
        index = {key: e for e, key in enumerate(self.keys)}
        for name, src in self.per_layer(gate_up, down).items():
            key, linear, _ = name.split(".")
            param = getattr(self.experts[index[key]], linear).weight
            param.data = src.to(device=param.device, dtype=param.dtype).clone()
        for param in self.bias_params() if self.has_bias else ():  # the biases stayed in their stacks
            param.data = param.data.clone()
        self._weights = self._biases = None

    def free_weights(self) -> None:
        """The host store holds the masters now: the device memory of the weights goes (biases stay)."""
        for param in self.weight_params():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self._weights = None


class _StackOfParameters(torch.autograd.Function):
    """The two stacks (gate_up and down, or their biases) as functions of the parameters that view them,
    without a copy: the backward gives each parameter its slice of the stacks' gradients. The parameters
    come in the stacks' own order (per expert: its row layers, then its down layer)."""

    @staticmethod
    def forward(ctx, stacks, *params):
        first, second = stacks
        ctx.experts = first.shape[0]
        ctx.per_expert = len(params) // ctx.experts
        ctx.rows = first.shape[1] // (ctx.per_expert - 1)
        return first.detach(), second.detach()

    @staticmethod
    def backward(ctx, grad_first, grad_second):
        grads = []
        for e in range(ctx.experts):
            for i in range(ctx.per_expert - 1):
                grads.append(None if grad_first is None else grad_first[e, i * ctx.rows:(i + 1) * ctx.rows])
            grads.append(None if grad_second is None else grad_second[e])
        return (None, *grads)
