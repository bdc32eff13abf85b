"""Trace-driven expert-cache simulation: the same routing replayed against every policy at one budget.

A trace is the routing of a run in execution order: trace[step][layer] = the experts that layer used at
that decode step (for the whole batch). Predictions, when given, are predictions[step][layer][depth-1] =
the experts guessed for `layer` at depth `depth`, made while the layer `depth` earlier ran (at the end of
a step, that is the next step's first layers), or None where no guess was made. Scores, optional, are a
parallel structure: scores[step][layer][depth-1][i] = the confidence in predictions[step][layer][depth-1][i]
(RoutingTrace.scores: how many tokens chose the expert); without them a guess's experts are equally sure.

Counting: a load is one expert crossing PCIe. A request finds its expert resident (a hit; with
prefetching it counts as a hit when a prefetch brought it in ahead of the use) or not (a miss: an
on-demand load the compute waits for). A prefetched expert evicted before any use is wasted.

Policies:
  on_demand   nothing is kept: every routed expert is loaded when used (the floor any cache improves on)
  lru, lfu    demand loading with least-recently / least-frequently used eviction
  predictive  before layer l runs, the experts predicted for l+1..l+d are prefetched; experts predicted
              for the coming layers are evicted last (nearer layers last of all), then LRU
  belady      demand loading evicting the expert whose next use is farthest away (Belady's MIN), or,
              where the expert needed now is needed again later than every resident one, reading it
              without caching it (as the other policies read a miss in place when no slot can be freed):
              the fewest loads any demand-loading cache can do with this budget, knowing the future
  oracle      predictive with the true future routing as its predictions
  budgeted    predictive that knows the PCIe budget (needs `timing`): while layer l computes, it copies
              predicted experts, nearest layer and most confident first, only while the copy would land
              before the target layer starts (copies already queued, demand loads first, counted), and
              a prefetch evicts only experts predicted with lower priority, never the running layer's
              experts; the rest are left to demand loading with prediction-steered eviction

Timing (optional, `timing=Timing(layer_ms, load_ms)`): one FIFO copy engine moves one expert in
load_ms; a layer computes for layer_ms once all its experts are in. A layer's misses are queued when it
is reached (behind any prefetches still in the queue), then its prefetches; the layer starts when its
last expert lands. Reported for every policy: stall_ms (time the compute waited for copies, the exposed
stall) and time_ms (compute + stall), over the whole trace and after warm-up (warmup_steps: the first n
steps, or the steps given, such as each micro-batch's prompt step in a trace of several); with record_bytes, the
bytes moved (loads x record bytes). Belady's loads are the bound for demand loading: prefetching may
move more bytes than that, never fewer experts than the misses it leaves.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ._checks import check_depth, steps_left_out

POLICIES = ("on_demand", "lru", "lfu", "predictive", "belady", "oracle", "budgeted")
PRIORITY_PER_DEPTH_STEP = 2.0  # budgeted: a guess d layers ahead gets 2 * (depth - d + 1) + confidence (<= 1)


@dataclass(frozen=True)
class Timing:
    """The timing model: layer_ms of compute per layer (per step), load_ms per expert copied over PCIe
    (one copy engine, first in first out); record_bytes, if given, turns loads into bytes moved."""

    layer_ms: float
    load_ms: float
    record_bytes: int | None = None

    def __post_init__(self):
        for name in ("layer_ms", "load_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"timing {name} must be a number >= 0, got {value!r}")
        if self.load_ms <= 0:
            raise ValueError(f"timing load_ms must be > 0, got {self.load_ms!r}")
        if self.record_bytes is not None and (isinstance(self.record_bytes, bool) or not isinstance(
                self.record_bytes, int) or self.record_bytes <= 0):
            raise ValueError(f"timing record_bytes must be a positive int or None, got {self.record_bytes!r}")

    @classmethod
    def from_pcie(cls, layer_ms: float, record_bytes: int, h2d_gbps: float) -> "Timing":
        """load_ms from an expert's bytes and the host-to-device rate (GB/s, 1e9 bytes)."""
        if not h2d_gbps > 0:
            raise ValueError(f"h2d_gbps must be > 0, got {h2d_gbps!r}")
        return cls(layer_ms, record_bytes / (h2d_gbps * 1e9) * 1e3, record_bytes)


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
    requests_after_warmup: int = 0
    hits_after_warmup: int = 0
    loads_after_warmup: int = 0
    misses_after_warmup: int = 0
    per_layer_misses: dict = field(default_factory=dict)
    record_bytes: int | None = None  # from the timing model: bytes per load
    stall_ms: float | None = None    # with a timing model: compute waiting on copies (exposed stall)
    time_ms: float | None = None     # ... compute + stall
    stall_ms_after_warmup: float | None = None
    time_ms_after_warmup: float | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def hit_rate_after_warmup(self) -> float | None:
        return self.hits_after_warmup / self.requests_after_warmup if self.requests_after_warmup else None

    @property
    def loads(self) -> int:
        return self.misses + self.prefetches

    @property
    def bytes_moved(self) -> int | None:
        return None if self.record_bytes is None else self.loads * self.record_bytes

    def as_dict(self) -> dict:
        return {"policy": self.policy, "slots": self.slots, "requests": self.requests, "hits": self.hits,
                "misses": self.misses, "prefetches": self.prefetches, "prefetch_hits": self.prefetch_hits,
                "wasted_prefetches": self.wasted_prefetches, "loads": self.loads, "hit_rate": self.hit_rate,
                "requests_after_warmup": self.requests_after_warmup, "hits_after_warmup": self.hits_after_warmup,
                "hit_rate_after_warmup": self.hit_rate_after_warmup,
                "misses_after_warmup": self.misses_after_warmup, "loads_after_warmup": self.loads_after_warmup,
                "bytes_moved": self.bytes_moved, "stall_ms": self.stall_ms, "time_ms": self.time_ms,
                "stall_ms_after_warmup": self.stall_ms_after_warmup, "time_ms_after_warmup": self.time_ms_after_warmup,
                "per_layer_misses": dict(sorted(self.per_layer_misses.items()))}


