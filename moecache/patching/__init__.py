"""moecache.patch(model): swap a loaded model's routed-experts modules (and its MLA attention) for
moecache's, in place; unpatch puts the exact originals back.

Hook chosen: the experts module itself (transformers 5.x `*Experts`, called as
experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])), not the whole MoE block and not
transformers' ExpertsInterface. The router, shared experts and block stay the model's own, so routing
(softmax or sigmoid, groups, correction bias, scaling) and return values (router logits for auxiliary
losses) are the model's exactly. ExpertsInterface selects one function per *config* by name and keeps
no per-layer state; offload needs per-layer state (cache, layer index, prefetching), and module
swapping is reversible object by object, so unpatch can restore the exact originals.

patch() runs in four steps: plan (what can be replaced, what is left alone and why), validate (every
error raised before the model changes), apply (swap modules, wire offload, install the generate hook),
record (what unpatch and stats need).
"""
from __future__ import annotations

import logging
from dataclasses import astuple, dataclass, field, replace
from functools import partial

from torch import nn

from ..cache import ExpertCache
from ..compat import install_output_recorders, remove_output_recorders
from ..layers.experts import MoecacheExperts, WeakLink
from ..layers.mla import MoecacheMLA
from .attention import AttentionPlan, plan_attention
from .families import (
    HOOKS,
    FoundExperts,
    UnsupportedExperts,
    bypassed_roots,
    experts_shape,
    find_experts,
    find_router,
    installed,
    layout_for,
    make_experts,
)
from .generate import install_latent_cache_default, remove_latent_cache_default
from .hooks import HookCount, give_back_hooks, settle_hooks, share_hooks, unwatch_hooks, unwatch_tree, watch_hooks
from .offload import (
    Offload,
    cached_layers,
    cached_shape,
    check_device_room,
    expert_record_bytes,
    experts_dtype,
    install_state_hooks,
    install_token_id_hooks,
    move_back,
    offload_experts,
    prefetch_allowance,
    restore_offloaded,
    validate_offload,
)

logger = logging.getLogger(__name__)

__all__ = ["patch", "unpatch", "plan", "stats", "reset_stats", "Offload", "prefetch_allowance", "patched_experts",
           "routers", "expert_cache"]

_STATE = "_moecache_patch"
_LEFT_ALONE = "_moecache_left_alone"
_PATCH_CALLED = "_moecache_patch_called"  # patch ran on this module (and maybe found everything patched)
_MADE_BY = "_moecache_made_by"  # on each module (or override) patch puts in place: a weak reference to its state


@dataclass
class Replacement:
    """`new` took `original`'s place at parent.attr: as a module (kind "module", MLA attention), or as an
    instance override of a method (other kinds; `hook` is what was set there)."""

    name: str
    parent: nn.Module
    attr: str
    original: nn.Module
    new: nn.Module
    kind: str = "module"
    hook: object = None
    block: nn.Module | None = None  # the MoE block whose router routes these experts


@dataclass
class PatchState:
    """What a patched model carries: the replacements in the order made, the expert cache and predictor."""

    replaced: list[Replacement] = field(default_factory=list)
    cache: ExpertCache | None = None
    offload: Offload | None = None  # what the cache was built for
    predictor: object = None
    hooks: list = field(default_factory=list)  # state-dict hook handles, removed by unpatch
    restored: bool = False  # unpatch ran (through this model, or a shallow copy sharing its modules)
    recorders: list = field(default_factory=list)  # transformers' output recorders patch installed
    watched: list = field(default_factory=list)  # hook tables of parts the kernels do not call
    moved: list = field(default_factory=list)  # parameters and buffers offload moved to Offload.device


def _state_of(model: nn.Module) -> PatchState | None:
    """The model's patch state; None once the modules were restored. copy.copy(model) shares the
    submodules and this state with the original, so unpatching either restores both: the other one's
    state is dropped here, with its generate hook."""
    state: PatchState | None = model.__dict__.get(_STATE)
    if state is not None and state.restored:
        del model.__dict__[_STATE]
        remove_latent_cache_default(model, state)  # the hooks it left where unpatch did not look
        return None
    return state


@dataclass
class _Plan:
    experts: list[tuple[FoundExperts, object]] = field(default_factory=list)  # (found, layout) to replace
    attention: list[AttentionPlan] = field(default_factory=list)
    experts_requested: bool = True
    experts_found: int = 0  # routed-experts modules in the model, patched or not
    experts_patched: int = 0  # already MoecacheExperts
    experts_left_alone: list[str] = field(default_factory=list)  # why each unsupported experts module stays


