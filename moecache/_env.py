"""MOECACHE_* environment switches, read lazily (at call time, never at import)."""
import logging
import os

_BACKENDS = ("auto", "torch", "triton")


def backend_override() -> str:
    """MOECACHE_BACKEND=auto|torch|triton: the backend used where a call says "auto"."""
    value = os.environ.get("MOECACHE_BACKEND", "auto").strip().lower()
    if value not in _BACKENDS:
        raise ValueError(f"MOECACHE_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


def configure_logging() -> None:
    """MOECACHE_LOGLEVEL=DEBUG|INFO|WARNING|...: level of the `moecache` logger (unset: untouched)."""
    level = os.environ.get("MOECACHE_LOGLEVEL")
    if not level:
        return
    name = level.strip().upper()
    if name.isdigit() or not isinstance(logging.getLevelName(name), int):
        import warnings

        warnings.warn(f"MOECACHE_LOGLEVEL={level!r} is not a logging level name (DEBUG, INFO, WARNING, ERROR, "
                      "CRITICAL); the moecache logger keeps its default level", stacklevel=2)
        return
    logging.getLogger("moecache").setLevel(name)


def kv_block_size() -> int:
    """MOECACHE_KV_BLOCK_SIZE=N: tokens per page of the latent KV cache generate builds (default 64)."""
    value = os.environ.get("MOECACHE_KV_BLOCK_SIZE", "64").strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MOECACHE_KV_BLOCK_SIZE must be a positive integer, got {value!r}")
    return int(value)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


ENV_SWITCHES = {
    "MOECACHE_BACKEND": "auto|torch|triton — backend for calls that say backend='auto'",
    "MOECACHE_VALIDATE": "0 skips fused_moe and mla_decode value checks that need a host sync",
    "MOECACHE_MOE_CONFIG": "path of a fused_moe block-config table (bench/tune_moe.py writes one)",
    "MOECACHE_KV_BLOCK_SIZE": "tokens per page of the latent KV cache model.generate builds for MLA (default 64)",
    "MOECACHE_LOGLEVEL": "level of the `moecache` logger (DEBUG, INFO, ...)",
    "MOECACHE_BUILD_CUDA": "auto|0|1 — build the CUDA backend of moecache._C (at pip install time)",
    "MOECACHE_SANITIZE": "address|thread — build moecache._C with a sanitizer (tests only)",
    "TRITON_INTERPRET": "1 runs Triton kernels on the CPU; set automatically when no GPU is usable",
}


def select_triton_mode() -> None:
    """Switch the Triton interpreter on where no CUDA device is usable.

    Must run before triton is first imported: @triton.jit (triton.language's own helpers included)
    reads TRITON_INTERPRET when it decorates. An explicit TRITON_INTERPRET is left alone.
    """
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
