"""Code that runs around a module: hooks, a forward set on the instance, parametrized weights. The
replacement patch puts in place shares the original's forward and backward hook tables (not its
state-dict hooks), so its hooks fire where the module is called, and hooks registered while patched stay
with the original after unpatch. Anything else around a module patch replaces, and anything at all
around a part the kernels stand in for (an activation module, the MLPs of list experts, MLA's
kv_b_proj, whose weights are read, not called) would silently stop running, so patch leaves such layers
alone."""
from __future__ import annotations

import gc
import weakref
from collections import OrderedDict

from torch import nn
from torch.nn.utils import parametrize

HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


class HolderRef:
    """A weak reference from something patch puts in a module's __dict__ (an instance forward, a
    generate hook) back to that module. A strong one would make a cycle that keeps a dropped model, its
    device memory and its expert cache with it, alive until the cycle collector runs. Once the module is
    gone, whatever module holds `held` in its __dict__ now (a shallow copy, copy.copy, which shares it)
    is the one it serves."""

    def __init__(self, module: nn.Module):
        self._ref = weakref.ref(module)

    def get(self, held: object) -> nn.Module:
        module = self._ref()
        if module is None:
            module = _holder_of(held)
            self._ref = weakref.ref(module)
        return module

    def is_to(self, module: nn.Module) -> bool:
        return self._ref() is module


def _holder_of(held: object) -> nn.Module:
    for table in gc.get_referrers(held):
        if isinstance(table, dict):
            for module in gc.get_referrers(table):
                if isinstance(module, nn.Module) and getattr(module, "__dict__", None) is table:
                    return module
    raise RuntimeError("moecache: the module this was installed on is gone, and no module holds it any more")


def share_hooks(original: nn.Module, replacement: nn.Module) -> None:
    for table in HOOK_TABLES:
        object.__setattr__(replacement, table, getattr(original, table))
    object.__setattr__(replacement, "_is_full_backward_hook", original._is_full_backward_hook)


def give_back_hooks(replacement: nn.Module, original: nn.Module) -> None:
    """The tables are the original's already; a full backward hook registered on the replacement also
    marked it as holding full backward hooks, which torch reads before running any of them."""
    if replacement._is_full_backward_hook is not None:
        original._is_full_backward_hook = replacement._is_full_backward_hook


def hooked(module: nn.Module) -> bool:
    return any(getattr(module, table) for table in HOOK_TABLES)


def own_forward(module: nn.Module) -> str | None:
    """Why calls of this module run code its class does not (accelerate's device hooks and other
    wrappers set `forward` on the instance), or None. Hook tables are not counted: a replacement shares them."""
    return "a forward set on the module itself (accelerate's device hooks, say)" if "forward" in vars(module) else None


def bypassed(module: nn.Module) -> str | None:
    """Why this module must be called rather than stood in for, or None."""
    if hooked(module):
        return "hooks"
    if parametrize.is_parametrized(module):
        return "parametrized weights"
    return own_forward(module)


def read_as_weights(layer: nn.Linear) -> str | None:
    """Why the kernels may not compute a linear layer from its weight (and bias) alone, or None."""
    if type(layer).forward is not nn.Linear.forward:  # a parametrized layer's class keeps Linear's
        return f"a forward of its own ({type(layer).__name__})"
    return bypassed(layer)


def bypassed_parts(root: nn.Module, *, include_root: bool) -> list[str]:
    """'name: why' for the modules under `root` (and root itself, named by its class, if include_root)
    that something runs around."""
    found = []
    for name, module in root.named_modules():
        why = bypassed(module) if name or include_root else None
        if why:
            found.append(f"{name or type(root).__name__}: {why}")
    return found


# The tables torch's register_*_hook functions write a module's hooks into.
WATCHED_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


class HookCount(list):
    """[hooks in a layer's watched tables]. A copy starts at 0: the copied tables count themselves in."""

    def __init__(self, value=(0,)):
        super().__init__(value)

    def __reduce__(self):
        return type(self), ()

    def __deepcopy__(self, memo):
        return type(self)()


class WatchedHooks(OrderedDict):
    """A hook table of a part the kernels do not call. While patched it counts the hooks registered after
    patch (not moecache's own: `settle` takes them as the baseline) into `count` (one for a whole layer),
    so a hook that could never run costs the layer's forward one read to see (and the forward refuses).
    It stays the module's table after unpatch, counting nothing: torch's hook handles hold their table."""

    def __init__(self, table=(), count: HookCount | None = None, name: str = "", baseline=None):
        super().__init__(table)
        self.watch(count, name, baseline)

    def watch(self, count: HookCount | None, name: str, baseline=None) -> None:
        self.count, self.name = count, name
        self.baseline = frozenset(self) if baseline is None else frozenset(baseline)
        if count is not None:
            count[0] += sum(key not in self.baseline for key in self)

    def __setitem__(self, key, value) -> None:
        counted = key not in self and getattr(self, "count", None) is not None and key not in self.baseline
        super().__setitem__(key, value)
        if counted:
            self.count[0] += 1

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        if self.count is not None and key not in self.baseline:
            self.count[0] -= 1

    def __reduce__(self):  # a copy counts its entries once, into the copy of the count
        return type(self), (OrderedDict(self), self.count, self.name, self.baseline)


def watch_hooks(root: nn.Module, *, include_root: bool, count: HookCount) -> list[WatchedHooks]:
    """Watch the hook tables of the modules under `root` (and root itself, if include_root)."""
    watched = []
    for name, module in root.named_modules():
        if name or include_root:
            for attr in WATCHED_TABLES:
                table = getattr(module, attr)
                if isinstance(table, WatchedHooks):
                    table.watch(count, name)
                else:  # from now on the module's table for good (handles made before stay with the old one)
                    table = WatchedHooks(table, count, name)
                    object.__setattr__(module, attr, table)
                watched.append(table)
    return watched


def settle_hooks(watched: list[WatchedHooks]) -> None:
    """The hooks the tables hold now are moecache's own (installed after the watch began): not counted."""
    for table in watched:
        table.baseline = frozenset(table)
    for table in watched:
        if table.count is not None:
            table.count[0] = 0


def unwatch_hooks(watched: list[WatchedHooks]) -> None:
    for table in watched:
        table.count = None


def unwatch_tree(root: nn.Module) -> None:
    """Stop every watch in the tables under root (a copied layer's, which no state lists)."""
    unwatch_hooks([getattr(m, attr) for m in root.modules() for attr in WATCHED_TABLES
                   if isinstance(getattr(m, attr), WatchedHooks)])