def patch(model: nn.Module, *, experts: bool = True, attention: bool = True, offload: Offload | None = None,
          strict: bool = False) -> nn.Module:
    """Replace the model's routed-experts modules with moecache's, in place; returns the model.

    Args:
        experts: swap experts modules for MoecacheExperts (same parameters, no copy).
        attention: replace DeepSeek-V2/V3 MLA attention modules (and modules shaped like DeepSeek's own
            code) with MoecacheMLA, and make model.generate use a paged LatentKVCache.
        offload: an Offload to keep experts in pinned host memory with a GPU slot pool.
        strict: raise instead of leaving a module alone (with one warning) when it cannot be patched.
    """
    _check_module(model)
    if offload is not None and not isinstance(offload, Offload):
        raise TypeError(f"offload must be a moecache.Offload or None, got {type(offload).__name__}")
    if offload is not None and not experts:
        raise ValueError("offload moves the experts patch replaces: it needs experts=True")
    left_alone: list[dict] = []
    try:
        plan = _plan(model, experts, attention, strict, left_alone)
        _validate(model, plan, offload, strict)
        _apply(model, plan, offload)
        model.__dict__[_PATCH_CALLED] = True
    finally:
        _record_left_alone(model, left_alone)
    return model


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _plan(model, experts: bool, attention: bool, strict: bool, left_alone: list) -> _Plan:
    plan = _Plan(attention=plan_attention(model, strict, left_alone) if attention else [], experts_requested=experts)
    if not experts:
        return plan
    unsupported: list = []
    found = find_experts(model, unsupported)
    for name, cls, reason in unsupported:
        if strict:
            raise ValueError(f"moecache.patch: {name} ({cls}): {reason}")
        left_alone.append({"name": name, "kind": "experts", "type": cls, "reason": reason})
        plan.experts_left_alone.append(reason)
    plan.experts_found = len(found)
    sharing = _layers_sharing_weights(found)
    for f in found:
        if isinstance(f.module, MoecacheExperts) or isinstance(f.parent.__dict__.get(f.attr), HOOKS):
            plan.experts_patched += 1
            continue
        try:
            if f.name in sharing:
                raise UnsupportedExperts(f"expert weights shared with {sharing[f.name]}")
            layout = layout_for(model, f)
        except UnsupportedExperts as unsupported:
            reason = str(unsupported)
            if strict:
                raise ValueError(f"moecache.patch: {f.name} ({type(f.module).__name__}) uses {reason}") from None
            left_alone.append({"name": f.name, "kind": "experts", "type": type(f.module).__name__, "reason": reason})
            plan.experts_left_alone.append(reason)
            continue
        plan.experts.append((f, layout))
    return plan


def _layers_sharing_weights(found: list[FoundExperts]) -> dict[str, str]:
    """List-expert layers holding a parameter another layer holds too -> that other layer. A parameter
    can view one stack only (the other layer would keep a stale copy) and offload frees what it stacks,
    so every layer of a sharing pair is left alone, patched or not before."""
    holders: dict[int, list[str]] = {}
    for f in found:
        if f.names is not None:
            for pid in {id(p) for m in f.mlps for p in m.parameters()}:
                holders.setdefault(pid, []).append(f.name)
    sharing = {}
    for names in holders.values():
        for name in names:
            other = next((n for n in names if n != name), None)
            if other is not None:
                sharing.setdefault(name, other)
    return sharing


def _validate(model, plan: _Plan, offload: Offload | None, strict: bool) -> None:
    state: PatchState | None = _state_of(model)
    if not plan.experts_requested:
        return
    if plan.experts_found == 0 and not plan.experts_left_alone and (
            offload is not None or (strict and not plan.attention)):
        raise ValueError(_no_experts_message(model))
    if (plan.experts_found or plan.experts_left_alone) and not plan.experts and not plan.experts_patched \
            and (strict or offload is not None):
        reason = f": {plan.experts_left_alone[0]}" if plan.experts_left_alone else ""
        raise ValueError(f"moecache.patch: no experts module could be patched{reason}")
    if offload is not None:
        if not plan.experts and state is not None and state.cache is None:
            raise ValueError("moecache.patch: the model is already patched without offload; unpatch it first")
        if plan.experts and state is not None and any(isinstance(r.new, MoecacheExperts) for r in state.replaced):
            # One expert cache numbers the layers it was built with; a second one would hold others.
            raise ValueError(f"moecache.patch: the model is already patched, and {plan.experts[0][0].name} is not: "
                             "unpatch it first to offload it with more layers")
        if state is not None and state.cache is not None and not _same_offload(offload, state.offload):
            raise ValueError(f"moecache.patch: the model is already offloaded with {state.offload}; unpatch it "
                             f"first to offload it with {offload}")
        if plan.experts:
            validate_offload([f for f, _ in plan.experts], offload)
            check_device_room(model, [f for f, _ in plan.experts], offload)


