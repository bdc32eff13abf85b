"""Code that runs around a module: hooks, a forward set on the instance, parametrized weights. The
replacement patch puts in place shares the original's forward and backward hook tables (not its
state-dict hooks), so its hooks fire where the module is called, and hooks registered while patched stay
with the original after unpatch. Anything else around a module patch replaces, and anything at all
around a part the kernels stand in for (an activation module, the MLPs of list experts, MLA's
kv_b_proj, whose weights are read, not called) would silently stop running, so patch leaves such layers
alone."""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


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
