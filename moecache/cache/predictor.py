"""Lookahead gating: guess the experts of the next MoE layers from the current layer's hidden state.

The residual stream changes little from one layer to the next, so applying layer l+j's router to the
hidden state entering layer l's experts predicts layer l+j's routing well (Pre-gated MoE, ExpertFlow,
mixtral-offloading's speculative loading). It costs one [T, H] x [H, E] product per predicted layer,
which is tiny next to the experts, and needs no training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class RouterSpec:
    """What a layer's router computes, reduced to what prediction needs.

    weight: [E, H] (the router's linear weight); bias: [E] added to the logits (GPT-OSS);
    correction: [E] added for ranking only (DeepSeek-V3's e_score_correction_bias) to
    score_function(logits): "sigmoid" (DeepSeek-V3, MiniMax-M2), "softmax" (ERNIE 4.5), "sqrtsoftplus",
    or "logits" (the logits themselves).
    Where the router reads the residual otherwise than the experts do (Gemma 4: the router normalizes it
    and scales each dimension, the experts read another norm of it, with weights of its own):
    input_scale: [H], the router's own per-dimension scale of its normalized input;
    experts_input_scale: [H], the weight of the norm that made this layer's experts' input, divided out
    to take that input back to what routers read.
    zero_experts: rows of weight (and of bias and correction) after the E routed experts' that score
    zero-computation experts (LongCat-Flash): ranked with the others, and a pick of one uses no expert.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    correction: torch.Tensor | None = None
    score_function: str = "sigmoid"
    input_scale: torch.Tensor | None = None
    experts_input_scale: torch.Tensor | None = None
    zero_experts: int = 0

    @property
    def num_experts(self) -> int:
        """The routed experts (the scores' columns before the zero-computation experts')."""
        return self.weight.shape[0] - self.zero_experts

    def router_input(self, experts_input: torch.Tensor) -> torch.Tensor:
        """This layer's experts' input as the routers read it, up to a factor per token, which no ranking
        sees (a norm's weight of 0 leaves its dimension at 0)."""
        if self.experts_input_scale is None:
            return experts_input
        scale = self.experts_input_scale.float()
        return torch.where(scale != 0, experts_input.float() / scale, 0.0)

    def scores(self, router_input: torch.Tensor) -> torch.Tensor:
        """[T, E + zero_experts] fp32 ranking scores (top-k of these is the router's top-k choice, groups
        aside)."""
        x = router_input if self.input_scale is None else router_input.float() * self.input_scale.float()
        logits = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return ranking_scores(logits, self.correction, self.score_function)


@dataclass
class TokenIdRouter:
    """A router that picks experts by token id, not from the hidden state (DeepSeek-V4's hash-routed
    layers): table [vocab, K] holds each token id's experts. Its picks are known exactly as soon as the
    step's token ids are, before any layer runs; no reading of a hidden state predicts them."""

    table: torch.Tensor
    num_experts: int

    def picks(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T, K] the experts these token ids are routed to."""
        return self.table[token_ids.reshape(-1).to(self.table.device)].long()


def lookahead_scores(routers: list, layer: int, target: int, hidden_states: torch.Tensor) -> torch.Tensor:
    """Layer `target`'s router applied to the hidden state entering layer `layer`'s experts: [T, E] fp32
    ranking scores (`routers[target]` must be a RouterSpec; `routers[layer]` may be anything)."""
    source = routers[layer]
    return routers[target].scores(source.router_input(hidden_states) if isinstance(source, RouterSpec)
                                  else hidden_states)


SCORE_FUNCTIONS = {"sigmoid": torch.sigmoid, "softmax": lambda x: torch.softmax(x, dim=-1),
                   "sqrtsoftplus": lambda x: torch.sqrt(torch.nn.functional.softplus(x)), "logits": lambda x: x}


def ranking_scores(logits: torch.Tensor, correction: torch.Tensor | None, score_function: str = "sigmoid") -> torch.Tensor:
    """A router's [T, E] logits as fp32 scores whose top-k is its choice: score_function(logits) plus the
    selection bias where the router has one (DeepSeek-V3's e_score_correction_bias), else the logits
    themselves (every score function keeps their order)."""
    if correction is None:
        return logits.float()
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {sorted(SCORE_FUNCTIONS)}, got {score_function!r}")
    return SCORE_FUNCTIONS[score_function](logits.float()) + correction.float().reshape(-1)


@dataclass
class PredictionStats:
    """Per (layer, depth): experts predicted, of those the ones the layer then used, and experts used."""

    predicted: int = 0
    correct: int = 0
    actual: int = 0

    @property
    def recall(self) -> float:
        return self.correct / self.actual if self.actual else 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0


class LookaheadPredictor:
    """Predicts layers l+1..l+depth's experts from layer l's hidden state, and scores its guesses.

    `predict` returns, per predicted layer, the experts chosen by any token and how many tokens chose
    each; `observe` compares what a layer really used with what was predicted for it earlier.
    A layer whose router picks by token id (TokenIdRouter) is predicted exactly from `token_ids`, the
    running step's token ids (whoever runs the model sets them before each MoE layer; None: unknown,
    and such a layer is not predicted).
    """

    def __init__(self, routers: list[RouterSpec | TokenIdRouter | None], depth: int = 1, learned=None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.routers = routers
        self.learned = learned  # a LearnedRoutePredictor: its heads replace router reuse where it has one
        self.depth = depth
        self.pending: dict[tuple[int, int], set[int]] = {}  # (layer, depth) -> experts predicted for it
        self.stats = {(layer, d): PredictionStats() for layer in range(len(routers)) for d in range(1, depth + 1)}
        self.use_counts: dict[int, dict[int, int]] = {}  # layer -> expert -> times used (the frequency prior)
        self.seconds = 0.0  # host time spent predicting
        self.token_ids: torch.Tensor | None = None

    def predict(self, layer: int, hidden_states: torch.Tensor, top_k: int) -> list[tuple[int, int, torch.Tensor]]:
        """[(target layer, depth, token counts [E] on the host)] for the layers after `layer`."""
        start = time.perf_counter()
        out = []
        for d in range(1, self.depth + 1):
            target = layer + d
            if target >= len(self.routers):
                break
            router = self.routers[target]
            if isinstance(router, TokenIdRouter):
                ids = self.token_ids
                if ids is None or ids.numel() != hidden_states.shape[0]:
                    continue  # not this step's token ids: no guess beats none
                chosen, num_experts = router.picks(ids).reshape(-1), router.num_experts
            else:
                if self.learned is not None and self.learned.has(target, d):
                    scores = self.learned.scores(target, d, hidden_states)
                    num_experts = scores.shape[1]
                elif router is None:
                    continue
                else:
                    scores = lookahead_scores(self.routers, layer, target, hidden_states)
                    num_experts = scores.shape[1] - getattr(router, "zero_experts", 0)
                chosen = scores.topk(min(top_k, scores.shape[1]), dim=1).indices.reshape(-1)
                chosen = chosen[chosen < num_experts]  # a zero-computation expert's pick uses none
            counts = torch.bincount(chosen, minlength=num_experts).cpu()
            self.pending[(target, d)] = set(torch.nonzero(counts).reshape(-1).tolist())
            out.append((target, d, counts))
        self.seconds += time.perf_counter() - start
        return out

    PRIOR_CEILING = 0.99  # the frequency prior stays below every prediction's priority (>= 1)

    def prior(self, layer: int, num_experts: int) -> list[float]:
        """Frequency prior in [0, PRIOR_CEILING]: how often each expert of `layer` has been used, relative
        to the most used one. It only orders the experts nobody predicted."""
        counts = self.use_counts.get(layer, {})
        top = max(counts.values(), default=0)
        return [self.PRIOR_CEILING * counts.get(e, 0) / top if top else 0.0 for e in range(num_experts)]

    def observe(self, layer: int, used: list[int]) -> None:
        used_set = set(used)
        counts = self.use_counts.setdefault(layer, {})
        for e in used_set:
            counts[e] = counts.get(e, 0) + 1
        for d in range(1, self.depth + 1):
            guess = self.pending.pop((layer, d), None)
            if guess is None:
                continue
            s = self.stats[(layer, d)]
            s.predicted += len(guess)
            s.correct += len(guess & used_set)
            s.actual += len(used_set)

    def reset_stats(self) -> None:
        """Zero the recall/precision counts and the host time; pending guesses and the prior stay."""
        self.stats = {key: PredictionStats() for key in self.stats}
        self.seconds = 0.0

    def summary(self) -> dict:
        per = [{"layer": layer, "depth": d, "predicted": s.predicted, "correct": s.correct, "actual": s.actual,
                "recall": s.recall, "precision": s.precision} for (layer, d), s in sorted(self.stats.items())
               if s.actual]
        total = {}
        for d in range(1, self.depth + 1):
            rows = [p for p in per if p["depth"] == d]
            actual = sum(p["actual"] for p in rows)
            predicted = sum(p["predicted"] for p in rows)
            correct = sum(p["correct"] for p in rows)
            # None where nothing was scored at this depth (a model with one MoE layer has no next one).
            total[d] = {"recall": correct / actual if actual else None,
                        "precision": correct / predicted if predicted else None}
        return {"depth": self.depth, "per_layer": per, "by_depth": total, "predictor_seconds": self.seconds}
