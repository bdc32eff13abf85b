"""nn.Modules that run moecache's ops; `moecache.patch` puts them into models."""
from .experts import ExpertsLayout, MoecacheExperts

__all__ = ["ExpertsLayout", "MoecacheExperts"]