def _same_offload(a: Offload, b: Offload | None) -> bool:
    """Equal fields of equal types: gpu_experts=1 (one expert per layer) is not gpu_experts=1.0 (all); the
    device compared as the device it names ('cuda' is 'cuda:0' where that is the current one)."""
    if b is None or a.target_device() != b.target_device():
        return False
    return all(x == y and type(x) is type(y) for x, y in zip(astuple(replace(a, device=None)), astuple(replace(b, device=None))))


def _no_experts_message(model) -> str:
    return (f"moecache.patch: no MoE experts found in {type(model).__name__} "
            f"(model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}); nothing was patched")


def _apply(model, plan: _Plan, offload: Offload | None) -> None:
    state: PatchState = _state_of(model) or PatchState()
    if plan.experts_requested and plan.experts_found == 0 and not plan.experts_left_alone and not plan.attention:
        logger.warning(_no_experts_message(model))  # (modules left alone get their own warning)
    elif not plan.experts and not plan.attention and plan.experts_patched:
        logger.info("moecache.patch: %s is already patched; nothing more to do", type(model).__name__)

    new_experts = []
    for f, layout in plan.experts:
        new = make_experts(f, layout)
        new_experts.append(Replacement(f.name, f.parent, f.attr, f.module, new, f.kind, installed(f, new),
                                       f.router_block))
    offloaded, resident = [], new_experts
    if offload is not None and new_experts:
        cached = set(cached_layers([f for f, _ in plan.experts]))
        offloaded = [r for i, r in enumerate(new_experts) if i in cached]
        resident = [r for i, r in enumerate(new_experts) if i not in cached]
        if resident:
            logger.warning("moecache.patch: the MoE layers hold experts of %d shapes and one expert cache takes one: "
                           "the %d layers of %d experts of %.2f MiB (%s, ...) are offloaded, the other %d stay "
                           "resident (%s, ...)", len({cached_shape(f) for f, _ in plan.experts}), len(offloaded),
                           offloaded[0].new.num_experts, expert_record_bytes(plan.experts[min(cached)][0]) / 2**20,
                           offloaded[0].name, len(resident), resident[0].name)
        try:
            state.cache, state.predictor, state.moved = offload_experts(
                model, [(r.block, r.new) for r in offloaded], offload)
            state.offload = replace(offload)  # a snapshot: the caller's object may change later
        except BaseException:  # Ctrl-C while the host store fills, too: the model stays as it was
            for r in new_experts:
                if r.new.stacked is not None:
                    r.new.stacked.unstack()
            raise
    for r in new_experts:
        if r.kind == "module":
            share_hooks(r.original, r.new)
            setattr(r.parent, r.attr, r.new)
        else:
            object.__setattr__(r.parent, r.attr, r.hook)  # an instance override, not a submodule
            if r.parent is r.original:
                r.new.hold_original_weakly()
        state.replaced.append(r)
        logger.info("moecache.patch: %s (%s, %d experts) -> MoecacheExperts(%s)%s", r.name, type(r.original).__name__,
                    r.new.num_experts, r.new.layout.activation_text, " offloaded" if offload else "")
    if plan.attention:  # the original attention modules keep recording output_attentions
        state.recorders += install_output_recorders(model)
    new_attention = []
    for a in plan.attention:
        new = MoecacheMLA(a.module, **a.kwargs)
        share_hooks(a.module, new)
        setattr(a.parent, a.attr, new)
        new_attention.append(Replacement(a.name, a.parent, a.attr, a.module, new))
        state.replaced.append(new_attention[-1])
        logger.info("moecache.patch: %s (%s, %d heads) -> MoecacheMLA (latent cache of %d values per token)", a.name,
                    type(a.module).__name__, new.num_heads, new.kv_lora_rank + new.qk_rope_head_dim)
    if plan.attention:
        install_latent_cache_default(model, state)
    # A hook registered on a part the kernels do not call makes the layer's forward refuse (the latent path,
    # for kv_b_proj); moecache's own (offload's, on the MLPs) are installed below and settled as the baseline
    watched = []
    for (f, _), r in zip(plan.experts, new_experts):
        r.new.hook_count = HookCount()
        for root, include_root in bypassed_roots(f):
            watched += watch_hooks(root, include_root=include_root, count=r.new.hook_count)
    for r in new_attention:
        r.new.hook_count = HookCount()
        watched += watch_hooks(r.original.kv_b_proj, include_root=True, count=r.new.hook_count)
    state.watched += watched
    if new_experts:
        if offloaded:
            state.hooks += install_state_hooks(model, [r.new for r in offloaded])
            state.hooks += install_token_id_hooks([r.block for r in offloaded], state.predictor)
        for r in resident:
            stacked = r.new.stacked
            for mlp in stacked.experts if stacked is not None else ():
                # on each MLP and each of its linear layers: a load into one, or into any module above
                # it, runs its hooks (a restack done already is not done again)
                for module in (mlp, *(getattr(mlp, n) for n in (*stacked.names.rows, stacked.names.down))):
                    state.hooks.append(module.register_load_state_dict_post_hook(
                        partial(_restack_after_load, WeakLink(stacked))))
    settle_hooks(watched)
    for r in [*new_experts, *new_attention]:  # a copy of one (a layer deep-copied into the model) says whose
        for made in {id(r.new): r.new, id(r.hook): r.hook}.values():
            if made is not None:
                made.__dict__[_MADE_BY] = _MadeBy(state)
    if state.replaced:
        setattr(model, _STATE, state)


