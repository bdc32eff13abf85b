"""Offloading a patched model's experts: the Offload request, its budget, the checks made before anything
changes, wiring the layers to one ExpertCache (and a predictor), and putting the weights back."""
from __future__ import annotations

import logging
import math
import numbers
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import _C, compat
from ..cache import ExpertCache
from ..cache.expert_cache import record_size
from ..cache.learned import LearnedRoutePredictor
from ..cache.offloaded import OffloadedExperts, PrefetchBudget
from ..cache.predictor import LookaheadPredictor, TokenIdRouter
from ..layers.experts import MoecacheExperts
from .families import FoundExperts, experts_shape, find_router, fused_weights

logger = logging.getLogger(__name__)

POLICIES = ("lru", "lfu", "predictive", "budgeted")
CACHE_OWNER = "moecache.unpatch(model)"
PREDICTING = ("predictive", "budgeted")  # the policies that run a LookaheadPredictor
_BYTE_UNITS = {None: 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@dataclass
class Offload:
    """Keep experts in pinned host memory with only some on the GPU.

    gpu_experts: a fraction of all experts (0 < x <= 1, e.g. 0.25), a count per layer (int), or a byte
        budget ("6GiB", "512MB", or an int with bytes=True).
    policy: "lru" / "lfu": evict the least recently / frequently used expert, and (with prefetch) copy
        the experts the next layer used on the previous step after each layer. "predictive": each layer
        applies the routers of the next `lookahead` layers to its hidden state and prefetches the experts
        they pick while it computes; the cache evicts by those predictions (its "priority" eviction).
        "budgeted": predictive within a PCIe budget: each layer copies only the most confident guesses
        (nearest layer first, then the share of tokens that chose the expert) that its copy allowance
        (`prefetch_limit`) covers, so useless copies do not queue ahead of demand loads; a prefetch never
        evicts the running layer's experts, nor an expert predicted with at least its own priority.
    prefetch: copy ahead of need as the policy says (False: load on demand only; with "predictive" the
        predictions are still made and still steer eviction, so their cost is measured without copies).
    pin: how the host store is page-locked: "alloc" (cudaHostAlloc) or "register" (cudaHostRegister).
    allow_pageable: if page-locking fails, use pageable memory with a warning instead of raising.
    lookahead: how many layers ahead the predictive policy looks (1 or 2 are typical).
    predictor: with policy "predictive" or "budgeted", the path of a LearnedRoutePredictor
        (bench/train_predictor.py writes one) whose heads replace router reuse where they exist; None:
        lookahead gating only.
    device: where the device slots live and the model runs. None: where the experts are (load the model
        onto the GPU first). A CUDA device, for a model loaded in host memory whose experts do not fit the
        GPU: patch moves each layer's experts into the host store as it goes (freeing their memory there,
        so host memory holds about one copy of them, then pins the store in place), then moves every other
        parameter and buffer to the device; unpatch puts the experts back and moves what it moved back.
    prefetch_limit: with policy "budgeted" (and only there; required): the per-layer copy allowance in
        experts, what the copy engine moves while one layer computes; `prefetch_allowance(layer_ms,
        h2d_gbps, record_bytes)` derives it. A fraction accumulates (0.25: one copy every 4 layers). The
        unspent allowance is capped at `lookahead` layers' worth (a copy queued behind more could not
        land before the farthest predicted layer runs), and every expert loaded on demand is paid from
        it (it crosses PCIe ahead of any prefetch). 0 prefetches nothing (as prefetch=False).
    """

    gpu_experts: float | int | str = 0.25
    policy: str = "lru"
    prefetch: bool = True
    bytes: bool = False
    pin: str = "alloc"
    allow_pageable: bool = False
    lookahead: int = 1
    predictor: str | None = None
    prefetch_limit: float | None = None
    device: str | torch.device | None = None

    def __post_init__(self):
        # the same request compares equal however its numbers were made
        for name in ("gpu_experts", "lookahead", "prefetch_limit"):
            setattr(self, name, _plain_number(getattr(self, name)))

    def target_device(self, *, usable: bool = True) -> torch.device | None:
        """`device` as a torch.device (a CUDA one with its index), or None; a clear error for anything else
        (usable=False: the name alone is checked, not this machine's devices)."""
        if self.device is None:
            return None
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"offload device={self.device!r} is not a device (e.g. 'cuda', 'cuda:1' or 'cpu')") from None
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"offload device={self.device!r}: the slots live on a CUDA device or the CPU")
        if device.type == "cuda" and usable:
            if not _C.cuda_available():
                raise ValueError(f"offload device={self.device!r} but moecache._C cannot use CUDA "
                                 f"({_C.cuda_unavailable_reason()})")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            if device.index >= torch.cuda.device_count():
                raise ValueError(f"offload device={self.device!r}: this machine has {torch.cuda.device_count()} "
                                 "CUDA device(s)")
        return device

    def slots(self, num_layers: int, num_experts: int, record_bytes: int) -> int:
        """Device slots for this budget (at least one, at most every expert)."""
        total = num_layers * num_experts
        budget = _plain_number(self.gpu_experts)  # (a field set after construction too)
        if isinstance(budget, str):
            match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*", budget)
            if not match:
                raise ValueError(f"gpu_experts={budget!r}: expected a byte budget such as '6GiB' or '512MB'")
            budget_bytes = float(match.group(1)) * _BYTE_UNITS[match.group(2)]
            slots = int(budget_bytes // record_bytes)
        elif isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"gpu_experts must be a fraction, a per-layer count or a byte budget, got {budget!r}")
        elif self.bytes:
            if not math.isfinite(budget) or budget <= 0:
                raise ValueError(f"gpu_experts={budget!r} with bytes=True: a byte budget must be a positive finite number")
            budget_bytes = budget
            slots = int(budget // record_bytes)
        elif isinstance(budget, float):
            if not 0 < budget <= 1:  # NaN fails this too
                raise ValueError(f"gpu_experts={budget}: a fraction must lie in (0, 1]")
            slots = max(1, math.ceil(budget * total))
        else:
            if not 1 <= budget <= num_experts:
                raise ValueError(f"gpu_experts={budget}: a per-layer count must lie in [1, {num_experts}]")
            slots = budget * num_layers
        if (isinstance(budget, str) or self.bytes) and slots < 1:
            raise ValueError(f"gpu_experts={budget!r} is {budget_bytes / 2**20:.2f} MiB, smaller than one expert "
                             f"({record_bytes / 2**20:.2f} MiB)")
        return min(slots, total)


def gpu_experts_from_text(text: str):
    """A budget as a user types it (an environment variable, a command-line flag) as Offload's gpu_experts
    takes it: digits alone are a per-layer count ("4"), another number a fraction ("0.25", "1.0": all),
    anything else a byte budget ("6GiB"), which Offload.slots checks."""
    text = text.strip()
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _plain_number(value):
    """A numpy number as the Python int or float it stands for; anything else as it is (bools too)."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def prefetch_allowance(layer_ms: float, h2d_gbps: float, record_bytes: int) -> float:
    """The budgeted policy's per-layer copy allowance (Offload.prefetch_limit): how many experts of
    `record_bytes` the host-to-device copies move at `h2d_gbps` (pinned, GB/s = 1e9 bytes/s) while one
    layer computes for `layer_ms`. The lookahead is applied by the policy: unspent allowance is capped at
    `lookahead` layers' worth. E.g. a DeepSeek-VL2-Small expert (3 x 2048 x 1408 bf16, 17.3 MB) at 55 GB/s
    takes 0.31 ms: with 40 us of compute per layer the allowance is 0.13, and with lookahead 2 the cap (0.26)
    stays below one copy: nothing can land in time, so nothing is prefetched."""
    for name, value in (("layer_ms", layer_ms), ("h2d_gbps", h2d_gbps), ("record_bytes", record_bytes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"prefetch_allowance: {name} must be a positive finite number, got {value!r}")
    if not isinstance(record_bytes, numbers.Integral):
        raise ValueError(f"prefetch_allowance: record_bytes must be a whole number of bytes, got {record_bytes!r}")
    allowance = float(layer_ms) * float(h2d_gbps) * 1e6 / int(record_bytes)  # layer time / one copy's time
    if not math.isfinite(allowance):
        raise ValueError(f"prefetch_allowance: {layer_ms} ms at {h2d_gbps} GB/s gives no finite allowance")
    return allowance


def cached_layers(found: list[FoundExperts]) -> list[int]:
    """Which MoE layers (indices into `found`) the one expert cache takes: all of them where their experts
    are of one size, else those of the size that holds the most expert bytes (the first such in model
    order on a tie), and the others stay resident: a cache's slots are of one size (Ernie-4.5-VL's text
    and vision experts, Qwen3-Omni's thinker and talker). Layers in different dtypes are refused."""
    dtypes = {experts_dtype(f) for f in found}
    if len(dtypes) > 1:
        described = ", ".join(f"{f.name}: {experts_shape(f)[0]} experts of {expert_record_bytes(f)} bytes in "
                              f"{experts_dtype(f)}" for f in found)
        raise ValueError(f"offload: one expert cache holds every offloaded layer's experts in slots of one size "
                         f"and dtype, and these layers differ ({described}); convert them to one dtype, or patch "
                         "without offload to run them resident")
    shapes = [cached_shape(f) for f in found]
    held = {}
    for f, shape in zip(found, shapes):
        held[shape] = held.get(shape, 0) + shape[0] * expert_record_bytes(f)
    largest = max(held, key=lambda shape: held[shape])  # max keeps the first of equals: model order
    return [i for i, shape in enumerate(shapes) if shape == largest]


def cached_shape(found: FoundExperts) -> tuple:
    """What layers in one expert cache share: (E, H, I, gated, gate and up interleaved)."""
    num_experts, hidden = experts_shape(found)
    if found.names is not None:
        return num_experts, hidden, getattr(found.mlps[0], found.names.down).weight.shape[1], found.names.gated, False
    transposed, interleaved, _ = compat.experts_flags(found.module)
    down = fused_weights(found.module)[1]
    # the store reads gate and up interleaved only from transposed experts (GPT-OSS's layout)
    return (num_experts, hidden, down.shape[1 if transposed else 2], compat.experts_gated(found.module),
            transposed and interleaved)


def validate_offload(found: list[FoundExperts], offload: Offload, loaded: bool = True) -> None:
    """Everything that can be wrong with an offload request, raised before the model changes; with
    loaded=False (moecache.plan, a model on the meta device) all but where the weights are. Only the
    layers one expert cache takes (cached_layers) are checked as offloaded layers."""
    found = [found[i] for i in cached_layers(found)]
    if offload.policy not in POLICIES:
        raise ValueError(f"offload policy must be one of {POLICIES}, got {offload.policy!r}")
    if isinstance(offload.lookahead, bool) or not isinstance(offload.lookahead, int) or offload.lookahead < 1:
        raise ValueError(f"offload lookahead must be an int >= 1, got {offload.lookahead!r}")
    if offload.predictor is not None:
        if offload.policy not in PREDICTING:
            raise ValueError(f"offload predictor={offload.predictor!r} needs policy='predictive' or 'budgeted'")
        if not Path(offload.predictor).is_file():
            raise ValueError(f"offload predictor={offload.predictor!r}: no such file")
    limit = offload.prefetch_limit
    if offload.policy == "budgeted":
        if limit is None:
            raise ValueError("offload policy 'budgeted' needs prefetch_limit (experts copied per layer of compute; "
                             "moecache.prefetch_allowance(layer_ms, h2d_gbps, record_bytes) derives it)")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not (math.isfinite(limit) and limit >= 0):
            raise ValueError(f"offload prefetch_limit must be a finite number >= 0 (experts per layer), got {limit!r}")
    elif limit is not None:
        raise ValueError(f"offload prefetch_limit={limit!r} needs policy='budgeted', not {offload.policy!r}")
    if offload.policy in PREDICTING:
        routers = [find_router(f.router_block, *experts_shape(f)) for f in found]
        missing = [f.name for f, router in zip(found, routers) if router is None]
        if missing:
            raise ValueError(f"offload policy {offload.policy!r} needs each MoE block's router ([E, H] weight); "
                             f"none found beside {missing[0]}")
        # A block routed by token id is predicted from the token ids its forward is given; given none, not at all.
        if all(isinstance(router, TokenIdRouter) and compat.block_token_ids_reader(f.router_block) is None
               for f, router in zip(found, routers)):
            raise ValueError(f"offload policy {offload.policy!r} has nothing to predict from: every MoE block here "
                             "picks its experts by token id and none is given the token ids: use 'lru' or 'lfu'")
        if offload.predictor is not None:
            _check_predictor_fits(LearnedRoutePredictor.load(offload.predictor), offload.predictor, found)
    wrapped = next((f for f in found if f.kind == "module" and f.attr == "base_layer"), None)
    if wrapped is not None:  # PEFT's adapter layers hold the module they wrap as base_layer
        raise ValueError(f"offload: {wrapped.name} is wrapped by a {type(wrapped.parent).__name__}, which computes with "
                         "the experts' weights, and offload empties them: merge the adapter into the weights first "
                         "(PEFT: merge_and_unload()) or patch without offload")
    devices = set()
    for f in found:
        if f.names is None:
            devices.add(fused_weights(f.module)[0].device)
        else:
            devices.update(getattr(m, n).weight.device for m in f.mlps for n in (*f.names.rows, f.names.down))
    target = offload.target_device(usable=loaded)
    if target is not None and loaded:
        elsewhere = sorted(str(d) for d in devices if d.type != "cpu" and d != target)
        if elsewhere:
            raise ValueError(f"offload device={offload.device!r}: the experts are on {elsewhere[0]}; load them into "
                             f"host memory (the CPU) or onto {target}")
        devices = {target}
    if len(devices) != 1 and loaded:
        raise ValueError(f"offload: the experts live on several devices {sorted(map(str, devices))}; one expert "
                         "cache serves one device: load the experts onto one GPU (or the CPU), or name the GPU "
                         "(Offload(device=...)) for experts in host memory")
    device = devices.pop()
    if device.type == "meta" and loaded:
        raise ValueError("offload: the experts are on the meta device (not loaded)")
    if device.type == "cuda" and loaded and not _C.cuda_available():
        raise ValueError(f"offload: experts are on {device} but moecache._C cannot use CUDA "
                         f"({_C.cuda_unavailable_reason()}); pinned host memory needs it")
    offload.slots(len(found), experts_shape(found[0])[0], expert_record_bytes(found[0]))  # a budget error, before stacking


def bytes_to_move(model: nn.Module, found: list[FoundExperts], device: torch.device) -> int:
    """Bytes of the parameters and buffers, experts aside, that Offload(device=...) moves onto `device`
    (those elsewhere; a tensor shared by several modules counted once)."""
    experts = set()
    for f in found:
        for module in f.modules:
            experts.update(id(t) for t in module.parameters())
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in experts}
    return sum(t.numel() * t.element_size() for t in tensors.values() if t.device != device)


