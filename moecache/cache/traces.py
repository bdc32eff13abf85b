"""Record a model's routing (and lookahead predictions of it) while it generates, for simulate.py and
the predictor's accuracy.

A record holds, per forward step (the prompt, then each decode step) and per MoE layer, the experts the
layer used for the whole batch, and the experts the lookahead predictor guessed for it from the hidden
states of the `depth` layers before it in the same step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .predictor import LookaheadPredictor


@dataclass
class RoutingTrace:
    num_layers: int
    num_experts: int
    top_k: int
    depth: int
    steps: list = field(default_factory=list)        # steps[s][layer] = sorted experts used
    predictions: list = field(default_factory=list)  # predictions[s][layer][d-1] = sorted guess or None
    tokens: list = field(default_factory=list)       # tokens[s] = tokens routed at step s

    def recall(self, depth: int = 1, skip_steps: int = 1) -> dict:
        """Per layer and overall: |guess ∩ used| / |used| over the steps (the prompt step skipped)."""
        per_layer, hit_all, used_all = {}, 0, 0
        for layer in range(self.num_layers):
            hit = used = 0
            for s in range(skip_steps, len(self.steps)):
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
        return {"per_layer": per_layer, "overall": hit_all / used_all if used_all else 0.0}

    def to_json(self) -> str:
        return json.dumps({"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                           "depth": self.depth, "steps": self.steps, "predictions": self.predictions,
                           "tokens": self.tokens})

    @classmethod
    def from_json(cls, text: str) -> "RoutingTrace":
        return cls(**json.loads(text))


def record_routing(model, input_ids: torch.Tensor, *, max_new_tokens: int, depth: int = 2, learned=None,
                   **generate_kwargs) -> tuple[RoutingTrace, torch.Tensor]:
    """Greedy-generate with a patched model (experts resident or offloaded) and record its routing, with
    lookahead-gating predictions (or a LearnedRoutePredictor's where `learned` has a head).
    Returns (trace, generated ids)."""
    from ..patching import patched_experts, routers

    layers = patched_experts(model)
    if not layers:
        raise ValueError("record_routing: the model has no patched MoE layers")
    index = {id(m): i for i, m in enumerate(layers)}
    predictor = LookaheadPredictor(routers(model), depth=depth, learned=learned)
    trace = RoutingTrace(num_layers=len(layers), num_experts=layers[0].num_experts, top_k=0, depth=depth)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        layer = index[id(module)]
        if layer == 0:
            trace.steps.append([None] * trace.num_layers)
            trace.predictions.append([[None] * depth for _ in range(trace.num_layers)])
            trace.tokens.append(int(hidden.shape[0]))
        trace.top_k = int(top_k_index.shape[1])
        step = len(trace.steps) - 1
        trace.steps[step][layer] = sorted(torch.unique(top_k_index).tolist())
        for target, d, counts in predictor.predict(layer, hidden, trace.top_k):
            trace.predictions[step][target][d - 1] = sorted(torch.nonzero(counts).reshape(-1).tolist())

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        with torch.no_grad():
            generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, **generate_kwargs)
    finally:
        for h in handles:
            h.remove()
    return trace, out
