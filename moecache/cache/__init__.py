"""Expert offloading: master copies in pinned host memory, a pool of device slots, a C++/CUDA prefetcher."""
from .expert_cache import ExpertCache, ExpertSource, Lease, expert_source

__all__ = ["ExpertCache", "ExpertSource", "Lease", "expert_source"]