def _accesses(trace):
    for step, layers in enumerate(trace):
        for layer, experts in enumerate(layers):
            yield step, layer, sorted(set(int(e) for e in experts))


def oracle_predictions(trace, depth: int) -> list:
    """Predictions that are the truth: what a perfect predictor would say."""
    num_layers = len(trace[0]) if trace else 0
    return [[[sorted(set(trace[s][l])) for _ in range(1, depth + 1)] for l in range(num_layers)]
            for s in range(len(trace))]


def simulate(trace, slots: int, policy: str, *, predictions=None, scores=None, depth: int = 1,
             warmup_steps=1, timing: Timing | None = None) -> SimResult:
    """Replay `trace` against `policy` with `slots` experts resident at most; see the module docstring.

    trace: steps[s][layer] = the experts used, or a RoutingTrace (record_routing's), whose recorded
    predictions and scores are then the defaults.
    timing: a Timing (or a (layer_ms, load_ms) pair) adds stall and time to the result; the budgeted
    policy needs it (it decides what can land in time). scores: confidences parallel to predictions.
    warmup_steps: the steps the *_after_warmup figures leave out: the first n (an int), or these step
    indices (a trace of several micro-batches: each one's prompt step)."""
    if not isinstance(trace, (list, tuple)):
        steps = getattr(trace, "steps", None)
        if not isinstance(steps, list):
            raise TypeError(f"trace must be a RoutingTrace or a list of steps (steps[s][layer] = experts used), "
                            f"got {type(trace).__name__}")
        if predictions is None and trace.predictions:
            predictions, scores = trace.predictions, scores if scores is not None else (trace.scores or None)
        trace = steps
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    unmeasured = steps_left_out(warmup_steps, "warmup_steps")
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    check_depth(depth)
    if timing is not None and not isinstance(timing, Timing):
        if not isinstance(timing, (tuple, list)) or len(timing) not in (2, 3):
            raise ValueError(f"timing must be a Timing or (layer_ms, load_ms), got {timing!r}")
        timing = Timing(*timing)
    if policy == "oracle":
        predictions, scores, policy_kind = oracle_predictions(trace, depth), None, "predictive"
    else:
        policy_kind = policy
    if policy_kind in ("predictive", "budgeted") and predictions is None:
        raise ValueError(f"the {policy_kind} policy needs predictions")
    if policy_kind in ("predictive", "budgeted"):
        held = min((len(guesses) for step in predictions for guesses in step), default=depth)
        if held < depth:
            raise ValueError(f"depth={depth} but the predictions hold {held} depth(s) per layer")
    if policy_kind == "budgeted" and timing is None:
        raise ValueError("the budgeted policy needs timing=Timing(layer_ms, load_ms): it prefetches only what lands "
                         "in time")
    result = SimResult(policy, slots)
    if timing is not None:
        result.record_bytes = timing.record_bytes
        result.stall_ms = result.time_ms = result.stall_ms_after_warmup = result.time_ms_after_warmup = 0.0
    if policy_kind == "belady":
        return _belady(trace, slots, result, unmeasured, timing)

    resident: dict[tuple[int, int], dict] = {}  # (layer, expert) -> {last, prefetched}
    priority: dict[tuple[int, int], float] = {}  # predicted for an upcoming layer: higher = nearer / surer
    uses: dict[tuple[int, int], int] = {}
    ready: dict[tuple[int, int], float] = {}    # timing: when the expert's copy lands
    clock = 0
    now = engine_free = 0.0                     # timing: the compute clock, and when the copy queue drains
    num_layers = len(trace[0]) if trace else 0
    predicting = policy_kind in ("predictive", "budgeted")

    def victim(protected):
        candidates = [k for k in resident if k not in protected]
        if not candidates:
            return None
        if policy_kind == "lfu":
            return min(candidates, key=lambda k: (uses.get(k, 0), resident[k]["last"]))
        return min(candidates, key=lambda k: (priority.get(k, 0), resident[k]["last"]))

    def load(key, protected, prefetch, min_priority=None):
        nonlocal engine_free
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
        if timing is not None:
            engine_free = max(now, engine_free) + timing.load_ms
            ready[key] = engine_free
        return True

    def guesses_for(step, layer, d):
        """(target step, target layer, [(expert, confidence in (0, 1])]) of the guess made at depth d."""
        # Past the last layer: the first layers of a later step (d may span several steps).
        target_step, target = step + (layer + d) // num_layers, (layer + d) % num_layers
        if target_step >= len(predictions):
            return target_step, target, []
        guess = predictions[target_step][target][d - 1]
        if guess is None:  # no prediction made (a lookahead predictor cannot see the next token)
            return target_step, target, []
        sure = None
        if scores is not None and target_step < len(scores) and scores[target_step][target][d - 1] is not None:
            sure = [float(c) for c in scores[target_step][target][d - 1]]
        if not sure or max(sure) <= 0:
            return target_step, target, [(int(e), 1.0) for e in guess]
        top = max(sure)
        return target_step, target, [(int(e), c / top) for e, c in zip(guess, sure)]

    def prefetch(wanted, protected, start=None):
        for d, target_step, k in wanted:
            if k in resident:
                continue
            if start is not None and max(now, engine_free) + timing.load_ms > start + d * timing.layer_ms:
                continue  # would land after layer l+d starts: it would only delay the demand loads behind it
            if load(k, protected, prefetch=True, min_priority=priority[k]):
                result.prefetches += 1
                if target_step not in unmeasured:
                    result.loads_after_warmup += 1

    for step, layer, experts in _accesses(trace):
        clock += 1
        keys = [(layer, e) for e in experts]
        protected = set(keys)
        warm = step not in unmeasured
        if predicting:
            for k in list(priority):
                if k[0] == layer:
                    del priority[k]  # this layer's predictions are spent once it runs
        arrive = now
        needed_by = now
        for k in keys:
            result.requests += 1
            result.requests_after_warmup += warm
            uses[k] = uses.get(k, 0) + 1
            if policy_kind != "on_demand" and k in resident:
                result.hits += 1
                result.hits_after_warmup += warm
                if resident[k]["prefetched"]:
                    result.prefetch_hits += 1
                    resident[k]["prefetched"] = False
                resident[k]["last"] = clock
                if timing is not None:
                    needed_by = max(needed_by, ready[k])
                continue
            result.misses += 1
            result.per_layer_misses[layer] = result.per_layer_misses.get(layer, 0) + 1
            if warm:
                result.misses_after_warmup += 1
                result.loads_after_warmup += 1
            if policy_kind != "on_demand":
                if not load(k, protected, prefetch=False) and timing is not None:
                    engine_free = max(now, engine_free) + timing.load_ms  # read in place: same bytes
                    needed_by = max(needed_by, engine_free)
                elif timing is not None:
                    needed_by = max(needed_by, ready[k])
            elif timing is not None:
                engine_free = max(now, engine_free) + timing.load_ms
                needed_by = max(needed_by, engine_free)
        start = needed_by  # this layer computes once its experts are in
        if predicting:
            # Issued while this layer computes, so they cannot evict this layer's experts.
            wanted = []
            for d in range(1, depth + 1):
                target_step, target, guesses = guesses_for(step, layer, d)
                group = []
                for e, sure in guesses:
                    if policy_kind == "budgeted":
                        score = PRIORITY_PER_DEPTH_STEP * (depth - d + 1) + sure
                    else:
                        score = depth - d + 1
                    priority[(target, e)] = max(priority.get((target, e), 0), score)
                    group.append((d, target_step, (target, e)))
                if policy_kind == "predictive":  # every guess, depth by depth
                    prefetch(group, protected)
                else:
                    wanted += group
            if policy_kind == "budgeted":
                wanted.sort(key=lambda w: -priority[w[2]])  # nearest layer, then most confident, first
                prefetch(wanted, protected, start=start)
        if timing is not None:
            now = start + timing.layer_ms
            result.stall_ms += start - arrive
            result.time_ms += now - arrive
            if warm:
                result.stall_ms_after_warmup += start - arrive
                result.time_ms_after_warmup += now - arrive
    return result


