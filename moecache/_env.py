"""MOECACHE_* environment switches, read when they are used (never cached), and TRITON_INTERPRET, which
Triton itself reads once, when a kernel is decorated: moecache.kernels takes it at import."""
import logging
import os
import sys

_BACKENDS = ("auto", "torch", "triton")


def backend_override() -> str:
    """MOECACHE_BACKEND=auto|torch|triton: the backend used where a call says "auto"."""
    value = (os.environ.get("MOECACHE_BACKEND") or "auto").strip().lower()  # set but empty: unset, as the others
    if value not in _BACKENDS:
        raise ValueError(f"MOECACHE_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


def log_level() -> str | None:
    """MOECACHE_LOGLEVEL=DEBUG|INFO|WARNING|ERROR|CRITICAL, or None when unset. Anything else warns and
    counts as unset."""
    level = os.environ.get("MOECACHE_LOGLEVEL")
    if not level:
        return None
    name = level.strip().upper()
    if name.isdigit() or not isinstance(logging.getLevelName(name), int):
        import warnings

        warnings.warn(f"MOECACHE_LOGLEVEL={level!r} is not a logging level name (DEBUG, INFO, WARNING, ERROR, "
                      "CRITICAL); the moecache logger keeps its default level", stacklevel=3)
        return None
    return name


class _StderrUnlessHandled(logging.Handler):
    """Prints a record to stderr (the one sys.stderr is at the time) where no other handler on its way
    to the root logger takes it at its level: an application that configured no logging still sees what
    MOECACHE_LOGLEVEL asked for (the standard library's last resort prints warnings and above only), and
    one that did sees each record once."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self and not isinstance(h, logging.NullHandler) and record.levelno >= h.level
                   for h in logger.handlers):
                return
            if not logger.propagate:
                break
            logger = logger.parent
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must not raise (Handler.handleError's contract)
            self.handleError(record)


def configure_logging() -> None:
    """The `moecache` logger's level from MOECACHE_LOGLEVEL (unset or invalid: untouched), with records
    printed to stderr where the application has no handler of its own for them."""
    name = log_level()
    if name:
        logger = logging.getLogger("moecache")
        logger.setLevel(name)
        if not any(isinstance(h, _StderrUnlessHandled) for h in logger.handlers):
            handler = _StderrUnlessHandled()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)


def kv_block_size() -> int:
    """MOECACHE_KV_BLOCK_SIZE=N: tokens per page of the latent KV cache generate builds (default 64)."""
    value = (os.environ.get("MOECACHE_KV_BLOCK_SIZE") or "64").strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MOECACHE_KV_BLOCK_SIZE must be a positive integer, got {value!r}")
    return int(value)


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU (set by select_triton_mode where no GPU is usable)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def validate_values() -> bool:
    """MOECACHE_VALIDATE=0 skips the ops' value checks that need a host sync (default: run them)."""
    return os.environ.get("MOECACHE_VALIDATE", "1") != "0"


def moe_config_path() -> str | None:
    """MOECACHE_MOE_CONFIG=path: a fused_moe block-configuration table (bench/tune_moe.py writes one)."""
    return os.environ.get("MOECACHE_MOE_CONFIG") or None




def select_triton_mode() -> None:
    """Switch the Triton interpreter on where no CUDA device is usable.

    Must run before triton is first imported: @triton.jit (triton.language's own helpers included)
    reads TRITON_INTERPRET when it decorates. An explicit TRITON_INTERPRET is left alone (set but empty
    counts as unset, as for every switch).
    """
    if os.environ.get("TRITON_INTERPRET"):
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