class _MadeBy(WeakLink):
    """A weak reference to the patch state that made a module: a deep copy of a layer keeps pointing at
    the same state; a pickle drops it (the state would drag the whole model into a pickle of one layer;
    an unpickled model knows its modules from its own state's records)."""

    __slots__ = ()

    def __reduce__(self):
        return _MadeBy, (None,)

    def __deepcopy__(self, memo):
        state = self()
        return _MadeBy(memo.get(id(state), state))


def _restack_after_load(stacked_ref, module, incompatible_keys) -> None:
    """load_state_dict(..., assign=True) puts new Parameter objects in the model: stacked list experts
    are stacked again from them (with assign=False the copies land in the stack's views). The hooks sit
    on MLPs the stack holds: they link to it weakly."""
    stacked = stacked_ref()
    if stacked is not None and stacked.is_stacked() and stacked.layers_as_patched() and not stacked.is_current():
        stacked.stack()


def _record_left_alone(model: nn.Module, left_alone: list[dict]) -> None:
    """One warning per patch() call for everything asked for but left alone, with counts and reasons;
    stats(model)["left_alone"] lists each module."""
    if not left_alone:
        model.__dict__.pop(_LEFT_ALONE, None)
        return
    model.__dict__[_LEFT_ALONE] = left_alone  # plain attribute: never a submodule or parameter
    by_reason: dict[tuple[str, str], int] = {}
    for item in left_alone:
        by_reason[(item["kind"], item["reason"])] = by_reason.get((item["kind"], item["reason"]), 0) + 1
    parts = [f"{count} {kind} module{'s' if count > 1 else ''} ({reason})" for (kind, reason), count in by_reason.items()]
    logger.warning("moecache.patch: left alone in %s: %s; moecache.stats(model)['left_alone'] names them",
                   type(model).__name__, "; ".join(parts))


