"""Prefetching within a PCIe budget: the simulator's timing model and its budgeted policy (hand-made
traces, hand-computed stalls), and the live policy (Offload(policy="budgeted")) on the real cache."""
import random

import numpy as np
import pytest
import torch

import moecache
from moecache import Offload, prefetch_allowance
from moecache.analysis.simulate import POLICIES, Timing, simulate
from moecache.cache import ExpertCache
from moecache.cache.offloaded import OffloadedExperts, PrefetchBudget
from moecache.cache.predictor import LookaheadPredictor, RouterSpec

from builders import random_layers

# ------------------------------------------------------------------ simulator: timing model


def test_belady_is_the_fewest_loads_even_below_a_layers_experts():
    """A layer using more experts than there are slots: LRU and LFU read the extra ones in place without
    caching them. Regression: MIN always evicted, thrashed, and loaded almost twice what LRU did."""
    trace = [[[1, 2]] for _ in range(10)]
    assert simulate(trace, 1, "belady").loads == simulate(trace, 1, "lru").loads == 11
    rng = random.Random(0)
    for _ in range(60):
        trace = [[sorted(rng.sample(range(8), rng.randint(1, 4))) for _ in range(2)] for _ in range(30)]
        for slots in (1, 2, 3, 5, 8):
            best = simulate(trace, slots, "belady").loads
            assert best <= min(simulate(trace, slots, p).loads for p in ("lru", "lfu", "on_demand")), (trace, slots)


def test_timing_model_on_demand_lru_and_belady_by_hand():
    """layer 1 ms, load 0.5 ms. Step 0: layer 0 misses 0, 1 (land at 0.5, 1.0: stall 1.0, done 2.0);
    layer 1 misses 2 (lands 2.5: stall 0.5, done 3.5). Step 1 hits everything: 2 ms more.
    On demand loads all five: stall 1.0 + 0.5 + 0.5 + 0.5."""
    trace = [[[0, 1], [2]], [[0], [2]]]
    timing = Timing(layer_ms=1.0, load_ms=0.5, record_bytes=100)
    for policy in ("lru", "lfu", "belady"):
        r = simulate(trace, 8, policy, timing=timing, warmup_steps=0)
        assert (r.loads, r.stall_ms, r.time_ms, r.bytes_moved) == (3, 1.5, 5.5, 300), policy
    r = simulate(trace, 8, "on_demand", timing=timing, warmup_steps=1)
    assert (r.loads, r.stall_ms, r.time_ms, r.bytes_moved) == (5, 2.5, 6.5, 500)
    assert (r.stall_ms_after_warmup, r.time_ms_after_warmup) == (1.0, 3.0)
    assert simulate(trace, 8, "lru", timing=(1.0, 0.5)).stall_ms == 1.5  # a plain pair works too
    assert simulate(trace, 8, "lru").stall_ms is None  # no timing model: no times
    row = simulate(trace, 8, "lru", timing=timing).as_dict()
    assert {"loads", "bytes_moved", "stall_ms", "time_ms"} <= set(row)


# One step, three layers using experts 0, 1, 2 (one each); layer 1 was guessed from layer 0 as
# [5, 6, 1] with 1, 1 and 3 tokens, layer 2 from layer 1 as [2]. Layer 1 ms, load 1 ms.
HAND_TRACE = [[[0], [1], [2]]]
HAND_PREDICTIONS = [[[None], [[5, 6, 1]], [[2]]]]
HAND_SCORES = [[[None], [[1, 1, 3]], [[4]]]]


def test_predictive_copies_queue_ahead_of_what_is_needed():
    """Predictive copies every guess in order: (1,5), (1,6), (1,1) land at 2, 3, 4, so layer 1 (reached at
    2) waits for (1,1) until 4; (2,2) lands at 5, layer 2 starts at 5. Stall 1 + 2, 6 ms, 1 miss + 4 copies."""
    r = simulate(HAND_TRACE, 10, "predictive", predictions=HAND_PREDICTIONS, scores=HAND_SCORES,
                 timing=Timing(1.0, 1.0), warmup_steps=0)
    assert (r.misses, r.prefetches, r.loads, r.stall_ms, r.time_ms) == (1, 4, 5, 3.0, 6.0)