def _belady(trace, slots: int, result: SimResult, unmeasured, timing: Timing | None) -> SimResult:
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
        warm = step not in unmeasured
        result.requests += 1
        result.requests_after_warmup += warm
        if key in resident:
            result.hits += 1
            result.hits_after_warmup += warm
        else:
            result.misses += 1
            result.per_layer_misses[layer] = result.per_layer_misses.get(layer, 0) + 1
            if warm:
                result.misses_after_warmup += 1
                result.loads_after_warmup += 1
            if len(resident) >= slots:
                while not (heap[0][1] in resident and resident[heap[0][1]] == -heap[0][0]):
                    heapq.heappop(heap)  # entries left behind by a later use of the same expert
                if -heap[0][0] <= next_use[i]:
                    continue  # every resident expert is needed sooner: read this one without caching it
                del resident[heapq.heappop(heap)[1]]
        resident[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    if timing is not None:
        # Demand loading only: the queue is empty when a layer is reached, so each miss stalls load_ms.
        runs = sum(len(layers) for layers in trace)
        warm_runs = sum(len(layers) for step, layers in enumerate(trace) if step not in unmeasured)
        result.stall_ms = result.misses * timing.load_ms
        result.stall_ms_after_warmup = result.misses_after_warmup * timing.load_ms
        result.time_ms = result.stall_ms + runs * timing.layer_ms
        result.time_ms_after_warmup = result.stall_ms_after_warmup + warm_runs * timing.layer_ms
    return result