# ------------------------------------------------------------------ unpatch, stats, accessors
def unpatch(model: nn.Module) -> nn.Module:
    """Put the original modules and weights back exactly; returns the model."""
    _check_module(model)
    state: PatchState | None = _state_of(model)
    model.__dict__.pop(_LEFT_ALONE, None)
    patch_called = model.__dict__.pop(_PATCH_CALLED, False)
    if state is None:
        # A wrapper put around a patched model (PEFT's get_peft_model) and never patched itself: its unpatch
        # is the model's. One whose own patch found everything patched already keeps the models' patches.
        inner = [] if patch_called else _patched_inside(model)
        for module in inner:
            unpatch(module)
        if not inner:
            logger.info("moecache.unpatch: %s is not patched", type(model).__name__)
        return model
    experts = [r.new for r in state.replaced if isinstance(r.new, MoecacheExperts)]
    _check_no_parametrization(model, state, experts)
    for handle in state.hooks:
        handle.remove()
    move_back(state.moved)  # first: the experts go back onto the device their parameters were on
    state.moved = []
    if state.cache is not None:
        restore_offloaded(experts, state.cache)
    remove_latent_cache_default(model, state)
    remove_output_recorders(state.recorders)
    unwatch_hooks(state.watched)
    holders = _holders(model, state)
    for r in reversed(state.replaced):
        if r.kind == "module":
            _put_original_back(r.new, holders.get(id(r.new), ()))
        else:
            r.parent.__dict__.pop(r.attr, None)  # the class's own method again (gone already on a retry)
            _unstack(r.new)
        if isinstance(r.new, MoecacheExperts):
            _give_back_parameters(r.new, r.original)
            r.new.provider = None
    strays = _restore_strays(model, state)
    state.restored = True
    delattr(model, _STATE)
    logger.info("moecache.unpatch: restored %d modules", len(state.replaced) + strays)
    return model


def _check_no_parametrization(model: nn.Module, state: PatchState, experts: list[MoecacheExperts]) -> None:
    """A parametrization registered on patched experts cannot move to the original module exactly (its
    right_inverse would run again on the weights): refused before unpatch changes anything."""
    from torch.nn.utils import parametrize

    names = {id(h.module): h.name for h in _patched_in_tree(model, state)}
    for module in dict.fromkeys([*experts, *(h.module for h in _patched_in_tree(model, state))]):
        if isinstance(module, MoecacheExperts) and parametrize.is_parametrized(module):
            tensors = ", ".join(module.parametrizations.keys())
            raise ValueError(f"moecache.unpatch: the patched experts {names.get(id(module), type(module).__name__)} "
                             f"hold a parametrization of {tensors} (torch.nn.utils.parametrize, registered after "
                             "patch), which unpatch cannot carry to the original module; remove it first "
                             "(parametrize.remove_parametrizations(module, name, leave_parametrized=True) keeps "
                             "its values) and unpatch again. Nothing was changed")


@dataclass
class _Held:
    """A module (or, for list experts, a method override) this patch made, where the model holds it now."""

    name: str              # as stats names it (list experts: as find_experts names them)
    parent: nn.Module
    attr: str
    made: object           # parent._modules[attr], or the override in parent.__dict__[attr]
    module: nn.Module      # the MoecacheExperts or MoecacheMLA
    listed: bool           # made at patch (in state.replaced), not copied in since

    @property
    def is_override(self) -> bool:
        return self.parent.__dict__.get(self.attr) is self.made


def _patched_in_tree(model: nn.Module, state: PatchState) -> list[_Held]:
    """Every experts and MLA module this patch made that the model holds now, in module order: a layer
    copied in since patch is there (a copy keeps the weak reference to the state, which a deep copy does
    not copy), a layer removed since is not. Modules another patch made (of a model inside, or around)
    are that patch's."""
    known = {id(r.new) for r in state.replaced} | {id(r.hook) for r in state.replaced}

    def mine(made) -> bool:
        made_by = getattr(made, "__dict__", {}).get(_MADE_BY)
        return id(made) in known or (made_by is not None and made_by() is state)

    held = []
    for name, parent in model.named_modules():
        prefix = f"{name}." if name else ""
        for attr in ("moe_infer", "forward"):
            override = parent.__dict__.get(attr)
            if isinstance(override, HOOKS) and mine(override):
                experts = override if isinstance(override, MoecacheExperts) else override.experts
                label = name if getattr(override, "kind", None) == "switch" else prefix + "experts"
                held.append(_Held(label, parent, attr, override, experts, id(override) in known))
        for attr, child in parent._modules.items():
            if isinstance(child, (MoecacheExperts, MoecacheMLA)) and mine(child):
                held.append(_Held(prefix + attr, parent, attr, child, child, id(child) in known))
    return held