def check_device_room(model: nn.Module, found: list[FoundExperts], offload: Offload) -> None:
    """For Offload(device=<a GPU>): the weights moved there and the slot pool must fit its free memory,
    checked before the host store is filled (which takes minutes for a large model), not after."""
    target = offload.target_device()
    if target is None or target.type != "cuda":
        return
    found = [found[i] for i in cached_layers(found)]  # experts of other sizes move with the rest
    moved = bytes_to_move(model, found, target)
    pool = offload.slots(len(found), experts_shape(found[0])[0], expert_record_bytes(found[0])) * \
        expert_record_bytes(found[0])
    free, total = torch.cuda.mem_get_info(target)
    if moved + pool > free:
        raise ValueError(f"offload device={offload.device!r}: the model's other weights ({moved / 2**30:.2f} GiB, "
                         "experts the cache does not take included) and "
                         f"the expert slots ({pool / 2**30:.2f} GiB) need {(moved + pool) / 2**30:.2f} GiB of GPU "
                         f"memory but {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB is free: lower gpu_experts")


def experts_dtype(found) -> torch.dtype:
    if found.names is None:
        return fused_weights(found.module)[0].dtype
    return getattr(found.mlps[0], found.names.gate).weight.dtype


def expert_record_bytes(found: FoundExperts) -> int:
    """One expert's bytes in a device slot (gate/up and down, aligned as the cache stores them)."""
    if found.names is None:
        first, down = fused_weights(found.module)
        gate_up, down = [first[0]], down[0]
    else:
        gate_up = [getattr(found.mlps[0], n).weight for n in found.names.rows]
        down = getattr(found.mlps[0], found.names.down).weight
    return record_size(sum(w.numel() for w in gate_up) * down.element_size(), down.numel() * down.element_size())


