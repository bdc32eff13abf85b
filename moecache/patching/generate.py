"""model.generate with a LatentKVCache: where generate would build its default cache (dynamic, or static
with cache_implementation="static"; other implementations are kept), a patched model with MLA attention
builds a paged latent cache; a cache the caller passes is used as given.

The hook is an instance override of `_prepare_cache_for_generation` that holds its model by a weak
reference (not a closure over it), so copy.deepcopy carries it over to the copy, bound to the copy."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import compat
from .._env import kv_block_size
from ..layers.latent_cache import LatentKVCache
from ..layers.mla import LATENT_DTYPES, MoecacheMLA
from .attention import is_mla_attention
from .hooks import HolderRef

HOOK = "_prepare_cache_for_generation"
# The cache_implementation values whose cache the latent cache stands in for: the default (dynamic) and
# static. Others (offloaded, quantized, sliding-window) ask for something it does not do: they stay.
REPLACED_CACHES = (None, "dynamic", "static")


class LatentCacheDefault:
    """Stands in for model._prepare_cache_for_generation: the model's own, then its default cache swapped
    for a LatentKVCache while every MLA attention module of the model is patched (with one left alone,
    one whose kv_b_proj was replaced after patch, or after an unpatch through a shallow copy restored the
    shared modules, generate keeps its default)."""

    def __init__(self, model: nn.Module, owner: object):
        # `owner`, the patch that installed it, is what unpatch removes by; the model holds this hook, so
        # the hook holds the model weakly
        self._model = HolderRef(model)
        self.owner = owner

    @property
    def model(self) -> nn.Module:
        return self._model.get(self)

    def is_bound_to(self, module: nn.Module) -> bool:
        return self._model.is_to(module)

    def __deepcopy__(self, memo):
        # A deep copy of the model gets a hook bound to the copy and owned by the copy's patch: the model
        # being copied is in the memo already, so these are the copies under way, not new ones.
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied._model = HolderRef(copy.deepcopy(self.model, memo))
        copied.owner = copy.deepcopy(self.owner, memo)
        return copied

    def __getstate__(self):
        return {"model": self.model, "owner": self.owner}

    def __setstate__(self, state):
        self._model, self.owner = HolderRef(state["model"]), state["owner"]

    def __call__(self, generation_config, model_kwargs, *args, **kwargs):
        model = self.model
        result = getattr(type(model), HOOK)(model, generation_config, model_kwargs, *args, **kwargs)
        key = compat.generate_cache_key(model_kwargs)
        cache = model_kwargs.get(key) if key else None
        if isinstance(cache, LatentKVCache):
            _check_room(cache, generation_config)
        if cache is None or getattr(cache, "_is_user_defined", False) or isinstance(cache, LatentKVCache) \
                or getattr(generation_config, "cache_implementation", None) not in REPLACED_CACHES:
            return result
        # Every MLA attention must be patched: one left alone (or restored) could not use the latent cache
        layers, unpatched = [], False
        for m in model.modules():
            if isinstance(m, MoecacheMLA):
                layers.append(m.layer_idx)
                # a model converted to a dtype the kernels do not compute in (float64) keeps its default cache
                weight = getattr(m.kv_a_proj_with_mqa, "weight", None)
                unsupported_dtype = isinstance(weight, torch.Tensor) and weight.dtype not in LATENT_DTYPES
                unpatched = unpatched or not m.latent_path_ready() or unsupported_dtype
            elif is_mla_attention(m):
                unpatched = True
        if layers and not unpatched:
            num_layers = max(max(layers) + 1, getattr(compat.text_config(model), "num_hidden_layers", 0))
            max_len = cache.get_max_length() if cache.is_compileable else -1
            model_kwargs[key] = LatentKVCache(num_layers, block_size=kv_block_size(),
                                              max_cache_len=max_len if max_len > 0 else None)
        return result


def _check_room(cache: LatentKVCache, generation_config) -> None:
    """A preallocated cache too short for this generate: said before the first token, since a compiled
    forward's writes are not checked on the host (past the pages they would fail on an index, or land
    in a page's spare rows and be read as tokens)."""
    stored = getattr(generation_config, "max_length", None)
    if cache.max_cache_len is not None and stored is not None and stored - 1 > cache.max_cache_len:
        raise ValueError(f"the LatentKVCache passed to generate holds {cache.max_cache_len} tokens per request "
                         f"(max_cache_len), and this generate stores up to {stored - 1} (max_length "
                         f"{stored} less the last token): build it with max_cache_len >= {stored - 1}")


def _generating_modules(model: nn.Module) -> list[nn.Module]:
    """The model if it generates, else the outermost submodules that generate and hold patched MLA (a
    plain module wrapping a causal LM): the generate that runs the patched attention gets the hook."""
    if hasattr(type(model), HOOK):  # the class's: a wrapper (PEFT's) may forward attribute reads inward
        return [model]
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if hasattr(type(module), HOOK) and any(isinstance(m, MoecacheMLA) for m in module.modules()):
            found.append(module)
            inside.append(name + ".")
    return found


def install_latent_cache_default(model: nn.Module, owner: object) -> None:
    """Hook the modules whose generate runs the patched attention (an override already there, the
    user's or another patch's, stays as it is)."""
    for module in _generating_modules(model):
        if HOOK not in module.__dict__:
            setattr(module, HOOK, LatentCacheDefault(module, owner))


def remove_latent_cache_default(model: nn.Module, owner: object) -> None:
    """Remove the hooks `owner` installed in the model, and one a module holds for another module: a
    shallow copy's, bound to the model it was copied from."""
    for module in model.modules():
        hook = module.__dict__.get(HOOK)
        if isinstance(hook, LatentCacheDefault) and (hook.owner is owner or not hook.is_bound_to(module)):
            del module.__dict__[HOOK]