def _restore_strays(model: nn.Module, state: PatchState) -> int:
    """Patched modules this state made but does not list, copied in since patch (`layers[2] =
    copy.deepcopy(layers[0])` deep-copies the patched modules with their originals): put back as the
    others. Returns how many."""
    strays = [h for h in _patched_in_tree(model, state) if not h.listed]
    for h in strays:
        if h.is_override:
            del h.parent.__dict__[h.attr]
            _unstack(h.module)
            for mlp in h.module.stacked.experts:
                unwatch_tree(mlp)
        else:
            _put_original_back(h.module, [(h.parent, h.attr)])
            if isinstance(h.module, MoecacheExperts):
                _give_back_parameters(h.module, h.module.original)
            unwatch_tree(h.module.original)
    return len(strays)


def _put_original_back(new: nn.Module, holders) -> None:
    """A module patch put in place gives way to its original wherever it is held, with its hooks."""
    for parent, attr in holders:
        setattr(parent, attr, new.original)
    give_back_hooks(new, new.original)


def _unstack(experts: MoecacheExperts) -> None:
    """List experts' parameters get their own storage again (unless offloaded, or done already)."""
    if experts.stacked is not None and experts.stacked.is_stacked():
        experts.stacked.unstack()


def _patched_inside(model: nn.Module) -> list[nn.Module]:
    """The outermost modules inside `model` that were patched themselves."""
    found, inside = [], []
    for name, module in model.named_modules():
        if name and not any(name.startswith(prefix) for prefix in inside) and _state_of(module) is not None:
            found.append(module)
            inside.append(name + ".")
    return found


