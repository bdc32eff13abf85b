"""Trace-driven expert-cache simulation: the same routing replayed against every policy at one budget.

A trace is the routing of a run in execution order: trace[step][layer] = the experts that layer used at
that decode step (for the whole batch). Predictions, when given, are predictions[step][layer][depth-1] =
the experts guessed for `layer` at depth `depth`, made while the layer `depth` earlier ran (at the end of
a step, that is the next step's first layers), or None where no guess was made.

Counting: a load is one expert crossing PCIe. A request finds its expert resident (a hit; with
prefetching it counts as a hit when a prefetch brought it in ahead of the use) or not (a miss: an
on-demand load the compute waits for). A prefetched expert evicted before any use is wasted.

Policies:
  on_demand   nothing is kept: every routed expert is loaded when used (the floor any cache improves on)
  lru, lfu    demand loading with least-recently / least-frequently used eviction
  predictive  before layer l runs, the experts predicted for l+1..l+d are prefetched; experts predicted
              for the coming layers are evicted last (nearer layers last of all), then LRU
  belady      demand loading evicting the expert whose next use is farthest away (Belady's MIN): the
              fewest loads any demand-loading cache can do with this budget, knowing the future
  oracle      predictive with the true future routing as its predictions
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

POLICIES = ("on_demand", "lru", "lfu", "predictive", "belady", "oracle")


@dataclass
class SimResult:
    policy: str
    slots: int
    requests: int = 0
    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    wasted_prefetches: int = 0
    prefetch_hits: int = 0
    loads_after_warmup: int = 0
    misses_after_warmup: int = 0
    per_layer_misses: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def loads(self) -> int:
        return self.misses + self.prefetches

    def as_dict(self) -> dict:
        return {"policy": self.policy, "slots": self.slots, "requests": self.requests, "hits": self.hits,
                "misses": self.misses, "prefetches": self.prefetches, "prefetch_hits": self.prefetch_hits,
                "wasted_prefetches": self.wasted_prefetches, "loads": self.loads, "hit_rate": self.hit_rate,
                "misses_after_warmup": self.misses_after_warmup, "loads_after_warmup": self.loads_after_warmup,
                "per_layer_misses": dict(sorted(self.per_layer_misses.items()))}


def _accesses(trace):
    for step, layers in enumerate(trace):
        for layer, experts in enumerate(layers):
            yield step, layer, sorted(set(int(e) for e in experts))


def oracle_predictions(trace, depth: int) -> list:
    """Predictions that are the truth: what a perfect predictor would say."""
    num_layers = len(trace[0])
    return [[[sorted(set(trace[s][l])) for _ in range(1, depth + 1)] for l in range(num_layers)]
            for s in range(len(trace))]


def simulate(trace, slots: int, policy: str, *, predictions=None, depth: int = 1, warmup_steps: int = 1) -> SimResult:
    """Replay `trace` against `policy` with `slots` experts resident at most; see the module docstring."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if policy == "oracle":
        predictions, policy_kind = oracle_predictions(trace, depth), "predictive"
    else:
        policy_kind = policy
    if policy_kind == "predictive" and predictions is None:
        raise ValueError("the predictive policy needs predictions")
    result = SimResult(policy, slots)
    if policy_kind == "belady":
        return _belady(trace, slots, result, warmup_steps)

    resident: dict[tuple[int, int], dict] = {}  # (layer, expert) -> {last, uses, prefetched}
    priority: dict[tuple[int, int], int] = {}   # predicted for an upcoming layer: higher = nearer
    uses: dict[tuple[int, int], int] = {}
    clock = 0
    num_layers = len(trace[0]) if trace else 0

    def victim(protected):
        candidates = [k for k in resident if k not in protected]
        if not candidates:
            return None
        if policy_kind == "lfu":
            return min(candidates, key=lambda k: (uses.get(k, 0), resident[k]["last"]))
        return min(candidates, key=lambda k: (priority.get(k, 0), resident[k]["last"]))

    def load(key, protected, prefetch, min_priority=None):
        if len(resident) >= slots:
            v = victim(protected)
            if v is None:
                return False
            if min_priority is not None and priority.get(v, 0) >= min_priority:
                return False  # a prefetch never evicts something at least as wanted as itself
            if resident[v]["prefetched"]:
                result.wasted_prefetches += 1
            del resident[v]
        resident[key] = {"last": clock, "prefetched": prefetch}
        return True

    for step, layer, experts in _accesses(trace):
        clock += 1
        keys = [(layer, e) for e in experts]
        protected = set(keys)
        warm = step >= warmup_steps
        if policy_kind == "predictive":
            for k in list(priority):
                if k[0] == layer:
                    del priority[k]  # this layer's predictions are spent once it runs
        for k in keys:
            result.requests += 1
            uses[k] = uses.get(k, 0) + 1
            if policy_kind != "on_demand" and k in resident:
                result.hits += 1
                if resident[k]["prefetched"]:
                    result.prefetch_hits += 1
                    resident[k]["prefetched"] = False
                resident[k]["last"] = clock
                continue
            result.misses += 1
            result.per_layer_misses[layer] = result.per_layer_misses.get(layer, 0) + 1
            if warm:
                result.misses_after_warmup += 1
                result.loads_after_warmup += 1
            if policy_kind != "on_demand":
                load(k, protected, prefetch=False)
        if policy_kind == "predictive":
            # Issued while this layer computes, so they cannot evict this layer's experts.
            for d in range(1, depth + 1):
                target = layer + d
                target_step = step
                if target >= num_layers:  # the next step's first layers
                    target, target_step = target - num_layers, step + 1
                if target_step >= len(predictions):
                    continue
                guesses = predictions[target_step][target][d - 1]
                if guesses is None:  # no prediction made (a lookahead predictor cannot see the next token)
                    continue
                for e in guesses:
                    priority[(target, e)] = max(priority.get((target, e), 0), depth - d + 1)
                for e in guesses:
                    k = (target, e)
                    if k in resident:
                        continue
                    if load(k, protected, prefetch=True, min_priority=priority[k]):
                        result.prefetches += 1
                        if target_step >= warmup_steps:
                            result.loads_after_warmup += 1
    return result


def _belady(trace, slots: int, result: SimResult, warmup_steps: int) -> SimResult:
    accesses = [(step, layer, e) for step, layer, experts in _accesses(trace) for e in experts]
    order = [(layer, e) for _, layer, e in accesses]
    # next_use[i]: index of the next access of the same expert after i (inf if none)
    next_use = [float("inf")] * len(order)
    last_seen: dict = {}
    for i in range(len(order) - 1, -1, -1):
        next_use[i] = last_seen.get(order[i], float("inf"))
        last_seen[order[i]] = i
    resident: dict = {}  # key -> its next use
    heap: list = []      # (-next use, key) with lazy deletion
    for i, (step, layer, e) in enumerate(accesses):
        key = (layer, e)
        result.requests += 1
        if key in resident:
            result.hits += 1
        else:
            result.misses += 1
            result.per_layer_misses[layer] = result.per_layer_misses.get(layer, 0) + 1
            if step >= warmup_steps:
                result.misses_after_warmup += 1
                result.loads_after_warmup += 1
            if len(resident) >= slots:
                while heap:
                    neg_next, victim = heapq.heappop(heap)
                    if victim in resident and resident[victim] == -neg_next:
                        del resident[victim]
                        break
        resident[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return result
