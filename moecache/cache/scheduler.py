"""Token scheduling (ExpertFlow): put requests whose tokens route alike into the same micro-batch, so
each decode step touches fewer distinct experts, hence fewer loads when experts are offloaded.

Requests are grouped once, from the routing of their prompts (a cheap predictor of where their decode
tokens go: routing is temporally local); each group then generates with its own KV cache, so every
request's cache is exactly what it would be in any other grouping, and greedy outputs do not change
where each token is routed on its own (not by a gate whose expert capacity counts the batch's tokens).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def group_by_routes(routes: list[set], batch_size: int) -> list[list[int]]:
    """Partition request indices into groups of at most batch_size, each group's union of routes small.

    Greedy: a group starts from the unplaced request with the most experts, then repeatedly takes the
    request adding the fewest experts not yet in the group's union (ties: more shared experts, then the
    lower index). Deterministic; O(N^2 * route size), fine for the hundreds of requests of a batch queue.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    left = list(range(len(routes)))
    groups = []
    while left:
        seed = max(left, key=lambda i: (len(routes[i]), -i))
        left.remove(seed)
        group, union = [seed], set(routes[seed])
        while left and len(group) < batch_size:
            best = min(left, key=lambda i: (len(routes[i] - union), -len(routes[i] & union), i))
            left.remove(best)
            group.append(best)
            union |= routes[best]
        groups.append(sorted(group))
    return groups


def distinct_experts(routes: list[set], groups: list[list[int]]) -> float:
    """Mean size of a group's union of routes (what one step of that group touches, as predicted)."""
    return sum(len(set().union(*(routes[i] for i in g))) for g in groups) / max(len(groups), 1)


def prompt_routes(model, prompts: torch.Tensor, experts: list, *, last_tokens: int = 4,
                  batch_size: int = 16, attention_mask: torch.Tensor | None = None,
                  before_group: Callable[[list[int]], None] | None = None) -> list[set]:
    """(layer, expert) pairs each request's last `last_tokens` prompt tokens route to (one extra prefill).
    experts: the model's patched experts modules in layer order (moecache.patched_experts(model)).
    Prompts of different lengths come left-padded, with their attention_mask."""
    index = {id(m): i for i, m in enumerate(experts)}
    routes = [set() for _ in range(prompts.shape[0])]
    current: list[int] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = module.routes_by_token(hidden, args[1] if len(args) > 1 else kwargs["top_k_index"])
        layer = index[id(module)]
        ids = top_k_index.reshape(len(current), -1, top_k_index.shape[-1])[:, -last_tokens:].reshape(len(current), -1)
        for row, request in enumerate(current):
            routes[request].update((layer, int(e)) for e in ids[row].tolist())

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in experts]
    try:
        with torch.no_grad():
            for start in range(0, prompts.shape[0], batch_size):
                current[:] = list(range(start, min(start + batch_size, prompts.shape[0])))
                if before_group is not None:
                    before_group(list(current))
                model(prompts[current], attention_mask=None if attention_mask is None else attention_mask[current])
    finally:
        for h in handles:
            h.remove()
    return routes


