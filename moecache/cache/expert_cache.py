"""Python face of `moecache._C.CacheCore`: builds the pinned host store from a model's experts,
owns the device slot pool and expert map as torch tensors (no copies: the C++ side gets their
addresses), and runs a layer's experts through ops.fused_moe with the map.

Misses: where the kernel reads each routed expert's weights once per call (few tokens:
ops.streams_each_expert_once says when), a non-resident expert is read in place from pinned host memory
by the kernel (map entry -1): no host round trip, and the same PCIe bytes a copy would move. Otherwise
the kernel would re-read it once per tile of rows, so misses are copied into slots first (`ensure`), and
the compute stream waits only on the copies it needs.
"""
from __future__ import annotations

import contextlib
import logging
import math
import operator
import threading
from typing import Iterable

import torch

from .. import _C, ops
from .device import device_alias, mark_static_address
from .sources import expert_source

logger = logging.getLogger(__name__)

_ALIGN = 256  # bytes: each expert record and its down block start on this boundary
LEASE_WAIT_MS = 60_000.0  # how long a call waits for other calls' leases before giving up


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def record_size(gate_up_bytes: int, down_bytes: int) -> int:
    """Bytes one expert takes in the host store and in a device slot: its gate/up block, then its down
    block, each starting on the alignment boundary."""
    return _align(_align(gate_up_bytes) + down_bytes)


def weighted_routes(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int):
    """(weights, ids, the distinct experts of the routes whose weight is not 0), in one host sync.

    A route of weight 0 adds nothing (LongCat-Flash's zero-computation experts and ZAYA's skip expert leave
    such routes pointing at a real expert; so do capacity drops), so its expert is not fetched. One token's
    such routes are dropped (the kernel reads each of a token's routes on its own); with more tokens, where
    the kernel reads an expert once for all its rows, a route of weight 0 is pointed at its token's
    highest-weighted expert, which the kernel reads anyway, and multiplies its output by 0. Ids outside
    [0, num_experts) stay among the experts whatever their weight (the cache refuses them). Where autograd
    records the weights, routes stay as they are (a weight's gradient is its expert's output)."""
    if topk_weights.requires_grad and torch.is_grad_enabled():
        return topk_weights, topk_ids, ExpertCache._ids(torch.unique(topk_ids))
    zero = topk_weights == 0
    if topk_ids.shape[0] == 1:
        ids, zeros = torch.stack((topk_ids[0].long(), zero[0].long())).tolist()
        kept = [k for k, z in enumerate(zeros) if not z]
        distinct = sorted({ids[k] for k in kept} | {e for e in ids if not 0 <= e < num_experts})
        if len(kept) in (0, len(ids)):
            return topk_weights, topk_ids, distinct
        # the weighed routes first, in their order: an index made where the ids are (no copy to the device)
        index = torch.argsort(zero[0].int(), stable=True)[:len(kept)]
        return topk_weights[:, index], topk_ids[:, index], distinct
    # id * 2 + (weight 0): which ids occur, and whether with weight, from one unique; an id outside the
    # experts, clamped to -1 or E first (no int64 overflow), stays one the cache refuses
    keys = ExpertCache._ids(torch.unique(topk_ids.long().clamp(-1, num_experts) * 2 + zero))
    distinct = sorted({k >> 1 for k in keys if not k & 1 or not 0 <= k >> 1 < num_experts})
    if not any(k & 1 for k in keys) or not distinct:
        return topk_weights, topk_ids, distinct
    best = topk_ids.gather(1, topk_weights.abs().argmax(dim=1, keepdim=True))
    best = torch.where(zero.all(dim=1, keepdim=True), distinct[0], best)  # a token whose routes all weigh 0
    return topk_weights, torch.where(zero, best, topk_ids), distinct


