"""model.generate with a LatentKVCache: where generate would build its default cache (dynamic, or static
with cache_implementation="static"), a patched model with MLA attention builds a paged latent cache; a
cache the caller passes is used as given.

The hook is an instance override of `_prepare_cache_for_generation` bound to the model (a method, not a
closure over it), so copy.deepcopy rebinds it to the copy and the copy builds its own caches."""
from __future__ import annotations

import types

from torch import nn

from .. import compat
from .._env import kv_block_size
from ..layers.latent_cache import LatentKVCache
from ..layers.mla import MoecacheMLA

HOOK = "_prepare_cache_for_generation"


def _prepare_latent_cache(model: nn.Module, generation_config, model_kwargs, *args, **kwargs):
    result = getattr(type(model), HOOK)(model, generation_config, model_kwargs, *args, **kwargs)
    key = compat.generate_cache_key(model_kwargs)
    cache = model_kwargs.get(key) if key else None
    if cache is not None and not getattr(cache, "_is_user_defined", False) and not isinstance(cache, LatentKVCache):
        max_len = cache.get_max_length() if cache.is_compileable else -1
        model_kwargs[key] = LatentKVCache(_cache_layers(model), block_size=kv_block_size(),
                                          max_cache_len=max_len if max_len > 0 else None)
    return result


def _cache_layers(model: nn.Module) -> int:
    layers = [m.layer_idx for m in model.modules() if isinstance(m, MoecacheMLA)]
    return max(max(layers, default=-1) + 1, getattr(compat.text_config(model), "num_hidden_layers", 0))


def _generating_modules(model: nn.Module) -> list[nn.Module]:
    """The model if it generates, else the outermost submodules that generate and hold patched MLA (a
    plain module wrapping a causal LM): the generate that runs the patched attention gets the hook."""
    if hasattr(model, HOOK):
        return [model]
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if hasattr(module, HOOK) and any(isinstance(m, MoecacheMLA) for m in module.modules()):
            found.append(module)
            inside.add(name + ".")
    return found


def install_latent_cache_default(model: nn.Module) -> None:
    for module in _generating_modules(model):
        if HOOK not in module.__dict__:  # an override the user set stays theirs
            setattr(module, HOOK, types.MethodType(_prepare_latent_cache, module))


def remove_latent_cache_default(model: nn.Module) -> None:
    for module in model.modules():
        hook = module.__dict__.get(HOOK)
        if getattr(hook, "__func__", None) is _prepare_latent_cache:
            del module.__dict__[HOOK]