def test_budgeted_copies_only_what_lands_in_time_most_confident_first():
    """Budgeted: layer 0 waits for its miss until 1 and starts; (1,1), the surest guess, lands at 2 when
    layer 1 starts: copied; (1,5) would land at 3: skipped. Layer 1 starts at 2 with no stall; (2,2)
    lands at 3 as layer 2 starts. Stall 1 (the cold miss), 4 ms, 3 loads: what on-demand loads."""
    kw = dict(predictions=HAND_PREDICTIONS, scores=HAND_SCORES, timing=Timing(1.0, 1.0), warmup_steps=0)
    r = simulate(HAND_TRACE, 10, "budgeted", **kw)
    assert (r.misses, r.prefetches, r.prefetch_hits, r.loads, r.stall_ms, r.time_ms) == (1, 2, 2, 3, 1.0, 4.0)
    on_demand = simulate(HAND_TRACE, 10, "on_demand", **kw)
    assert (on_demand.loads, on_demand.stall_ms, on_demand.time_ms) == (3, 3.0, 6.0)
    assert simulate(HAND_TRACE, 10, "belady", **kw).loads == 3
    # Without scores every guess is as sure: list order, so (1,5) takes the only in-time copy.
    r = simulate(HAND_TRACE, 10, "budgeted", predictions=HAND_PREDICTIONS, timing=Timing(1.0, 1.0), warmup_steps=0)
    assert (r.misses, r.prefetches, r.stall_ms) == (2, 2, 2.0)


def test_budgeted_needs_timing_and_predictions():
    with pytest.raises(ValueError, match="timing"):
        simulate(HAND_TRACE, 4, "budgeted", predictions=HAND_PREDICTIONS)
    with pytest.raises(ValueError, match="predictions"):
        simulate(HAND_TRACE, 4, "budgeted", timing=Timing(1.0, 1.0))
    with pytest.raises(ValueError, match="load_ms"):
        Timing(1.0, 0.0)
    with pytest.raises(ValueError, match="timing"):
        simulate(HAND_TRACE, 4, "lru", timing=1.0)
    assert Timing.from_pcie(0.04, 3 * 2048 * 1408 * 2, 55.0).load_ms == pytest.approx(0.3146, abs=1e-4)


def test_budgeted_never_evicts_the_running_layer_or_a_surer_guess():
    """Two slots. Layer 0 runs expert 0; guesses: layer 1 -> [1] (depth 1), layer 2 -> [2] (depth 2). (1,1)
    takes the free slot; (2,2) would need a victim, but the only ones are the running layer's expert and
    the nearer guess: no copy. Layer 1 then hits."""
    trace = [[[0], [1], [3]]]
    predictions = [[[None, None], [[1], None], [[4], [2]]]]
    r = simulate(trace, 2, "budgeted", predictions=predictions, depth=2, timing=Timing(10.0, 1.0), warmup_steps=0)
    assert r.per_layer_misses.get(1, 0) == 0 and r.prefetch_hits >= 1
    # The pool holds only the running layer's experts: the guess for layer 1 finds no victim.
    alone = simulate([[[0, 1], [2]]], 2, "budgeted", predictions=[[[None], [[2]]]], timing=Timing(10.0, 1.0),
                     warmup_steps=0)
    assert (alone.prefetches, alone.misses) == (0, 3)