def _check_predictor_fits(learned: LearnedRoutePredictor, path, found: list[FoundExperts]) -> None:
    num_experts, hidden = experts_shape(found[0])
    if (learned.hidden, learned.num_experts) != (hidden, num_experts):
        raise ValueError(f"offload predictor={str(path)!r} was trained for hidden size {learned.hidden} and "
                         f"{learned.num_experts} experts; this model's MoE layers have {hidden} and {num_experts}")
    beyond = sorted(t for t, _ in learned.targets if t >= len(found))
    if beyond:
        raise ValueError(f"offload predictor={str(path)!r} predicts MoE layer {beyond[0]}; this model has "
                         f"{len(found)} MoE layers (numbered from 0)")


def offload_experts(model: nn.Module, layers: list[tuple[nn.Module, MoecacheExperts]], offload: Offload):
    """Move the layers' experts (in layer order, with their MoE blocks) to one ExpertCache and give each
    layer an OffloadedExperts provider; the memory the experts held is freed layer by layer as the host
    store takes them. With `offload.device` naming another device than the experts', every other
    parameter and buffer of `model` is moved there. Transactional: on any failure (Ctrl-C too) the model
    is as it was. Returns (cache, predictor or None, what was moved: for move_back)."""
    modules = [m for _, m in layers]
    E = modules[0].num_experts
    gate_up, down = modules[0].weights()
    device = offload.target_device() or gate_up.device
    if offload.device is None and device.type == "cpu" and _C.cuda_available():
        logger.warning("moecache.patch: the experts are in host memory and the Offload names no device, so the "
                       "slots and the model stay on the CPU; Offload(device='cuda') runs it on the GPU")
    record_bytes = record_size(gate_up[0].numel() * gate_up.element_size(), down[0].numel() * down.element_size())
    del gate_up, down
    num_slots = offload.slots(len(modules), E, record_bytes)
    learned = None
    if offload.policy in PREDICTING and offload.predictor:
        learned = LearnedRoutePredictor.load(offload.predictor, device=device)
    # a generator: each layer's tensors are held by the cache's source for that layer alone, dropped once stored
    cache = ExpertCache((m.original if m.stacked is None else m.stacked.weights() for m in modules),
                        num_slots=num_slots, policy="priority" if offload.policy in PREDICTING else offload.policy,
                        device=device, pin=offload.pin, allow_pageable=offload.allow_pageable,
                        release_sources=_HandOver(modules))
    cache.owner = CACHE_OWNER
    moved = []
    try:
        if offload.device is not None:
            moved = move_to(model, device)
        predictor = budget = None
        if offload.policy == "budgeted":
            budget = PrefetchBudget(offload.prefetch_limit, offload.lookahead)
        if offload.policy in PREDICTING:  # the routers read where they now are
            routers = [find_router(block, m.num_experts, m.hidden_size) for block, m in layers]
            predictor = LookaheadPredictor(routers, depth=offload.lookahead, learned=learned)
    except BaseException:
        move_back(moved)
        for layer, module in enumerate(modules):
            _put_back(module, *cache.host_weights(layer))
        cache.close(owner=CACHE_OWNER)
        raise
    providers = [OffloadedExperts(cache, layer, predictor=predictor, prefetch=offload.prefetch, budget=budget)
                 for layer in range(len(modules))]
    for provider, nxt in zip(providers, providers[1:]):
        provider.next = nxt
    for module, provider in zip(modules, providers):
        module.provider = provider
    logger.info("moecache.patch: %d layers x %d experts offloaded to %s host memory; %d slots on %s (%.2f GiB)%s",
                len(modules), E, "pinned" if cache.pinned else "pageable", num_slots, device,
                num_slots * cache.record_bytes / 2**30,
                f"; {len(moved)} other parameters and buffers moved to {device}" if moved else "")
    return cache, predictor, moved


