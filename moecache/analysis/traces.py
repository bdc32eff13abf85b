"""Record what a model's MoE layers do, for simulate.py, the predictor's accuracy and its training.

record_routing: while the model generates, per forward step and MoE layer, the experts used and what
lookahead gating predicted. record_layer_inputs: per decoder layer, the hidden state its MLP block read
and, for MoE layers, the routing (the learned predictor's training pairs).

A routing record holds, per forward step (the prompt, then each decode step) and per MoE layer, the experts the
layer used for the whole batch, and the experts the lookahead predictor guessed for it from the hidden
states of the `depth` layers before it in the same step, with each guessed expert's confidence: how many
of the step's tokens the predictor sent to it (scores, parallel to predictions; simulate.py's budgeted
policy prefetches the most confident first).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..cache.predictor import LookaheadPredictor
from ._checks import check_depth, steps_left_out


@dataclass
class RoutingTrace:
    num_layers: int
    num_experts: int
    top_k: int
    depth: int
    steps: list = field(default_factory=list)        # steps[s][layer] = sorted experts used
    predictions: list = field(default_factory=list)  # predictions[s][layer][d-1] = sorted guess or None
    tokens: list = field(default_factory=list)       # tokens[s] = tokens routed at step s
    scores: list = field(default_factory=list)       # scores[s][layer][d-1][i] = tokens that chose predictions[..][i]

    def recall(self, depth: int = 1, skip_steps=1) -> dict:
        """Per layer and overall: |guess ∩ used| / |used| over the steps, but skip_steps (the first n, or
        these indices: each micro-batch's prompt step); overall is None where no guess could be scored
        (as the live predictor's summary says)."""
        check_depth(depth, self.depth)
        skipped = steps_left_out(skip_steps, "skip_steps")
        per_layer, hit_all, used_all = {}, 0, 0
        for layer in range(self.num_layers):
            hit = used = 0
            for s in range(len(self.steps)):
                if s in skipped:
                    continue
                guess = self.predictions[s][layer][depth - 1]
                if guess is None:
                    continue
                actual = set(self.steps[s][layer])
                hit += len(actual & set(guess))
                used += len(actual)
            if used:
                per_layer[layer] = hit / used
            hit_all += hit
            used_all += used
        return {"per_layer": per_layer, "overall": hit_all / used_all if used_all else None}

    def to_json(self) -> str:
        return json.dumps({"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                           "depth": self.depth, "steps": self.steps, "predictions": self.predictions,
                           "tokens": self.tokens, "scores": self.scores})

    @classmethod
    def from_json(cls, text: str) -> "RoutingTrace":
        return cls(**json.loads(text))


def record_routing(model, input_ids: torch.Tensor, experts: list, routers: list, *, max_new_tokens: int,
                   depth: int = 2, learned=None, **generate_kwargs) -> tuple[RoutingTrace, torch.Tensor]:
    """Greedy-generate and record the routing of `experts` (the model's patched experts modules in layer
    order: moecache.patched_experts(model)), with lookahead-gating predictions from `routers`
    (moecache.routers(model)), or a LearnedRoutePredictor's where `learned` has a head (a layer routed by
    token id: its table's picks for the step's input_ids), and how many tokens the predictor sent to each
    guessed expert (trace.scores). Returns (trace, generated ids)."""
    layers = list(experts)
    if not layers:
        raise ValueError("record_routing: no MoE layers given (patch the model, then pass moecache.patched_experts(model))")
    index = {id(m): i for i, m in enumerate(layers)}
    predictor = LookaheadPredictor(routers, depth=depth, learned=learned)
    trace = RoutingTrace(num_layers=len(layers), num_experts=layers[0].num_experts, top_k=0, depth=depth)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = module.routes_by_token(hidden, args[1] if len(args) > 1 else kwargs["top_k_index"])
        layer = index[id(module)]
        if layer == 0:
            trace.steps.append([None] * trace.num_layers)
            trace.predictions.append([[None] * depth for _ in range(trace.num_layers)])
            trace.scores.append([[None] * depth for _ in range(trace.num_layers)])
            trace.tokens.append(int(hidden.shape[0]))
        trace.top_k = int(top_k_index.shape[1])
        step = len(trace.steps) - 1
        trace.steps[step][layer] = sorted(torch.unique(top_k_index).tolist())
        for target, d, counts in predictor.predict(layer, hidden, trace.top_k):
            guess = sorted(torch.nonzero(counts).reshape(-1).tolist())
            trace.predictions[step][target][d - 1] = guess
            trace.scores[step][target][d - 1] = [int(counts[e]) for e in guess]

    def share_token_ids(module, args, kwargs):  # layers routed by token id are predicted from the step's ids
        ids = kwargs.get("input_ids", args[0] if args else None)
        predictor.token_ids = ids if isinstance(ids, torch.Tensor) else None

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    handles.append(model.register_forward_pre_hook(share_token_ids, with_kwargs=True))
    try:
        with torch.no_grad():
            generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, **generate_kwargs)
    finally:
        for h in handles:
            h.remove()
    return trace, out


@torch.no_grad()
def record_layer_inputs(model, ids: torch.Tensor, *, seq_len: int = 256, batch_size: int = 16) -> dict:
    """What each MoE layer saw and chose, for predictor and caching experiments.

    ids: LongTensor [1, n] (or [n]); it is cut into non-overlapping windows of `seq_len` tokens (a
    shorter last window is dropped) run independently, `batch_size` windows at a time.

    Returns {decoder layer index: {"hidden": [N, H] fp32}} for every decoder layer: the input of its MLP
    block (after post_attention_layernorm; for a MoE layer, what its router and experts read). MoE
    layers also carry "topk_ids" [N, K] int64 (the experts chosen) and "router_logits" [N, E] fp32.
    N = windows * seq_len, tokens in order.
    """
    ids = ids.reshape(-1)
    n_win = ids.numel() // seq_len
    if n_win == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {ids.numel()}")
    windows = ids[: n_win * seq_len].view(n_win, seq_len).to(next(model.parameters()).device)
    layers = model.model.layers
    first_moe = model.config.first_k_dense_replace
    acc: dict = {i: {"hidden": []} for i in range(len(layers))}
    handles = []

    def mlp_hook(m, args, out, i):
        acc[i]["hidden"].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())

    def gate_hook(m, args, out, i):
        logits, _, topk = out
        acc[i]["router_logits"].append(logits.float().cpu())
        acc[i]["topk_ids"].append(topk.long().cpu())

    for i, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: mlp_hook(m, a, o, i)))
        if i >= first_moe:
            acc[i].update(topk_ids=[], router_logits=[])
            handles.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: gate_hook(m, a, o, i)))
    try:
        for start in range(0, n_win, batch_size):
            model(windows[start:start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: {k: torch.cat(v) for k, v in d.items()} for i, d in acc.items()}
