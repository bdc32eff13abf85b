"""model.generate with a LatentKVCache: where generate would build its default cache (dynamic, or static
with cache_implementation="static"), a patched model with MLA attention builds a paged latent cache; a
cache the caller passes is used as given."""
from __future__ import annotations

from torch import nn

from .. import compat
from .._env import kv_block_size
from ..layers.latent_cache import LatentKVCache
from ..layers.mla import MoecacheMLA

HOOK = "_prepare_cache_for_generation"


def install_latent_cache_default(model: nn.Module) -> None:
    prepare = getattr(model, HOOK, None)
    if prepare is None or HOOK in model.__dict__:
        return
    text_config = compat.text_config(model)
    num_layers = max(m.layer_idx for m in model.modules() if isinstance(m, MoecacheMLA)) + 1
    num_layers = max(num_layers, getattr(text_config, "num_hidden_layers", 0))

    def prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs):
        result = prepare(generation_config, model_kwargs, *args, **kwargs)
        key = compat.generate_cache_key(model_kwargs)
        cache = model_kwargs.get(key) if key else None
        if cache is not None and not getattr(cache, "_is_user_defined", False) and not isinstance(cache, LatentKVCache):
            max_len = cache.get_max_length() if cache.is_compileable else -1
            model_kwargs[key] = LatentKVCache(num_layers, block_size=kv_block_size(),
                                              max_cache_len=max_len if max_len > 0 else None)
        return result

    setattr(model, HOOK, prepare_cache_for_generation)


def remove_latent_cache_default(model: nn.Module) -> None:
    model.__dict__.pop(HOOK, None)
