"""Hooks a user registered on a module that patch replaces. The replacement shares the original's forward
and backward hook tables (not its state-dict hooks), so its hooks fire where the module is called, and
hooks registered while patched stay with the original after unpatch. Hooks on parts the kernels stand
in for (an activation module, the MLPs of list experts, MLA's kv_b_proj) could never fire, so patch
leaves such layers alone."""
from __future__ import annotations

from torch import nn

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


def hooked_parts(root: nn.Module, *, include_root: bool) -> list[str]:
    """Names of the modules under `root` (and root itself, as "", if include_root) that carry hooks."""
    return [name or type(root).__name__ for name, module in root.named_modules()
            if (name or include_root) and hooked(module)]