class _HandOver:
    """ExpertCache's release_sources for an offload: a layer's experts' memory is freed as soon as the
    host store holds them, and put back (copied from the store) if the cache cannot be made."""

    def __init__(self, modules: list[MoecacheExperts]):
        self.modules = modules

    def release(self, layer: int) -> None:
        module = self.modules[layer]
        if module.stacked is not None:
            module.stacked.free_weights()
        else:
            for param in module.fused_parameters():
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def restore(self, layer: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        _put_back(self.modules[layer], gate_up, down)


def _put_back(module: MoecacheExperts, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """A layer's master weights (from the host store) copied back into its parameters, bit-exact (they were
    copied, not cast)."""
    if module.stacked is not None:
        module.stacked.load_weights(gate_up, down)
        return
    if module.layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    # the Parameters the patched module holds now: unpatch gives those to the original (a conversion under
    # torch's overwrite-on-conversion flag, or a load with assign=True, made new ones)
    for param, src in zip(module.fused_parameters(), (gate_up, down)):
        # a copy: never a view of the store the cache is about to release
        param.data = src.to(device=param.device, dtype=param.dtype, memory_format=torch.contiguous_format, copy=True)


def move_to(model: nn.Module, device: torch.device) -> list:
    """Move every parameter and buffer of `model` that is not on `device` there (a tensor shared by
    several modules once: a tied weight stays tied). Returns what moved, for move_back."""
    moved, buffers = [], {}
    try:
        for param in {id(p): p for p in model.parameters()}.values():
            if param.device != device:
                moved.append((param, None, param.device))
                param.data = param.data.to(device)
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.device != device:
                    moved.append((module, name, buffer.device))
                    if id(buffer) not in buffers:
                        buffers[id(buffer)] = (buffer, buffer.to(device))  # the original kept: ids stay unique
                    module._buffers[name] = buffers[id(buffer)][1]
    except BaseException:
        move_back(moved)
        raise
    return moved


def move_back(moved: list) -> None:
    """Undo move_to: each parameter and buffer goes back to the device it was on."""
    copies = {}
    for owner, name, device in reversed(moved):
        if name is None:
            owner.data = owner.data.to(device)
        else:
            buffer = owner._buffers[name]
            if id(buffer) not in copies:
                copies[id(buffer)] = buffer.to(device)
            owner._buffers[name] = copies[id(buffer)]


NOT_COPYABLE = ("a model whose experts moecache offloaded cannot be pickled or copied (pinned host memory, "
                "device slots, a copy engine): save its state_dict (it holds the real weights), or unpatch it "
                "(moecache.unpatch) before deepcopy or torch.save(model)")


class _OffloadHook:
    """Hooks an offloaded model carries: pickling or copying them (torch.save(model), deepcopy) raises
    the same clear error as the expert cache would, before anything else is pickled."""

    def __reduce__(self):
        raise TypeError(NOT_COPYABLE)

    def __deepcopy__(self, memo):
        raise TypeError(NOT_COPYABLE)


class _OffloadedState(_OffloadHook):
    """state_dict() of an offloaded fused experts module: the master copies from the host store, in place
    of the freed device parameters."""

    def __init__(self, module: MoecacheExperts):
        # Weakly: the hook lives in the module's own hook table, and a strong reference back would keep a
        # dropped model, and its expert cache (host store, device slots), alive until the cycle collector runs.
        self.module = weakref.ref(module)

    def __call__(self, _, state_dict, prefix, local_metadata):
        masters = _host_masters(self.module())
        if masters is None:
            return
        module, gate_up, down = masters
        if module.layout.transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        _put_masters(state_dict, prefix, dict(zip(module.layout.parameter_names, (gate_up, down))))


class _OffloadedLinearState(_OffloadHook):
    """state_dict() of one linear layer of an offloaded list expert (so of any module above it too): its
    weight's master copy from the host store."""

    def __init__(self, module: MoecacheExperts, expert: int, linear: str):
        self.module, self.expert, self.linear = weakref.ref(module), expert, linear  # weakly: as above

    def __call__(self, _, state_dict, prefix, local_metadata):
        masters = _host_masters(self.module())
        if masters is None:
            return
        module, gate_up, down = masters
        names = module.stacked.names
        if self.linear == names.down:
            weight = down[self.expert]
        else:
            inter, row = down.shape[2], names.rows.index(self.linear)
            weight = gate_up[self.expert, row * inter:(row + 1) * inter]
        _put_masters(state_dict, prefix, {"weight": weight})


def _host_masters(module: MoecacheExperts | None):
    """(module, gate_up, down) of an offloaded layer's master copies in the host store; None once the
    layer is no longer offloaded (or gone)."""
    provider = getattr(module, "provider", None)
    if not isinstance(provider, OffloadedExperts):
        return None
    return (module, *provider.cache.host_weights(provider.layer))


def _put_masters(state_dict: dict, prefix: str, weights: dict) -> None:
    """Clones (the store stays the cache's), in the dtype the model's parameters now have (a conversion
    after patch, which forward refuses, still gives a checkpoint of one dtype), as unpatch restores them."""
    for name, tensor in weights.items():
        freed = state_dict.get(prefix + name)  # the emptied parameter, in the dtype it now has
        dtype = tensor.dtype if freed is None else freed.dtype
        state_dict[prefix + name] = tensor.to(dtype, memory_format=torch.contiguous_format, copy=True)


class _RefuseLoad(_OffloadHook):
    def __call__(self, *args, **kwargs):
        raise RuntimeError("load_state_dict on a model whose experts moecache offloaded: the weights live in the "
                           "expert cache. Call moecache.unpatch(model), load, then patch it again; nothing was "
                           "loaded")


class _RefuseConverted(_OffloadHook):
    """A conversion of the model (model.half(), .to(dtype), even .half().float()) gives the freed
    parameters new storage but never reaches the masters in the host store: the forward refuses, where
    it would compute with weights the model no longer says it has."""

    def __init__(self, module: MoecacheExperts):
        self.module = weakref.ref(module)  # weakly: as _OffloadedState
        self.storage = _first_freed(module).untyped_storage()._cdata

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return
        module = self.module()
        if module is not None and isinstance(module.provider, OffloadedExperts) \
                and _first_freed(module).untyped_storage()._cdata != self.storage:
            raise TypeError("the model was converted (model.half(), .to(dtype) and the like) after moecache "
                               "offloaded its experts: their weights stay in the expert cache as they were at "
                               "patch, which the conversion never reached. Call moecache.unpatch(model), convert, "
                               "then patch it again")


def _first_freed(module: MoecacheExperts) -> torch.Tensor:
    """The parameter whose storage a conversion replaces, as it does every other one's."""
    if module.stacked is None:
        return module.fused_parameters()[0]
    return getattr(module.stacked.experts[0], module.stacked.names.gate).weight


class _RefuseMLPCall(_OffloadHook):
    def __call__(self, *args, **kwargs):
        raise RuntimeError("an expert MLP whose weights moecache offloaded was called directly (a family's "
                           "training-mode forward runs its MLPs itself): call model.eval(), or unpatch the "
                           "model to train it")


def install_state_hooks(model: nn.Module, modules: list[MoecacheExperts]) -> list:
    """Keep an offloaded model's weights where users look for them: state_dict() (and so save_pretrained
    and torch.save of the state dict) returns the master copies from the host store in place of the
    freed device parameters; load_state_dict refuses before loading anything; an expert MLP of a list
    family called directly (its weights freed) says why it cannot run. Returns the hook handles."""
    handles = []
    holders = set()
    for module in modules:
        handles.append(module.register_forward_pre_hook(_RefuseConverted(module)))
        if module.stacked is None:
            # on the module in the model tree: the patched one, or the original it reads (Llama 4's)
            handles.append(module.parameter_holder.register_state_dict_post_hook(_OffloadedState(module)))
        else:  # on each linear layer: a state_dict of it, its expert or anything above gets the masters
            names = module.stacked.names
            for e, mlp in enumerate(module.stacked.experts):
                for linear in (*names.rows, names.down):
                    handles.append(getattr(mlp, linear).register_state_dict_post_hook(
                        _OffloadedLinearState(module, e, linear)))
                    holders.add(id(getattr(mlp, linear)))
        holders.update(id(m) for m in (module, module.original))
        if module.stacked is not None:
            handles += [mlp.register_forward_pre_hook(_RefuseMLPCall()) for mlp in module.stacked.experts]
            holders.update(id(mlp) for mlp in module.stacked.experts)
    # Every module whose state holds offloaded weights refuses a load, the model and each submodule on
    # the way down (a load into a decoder layer too): its hook runs before anything below it is loaded.
    names = [name for name, m in model.named_modules(remove_duplicate=False) if id(m) in holders]
    prefixes = {""} | {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}
    for name, m in model.named_modules():
        if name in prefixes:
            handles.append(m.register_load_state_dict_pre_hook(_RefuseLoad()))
    return handles


class _ShareTokenIds(_OffloadHook):
    """Before an MoE block runs: gives the predictor the step's token ids the block was called with (None
    where its forward takes none), so that the layers routed by token id ahead are predicted from this
    step's ids, never from an earlier step's."""

    def __init__(self, block: nn.Module, predictor: LookaheadPredictor):
        self.read = compat.block_token_ids_reader(block)
        self.predictor = predictor

    def __call__(self, block, args, kwargs):
        if not torch.compiler.is_compiling():
            self.predictor.token_ids = None if self.read is None else self.read(args, kwargs)


def install_token_id_hooks(blocks: list[nn.Module], predictor: LookaheadPredictor | None) -> list:
    """Where some MoE layer picks its experts by token id, a hook on every MoE block that hands the
    predictor the token ids of the step running (see _ShareTokenIds). Returns the hook handles."""
    if predictor is None or not any(isinstance(r, TokenIdRouter) for r in predictor.routers):
        return []
    return [block.register_forward_pre_hook(_ShareTokenIds(block, predictor), with_kwargs=True) for block in blocks]


def restore_offloaded(modules: list[MoecacheExperts], cache: ExpertCache) -> None:
    """Copy each offloaded layer's master weights back into the original parameters (bit-exact: they were
    copied, not cast), then close the cache."""
    if cache._closed:
        if not any(isinstance(module.provider, OffloadedExperts) for module in modules):
            return  # an unpatch interrupted after it had put every layer back: nothing is missing
        raise RuntimeError("the expert cache was closed before unpatch: the offloaded experts' weights are gone")
    cache.synchronize()
    for module in modules:
        provider = module.provider
        if not isinstance(provider, OffloadedExperts):
            continue
        _put_back(module, *cache.host_weights(provider.layer))
        module.provider = None
    cache.close(owner=CACHE_OWNER)
