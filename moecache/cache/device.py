"""Torch-side helpers for memory the C++ core owns: a device view of the pinned host store, and the
marking that keeps CUDA graphs from copying the cache's buffers on every replay."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class _CudaArrayInterface:
    """Describes a byte range of device-addressable memory to torch.as_tensor (no ownership)."""

    def __init__(self, address: int, nbytes: int, owner=None):
        self.owner = owner  # keeps the memory alive as long as a tensor made from this object
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


def device_alias(store, device: torch.device) -> torch.Tensor | None:
    """A uint8 CUDA tensor over the pinned store (it must outlive the tensor: the cache holds both), or
    None where the store is not pinned or the driver cannot map it."""
    if device.type != "cuda" or not store.pinned or store.nbytes == 0 or store.device_ptr == 0:
        return None
    try:
        return torch.as_tensor(_CudaArrayInterface(store.device_ptr, store.nbytes, owner=store), device=device)
    except (RuntimeError, TypeError) as err:  # an old driver without mapped pinned memory
        logger.warning("expert host store: no device view of the pinned masters (%s); "
                       "compiled CUDA-graph decode with offload will not capture", err)
        return None


def mark_static_address(t: torch.Tensor | None) -> None:
    """Tell torch.compile's CUDA graphs that t keeps its address, so replays read it in place instead of
    copying it into the graph's own memory each step. A torch without the call only loses that speed."""
    if t is None or t.device.type != "cuda":
        return
    mark = getattr(torch._dynamo, "mark_static_address", None)
    if mark is None:
        logger.info("torch %s has no mark_static_address: CUDA graphs will copy the expert pool per replay",
                    torch.__version__)
        return
    mark(t)