class Lease:
    """Slots that ensure() made resident, protected from eviction until release() (or the `with` ends)."""

    def __init__(self, cache: "ExpertCache", lease: int, slots: list[int], releases_before: int = 0):
        self._cache, self.id, self.slots = cache, lease, slots
        self.releases_before = releases_before  # the core's release count before this lease was taken
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._cache._core.release(self.id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._cache._core.closed:
            self.release()

    def __del__(self):
        # A lease dropped unreleased would protect its slots for good.
        try:
            if self._held and not self._cache._core.closed:
                self.release()
        except Exception:  # interpreter shutdown, or a cache already torn down
            pass

    def __repr__(self):
        return f"Lease({self.id}, slots={self.slots}, {'held' if self._held else 'released'})"


class ExpertCache:
    """Experts of `layers` kept in pinned host memory, with `num_slots` of them on the device at a time.

    Args:
        layers: one entry per MoE layer, anything `expert_source` reads (all layers the same shape).
        num_slots: device slots in the pool (one expert each, any layer).
        policy: "lru", "lfu" or "priority" (scores from `set_priorities`; the predictor feeds them).
        device: where slots live (default: the current CUDA device, else the CPU with the host backend).
        pin: "alloc" (cudaHostAlloc) or "register" (cudaHostRegister of an aligned arena).
        allow_pageable: if pinning fails, use pageable memory with a warning instead of raising. Applies to
            the CUDA backend only: the host backend (no usable GPU) keeps its store in ordinary memory, which
            it reports as `pinned=False` whatever this says.
        release_sources: for a caller that hands its experts over (moecache.patch's offload): an object with
            release(layer), called as soon as that layer's experts are in the store (each source is dropped
            then too), and restore(layer, gate_up [E, 2I, H], down [E, H, I]), called for every released
            layer with its masters from the store if the construction then fails or is interrupted, before
            the error propagates. A caller that frees its copy in release holds one copy of the experts in
            host memory, not two: for sources in host memory the store is then allocated pageable, filled,
            and page-locked in place (cudaHostRegister; pin mode "register" whatever `pin` says).

    Example:
        cache = ExpertCache([(w_gate_up, w_down) for ...], num_slots=32)
        out = cache.moe(layer, hidden_states, topk_weights, topk_ids)
        cache.prefetch(layer + 1, predicted_experts)
    """

    def __init__(self, layers: Iterable, *, num_slots: int, policy: str = "lru", device=None,
                 pin: str = "alloc", allow_pageable: bool = False, release_sources=None):
        sources = [expert_source(layer) for layer in layers]
        del layers  # each source is dropped once stored; an iterable of tensors is then held by no one
        if not sources:
            raise ValueError("layers: at least one MoE layer is needed")
        first = sources[0]
        if first.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"layers: experts must be fp16, bf16 or fp32 (what the kernels compute), got {first.dtype}")
        if min(first.num_experts, first.hidden, first.inter) <= 0:
            raise ValueError(f"layers: experts must be non-empty, got E={first.num_experts}, H={first.hidden}, "
                             f"I={first.inter}")
        for i, s in enumerate(sources):
            if (s.num_experts, s.hidden, s.inter, s.dtype, s.gate_up_interleaved, s.gated) != (
                    first.num_experts, first.hidden, first.inter, first.dtype, first.gate_up_interleaved, first.gated):
                def describe(src):
                    kind = ("gated" + (", interleaved" if src.gate_up_interleaved else "")) if src.gated else "non-gated"
                    return f"[E={src.num_experts}, H={src.hidden}, I={src.inter}, {src.dtype}, {kind}]"
                raise ValueError(f"layers[{i}] has experts {describe(s)}; layer 0 has {describe(first)}")
        if not isinstance(num_slots, int) or num_slots <= 0:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if _C.cuda_available() else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not _C.cuda_available():
                raise ValueError(f"device={self.device} but moecache._C cannot use CUDA: {_C.cuda_unavailable_reason()}")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            backend = "cuda"
        elif self.device.type == "cpu":
            backend = "host"
        else:
            raise ValueError(f"device must be a CUDA device or the CPU, got {self.device}")

        self.num_layers, self.num_experts = len(sources), first.num_experts
        self.hidden, self.inter, self.dtype = first.hidden, first.inter, first.dtype
        self.gated, self.gate_up_rows = first.gated, first.gate_up_rows
        self.gate_up_interleaved = first.gate_up_interleaved
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        gate_up_bytes = self.gate_up_rows * self.hidden * itemsize
        self._down_offset = _align(gate_up_bytes)
        self.record_bytes = record_size(gate_up_bytes, self.hidden * self.inter * itemsize)
        self.num_slots = num_slots
        pool_bytes = num_slots * self.record_bytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            if pool_bytes > free:
                raise ValueError(f"num_slots={num_slots} experts of {self.record_bytes / 2**20:.1f} MiB need "
                                 f"{pool_bytes / 2**30:.2f} GiB of GPU memory but only {free / 2**30:.2f} GiB of "
                                 f"{total / 2**30:.2f} GiB is free")

        in_host_memory = [s.get(0)[0].device.type == "cpu" for s in sources]
        handed_over = release_sources is not None and any(in_host_memory)
        del first, s  # no reference to a source outlives its layer's fill
        self._store = _C.HostStore(
            self.num_layers * self.num_experts * self.record_bytes, backend=backend, pin=pin,
            allow_pageable=allow_pageable, pin_after_fill=handed_over,
            reclaimable_bytes=sum(self.num_experts * self.record_bytes for host in in_host_memory if host)
            if handed_over else 0)
        self._host_bytes = torch.frombuffer(self._store, dtype=torch.uint8)
        self._host_gate_up, self._host_down = self._record_views(self._host_bytes, self.num_layers * self.num_experts)
        self._pool = torch.empty(pool_bytes, dtype=torch.uint8, device=self.device)
        self._slot_gate_up, self._slot_down = self._record_views(self._pool, num_slots)
        self._map = torch.full((self.num_layers, self.num_experts), -1, dtype=torch.int32, device=self.device)
        if self.device.type == "cuda":
            # The map's -1 fill is queued on this stream; the copy engine writes the map from its own
            # (non-blocking) stream, so the fill must have landed before the first copy can validate a slot.
            torch.cuda.current_stream(self.device).synchronize()
        self._core = _C.CacheCore(self._store, self.num_layers, self.num_experts, self.record_bytes, num_slots,
                                    self._pool.data_ptr(), self._map.data_ptr(), backend=backend, policy=policy,
                                    device=self.device.index or 0)
        # Everything that can fail for want of memory or a device is made: the sources are read, and handed
        # over where the caller releases them, only now.
        self._biases = []
        released = []
        try:
            for layer in range(self.num_layers):
                source, sources[layer] = sources[layer], None
                for e in range(self.num_experts):
                    gate_up, down = source.get(e)
                    record = layer * self.num_experts + e
                    self._host_gate_up[record].copy_(gate_up.detach())
                    self._host_down[record].copy_(down.detach())
                # Biases are small: each layer's stay on the device (the fused modules' own tensors where
                # they are there already), and moe adds them unless the call passes its own.
                self._biases.append(None if source.biases is None else
                                    tuple(b.detach().to(self.device) for b in source.biases))
                del source, gate_up, down
                if release_sources is not None:
                    release_sources.release(layer)
                    released.append(layer)
            self._store.pin()  # an arena filled before it was pinned (a no-op otherwise)
        except BaseException:  # Ctrl-C while the store fills, too: every released layer gets its weights back
            for layer in released:
                lo, hi = layer * self.num_experts, (layer + 1) * self.num_experts
                release_sources.restore(layer, self._host_gate_up[lo:hi], self._host_down[lo:hi])
            self._core.close()
            self._core = self._host_gate_up = self._host_down = self._host_bytes = None
            self._store.release()
            raise
        if self._store.warning:
            logger.warning("expert host store: %s", self._store.warning)
        # The same masters addressed as device memory, for callers that accept only device tensors
        # (CUDA-graph capture copies or refuses CPU inputs); None where the store is not pinned.
        self._device_host_bytes = device_alias(self._store, self.device)
        self._device_host_views = (None if self._device_host_bytes is None else
                                   self._record_views(self._device_host_bytes, self.num_layers * self.num_experts))
        # Compiled graphs read these objects (slices of them are taken inside the graph), so each one,
        # not only the base buffers, must be marked, or CUDA graph trees copy it at every replay.
        for t in (self._pool, self._map, self._device_host_bytes, self._slot_gate_up, self._slot_down,
                  *(self._device_host_views or ())):
            mark_static_address(t)
        self._closed = False
        self._misses_before_reset = 0  # what reset_stats zeroed: misses_since_creation() keeps counting
        self.owner: str | None = None  # who holds the only copy of the weights in this store (see close)
        self._lifetime = threading.Condition()  # guards _closed and _active (calls in progress)
        self._active = 0
        logger.info("expert cache: %d layers x %d experts of %.2f MiB in %s host memory (%s, %.2f s); %d slots on %s",
                    self.num_layers, self.num_experts, self.record_bytes / 2**20,
                    "pinned" if self._store.pinned else "pageable", self._store.pin_mode, self._store.pin_seconds,
                    num_slots, self.device)

    # ------------------------------------------------------------------ views
    def _record_views(self, flat_bytes: torch.Tensor, count: int):
        """[count, 2I, H] gate_up and [count, H, I] down views of records laid end to end."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        elems = flat_bytes.view(self.dtype)
        stride = self.record_bytes // itemsize
        gate_up = elems.as_strided((count, self.gate_up_rows, self.hidden), (stride, self.hidden, 1), 0)
        down = elems.as_strided((count, self.hidden, self.inter), (stride, self.inter, 1), self._down_offset // itemsize)
        return gate_up, down

    def _check_open(self):
        if self._closed:
            raise RuntimeError("ExpertCache is closed")

    @contextlib.contextmanager
    def _in_use(self):
        """A call in progress: close() waits for it before freeing the pool and the host store."""
        with self._lifetime:
            if self._closed:
                raise RuntimeError("ExpertCache is closed")
            self._active += 1
        try:
            yield
        finally:
            with self._lifetime:
                self._active -= 1
                self._lifetime.notify_all()

    def _check_not_capturing(self):
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("expert cache: called while a CUDA graph is being captured; copies cannot be "
                               "captured (compiled decode reads misses in place through expert_map instead)")

    @property
    def pinned(self) -> bool:
        return self._store.pinned

    @property
    def pin_seconds(self) -> float:
        return self._store.pin_seconds

    @property
    def policy(self) -> str:
        return self._core.policy

    def slot_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool as ([S, 2I, H], [S, H, I]) tensors on the device (views, no copies)."""
        self._check_open()
        return self._slot_gate_up, self._slot_down

    def host_weights(self, layer: int, *, on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's master copies as ([E, 2I, H], [E, H, I]) views of the pinned host store.

        on_device=True returns the same memory as tensors on the cache's CUDA device (mapped pinned
        memory: kernels read it over PCIe in place), which CUDA-graph capture accepts as it would any
        static device buffer; on the CPU, or when the store is pageable, the host views are returned.
        """
        self._check_open()
        self._check_layer(layer)
        lo, hi = layer * self.num_experts, (layer + 1) * self.num_experts
        gate_up, down = self._host_gate_up, self._host_down
        if on_device and self._device_host_views is not None:
            gate_up, down = self._device_host_views
        return gate_up[lo:hi], down[lo:hi]

    def layer_biases(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(b_gate_up [E, 2I or I], b_down [E, H]) of the layer's experts on the cache's device, or None
        where they had none: what moe adds unless a call passes biases of its own."""
        self._check_open()
        self._check_layer(layer)
        return self._biases[layer]

    def expert_map(self, layer: int) -> torch.Tensor:
        """[E] int32 on the device: each expert's slot, -1 while it is not resident."""
        self._check_open()
        self._check_layer(layer)
        return self._map[layer]

    def _check_layer(self, layer):
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is outside [0, {self.num_layers})")

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    @staticmethod
    def _ids(experts) -> list[int]:
        ids = experts.reshape(-1).tolist() if isinstance(experts, torch.Tensor) else list(experts)
        try:
            return [operator.index(e) for e in ids]
        except TypeError:
            raise TypeError(f"experts must be integer ids, got {ids!r}") from None

    # ------------------------------------------------------------------ cache operations
    def prefetch(self, layer: int, experts) -> int:
        """Start copying these experts of `layer` into slots; returns at once (how many copies started)."""
        with self._in_use():
            self._check_not_capturing()
            return self._core.prefetch(layer, self._ids(experts), self._stream())

    def ensure(self, layer: int, experts) -> "Lease":
        """Make experts resident for work enqueued next on the current stream, which waits only on the
        copies it needs. The lease's `slots` give each expert's slot (-1: no evictable slot was left);
        the slots are protected from eviction until the lease is released (`with` releases it)."""
        with self._in_use():
            return self._ensure(layer, experts)

    def _ensure(self, layer: int, experts, count: bool = True) -> "Lease":
        # count=False: a later round of one layer call asks again for experts it already counted.
        self._check_not_capturing()
        releases = self._core.releases()
        lease, slots = self._core.ensure(layer, self._ids(experts), self._stream(), count)
        return Lease(self, lease, slots, releases)

    def release(self, lease: "Lease") -> None:
        """End a lease: its slots may be evicted again (copies into them still wait for the work enqueued
        on the compute stream before the eviction, so releasing right after launching is safe)."""
        self._check_open()
        lease.release()

    def record_use(self, layer: int, experts) -> None:
        self._check_open()
        self._core.record_use(layer, self._ids(experts))

    def set_priorities(self, layer: int, scores) -> None:
        """Predicted next-use score per expert of `layer` (higher = keep; the "priority" policy)."""
        self._check_open()
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().float().cpu().reshape(-1).tolist()
        scores = [float(s) for s in scores]
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"set_priorities: scores must be finite (NaN or inf would pin or skip slots), got {scores}")
        self._core.set_priorities(layer, scores)

    def keep_resident(self, layer: int, experts) -> int:
        """Never evict these experts (hot or shared ones); starts their copies. Returns copies started."""
        self._check_open()
        ids = self._ids(experts)
        self._core.set_never_evict(layer, ids, True)
        return self._core.prefetch(layer, ids, self._stream())

    def allow_eviction(self, layer: int, experts) -> None:
        """Undo keep_resident: these experts compete for slots again."""
        self._check_open()
        self._core.set_never_evict(layer, self._ids(experts), False)

    def slot_of(self, layer: int, expert: int) -> int:
        self._check_open()
        return self._core.slot_of(layer, expert)

    def ready(self, layer: int, expert: int) -> bool:
        self._check_open()
        return self._core.ready(layer, expert)

    def resident(self, layer: int) -> list[int]:
        self._check_open()
        return self._core.resident(layer)

    def synchronize(self) -> None:
        self._check_open()
        self._core.synchronize()

    def stats(self) -> dict:
        """Counters since creation (or reset_stats), plus hit_rate and copy_gbps."""
        self._check_open()
        s = self._core.stats()
        s["hit_rate"] = s["hits"] / s["requests"] if s["requests"] else 0.0
        s["copy_gbps"] = s["bytes_copied"] / s["copy_ms"] / 1e6 if s["copy_ms"] > 0 else 0.0
        return s

    def reset_stats(self) -> None:
        self._check_open()
        self._misses_before_reset += self._core.stats()["misses"]
        self._core.reset_stats()

    def misses_since_creation(self) -> int:
        """Demand loads since the cache was made, whatever reset_stats zeroed (the budgeted policy charges
        them to its copy allowance)."""
        self._check_open()
        return self._misses_before_reset + self._core.stats()["misses"]

    # ------------------------------------------------------------------ running a layer
    def moe(self, layer: int, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
            activation: str = "silu", activation_limit: float | None = None, limit_after_activation: bool = False,
            swiglu_alpha: float | None = None, misses: str = "auto", track_usage: bool = True,
            backend: str = "auto", b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
            before_compute=None, validate: bool = True) -> torch.Tensor:
        """The routed experts of `layer` for these tokens, with weights served by the cache.

        activation, activation_limit, limit_after_activation, swiglu_alpha: as ops.fused_moe's.

        b_gate_up, b_down: the experts' biases; by default the layer's own, where its experts held them
        when the cache was built (`layer_biases`).

        misses: "in_place" (kernel reads non-resident experts from pinned host memory, no host sync
        unless track_usage; with tracking, a miss an empty slot can take is copied there), "copy" (copy
        them into slots first; rounds if the pool is too small), or "auto": where the kernel reads each
        expert once (ops.streams_each_expert_once) and the store is pinned, misses are copied into the
        slots the policy frees and only those no slot can take are read in place; else copy.
        before_compute: called with the layer's distinct experts (a list) once they are accounted for
            (and, when copied, leased) and before the kernel is enqueued, so prefetches it starts for
            later layers overlap this layer's compute and cannot evict this layer's experts.
        validate: ops.fused_moe's value checks on topk_ids (ids in [0, E), no expert twice in a token's
            row; a host sync), made before any expert is counted; False for a model's own top-k. The
            cache reads the layer's distinct ids anyway (one sync, and an IndexError for an expert outside
            the layer) unless misses are read in place without tracking usage. Routes of weight 0 fetch no
            expert (weighted_routes).
        """
        with self._in_use():
            act = dict(activation=activation, activation_limit=activation_limit,
                       limit_after_activation=limit_after_activation, swiglu_alpha=swiglu_alpha)
            return self._moe(layer, hidden_states, topk_weights, topk_ids, act, misses, track_usage, backend,
                             b_gate_up, b_down, before_compute, validate)

    def _moe(self, layer, hidden_states, topk_weights, topk_ids, act, misses, track_usage, backend,
             b_gate_up, b_down, before_compute, validate):
        self._check_layer(layer)
        self._check_call(hidden_states, topk_weights, topk_ids, act)
        if misses not in ("auto", "in_place", "copy"):
            raise ValueError(f"misses must be 'auto', 'in_place' or 'copy', got {misses!r}")
        if not isinstance(validate, bool):
            raise ValueError(f"validate must be a bool, got {validate!r}")
        in_place_ok = self._store.pinned or self.device.type == "cpu"
        evict = misses == "auto"  # copies that the policy makes room for: later calls hit
        if misses == "auto":
            once = ops.streams_each_expert_once(hidden_states.shape[0], topk_ids.shape[1], self.num_experts,
                                                self.hidden, self.inter, self.device, self.dtype)
            misses = "in_place" if once and in_place_ok else "copy"
        if misses == "in_place" and not in_place_ok:
            raise ValueError("misses='in_place' needs a pinned host store; this one is pageable")
        host_gate_up, host_down = self.host_weights(layer)
        if b_gate_up is None and b_down is None and self._biases[layer] is not None:
            b_gate_up, b_down = self._biases[layer]
        extra = dict(**act, backend=backend, b_gate_up=b_gate_up, b_down=b_down,
                     gate_up_interleaved=self.gate_up_interleaved, gated=self.gated, validate=validate)
        if misses == "in_place" and not (track_usage or before_compute is not None):
            # No accounting and no lease (no host sync): concurrent prefetches may evict what this call
            # reads from the slots; callers that prefetch from other threads track usage.
            return ops.fused_moe(hidden_states, self._slot_gate_up, self._slot_down, topk_weights, topk_ids,
                                 expert_map=self._map[layer], host_w_gate_up=host_gate_up, host_w_down=host_down,
                                 **extra)
        self._check_not_capturing()
        if validate:  # the caller's routes, checked as the kernels would, before any expert is counted
            ops.check_topk_ids(topk_ids, self.num_experts)
        extra["validate"] = False  # the routes below may drop or repeat the caller's; the map is the cache's own
        topk_weights, topk_ids, needed = weighted_routes(topk_weights, topk_ids, self.num_experts)
        if not needed:  # every route weighs 0: each adds 0 times its expert's output
            if before_compute is not None:
                before_compute(needed)
            return torch.zeros_like(hidden_states)
        if misses == "in_place":
            # The resident experts this call reads are leased: no prefetch (before_compute's for the next
            # layers, or another thread's) can evict them before the kernel is enqueued.
            with Lease(self, *self._core.use_in_place(layer, needed, self._stream(), evict)) as lease:
                if self.device.type == "cuda":
                    # Kernels on this stream read the live map: a later eviction's copy waits for them.
                    expert_map = self._map[layer]
                else:
                    # The host backend cannot order other threads' later map writes after this call:
                    # it reads a snapshot (leased slots, host copies for the rest).
                    expert_map = torch.full((self.num_experts,), -1, dtype=torch.int32)
                    expert_map[needed] = torch.tensor(lease.slots, dtype=torch.int32)
                if before_compute is not None:
                    before_compute(needed)
                return ops.fused_moe(hidden_states, self._slot_gate_up, self._slot_down, topk_weights, topk_ids,
                                     expert_map=expert_map, host_w_gate_up=host_gate_up,
                                     host_w_down=host_down, **extra)
        lease = self._ensure(layer, needed)
        if before_compute is not None:
            try:
                before_compute(needed)
            except BaseException:
                lease.release()
                raise
        if all(s >= 0 for s in lease.slots):
            with lease:
                return ops.fused_moe(hidden_states, self._slot_gate_up, self._slot_down, topk_weights, topk_ids,
                                     expert_map=self._map[layer], **extra)
        return self._moe_in_rounds(layer, hidden_states, topk_weights, topk_ids, needed, lease, extra)

    def _check_call(self, hidden_states, topk_weights, topk_ids, act: dict) -> None:
        """What a call must agree on with the cached experts, checked before any expert is copied or
        counted (the op checks the rest against the slot pool, whose E is the slot count)."""
        x = hidden_states
        if not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == self.hidden):
            raise ValueError(f"hidden_states must be [T, H={self.hidden}] (the cached experts' hidden size), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"hidden_states must be {self.dtype} on {self.device} as the cached experts are, got "
                             f"{x.dtype} on {x.device}")
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if not (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == x.shape[0]):
                raise ValueError(f"{name} must be [T={x.shape[0]}, K], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} differ")
        if topk_ids.dtype not in (torch.int32, torch.int64) or not 1 <= topk_ids.shape[1] <= self.num_experts:
            raise ValueError(f"topk_ids must be int32 or int64 with 1 <= K <= E={self.num_experts} columns, got "
                             f"{topk_ids.dtype} with K={topk_ids.shape[1]}")
        if not topk_weights.is_floating_point():
            raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device}, hidden_states on {x.device}")
        if not self.gated and act["activation"] not in ops.NON_GATED_ACTIVATIONS:
            raise ValueError(f"activation must be one of {ops.NON_GATED_ACTIVATIONS} for non-gated experts, got "
                             f"{act['activation']!r}")
        ops.gated_activation(**act, gated=self.gated)  # the activation and its clamp, gated or not

    def _moe_in_rounds(self, layer, x, topk_weights, topk_ids, needed, lease, extra):
        """The pool cannot hold every expert this layer routes to: run the resident ones, release, repeat.

        Each round computes only the routes (token, k) to its experts, one route a row, so an expert
        never runs on a token not routed to it (a weight of zero would not hide an output that is not
        finite there: 0 * inf is NaN). The routes are added k by k, each k's tokens distinct, so the sum
        is the same in every run.
        """
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        T, K = topk_ids.shape
        route_ids = topk_ids.t().reshape(-1)  # k-major: route k * T + t
        route_weights = topk_weights.t().reshape(-1, 1)
        route_tokens = torch.arange(T, device=x.device).repeat(K)
        remaining = list(needed)
        while True:
            resident = {e: s for e, s in zip(remaining, lease.slots) if s >= 0}
            if not resident:
                # Every slot is leased by other calls or kept resident: wait (holding nothing) for a
                # lease to end, then try again; only slots kept resident for good are an error.
                lease.release()
                if not self._core.wait_for_release(LEASE_WAIT_MS, lease.releases_before):
                    raise RuntimeError(f"expert cache: no slot of {self.num_slots} can be evicted for layer {layer} "
                                       f"(all kept resident, or leased for over {LEASE_WAIT_MS / 1e3:.0f} s); "
                                       "allow_eviction or use more slots")
                lease = self._ensure(layer, remaining, count=False)
                continue
            with lease:
                filler = next(iter(resident.values()))
                local_map = torch.full((self.num_experts,), filler, dtype=torch.int32)
                local_map[list(resident)] = torch.tensor(list(resident.values()), dtype=torch.int32)
                routes = torch.isin(route_ids, torch.tensor(list(resident), device=route_ids.device)).nonzero()[:, 0]
                tokens = route_tokens[routes]
                rows = ops.fused_moe(x[tokens], self._slot_gate_up, self._slot_down, route_weights[routes],
                                     route_ids[routes, None], expert_map=local_map.to(self.device), **extra)
                k_of_route = routes // T
                for k in range(K):
                    of_k = k_of_route == k
                    out.index_add_(0, tokens[of_k], rows[of_k].float())
            remaining = [e for e in remaining if e not in resident]
            if not remaining:
                return out.to(x.dtype)
            lease = self._ensure(layer, remaining, count=False)

    # ------------------------------------------------------------------ lifetime
    def close(self, *, owner: str | None = None) -> None:
        """Wait for copies in flight and for calls in progress, then free the host store and the pool
        (idempotent; calls made afterwards raise). A cache that holds the only copy of a model's experts
        (`owner` set, as moecache.patch does) closes only for that owner: moecache.unpatch."""
        if self.owner is not None and owner != self.owner and not self._closed:
            raise RuntimeError(f"this expert cache holds the only copy of an offloaded model's experts; "
                               f"{self.owner} puts them back and closes it")
        with self._lifetime:
            if self._closed:
                return
            self._closed = True
        self._core.close()  # wakes calls waiting for a lease; their next step into the core raises
        with self._lifetime:
            self._lifetime.wait_for(lambda: self._active == 0)
        if self.device.type == "cuda":
            # Kernels enqueued by finished calls, on any stream, may still read the pool or the pinned store.
            torch.cuda.synchronize(self.device)
        for name in ("_slot_gate_up", "_slot_down", "_pool", "_map", "_host_gate_up", "_host_down", "_host_bytes",
                     "_device_host_views", "_device_host_bytes", "_biases"):
            setattr(self, name, None)
        self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        # Pinned host memory, device slots and a copy thread cannot be pickled or copied.
        raise TypeError("an ExpertCache cannot be pickled or copied (pinned host memory, device slots, a copy "
                        "engine); for a model whose experts moecache offloaded: save its state_dict (it holds the "
                        "real weights), or unpatch it (moecache.unpatch) before deepcopy or torch.save(model)")

    def __deepcopy__(self, memo):
        self.__reduce__()

    def __del__(self):
        try:
            self.close(owner=self.owner)
        except Exception:  # interpreter shutdown: nothing left to report to
            pass

    def __repr__(self):
        state = "closed" if self._closed else f"{self.num_slots} slots on {self.device}, policy={self.policy}"
        return (f"ExpertCache({self.num_layers} layers x {self.num_experts} experts [H={self.hidden}, I={self.inter}, "
                f"{self.dtype}], {state})")
