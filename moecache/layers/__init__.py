"""nn.Modules that run moecache's ops; `moecache.patch` puts them into models."""
from .experts import ExpertsLayout, MoecacheExperts
from .latent_cache import LatentKVCache, PagedLatentLayer
from .mla import MoecacheMLA

__all__ = ["ExpertsLayout", "MoecacheExperts", "LatentKVCache", "PagedLatentLayer", "MoecacheMLA"]
