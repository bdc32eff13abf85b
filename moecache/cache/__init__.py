"""The offload runtime: experts' master copies in pinned host memory, a pool of device slots filled by
the C++/CUDA prefetcher (ExpertCache), the provider a patched layer runs through once offloaded, the
lookahead and learned predictors that fill it ahead of time, and token scheduling."""
from .expert_cache import ExpertCache, Lease
from .sources import ExpertSource, expert_source

__all__ = ["ExpertCache", "ExpertSource", "Lease", "expert_source"]