def _holders(model: nn.Module, state: PatchState) -> dict[int, list[tuple[nn.Module, str]]]:
    """Where each module patch put in place is held now: where patch put it, or in a wrapper put around
    it since (an adapter's base_layer), so unpatch keeps the wrapper. One no module holds any more (the
    user replaced it, or an interrupted unpatch put it back already) stays as it is."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    parents = dict.fromkeys([*(r.parent for r in state.replaced), *model.modules()])
    for parent in parents:
        for attr, child in parent._modules.items():
            if child is not None:
                holders.setdefault(id(child), []).append((parent, attr))
    return holders


def _give_back_parameters(new: MoecacheExperts, original: nn.Module) -> None:
    """The original module gets the Parameter objects the patched one holds now (load_state_dict with
    assign=True replaces them while patched)."""
    if new.stacked is not None or new.reads_original:
        return
    for name in new.layout.parameter_names:
        param = getattr(new, name)
        if getattr(original, name) is not param:
            setattr(original, name, param)


def stats(model: nn.Module) -> dict:
    """Per-layer calls and tokens of the patched experts, the expert cache's counters when offloaded, the
    predictor's recall and precision (policies "predictive" and "budgeted"), the patched MLA attention's calls, and
    what patch left alone and why."""
    _check_module(model)
    state: PatchState | None = _state_of(model)
    left_alone = list(model.__dict__.get(_LEFT_ALONE, []))
    if state is None:
        return {"patched": False, "layers": [], "cache": None, "attention": [], "left_alone": left_alone}
    held = _patched_in_tree(model, state)
    layers = [{"name": h.name, "calls": h.module.calls, "tokens": h.module.tokens,
               "activation": h.module.layout.activation_text} for h in held if isinstance(h.module, MoecacheExperts)]
    attention = [{"layer": h.module.layer_idx, **h.module.calls} for h in held if isinstance(h.module, MoecacheMLA)]
    cache = state.cache.stats() if state.cache is not None else None
    if cache is not None:
        cache["wasted_prefetch_bytes"] = cache["wasted_prefetches"] * state.cache.record_bytes
    prediction = state.predictor.summary() if state.predictor is not None else None
    return {"patched": True, "layers": layers, "calls": sum(l["calls"] for l in layers),
            "tokens": sum(l["tokens"] for l in layers), "cache": cache, "prediction": prediction,
            "attention": attention, "left_alone": left_alone}


def plan(model: nn.Module, *, experts: bool = True, attention: bool = True, offload: Offload | None = None) -> dict:
    """What patch(model, ...) would do, without changing anything; the weights are never read, so a model
    built on the meta device (from its config alone) will do. Returns:

    experts: per experts module patch would replace: name, type, experts, activation, gated, dtype and
        expert_bytes (one expert in the expert cache, aligned as stored);
    attention: the MLA attention modules it would replace; left_alone: what it would leave, and why;
    parameter_bytes: the model's parameters and buffers; expert_parameter_bytes: those of the experts above;
    offload (with an Offload): slots, slots_per_layer, slot_bytes (the device slots), host_bytes (every
        expert in the host store), device_weight_bytes (the parameters and buffers left on the device
        plus the slots: the weights' device memory, without activations or the KV cache) and resident
        (the experts modules that stay on the device: where layers hold experts of several sizes, the one
        expert cache takes those of the size holding the most bytes).
    An offload patch would refuse (its budget, its policy's needs: a router for "predictive") raises the
    same error here; where the weights are (the meta device, several devices) is not checked."""
    _check_module(model)
    left_alone: list[dict] = []
    found = _plan(model, experts, attention, False, left_alone)
    layers, expert_tensors = [], {}
    for f, layout in found.experts:
        layers.append({"name": f.name, "type": type(f.module).__name__, "experts": experts_shape(f)[0],
                       "activation": layout.activation_text, "gated": layout.gated, "dtype": str(experts_dtype(f)),
                       "expert_bytes": expert_record_bytes(f)})
        for module in f.modules:
            expert_tensors.update((id(t), t) for t in module.parameters())
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    parameter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    expert_bytes = sum(t.numel() * t.element_size() for t in expert_tensors.values())
    out = {"experts": layers, "attention": [a.name for a in found.attention], "left_alone": left_alone,
           "parameter_bytes": parameter_bytes, "expert_parameter_bytes": expert_bytes}
    if offload is not None:
        if not isinstance(offload, Offload):
            raise TypeError(f"offload must be a moecache.Offload or None, got {type(offload).__name__}")
        if not layers:
            raise ValueError(_no_experts_message(model))
        validate_offload([f for f, _ in found.experts], offload, loaded=False)
        cached = cached_layers([f for f, _ in found.experts])
        num_experts, record = layers[cached[0]]["experts"], layers[cached[0]]["expert_bytes"]
        cached_bytes = sum(t.numel() * t.element_size() for t in {
            id(t): t for i in cached for module in found.experts[i][0].modules
            for t in module.parameters()}.values())
        slots = offload.slots(len(cached), num_experts, record)
        out["offload"] = {"slots": slots, "slots_per_layer": slots / len(cached), "slot_bytes": slots * record,
                          "host_bytes": len(cached) * num_experts * record,
                          "device_weight_bytes": parameter_bytes - cached_bytes + slots * record,
                          "resident": [layers[i]["name"] for i in range(len(layers)) if i not in cached]}
    return out


def reset_stats(model: nn.Module) -> None:
    """Zero every counter stats(model) reports (after a warm-up, say): the layers' calls and tokens, the
    MLA attention's calls, the expert cache's counters and the predictor's scores and host time. What
    steers caching (residency, priorities, the predictor's frequency prior) is kept."""
    state: PatchState | None = _state_of(model)
    if state is None:
        raise ValueError("moecache.reset_stats: the model is not patched")
    for h in _patched_in_tree(model, state):
        if isinstance(h.module, MoecacheExperts):
            h.module.calls = h.module.tokens = 0
        else:
            h.module.calls = dict.fromkeys(h.module.calls, 0)
    if state.cache is not None:
        state.cache.reset_stats()
    if state.predictor is not None:
        state.predictor.reset_stats()


def _patched_blocks(model: nn.Module) -> list[tuple[nn.Module, MoecacheExperts]]:
    state: PatchState | None = _state_of(model)
    if state is None:
        raise ValueError("the model is not patched: call moecache.patch(model) first")
    return [(r.block, r.new) for r in state.replaced if isinstance(r.new, MoecacheExperts)]


def patched_experts(model: nn.Module) -> list[MoecacheExperts]:
    """The patched experts modules, in layer order (the order routers() uses; an offloaded model's expert
    cache numbers the offloaded ones in this order: all of them, unless layers with experts of another shape
    stay resident)."""
    return [new for _, new in _patched_blocks(model)]


def routers(model: nn.Module) -> list:
    """The router of every patched MoE layer, in layer order: a RouterSpec, a TokenIdRouter for a router that
    picks by token id, None where none was found."""
    return [find_router(block, new.num_experts, new.hidden_size) for block, new in _patched_blocks(model)]


def expert_cache(model: nn.Module) -> ExpertCache | None:
    """The ExpertCache serving an offloaded model's experts (None when not offloaded)."""
    state: PatchState | None = _state_of(model)
    return None if state is None else state.cache