def random_trace(steps=60, layers=4, experts=16, k=4, seed=0):
    rng = random.Random(seed)
    favourites = [rng.sample(range(experts), experts // 2) for _ in range(layers)]
    return [[sorted(rng.sample(favourites[l] if rng.random() < 0.8 else list(range(experts)), k))
             for l in range(layers)] for _ in range(steps)]


def noisy_predictions(trace, depth, wrong=6, seed=1):
    """Each guess: the truth plus `wrong` wrong experts, the truth with 3 tokens, the rest 1 (scores)."""
    rng = random.Random(seed)
    L = len(trace[0])
    preds, scores = [], []
    for s in trace:
        ps, ss = [], []
        for layer in range(L):
            guesses, sure = [], []
            for _ in range(depth):
                extra = rng.sample([e for e in range(16) if e not in s[layer]], wrong)
                g = sorted(set(s[layer]) | set(extra))
                guesses.append(g)
                sure.append([3 if e in s[layer] else 1 for e in g])
            ps.append(guesses)
            ss.append(sure)
        preds.append(ps)
        scores.append(ss)
    return preds, scores


@pytest.mark.parametrize("slots", [8, 16, 32])
def test_budgeted_moves_fewer_experts_than_predictive_where_over_prefetching_hurts(slots):
    """Copies as slow as 5 layers of compute and guesses mostly wrong: predictive floods the copy queue;
    budgeted copies no more experts, stalls less, and with less time than one copy per layer, copies none."""
    trace = random_trace()
    preds, scores = noisy_predictions(trace, depth=2)
    timing = Timing(layer_ms=0.2, load_ms=1.0)
    kw = dict(predictions=preds, scores=scores, depth=2, timing=timing)
    predictive = simulate(trace, slots, "predictive", **kw)
    budgeted = simulate(trace, slots, "budgeted", **kw)
    assert budgeted.loads <= predictive.loads and budgeted.stall_ms < predictive.stall_ms
    assert budgeted.prefetches == 0  # 2 layers x 0.2 ms < one 1 ms copy: nothing lands in time
    for r in (predictive, budgeted):
        assert r.hits + r.misses == r.requests
    # Cheap copies: budgeted prefetches, and everything it copies lands before its layer starts.
    fast = simulate(trace, slots, "budgeted", **{**kw, "timing": Timing(layer_ms=1.0, load_ms=0.3)})
    assert fast.prefetches > 0 and fast.prefetch_hits > 0
    assert set(POLICIES) >= {"budgeted", "belady"}


def test_budgeted_prefetch_lands_in_time_so_prefetch_hits_never_stall():
    """With copies that fit, every prefetch budgeted issues lands before its target layer starts: a run
    whose misses are all cold (every slot large enough, an oracle as predictor) stalls only on them."""
    trace = random_trace(steps=20)
    truth = [[[sorted(s[l]) for _ in range(1)] for l in range(4)] for s in trace]
    timing = Timing(layer_ms=1.0, load_ms=0.2)
    r = simulate(trace, 64, "budgeted", predictions=truth, depth=1, timing=timing, warmup_steps=0)
    assert r.stall_ms == pytest.approx(r.misses * timing.load_ms)  # the prefetched never made anyone wait
    assert r.prefetches > 0


# ------------------------------------------------------------------ live: Offload(policy="budgeted")


def test_prefetch_allowance_and_budget_arithmetic():
    # a DeepSeek-VL2-Small expert at 55 GB/s: 0.3146 ms; 40 us of compute moves 0.127 of it
    assert prefetch_allowance(0.04, 55.0, 3 * 2048 * 1408 * 2) == pytest.approx(0.04 / 0.31457, rel=1e-3)
    assert prefetch_allowance(1.0, 1.0, 1_000_000) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="h2d_gbps"):
        prefetch_allowance(0.04, 0, 100)
    assert prefetch_allowance(1e-300, 1e300, 1) == pytest.approx(1e6)  # no overflow on the way
    assert prefetch_allowance(np.float32(1.0), 1.0, np.int64(1_000_000)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no finite allowance"):
        prefetch_allowance(1e300, 1e300, 1)
    with pytest.raises(ValueError, match="record_bytes must be a whole number"):
        prefetch_allowance(1.0, 1.0, 1e6)
    b = PrefetchBudget(1.5, lookahead=2)  # window 3
    assert b.grant(0) == 3  # starts with an empty queue: the window
    b.spend(3)
    assert b.grant(0) == 1  # 0 + 1.5
    b.spend(1)
    assert b.grant(2) == 0  # 0.5 + 1.5 - 2 misses (the counter is cumulative: 0 -> 2) = 0
    assert b.grant(2) == 1  # + 1.5, no new miss
    assert b.grant(9) == 0  # capped at the window (3), then 7 misses: in debt
    assert b.credit == pytest.approx(-4.0)
    assert PrefetchBudget(0.4, lookahead=2).grant(0) == 0  # the window (0.8) holds no whole copy


def test_a_layer_call_with_no_tokens_leaves_the_predictions_alone():
    """No tokens: nothing to predict from (the per-token shares were 0/0, NaN priorities that no prefetch
    could ever evict), and nothing observed."""
    H, E = 32, 8
    with ExpertCache(random_layers(L=2, E=E, H=H, I=16), num_slots=4, policy="priority", device="cpu") as cache:
        predictor = LookaheadPredictor([RouterSpec(torch.randn(E, H)), RouterSpec(torch.randn(E, H))], depth=1)
        provider = OffloadedExperts(cache, 0, predictor=predictor, prefetch=True)
        out = provider(torch.randn(0, H), torch.zeros(0, 2, dtype=torch.long), torch.rand(0, 2),
                       activation_args=dict(activation="silu"), interleaved=False, biases={})
        assert out.shape == (0, H)
        assert cache.stats()["prefetches"] == 0
        assert predictor.summary() == LookaheadPredictor(predictor.routers, depth=1).summary()
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="finite"):
                cache.set_priorities(1, [bad] + [0.0] * (E - 1))


def _tiny_deepseek(layers=4):
    import builders

    return builders.deepseek("v2", seed=0, num_hidden_layers=layers, num_experts_per_tok=2, q_lora_rank=None,
                             topk_method="greedy")


def test_offload_budgeted_is_validated():
    pytest.importorskip("transformers")
    model = _tiny_deepseek()
    for bad, match in ((Offload(policy="budgeted"), "needs prefetch_limit"),
                       (Offload(policy="budgeted", prefetch_limit=-1), "prefetch_limit must be"),
                       (Offload(policy="budgeted", prefetch_limit=True), "prefetch_limit must be"),
                       (Offload(policy="budgeted", prefetch_limit=float("inf")), "prefetch_limit must be"),
                       (Offload(policy="predictive", prefetch_limit=2), "prefetch_limit=2 needs policy='budgeted'"),
                       (Offload(policy="budgeted", prefetch_limit=1, lookahead=0), "lookahead")):
        with pytest.raises(ValueError, match=match):
            moecache.patch(model, offload=bad)
        assert not moecache.stats(model)["patched"]  # nothing changed


def test_budgeted_prefetch_never_evicts_the_running_layers_experts():
    """Two slots hold layer 0's experts 0 and 1, not leased (their copies landed; a caller reading in
    place leases only those). While layer 0 prefetches its guesses for layer 1, they outrank every guess:
    the cache's priority eviction finds no victim, and they stay."""
    H, E = 32, 8
    layers = random_layers(L=2, E=E, H=H, I=16)
    cache = ExpertCache(layers, num_slots=2, policy="priority", device="cpu")
    try:
        assert cache.prefetch(0, [0, 1]) == 2
        cache.synchronize()
        cache.reset_stats()
        w = torch.zeros(E, H)
        w[5], w[6] = 1.0, 0.5  # layer 1's router picks experts 5 and 6 for an all-ones input
        predictor = LookaheadPredictor([RouterSpec(torch.zeros(E, H)), RouterSpec(w)], depth=1)
        provider = OffloadedExperts(cache, 0, predictor=predictor, prefetch=True, budget=PrefetchBudget(4, 1))
        provider._predict_and_prefetch(torch.ones(1, H), 2, [0, 1])
        assert cache.resident(0) == [0, 1] and cache.stats()["prefetches"] == 0
        # The same guesses once layer 0's experts are no longer running: they drop to the prior and go.
        other = OffloadedExperts(cache, 0, predictor=predictor, prefetch=True, budget=PrefetchBudget(4, 1))
        other._predict_and_prefetch(torch.ones(1, H), 2, [3])
        assert sorted(cache.resident(1)) == [5, 6] and cache.stats()["prefetches"] == 2
    finally:
        cache.close()


def test_prefetch_copies_the_highest_priority_first():
    """The core copies a prefetch list in priority order: when the pool has room for one, the surest
    guess gets it whatever its id, and the rest stop there."""
    with ExpertCache(random_layers(), num_slots=2, policy="priority") as cache:
        cache.set_priorities(0, [3.0, 3.0] + [0.0] * 6)
        assert cache.prefetch(0, [0, 1]) == 2
        cache.set_priorities(0, [0.5, 3.0] + [0.0] * 6)
        cache.set_priorities(1, [1.0, 0.2, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0])
        assert cache.prefetch(1, [0, 1, 6]) == 1  # only (0,0) (0.5) can go: the 2.0 guess takes it
        assert cache.resident(1) == [6] and cache.resident(0) == [1]


def test_budgeted_offload_tokens_match_resident_and_copies_stay_within_the_allowance():
    """The shipped trained tiny model, fp32 on the CPU (torch backend): greedy tokens identical to all
    experts resident, and the copies the policy starts within what its allowance earned."""
    pytest.importorskip("transformers")
    from moecache.data import encode, load_tiny_moe, validation_text

    try:
        model = load_tiny_moe(device="cpu", dtype=torch.float32)
    except OSError as err:
        pytest.skip(f"no trained checkpoint: {err}")
    ids = encode(validation_text())[0][:48].reshape(2, 24)
    mask = torch.ones_like(ids)
    new = 8
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    for limit, lookahead in ((1.0, 2), (0.5, 1), (0.0, 2)):
        moecache.patch(model, offload=Offload(gpu_experts=0.25, policy="budgeted", prefetch_limit=limit,
                                              lookahead=lookahead))
        try:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False)
            assert torch.equal(out, ref), (limit, lookahead)
            s = moecache.stats(model)
            calls = s["calls"]  # layer calls: each earns `limit` experts of copies
            c = s["cache"]
            assert c["prefetches"] <= limit * lookahead + limit * calls, (limit, c["prefetches"], calls)
            # paid for every miss too: the copies and misses together stay within the earned allowance
            # plus the misses it could not cover (the debt is repaid before any prefetch)
            if limit == 0:
                assert c["prefetches"] == 0
            assert c["hits"] + c["misses"] == c["requests"] > 0
            assert s["prediction"]["by_depth"][1]["recall"] > 0
        finally:
            moecache.unpatch(model)


def test_the_budget_is_charged_for_misses_that_reset_stats_zeroed():
    """Regression: the budget charged demand loads from the cache's miss counter, which reset_stats zeroes,
    so the loads between the last charge and a reset went unpaid and the policy prefetched more."""
    with ExpertCache(random_layers(), num_slots=3, policy="lru") as cache:
        budget = PrefetchBudget(1.0, lookahead=2)
        assert budget.grant(cache.misses_since_creation()) == 2
        for e in (0, 1):
            cache.ensure(0, [e]).release()
        cache.reset_stats()
        assert cache.stats()["misses"] == 0 and cache.misses_since_creation() == 2
        cache.ensure(0, [2]).release()
        assert cache.misses_since_creation() == 3
        assert budget.grant(cache.misses_since_creation()) == 0  # min(2 + 1, 2) - 3 misses