def generate_scheduled(model, prompts: torch.Tensor, experts: list, *, batch_size: int, schedule: bool = True,
                       max_new_tokens: int = 16, attention_mask: torch.Tensor | None = None,
                       before_group: Callable[[list[int]], None] | None = None, **generate_kwargs) -> tuple[torch.Tensor, dict]:
    """Greedy-generate for every prompt ([N, S]; left-padded with `attention_mask` when lengths differ; with
    none, the pad token's places are masked as generate infers them) in
    micro-batches of batch_size, grouped by predicted routes when `schedule`, else in order. experts: the
    model's patched experts modules in layer order (moecache.patched_experts(model)). Returns (outputs
    [N, S + new] in the prompts' order, info: groups, scheduler_s (host time spent grouping, the routing
    forward included), predicted distinct experts per step). before_group(requests) is called before each
    forward pass over a group of requests (the routing pass's and each micro-batch's generate).

    The outputs are plain greedy generate's over all prompts at once: a request stops at EOS and its row
    is padded with the pad token to the longest output (pass min_new_tokens=max_new_tokens, as the
    benchmarks do, for outputs of a fixed length). Except where routing depends on the batch: a gate
    with an expert capacity counted over the batch's tokens (DeepSpeed-MoE's, MoE-LLaVA's; Switch's)
    or a sampled second expert routes a request by the requests grouped with it (a warning says so)."""
    _check_one_greedy_output(model, generate_kwargs)
    if prompts.shape[0] == 0:
        raise ValueError("generate_scheduled: prompts holds no request (shape [0, S])")
    gate = _batch_dependent_gate(model)
    if gate is not None:
        logger.warning("generate_scheduled: %s routes by the batch (an expert capacity counted over the batch's "
                       "tokens, or a sampled second expert): a request's output can change with the requests "
                       "grouped with it, scheduled or in order", gate)
    n = prompts.shape[0]
    mask = _inferred_mask(model, prompts, generate_kwargs) if attention_mask is None else attention_mask
    start = time.perf_counter()
    if schedule:
        routes = prompt_routes(model, prompts, experts, batch_size=batch_size, attention_mask=mask,
                               before_group=before_group)
        groups = group_by_routes(routes, batch_size)
    else:
        routes, groups = None, [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    scheduler_s = time.perf_counter() - start
    outputs: list = [None] * n
    with torch.no_grad():
        for group in groups:
            if before_group is not None:
                before_group(list(group))
            out = model.generate(prompts[group], attention_mask=mask[group],
                                 max_new_tokens=max_new_tokens, **{**generate_kwargs, "do_sample": False})
            for row, request in enumerate(group):
                outputs[request] = out[row]
    info = {"groups": groups, "scheduler_s": scheduler_s,
            "predicted_distinct_experts": distinct_experts(routes, groups) if routes else None}
    longest = max(o.shape[0] for o in outputs)
    if any(o.shape[0] < longest for o in outputs):  # every request of a group stopped early: pad as generate does
        pad = _pad_token(model, generate_kwargs)
        outputs = [torch.cat([o, o.new_full((longest - o.shape[0],), pad)]) for o in outputs]
    return torch.stack(outputs), info


def _batch_dependent_gate(model) -> str | None:
    """A gate whose choices depend on the other tokens of the batch, named, or None."""
    for name, module in model.named_modules():
        drops_past_capacity = getattr(module, "capacity_factor", None) is not None and getattr(module, "drop_tokens", True)
        if drops_past_capacity or getattr(module, "top2_2nd_expert_sampling", False) \
                or getattr(module, "expert_capacity", None):
            return f"{name} ({type(module).__name__})"
    return None


def _check_one_greedy_output(model, generate_kwargs: dict) -> None:
    """The outputs are one token tensor per prompt, in the prompts' order: options that make generate return
    several rows per prompt or a dict would be cut to the wrong rows; beams and sampling are not greedy."""
    configs = [c for c in (generate_kwargs.get("generation_config"), model.generation_config) if c is not None]
    for name, plain in (("num_return_sequences", 1), ("return_dict_in_generate", False), ("num_beams", 1)):
        value = generate_kwargs.get(name, next((getattr(c, name) for c in configs if getattr(c, name, None)
                                                is not None), plain))
        if value not in (None, plain):
            raise ValueError(f"generate_scheduled returns one greedy output per prompt: {name}={value!r} "
                             f"is not supported (leave it at {plain!r}, in generation_config too)")
    if generate_kwargs.get("do_sample", False):  # the model's own generation_config is overridden: greedy
        raise ValueError("generate_scheduled generates greedily: do_sample=True is not supported")


def _inferred_mask(model, prompts: torch.Tensor, generate_kwargs: dict) -> torch.Tensor:
    """The mask generate infers when given none, over all the prompts at once: the pad token's places
    masked where the prompts hold it and it is no EOS token, else all ones."""
    pad = _token_ids(_generation_value(model, generate_kwargs, "pad_token_id"))
    eos = _token_ids(_generation_value(model, generate_kwargs, "eos_token_id"))
    if pad and pad[0] not in eos and bool((prompts == pad[0]).any()):
        return prompts.ne(pad[0]).long()
    return torch.ones_like(prompts)


def _token_ids(value) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1)]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [] if value is None else [int(value)]


def _pad_token(model, generate_kwargs: dict) -> int:
    """The token generate pads finished rows with: pad_token_id, else (as transformers does) the first EOS."""
    pad = _token_ids(_generation_value(model, generate_kwargs, "pad_token_id")) or \
        _token_ids(_generation_value(model, generate_kwargs, "eos_token_id"))
    if not pad:
        raise ValueError("generate_scheduled: groups stopped at different lengths and the model has neither "
                         "pad_token_id nor eos_token_id to pad the shorter ones with")
    return pad[0]


def _generation_value(model, generate_kwargs: dict, name: str):
    """A generation setting as generate resolves it: the argument, else the generation_config passed, else
    (for what that leaves unset) the model's own."""
    if generate_kwargs.get(name) is not None:
        return generate_kwargs[name]
    for config in (generate_kwargs.get("generation_config"), model.generation_config):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None
