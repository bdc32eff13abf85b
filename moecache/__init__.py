"""moecache: fast Mixture-of-Experts on one GPU.

Triton expert kernels (`moecache.ops`), a C++/CUDA expert prefetcher (`moecache._C`), and in-place
model patching. Importing moecache never fails because a GPU or a driver is missing.
"""
import logging

from ._env import configure_logging as _configure_logging
from ._env import select_triton_mode as _select_triton_mode
from ._version import __version__

_select_triton_mode()

logging.getLogger(__name__).addHandler(logging.NullHandler())
_configure_logging()

try:
    from . import _C  # noqa: E402  (compiled core; host backend where CUDA is unusable)
except ImportError as exc:  # pragma: no cover - only from an unbuilt source tree
    raise ImportError(
        f"moecache._C is not built next to {__file__}: install with `pip install .` and keep the source "
        "tree off sys.path (`python -P -m moecache ...`, or run from another directory): the repository root "
        "on sys.path hides the installed package"
    ) from exc

if _C.__version__ != __version__:
    raise ImportError(
        f"moecache._C is version {_C.__version__} but the Python package is {__version__}: reinstall with `pip install .`"
    )

__all__ = ["__version__", "_C", "ops", "cache", "layers", "analysis", "models", "patch", "unpatch", "plan", "stats",
           "reset_stats", "Offload", "prefetch_allowance", "patched_experts", "routers", "expert_cache"]

_PATCHING = ("patch", "unpatch", "plan", "stats", "reset_stats", "Offload", "prefetch_allowance", "patched_experts", "routers",
             "expert_cache")


def __getattr__(name):
    # ops, cache and patching pull in torch and triton; keep `import moecache` light for `moecache info`.
    import importlib

    if name in ("ops", "cache", "layers", "analysis", "models", "patching"):
        return importlib.import_module("." + name, __name__)
    if name in _PATCHING:
        return getattr(importlib.import_module(".patching", __name__), name)
    raise AttributeError(f"module 'moecache' has no attribute {name!r}")
