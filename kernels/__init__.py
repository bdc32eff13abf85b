"""Triton kernels and thin launchers (shipped as `moecache.kernels`). No model logic lives here.

Where no CUDA device is usable, the Triton interpreter is switched on *before* any kernel module
decorates its functions (TRITON_INTERPRET is read at @triton.jit time), so the kernels run on CPU.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
