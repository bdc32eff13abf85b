"""One MoE layer's experts served by an ExpertCache: what a patched layer delegates to once offloaded,
with the prefetch policy that fills the cache ahead of the layers that need it.

Two ways to fill it ahead of time:
- temporal locality (policies lru / lfu): after a layer runs, copy the experts the next layer used on
  the previous step;
- prediction (policy predictive): before a layer's kernel is enqueued, a LookaheadPredictor guesses the
  next layers' experts from this layer's hidden state; they get cache priorities and their copies start,
  so they overlap this layer's compute.
- prediction within a PCIe budget (policy budgeted): the same guesses and priorities, but only the most
  confident are copied, as many as a PrefetchBudget allows (what the copy engine moves during the compute
  left before the target layers run, less the demand loads already queued); a prefetch never evicts the
  running layer's experts or an expert predicted with at least its own priority.
"""
from __future__ import annotations

import torch

from .. import ops
from .expert_cache import ExpertCache
from .predictor import LookaheadPredictor

# Cache priorities written for predicted experts: a layer d steps ahead gets a base of
# PRIORITY_PER_DEPTH_STEP * (lookahead - d + 1), so nearer layers outrank farther ones, plus the fraction
# of tokens that chose the expert (< 1, below the next base). The predictor's frequency prior for
# unpredicted experts stays below 1 (LookaheadPredictor.PRIOR_CEILING), under every prediction.
PRIORITY_PER_DEPTH_STEP = 2.0


class PrefetchBudget:
    """The copy allowance the budgeted policy shares across layers (one copy engine serves them all).

    Each layer call earns `per_layer` experts of copy time (what the engine moves during one layer's
    compute; a fraction accumulates), the credit never exceeds `lookahead * per_layer` (a copy queued
    behind more could not land before the farthest predicted layer starts), and every expert loaded on
    demand since the last call (a miss, copied or read in place: it crosses PCIe ahead of any prefetch)
    or prefetched is paid from it. `grant` says how many copies may start now.
    """

    def __init__(self, per_layer: float, lookahead: int):
        self.per_layer = float(per_layer)
        self.window = self.per_layer * lookahead
        self.credit = self.window  # the queue starts empty
        self._misses_seen: int | None = None

    def grant(self, misses_total: int) -> int:
        """Earn one layer's allowance, pay for the demand loads since the last call (from the cache's
        miss count since its creation); returns how many prefetches fit."""
        self.credit = min(self.credit + self.per_layer, self.window)
        if self._misses_seen is not None:
            self.credit -= misses_total - self._misses_seen
        self._misses_seen = misses_total
        return max(0, int(self.credit + 1e-9))

    def spend(self, copies: int) -> None:
        self.credit -= copies


