"""Triton kernels and thin launchers (shipped as `moecache.kernels`). No model logic lives here.

Importing this package imports `moecache` first, which switches the Triton interpreter on where no
CUDA device is usable, before triton is imported (TRITON_INTERPRET is read at @triton.jit time).
"""
from moecache._env import triton_interpreting

INTERPRETING = triton_interpreting()