class OffloadedExperts:
    """Runs `layer` of an ExpertCache: resident experts from the slot pool, misses read in place or
    copied first (the cache decides), prefetching for the following layers as the policy says."""

    def __init__(self, cache: ExpertCache, layer: int, *, predictor: LookaheadPredictor | None = None,
                 prefetch: bool = False, budget: PrefetchBudget | None = None):
        self.cache = cache
        self.layer = layer
        self.predictor = predictor
        self.prefetch = prefetch  # with a predictor: copy its picks (else predict and prioritise only)
        self.budget = budget  # with a predictor: copy only the most confident picks this allows (shared)
        self.prefetch_next = prefetch and predictor is None
        self.next: OffloadedExperts | None = None  # set by whoever wires the layers in order
        self.last_experts: list[int] | None = None  # experts this layer used on its last call

    def __call__(self, hidden_states, top_k_index, top_k_weights, *, activation_args: dict, interleaved: bool,
                 biases: dict) -> torch.Tensor:
        """activation_args: ops.fused_moe's activation keywords (ExpertsLayout.activation_args)."""
        cache, layer = self.cache, self.layer
        if hidden_states.dtype != cache.dtype or hidden_states.device != cache.device:
            raise TypeError(f"offloaded experts hold {cache.dtype} on {cache.device} but received "
                            f"{hidden_states.dtype} on {hidden_states.device}: a model converted or moved after "
                            "moecache offloaded it must be unpatched (moecache.unpatch), converted, then patched")
        if torch.compiler.is_compiling():
            # Traced: no host syncs or Python-side bookkeeping; misses are read in place through the map.
            gate_up, down = cache.slot_weights()
            host_gate_up, host_down = cache.host_weights(layer, on_device=True)
            return ops.fused_moe(hidden_states, gate_up, down, top_k_weights, top_k_index, **activation_args,
                                 gate_up_interleaved=interleaved, gated=cache.gated, expert_map=cache.expert_map(layer),
                                 host_w_gate_up=host_gate_up, host_w_down=host_down, validate=False, **biases)
        before_compute = None
        if self.predictor is not None and hidden_states.shape[0] > 0:  # no tokens: nothing to predict from
            def before_compute(used, x=hidden_states, top_k=top_k_index.shape[1]):
                self._predict_and_prefetch(x, top_k, used)
        elif self.prefetch_next:
            used_now = []
            before_compute = used_now.extend  # the experts the cache found (no second read of the ids)
        # The ids are the model's own top-k: no value checks (their host sync) on them.
        out = cache.moe(layer, hidden_states, top_k_weights, top_k_index, **activation_args,
                        before_compute=before_compute, validate=False, **biases)
        if self.prefetch_next:
            self._prefetch_next_layer(used_now)
        return out

    def _prefetch_next_layer(self, used: list[int]) -> None:
        """Temporal locality: the next layer will likely route to what it routed to on the previous step.
        Every layer, the last one too, keeps what it used (its routes of weight 0 use nothing) for the layer
        before it to prefetch."""
        nxt = self.next
        if nxt is not None and nxt.last_experts is not None:
            self.cache.prefetch(nxt.layer, nxt.last_experts)
        self.last_experts = used

    def _predict_and_prefetch(self, hidden_states: torch.Tensor, top_k: int, used: list[int]) -> None:
        """Score this layer's earlier guess, drop its priorities to the frequency prior (it is done until
        the next step), then raise the priorities of the experts the next layers are predicted to use
        and (when prefetching) start copying them."""
        predictor, cache, layer = self.predictor, self.cache, self.layer
        predictor.observe(layer, used)
        prior = predictor.prior(layer, cache.num_experts)
        if self.budget is not None:
            self._predict_within_budget(hidden_states, top_k, used, prior)
            return
        cache.set_priorities(layer, prior)
        tokens = hidden_states.shape[0]
        for target, depth, counts in predictor.predict(layer, hidden_states, top_k):
            base = PRIORITY_PER_DEPTH_STEP * (predictor.depth - depth + 1)
            cache.set_priorities(target, (base + counts.float() / tokens) * (counts > 0))
            if self.prefetch:
                cache.prefetch(target, torch.nonzero(counts).reshape(-1))

    def _predict_within_budget(self, hidden_states: torch.Tensor, top_k: int, used: list[int], prior) -> None:
        """Policy budgeted: priorities as for predictive; copies only for the most confident guesses
        (nearest layer first, then the share of tokens that chose the expert), as many as the budget grants.
        While they are issued this layer's experts outrank every guess, so no prefetch takes their slots
        (the cache's priority eviction takes only strictly lower scores); then they drop to the prior."""
        predictor, cache, layer, budget = self.predictor, self.cache, self.layer, self.budget
        in_use = PRIORITY_PER_DEPTH_STEP * (predictor.depth + 1)  # above any guess's priority
        running = set(used)
        cache.set_priorities(layer, [in_use if e in running else p for e, p in enumerate(prior)])
        tokens = hidden_states.shape[0]
        candidates = []  # (priority, target, expert)
        for target, depth, counts in predictor.predict(layer, hidden_states, top_k):
            base = PRIORITY_PER_DEPTH_STEP * (predictor.depth - depth + 1)
            scores = (base + counts.float() / tokens) * (counts > 0)
            cache.set_priorities(target, scores)
            candidates += [(float(scores[e]), target, int(e)) for e in torch.nonzero(counts).reshape(-1).tolist()]
        allowed = budget.grant(cache.misses_since_creation()) if self.prefetch else 0
        if allowed > 0 and candidates:
            candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
            chosen: dict[int, list[int]] = {}
            picked = 0
            for _, target, e in candidates:
                if picked == allowed:
                    break
                if cache.slot_of(target, e) < 0:
                    chosen.setdefault(target, []).append(e)
                    picked += 1
            for target, experts in chosen.items():  # nearest layer first (dicts keep insertion order)
                budget.spend(cache.prefetch(target, experts))
        cache.set_priorities(layer, prior)

    def __repr__(self) -> str:
        return f"OffloadedExperts(layer {self.layer} of {self.cache!r})"
