"""moecache.cache.ExpertCache and moecache._C's prefetcher (host backend here; GPU tests marked)."""
import os
import random
import threading
import time
import weakref

import pytest
import torch

from moecache import _C, ops
from moecache.cache import ExpertCache, expert_source
from moecache.ops.reference import fused_moe_reference, route_reference
from moecache.testing import assert_close

from builders import DEVICE, random_layers


def assert_slot_holds(cache, layers, layer, expert):
    slot = cache.slot_of(layer, expert)
    assert slot >= 0, f"expert {expert} of layer {layer} is not resident"
    gate_up, down = cache.slot_weights()
    assert torch.equal(gate_up[slot].cpu(), layers[layer][0][expert])
    assert torch.equal(down[slot].cpu(), layers[layer][1][expert])


def test_host_store_holds_every_master_and_slots_match_after_prefetch_and_ensure():
    layers = random_layers(dtype=torch.float16)
    with ExpertCache(layers, num_slots=5) as cache:
        for layer in range(3):
            gate_up, down = cache.host_weights(layer)
            assert torch.equal(gate_up, layers[layer][0]) and torch.equal(down, layers[layer][1])
        assert cache.prefetch(1, [7, 2, 2, 5]) == 3
        lease = cache.ensure(0, [4, 1])
        assert lease.slots == [cache.slot_of(0, 4), cache.slot_of(0, 1)]
        cache.synchronize()
        for layer, expert in [(1, 7), (1, 2), (1, 5), (0, 4), (0, 1)]:
            assert_slot_holds(cache, layers, layer, expert)
        expert_map = cache.expert_map(1).cpu()
        assert expert_map.tolist() == [cache.slot_of(1, e) for e in range(8)]
        assert sorted(cache.resident(1)) == [2, 5, 7]
        cache.release(lease)


def test_pack_copies_merges_adjacent_source_and_destination():
    jobs = [(120, 30, 10), (100, 10, 10), (110, 20, 10), (500, 40, 10), (900, 50, 10)]
    assert _C.pack_copies(jobs) == [(100, 10, 30), (500, 40, 10), (900, 50, 10)]


def test_fresh_pool_fills_in_order_and_packs_the_copies():
    layers = random_layers(E=8)
    with ExpertCache(layers, num_slots=8) as cache:
        cache.prefetch(0, range(8))
        cache.synchronize()
        s = cache.stats()
        assert [cache.slot_of(0, e) for e in range(8)] == list(range(8))
        assert s["transfers"] == 1 and s["bytes_copied"] == 8 * cache.record_bytes


def test_lru_evicts_the_least_recently_used():
    with ExpertCache(random_layers(), num_slots=3, policy="lru") as cache:
        for e in (0, 1, 2):
            cache.ensure(0, [e]).release()
        cache.ensure(0, [0]).release()  # 1 is now the oldest
        cache.ensure(0, [3]).release()
        assert sorted(cache.resident(0)) == [0, 2, 3]


def test_lfu_evicts_the_least_frequently_used():
    with ExpertCache(random_layers(), num_slots=3, policy="lfu") as cache:
        for e, times in ((0, 3), (1, 1), (2, 2)):
            for _ in range(times):
                cache.ensure(0, [e]).release()
        cache.ensure(0, [3]).release()
        assert sorted(cache.resident(0)) == [0, 2, 3]
        cache.ensure(0, [4]).release()  # 3 (one use, newer) vs 2 (two uses): 3 goes
        assert sorted(cache.resident(0)) == [0, 2, 4]


def test_priority_evicts_the_lowest_score_and_prefetch_never_evicts_a_better_expert():
    with ExpertCache(random_layers(), num_slots=3, policy="priority") as cache:
        cache.set_priorities(0, [5, 1, 9, 0, 7, 3, 2, 8])
        assert cache.prefetch(0, [0, 1, 2]) == 3
        cache.ensure(0, [3]).release()  # demand: evicts the lowest score, expert 1
        assert sorted(cache.resident(0)) == [0, 2, 3]
        assert cache.prefetch(0, [6]) == 1  # 6 (score 2) may only replace 3 (score 0)
        assert sorted(cache.resident(0)) == [0, 2, 6]
        assert cache.prefetch(0, [1]) == 0  # 1 (score 1) scores below every resident expert
        assert cache.prefetch(0, [7]) == 1  # 7 (score 8) replaces the lowest, 6
        assert sorted(cache.resident(0)) == [0, 2, 7]
        with pytest.raises(ValueError, match="one value per expert"):
            cache.set_priorities(0, [1.0, 2.0])
        with pytest.raises(ValueError, match="scores must be finite, got nan for expert 2"):
            cache._core.set_priorities(0, [1.0, 2.0, float("nan"), 0, 0, 0, 0, 0])  # the core's own check


def test_never_evict_experts_stay():
    with ExpertCache(random_layers(), num_slots=3) as cache:
        cache.keep_resident(0, [6])
        for e in range(6):
            cache.ensure(1, [e]).release()
        assert cache.resident(0) == [6]
        cache.allow_eviction(0, [6])
        for e in range(6):
            cache.ensure(1, [e]).release()
        assert cache.resident(0) == []


def test_an_expert_in_use_is_never_evicted_even_with_a_tiny_pool():
    layers = random_layers()
    with ExpertCache(layers, num_slots=1) as cache:
        in_use = cache.ensure(0, [3])
        assert in_use.slots == [0]
        assert cache.prefetch(2, [1, 2]) == 0  # the only slot is in use by layer 0
        blocked = cache.ensure(1, [5])
        assert blocked.slots == [-1]
        assert_slot_holds(cache, layers, 0, 3)
        blocked.release()
        in_use.release()
        with cache.ensure(1, [5]) as lease:
            assert lease.slots == [0]
            assert_slot_holds(cache, layers, 1, 5)
        assert cache._core.leases_held() == 0
        with pytest.raises(ValueError, match="not held"):
            cache._core.release(12345)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("slots,T,misses", [(2, 6, "copy"), (3, 19, "copy"), (4, 3, "in_place"), (40, 19, "copy")],
                         ids=["rounds-decode", "rounds-grouped", "in-place", "roomy"])
def test_layer_output_matches_reference(slots, T, misses, backend):
    """A pool smaller than the layer's active experts works in rounds; in place reads the host copy.
    Each expert a layer call routes to is one request, however many rounds it takes (regression: every
    round counted its experts again, as requests and misses, and as uses for LFU)."""
    L, E, H, I, K = 2, 8, 40, 24, 3
    layers = random_layers(L, E, H, I)
    routed = 0
    with ExpertCache(layers, num_slots=slots) as cache:
        for layer in range(L):
            x = torch.randn(T, H)
            w, ids = route_reference(torch.randn(T, E), K)
            assert len(torch.unique(ids)) > min(slots, E - 1) or slots == 40
            routed += len(torch.unique(ids))
            out = cache.moe(layer, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses=misses, backend=backend)
            assert_close(out.cpu(), fused_moe_reference(x, *layers[layer], w, ids), torch.float32)
        s = cache.stats()
        assert s["hits"] + s["misses"] == s["requests"] == routed
        if misses == "copy":  # an empty pool, and each layer's experts new to it
            assert s["misses"] == routed and s["bytes_copied"] == routed * cache.record_bytes
        if misses == "in_place":  # misses fill the empty slots first (copies), the rest are read in place
            copied = s["misses"] - s["in_place_reads"]
            assert copied == slots and s["in_place_reads"] > 0 and s["bytes_copied"] == copied * cache.record_bytes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_token_misses_are_copied_into_the_slots_the_policy_frees(backend):
    """Regression: a miss read in place was never copied into a slot, so one-token calls never cached
    anything: a pool with room for every expert served 50 identical calls with 0 hits (and a patched
    model's first layer, which no prefetch reaches, never hit); then a full pool never changed on demand,
    so LRU and LFU evicted nothing in decode. An explicit misses="in_place" still leaves a full pool as
    it is."""
    L, E, H, I, K = 2, 8, 32, 16, 2
    layers = random_layers(L, E, H, I)
    x = torch.randn(1, H)
    w, ids = route_reference(torch.randn(1, E), K)
    with ExpertCache(layers, num_slots=L * E) as cache:
        for _ in range(5):
            for layer in range(L):
                out = cache.moe(layer, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), backend=backend)
                assert_close(out.cpu(), fused_moe_reference(x, *layers[layer], w, ids), torch.float32)
        s = cache.stats()
        assert (s["misses"], s["hits"], s["in_place_reads"]) == (L * K, 4 * L * K, 0)
        assert s["bytes_copied"] == L * K * cache.record_bytes
        for layer in range(L):
            assert sorted(cache.resident(layer)) == sorted(ids[0].tolist())
            for e in ids[0].tolist():
                assert_slot_holds(cache, layers, layer, e)

    def one(expert):
        return torch.ones(1, 1), torch.tensor([[expert]])

    for policy, evicted in (("lru", 0), ("lfu", 1)):  # LRU evicts the least recent (0), LFU the least used (1)
        with ExpertCache(layers, num_slots=2, policy=policy) as cache:
            for e in (0, 0, 0, 1, 2):  # the pool is full after 0 and 1; then 2 takes the victim's slot
                weights, expert = one(e)
                out = cache.moe(0, x.to(DEVICE), weights.to(DEVICE), expert.to(DEVICE), backend=backend)
                assert_close(out.cpu(), fused_moe_reference(x, *layers[0], weights, expert), torch.float32)
            assert sorted(cache.resident(0)) == sorted({0, 1, 2} - {evicted})
            s = cache.stats()
            assert (s["misses"], s["hits"], s["evictions"], s["in_place_reads"]) == (3, 2, 1, 0)
            for e in cache.resident(0):
                assert_slot_holds(cache, layers, 0, e)
    with ExpertCache(layers, num_slots=1) as cache:  # more experts in one call than slots: the rest in place
        out = cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), backend=backend)
        assert_close(out.cpu(), fused_moe_reference(x, *layers[0], w, ids), torch.float32)
        s = cache.stats()
        assert (s["misses"], s["in_place_reads"], s["evictions"]) == (K, K - 1, 0)
    with ExpertCache(layers, num_slots=K) as cache:  # explicit in place: full after the first call, then kept
        cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), backend=backend, misses="in_place")
        other = torch.tensor([[e for e in range(E) if e not in ids[0].tolist()][:K]], dtype=ids.dtype)
        out = cache.moe(0, x.to(DEVICE), w.to(DEVICE), other.to(DEVICE), backend=backend, misses="in_place")
        assert_close(out.cpu(), fused_moe_reference(x, *layers[0], w, other), torch.float32)
        s = cache.stats()
        assert (s["misses"], s["in_place_reads"], s["evictions"]) == (2 * K, K, 0)
        assert sorted(cache.resident(0)) == sorted(ids[0].tolist())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rounds_run_no_expert_on_a_token_not_routed_to_it(backend, dtype):
    """Regression: rounds pointed the routes outside a round at an expert of the round with weight 0, so
    that expert ran on tokens not routed to it, and an output not finite there (an fp16 overflow) made
    0 * inf = NaN in a token whose own experts are finite."""
    L, E, H, I, K, T = 1, 6, 32, 16, 2, 7
    layers = random_layers(L, E, H, I, dtype=dtype)
    layers[0][1][0, 3, 5] = float("inf")  # every output of expert 0 is not finite
    x = torch.randn(T, H, dtype=dtype)
    w, ids = route_reference(torch.randn(T, E), K)
    ids[:2] = torch.tensor([[0, 1], [1, 0]], dtype=ids.dtype)  # two tokens routed to expert 0, the rest not
    ids[2:] = torch.tensor([[2, 3], [4, 5], [3, 4], [5, 2], [2, 4]], dtype=ids.dtype)
    ref = fused_moe_reference(x, *layers[0], w, ids)
    with ExpertCache(layers, num_slots=2) as cache:  # 6 experts routed, 2 slots: 3 rounds
        out = cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses="copy", backend=backend).cpu()
    assert not ref[:2].isfinite().all(dim=1).any() and not out[:2].isfinite().all(dim=1).any()
    assert out[2:].isfinite().all()
    assert_close(out[2:], ref[2:], dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("misses", ["copy", "in_place"])
def test_routes_of_weight_zero_fetch_nothing(backend, misses):
    """A route of weight 0 (LongCat-Flash's zero-computation experts, ZAYA's skip expert, a capacity drop)
    adds nothing: its expert is neither fetched nor counted, and the output is the reference's."""
    L, E, H, I = 1, 8, 32, 16
    layers = random_layers(L, E, H, I)
    x = torch.randn(5, H)
    w, _ = route_reference(torch.randn(5, E), 3)
    ids = torch.tensor([[0, 1, 5], [1, 2, 6], [0, 2, 7], [1, 0, 5], [3, 4, 6]], dtype=torch.int32)
    w[:, 2] = 0  # experts 5, 6 and 7 only ever weigh 0
    w[4] = 0  # and 3 and 4 only in a token whose routes all weigh 0
    with ExpertCache(layers, num_slots=E) as cache:
        out = cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses=misses, backend=backend).cpu()
        assert_close(out, fused_moe_reference(x, *layers[0], w, ids), torch.float32)
        assert torch.equal(out[4], torch.zeros(H))
        s = cache.stats()
        assert s["requests"] == 3 and sorted(cache.resident(0)) == [0, 1, 2]
        nothing = cache.moe(0, x.to(DEVICE), torch.zeros_like(w).to(DEVICE), ids.to(DEVICE), backend=backend)
        assert torch.equal(nothing.cpu(), torch.zeros_like(x)) and cache.stats()["requests"] == 3
        ids[0, 2] = E  # an expert the layer lacks is refused whatever its weight
        with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, E=8\)"):
            cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses=misses, backend=backend)
        with pytest.raises(IndexError):
            cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses=misses, backend=backend, validate=False)
        ids[0, 2] = 0  # and so is a row that repeats an expert, weighed or not
        with pytest.raises(ValueError, match="repeats an expert"):
            cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses=misses, backend=backend)
        for bad in (-1, -2):  # negative ids too, with weight (regression: read as routes of weight 0) or without
            for k in (0, 2):
                ids[0] = torch.tensor([3, 1, 5], dtype=ids.dtype)
                ids[0, k] = bad
                with pytest.raises(IndexError):
                    cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses=misses, backend=backend,
                              validate=False)
                with pytest.raises(IndexError):  # one token
                    cache.moe(0, x[:1].to(DEVICE), w[:1].to(DEVICE), ids[:1].to(DEVICE), misses=misses,
                              backend=backend, validate=False)
        with pytest.raises(ValueError, match="topk_ids must be int32 or int64"):
            cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(torch.uint8).to(DEVICE), backend=backend)
        with pytest.raises(ValueError, match="topk_weights must be floating point"):
            cache.moe(0, x.to(DEVICE), w.long().to(DEVICE), ids.to(DEVICE), backend=backend)
        far = torch.tensor([[-2**63, 2, 3], [1, 3, 4]] + [[0, 1, 2]] * 3)  # regression: id * 2 overflowed into 0
        with pytest.raises(IndexError):
            cache.moe(0, x.to(DEVICE), w.to(DEVICE), far.to(DEVICE), misses=misses, backend=backend, validate=False)
        for T in (1, 2):  # one error whatever the token count, for a route that weighs 0 too
            bad = torch.tensor([[9, 2, 3]] * T)
            with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, E=8\)"):
                cache.moe(0, x[:T].to(DEVICE), torch.zeros(T, 3).to(DEVICE), bad.to(DEVICE), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("misses", ["copy", "in_place"])
def test_one_tokens_routes_of_weight_zero_are_dropped(backend, misses, monkeypatch):
    """One token's routes of weight 0 are dropped (not pointed at another of its experts, which the
    one-token kernel would read once per route): only its weighed experts are fetched and read."""
    L, E, H, I = 1, 8, 32, 16
    layers = random_layers(L, E, H, I)
    x = torch.randn(1, H)
    w = torch.tensor([[0.0, 0.7, 0.0, 0.3]])
    ids = torch.tensor([[6, 2, 7, 4]], dtype=torch.int64)
    seen = []
    real = ops.fused_moe

    def recording(*args, **kwargs):
        seen.append(args[4].tolist())
        return real(*args, **kwargs)
    monkeypatch.setattr(ops, "fused_moe", recording)
    with ExpertCache(layers, num_slots=E) as cache:
        out = cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses=misses, backend=backend).cpu()
        assert_close(out, fused_moe_reference(x, *layers[0], w, ids), torch.float32)
        assert seen == [[[2, 4]]] and sorted(cache.resident(0)) == [2, 4] and cache.stats()["requests"] == 2




@pytest.mark.parametrize("misses", ["copy", "in_place"])
def test_non_gated_experts_are_one_record_each(misses):
    """fc1 [I, H] and fc2 [H, I] share one record; a pool below the active experts still matches."""
    L, E, H, I, K, T = 2, 6, 32, 24, 2, 9
    layers = random_layers(L, E, H, I, gated=False)
    with ExpertCache(layers, num_slots=3) as cache:
        assert not cache.gated and cache.record_bytes >= 2 * H * I * 4
        assert cache.record_bytes < 3 * H * I * 4  # not sized as a gated expert
        for layer in range(L):
            x = torch.randn(T, H)
            w, ids = route_reference(torch.randn(T, E), K)
            out = cache.moe(layer, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses=misses, activation="gelu_tanh")
            ref = fused_moe_reference(x, *layers[layer], w, ids, activation="gelu_tanh", gated=False)
            assert_close(out.cpu(), ref, torch.float32)
        gate_up, down = cache.slot_weights()
        assert gate_up.shape == (3, I, H) and down.shape == (3, H, I)


def test_gated_and_non_gated_layers_do_not_mix():
    with pytest.raises(ValueError, match=r"layers\[1\] has experts .*non-gated"):
        ExpertCache([random_layers(1, I=16)[0], random_layers(1, I=16, gated=False)[0]], num_slots=2)


def test_stats_add_up():
    layers = random_layers(L=2, E=8)
    with ExpertCache(layers, num_slots=4) as cache:
        cache.prefetch(0, [0, 1])
        cache.ensure(0, [0, 2]).release()  # hit (prefetched), miss
        cache.prefetch(1, [3, 4, 5])  # evicts 1 (prefetched, never used) among others
        cache.ensure(1, [3, 6]).release()
        cache.synchronize()
        s = cache.stats()
        assert s["requests"] == 4 and s["hits"] == 2 and s["misses"] == 2
        assert s["prefetch_hits"] == 2 and s["prefetches"] == 5
        assert s["wasted_prefetches"] >= 1
        assert s["layer_hits"] == [1, 1] and s["layer_misses"] == [1, 1]
        assert s["bytes_copied"] == 7 * cache.record_bytes
        assert s["evictions"] == 7 - 4
        cache.reset_stats()
        assert cache.stats()["requests"] == 0
        cache.prefetch(0, [7])
        cache.synchronize()
        cache.reset_stats()
        cache.ensure(0, [7]).release()  # the prefetch belongs to the stats before the reset
        assert cache.stats()["prefetch_hits"] == 0 and cache.stats()["hits"] == 1
        cache._core._inject_copy_failures(1)
        with pytest.raises(RuntimeError, match="injected"):
            cache.prefetch(1, [0])
        assert cache.stats()["prefetches"] == 0  # a failed batch copied nothing


def test_a_release_before_the_wait_is_not_missed():
    """A layer call that finds every slot leased releases its empty lease and waits for another release.
    Regression: a release landing between its ensure and its wait was missed (the wait compared lease
    counts), so the call failed with "no slot can be evicted" although every slot was free again."""
    layers = random_layers(L=2, E=8)
    with ExpertCache(layers, num_slots=2) as cache:
        holder = cache.ensure(0, [0, 1])
        waiter = cache._ensure(1, [2, 3])
        assert waiter.slots == [-1, -1]
        holder.release()  # lands before the waiter waits
        waiter.release()  # protected nothing: no release to wait for
        assert cache._core.wait_for_release(60_000, waiter.releases_before) is True
        assert cache._core.releases() == waiter.releases_before + 1
        with cache._ensure(1, [2, 3]) as again:
            assert sorted(again.slots) == [0, 1]
        quiet = cache._core.releases()
        assert cache._core.wait_for_release(float("inf"), quiet) is False  # nothing held: nothing to wait for
        with cache.ensure(0, [4]):
            assert cache._core.wait_for_release(float("nan"), quiet) is False  # no wait at all
        # regression: a held lease that protects no slot made the wait run its whole timeout
        empty = cache.ensure(1, [])
        assert cache._core.leases_held() == 1
        started = time.monotonic()
        assert cache._core.wait_for_release(30_000, cache._core.releases()) is False
        assert time.monotonic() - started < 5
        empty.release()


def test_a_failing_before_compute_leaves_no_lease_behind():
    layers = random_layers(L=2, E=8)
    with ExpertCache(layers, num_slots=2) as cache:
        x = torch.randn(3, layers[0][0].shape[2])
        w, ids = route_reference(torch.randn(3, 8), 2)

        def fail(_):
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            cache.moe(0, x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), misses="copy", before_compute=fail)
        assert cache._core.leases_held() == 0
        dropped = cache.ensure(1, [5, 6])
        del dropped  # a lease dropped unreleased gives its slots back
        assert cache._core.leases_held() == 0


def test_random_request_streams_from_threads_keep_slots_and_map_consistent():
    L, E = 4, 16
    layers = random_layers(L=L, E=E, H=16, I=8)
    with ExpertCache(layers, num_slots=10, policy="lfu") as cache:
        errors = []

        def worker(seed):
            rng = random.Random(seed)
            try:
                for _ in range(150):
                    layer = rng.randrange(L)
                    experts = rng.sample(range(E), rng.randint(1, 4))
                    if rng.random() < 0.4:
                        cache.prefetch(rng.randrange(L), rng.sample(range(E), 3))
                    lease = cache.ensure(layer, experts)
                    gate_up, down = cache.slot_weights()
                    for e, s in zip(experts, lease.slots):
                        # Protected until release: the bytes must be this expert's, whatever others do.
                        if s >= 0:
                            assert torch.equal(gate_up[s].cpu(), layers[layer][0][e].cpu()), (layer, e, s)
                            assert torch.equal(down[s].cpu(), layers[layer][1][e].cpu()), (layer, e, s)
                    cache.stats()
                    lease.release()
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert cache._core.leases_held() == 0
        cache.synchronize()
        s = cache.stats()
        assert s["hits"] + s["misses"] == s["requests"] > 0
        expert_map = cache._map.cpu()
        for layer in range(L):
            for e in range(E):
                assert expert_map[layer, e].item() == cache.slot_of(layer, e)
                if cache.slot_of(layer, e) >= 0:
                    assert_slot_holds(cache, layers, layer, e)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_is_returned_on_close():
    layers = random_layers(L=2, E=16, H=256, I=128)  # 2 x 16 x 192 KiB = 6 MiB host store per cache
    for _ in range(5):
        ExpertCache(layers, num_slots=4).close()
    before = _rss_bytes()
    for _ in range(100):
        cache = ExpertCache(layers, num_slots=4)
        cache.prefetch(0, [1, 2, 3])
        cache.close()
    grown = _rss_bytes() - before
    assert grown < 64 << 20, f"RSS grew {grown / 2**20:.1f} MiB over 100 caches of 6 MiB"


def test_bad_input():
    layers = random_layers()
    cache = ExpertCache(layers, num_slots=2)
    with pytest.raises(IndexError, match="layer 3"):
        cache.prefetch(3, [0])
    with pytest.raises(IndexError, match="expert 8"):
        cache.ensure(0, [8])
    with pytest.raises(IndexError, match="expert -1"):
        cache.prefetch(0, [-1])
    with pytest.raises(IndexError):
        cache.expert_map(-1)
    with pytest.raises(ValueError, match="misses"):
        cache.moe(0, torch.randn(1, 32), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), misses="never")
    cache.close()
    cache.close()
    for call in (lambda: cache.prefetch(0, [1]), lambda: cache.stats(), lambda: cache.slot_weights(),
                 lambda: cache.moe(0, torch.randn(1, 32), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32))):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    with pytest.raises(ValueError, match="num_slots"):
        ExpertCache(layers, num_slots=0)
    with pytest.raises(ValueError, match="policy"):
        ExpertCache(layers, num_slots=2, policy="fifo")
    with pytest.raises(ValueError, match=r"layers\[1\]"):
        ExpertCache([layers[0], random_layers(L=1, E=4)[0]], num_slots=2)
    with pytest.raises(ValueError, match="w_down must be"):
        ExpertCache([(layers[0][0], layers[0][1][:, :, :3])], num_slots=2)
    with pytest.raises(RuntimeError, match="RAM is available"):
        _C.HostStore(1 << 60, backend="host")


class _Recorder:
    """ExpertCache's release_sources: records the calls, checks that the cache no longer holds a released
    layer's source, and can fail at one layer (a Ctrl-C, or an error)."""

    def __init__(self, alive, fail_at=None, failure=KeyboardInterrupt):
        self.alive = alive
        self.fail_at, self.failure = fail_at, failure
        self.released, self.restored = [], {}

    def release(self, layer):
        if layer == self.fail_at:
            raise self.failure("interrupted at layer %d" % layer)
        self.released.append(layer)
        # the cache holds no reference to a stored layer's source: its tensors are freed with the caller's
        assert [ref() is None for ref in self.alive[:layer + 1]] == [True] * (layer + 1)

    def restore(self, layer, gate_up, down):
        self.restored[layer] = (gate_up.clone(), down.clone())


def _handed_over(layers):
    """A generator of copies of `layers` (the only references to them), and weak references to each."""
    alive = []

    def sources():
        for gate_up, down in layers:
            copy = (gate_up.clone(), down.clone())
            alive.append(weakref.ref(copy[0]))
            yield copy
    return sources(), alive


def test_a_handed_over_source_is_released_once_stored_and_dropped():
    """release_sources.release(layer) comes as soon as the layer is in the store, in layer order, and by then
    the cache holds no reference to that layer's tensors (a caller that frees its copy holds one copy of the
    experts, not two); the store holds the masters exactly and the cache computes with them."""
    layers = random_layers(L=3, E=6)
    sources, alive = _handed_over(layers)
    recorder = _Recorder(alive)
    with ExpertCache(sources, num_slots=4, device="cpu", release_sources=recorder) as cache:
        assert recorder.released == [0, 1, 2] and not recorder.restored
        for layer in range(3):
            gate_up, down = cache.host_weights(layer)
            assert torch.equal(gate_up, layers[layer][0]) and torch.equal(down, layers[layer][1])
        x = torch.randn(5, 32)
        w, ids = route_reference(torch.randn(5, 6), 2)
        assert_close(cache.moe(1, x, w, ids), fused_moe_reference(x, *layers[1], w, ids), torch.float32)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_a_failed_hand_over_restores_every_released_layer_from_the_store(failure):
    """Interrupted (or failing) after two layers were released: both get their exact masters back through
    restore before the error propagates, and the third, never released, is not restored."""
    layers = random_layers(L=3, E=6)
    sources, alive = _handed_over(layers)
    recorder = _Recorder(alive, fail_at=2, failure=failure)
    with pytest.raises(failure, match="interrupted at layer 2"):
        ExpertCache(sources, num_slots=4, device="cpu", release_sources=recorder)
    assert recorder.released == [0, 1] and sorted(recorder.restored) == [0, 1]
    for layer in (0, 1):
        assert torch.equal(recorder.restored[layer][0], layers[layer][0])
        assert torch.equal(recorder.restored[layer][1], layers[layer][1])


def test_host_store_filled_before_pinning():
    """pin_after_fill: on the host backend there is nothing to pin (pin() is a no-op); the RAM check counts
    the memory the caller frees while filling, and says so."""
    store = _C.HostStore(4096, backend="host", pin_after_fill=True)
    assert not store.pin_pending and not store.pinned
    store.pin()
    assert store.pin_mode == "pageable"
    with pytest.raises(RuntimeError, match=r"RAM is available \(and .* freed while it fills\)"):
        _C.HostStore(1 << 60, backend="host", pin_after_fill=True, reclaimable_bytes=1 << 30)


def test_reads_transformers_experts_in_both_layouts():
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP

    config = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=4)
    fused = MixtralExperts(config)
    for p in fused.parameters():
        torch.nn.init.normal_(p)
    source = expert_source(fused)
    assert (source.num_experts, source.hidden, source.inter) == (4, 32, 16)
    gate_up, down = source.get(2)
    assert torch.equal(gate_up, fused.gate_up_proj[2]) and torch.equal(down, fused.down_proj[2])

    qconfig = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=3)
    listed = torch.nn.ModuleList(Qwen3MoeMLP(qconfig, intermediate_size=16) for _ in range(3))  # 4.x layout
    source = expert_source(listed)
    gate_up, down = source.get(1)
    assert torch.equal(gate_up, torch.cat([listed[1].gate_proj.weight, listed[1].up_proj.weight]))
    assert torch.equal(down, listed[1].down_proj.weight)
    with ExpertCache([fused, fused], num_slots=2) as cache:
        assert torch.equal(cache.host_weights(1)[0], fused.gate_up_proj.detach())
    with pytest.raises(ValueError, match="experts"):
        expert_source(torch.nn.Linear(3, 3))


def test_reads_non_gated_transformers_experts():
    """Nemotron-H's experts: up_proj [E, I, H] and down_proj [E, H, I], marked has_gate=False."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    fused = NemotronHExperts(NemotronHConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=4))
    for p in fused.parameters():
        torch.nn.init.normal_(p)
    source = expert_source(fused)
    assert (source.num_experts, source.hidden, source.inter, source.gated) == (4, 32, 16, False)
    up, down = source.get(3)
    assert torch.equal(up, fused.up_proj[3]) and torch.equal(down, fused.down_proj[3])
    with ExpertCache([fused], num_slots=2) as cache:
        x = torch.randn(5, 32)
        w, ids = torch.rand(5, 2), torch.tensor([[0, 3], [1, 2], [3, 1], [2, 0], [0, 1]])
        expected = fused_moe_reference(x, fused.up_proj.detach(), fused.down_proj.detach(), w, ids, activation="relu2",
                                       gated=False)
        assert_close(cache.moe(0, x, w, ids, activation="relu2"), expected, torch.float32)


class _BiasedMLP(torch.nn.Module):
    def __init__(self, hidden=32, inter=16, bias=True):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=bias)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=bias)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _gpt_oss_experts():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4))
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts


@pytest.mark.parametrize("misses", ["copy", "in_place"])
@pytest.mark.parametrize("kind", ["module-list", "gpt-oss"])
def test_the_experts_own_biases_are_added(kind, misses):
    """Regression: ExpertCache read only the experts' weights, so a layer of biased experts (GPT-OSS, or
    linear layers with biases) computed without its biases: 0.72 and 0.49 relative off, no warning."""
    torch.manual_seed(0)
    if kind == "gpt-oss":
        experts = _gpt_oss_experts()
        activation = "swiglu_oai"
    else:
        experts = torch.nn.ModuleList(_BiasedMLP() for _ in range(4))
        activation = "silu"
    x = torch.randn(5, 32)
    w, ids = route_reference(torch.randn(5, 4), 2)
    if kind == "gpt-oss":
        with torch.no_grad():
            want = experts(x, ids.long(), w)
    else:
        with torch.no_grad():
            want = sum(w[:, k:k + 1] * torch.stack([experts[int(e)](x[t]) for t, e in enumerate(ids[:, k])])
                       for k in range(2))
    with ExpertCache([experts], num_slots=4) as cache:
        b_gate_up, b_down = cache.layer_biases(0)
        assert b_gate_up.shape == (4, 32) and b_down.shape == (4, 32)
        assert_close(cache.moe(0, x, w, ids, activation=activation, misses=misses), want, torch.float32)
        other = cache.moe(0, x, w, ids, activation=activation, misses=misses,  # a call's own biases win
                          b_gate_up=torch.zeros_like(b_gate_up), b_down=torch.zeros_like(b_down))
        assert not torch.allclose(other, want)
    with ExpertCache([random_layers(L=1, E=4)[0]], num_slots=2) as cache:
        assert cache.layer_biases(0) is None


def test_calls_and_sources_that_do_not_fit_are_refused_naming_the_argument_before_anything_is_copied():
    """Regression: a ModuleList with one expert of another width failed inside a copy (a bare size
    mismatch), one of another dtype was cast quietly, and a call with the wrong hidden size blamed
    w_gate_up (the slot pool) after its experts had been copied and counted; a float id was truncated."""
    listed = torch.nn.ModuleList(_BiasedMLP(bias=False) for _ in range(3))
    listed[2].up_proj = torch.nn.Linear(32, 18, bias=False)
    with pytest.raises(ValueError, match=r"experts\[2\]\.up_proj: weight must be \(16, 32\)"):
        ExpertCache([listed], num_slots=2)
    listed[2].up_proj = torch.nn.Linear(32, 16, bias=False).double()
    with pytest.raises(ValueError, match=r"experts\[2\]\.up_proj: .*torch.float64"):
        ExpertCache([listed], num_slots=2)
    listed[2].up_proj = torch.nn.Linear(32, 16, bias=True)
    with pytest.raises(ValueError, match=r"experts\[2\]\.up_proj: bias, unlike"):
        ExpertCache([listed], num_slots=2)
    with ExpertCache(random_layers(L=1), num_slots=4) as cache:
        ids = torch.tensor([[0, 1], [2, 3]])
        w = torch.rand(2, 2)
        for call, message in (
                (lambda: cache.moe(0, torch.randn(2, 33), w, ids), r"hidden_states must be \[T, H=32\]"),
                (lambda: cache.moe(0, torch.randn(2, 32).double(), w, ids), "hidden_states must be torch.float32"),
                (lambda: cache.moe(0, torch.randn(2, 32), w[:, :1], ids), "topk_weights .* and topk_ids"),
                (lambda: cache.moe(0, torch.randn(2, 32), w, ids[:1]), r"topk_ids must be \[T=2, K\]"),
                (lambda: cache.moe(0, torch.randn(2, 32), w, ids, activation="swish"), "activation must be one of")):
            with pytest.raises(ValueError, match=message):
                call()
        assert cache.stats()["requests"] == 0 and cache.stats()["bytes_copied"] == 0
        assert all(cache.resident(layer) == [] for layer in range(cache.num_layers))
        for bad in ([1.7], torch.tensor([1.0])):
            with pytest.raises(TypeError, match="integer ids"):
                cache.prefetch(0, bad)
        assert cache.prefetch(0, [torch.tensor(1), 2]) == 2


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("pin", ["alloc", "register"])
def test_gpu_cuda_backend_copies_and_map(pin):
    layers = random_layers(L=2, E=16, H=512, I=256, dtype=torch.bfloat16)
    with ExpertCache(layers, num_slots=6, pin=pin) as cache:
        assert cache.pinned and cache.device.type == "cuda"
        assert cache.host_weights(0)[0].is_pinned()
        cache.prefetch(0, [3, 4, 5, 9])
        cache.ensure(1, [0, 15]).release()
        cache.synchronize()
        for layer, e in [(0, 3), (0, 4), (0, 5), (0, 9), (1, 0), (1, 15)]:
            assert_slot_holds(cache, layers, layer, e)
        assert cache.expert_map(0).tolist() == [cache.slot_of(0, e) for e in range(16)]
        s = cache.stats()
        assert s["copy_ms"] > 0 and s["bytes_copied"] == 6 * cache.record_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("T,misses", [(1, "in_place"), (4, "in_place"), (64, "copy"), (300, "copy")])
def test_gpu_layer_with_prefetch_in_flight_matches_reference(T, misses):
    """Copies run while layers compute; results stay right whatever has landed."""
    L, E, H, I, K = 4, 32, 1024, 512, 4
    layers = random_layers(L, E, H, I, dtype=torch.bfloat16)
    with ExpertCache(layers, num_slots=24) as cache:
        for step in range(3):
            for layer in range(L):
                x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
                w, ids = route_reference(torch.randn(T, E, device="cuda"), K)
                cache.prefetch((layer + 1) % L, torch.randperm(E)[:8])
                out = cache.moe(layer, x, w, ids, misses=misses)
                ref = fused_moe_reference(x, *(t.cuda() for t in layers[layer]), w, ids)
                assert_close(out, ref, torch.bfloat16)
        s = cache.stats()
        assert s["hits"] + s["misses"] == s["requests"] and s["bytes_copied"] > 0


@pytest.mark.gpu
def test_gpu_store_filled_from_host_memory_is_pinned_in_place():
    """Sources in host memory handed over: the store is filled pageable, then page-locked in place
    (cudaHostRegister: pin mode "register" though "alloc" was asked), and serves copies as any other."""
    layers = random_layers(L=2, E=8, H=256, I=128, dtype=torch.bfloat16)
    sources, alive = _handed_over(layers)
    recorder = _Recorder(alive)
    with ExpertCache(sources, num_slots=4, pin="alloc", release_sources=recorder) as cache:
        assert recorder.released == [0, 1]
        assert cache.pinned and cache._store.pin_mode == "register" and cache.host_weights(1)[0].is_pinned()
        cache.prefetch(1, [2, 7])
        cache.synchronize()
        for e in (2, 7):
            assert_slot_holds(cache, layers, 1, e)
    store = _C.HostStore(1 << 20, backend="cuda", pin="alloc", pin_after_fill=True)
    assert store.pin_pending and not store.pinned
    store.pin()
    assert store.pinned and store.pin_mode == "register" and not store.pin_pending and store.device_ptr != 0


@pytest.mark.gpu
def test_gpu_pool_larger_than_free_memory_is_refused_before_allocating():
    layers = random_layers(L=1, E=4, H=4096, I=14336 // 8, dtype=torch.bfloat16)
    free, _ = torch.cuda.mem_get_info()
    record = 3 * 4096 * (14336 // 8) * 2
    with pytest.raises(ValueError, match="GiB of GPU memory but only"):
        ExpertCache(layers, num_slots=free // record + 10)


# ------------------------------------------------------------------ concurrency and failures (host backend, on any machine)
def test_in_place_decode_under_concurrent_prefetches_stays_right():
    """Regression: cache.moe on the in-place path while other threads prefetch (evicting slots) read
    evicted slots; the resident experts it reads are now leased until the kernel has them."""
    L, E, H, I, K = 3, 12, 32, 16, 3
    layers = random_layers(L=L, E=E, H=H, I=I)
    with ExpertCache(layers, num_slots=5, policy="lru", device="cpu") as cache:
        stop, errors = threading.Event(), []

        def prefetcher(seed):
            rng = random.Random(seed)
            while not stop.is_set():
                cache.prefetch(rng.randrange(L), rng.sample(range(E), 4))

        def computer(seed):
            g = torch.Generator().manual_seed(seed)
            try:
                for _ in range(60):
                    layer = int(torch.randint(L, (1,), generator=g))
                    x = torch.randn(2, H, generator=g)
                    w, ids = route_reference(torch.randn(2, E, generator=g), K)
                    out = cache.moe(layer, x, w, ids, misses="in_place")
                    assert_close(out, fused_moe_reference(x, *layers[layer], w, ids), torch.float32)
            except Exception as exc:  # surfaced below
                errors.append(exc)

        prefetchers = [threading.Thread(target=prefetcher, args=(s,)) for s in range(3)]
        computers = [threading.Thread(target=computer, args=(100 + s,)) for s in range(3)]
        for t in prefetchers + computers:
            t.start()
        for t in computers:
            t.join()
        stop.set()
        for t in prefetchers:
            t.join()
        assert not errors, errors[0]
        assert cache._core.leases_held() == 0


def test_copy_path_waits_for_other_leases_instead_of_failing():
    """Regression: with T > 16 and every slot leased by other calls, moe raised "no slot can be
    evicted"; it now waits for a lease to end."""
    L, E, H, I, K = 2, 8, 32, 16, 2
    layers = random_layers(L=L, E=E, H=H, I=I)
    with ExpertCache(layers, num_slots=3, device="cpu") as cache:
        held = cache.ensure(0, [0, 1, 2])  # every slot leased by "another call"
        x = torch.randn(20, H)
        w, ids = route_reference(torch.randn(20, E), K)
        release = threading.Timer(0.3, held.release)
        release.start()
        out = cache.moe(1, x, w, ids, misses="copy")  # needs slots: waits for the release above
        release.join()
        assert_close(out, fused_moe_reference(x, *layers[1], w, ids), torch.float32)
        assert cache._core.leases_held() == 0


def test_prefetch_before_compute_cannot_evict_the_layer_being_computed():
    """Regression: on the in-place path a before_compute prefetch for layer l+1 evicted layer l's
    resident experts (LRU, 4 slots: [0, 1, 2, 3] -> []), which were then read from the host."""
    L, E, H, I = 2, 8, 32, 16
    layers = random_layers(L=L, E=E, H=H, I=I)
    with ExpertCache(layers, num_slots=4, policy="lru", device="cpu") as cache:
        cache.prefetch(0, [0, 1, 2, 3])
        cache.synchronize()
        x = torch.randn(2, H)
        ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        w = torch.rand(2, 2)
        started = []
        out = cache.moe(0, x, w, ids, misses="in_place",
                        before_compute=lambda used: started.append(cache.prefetch(1, [4, 5, 6, 7])))
        assert started == [0], "the prefetch evicted experts the layer was about to read"
        assert cache.resident(0) == [0, 1, 2, 3]
        assert cache.stats()["in_place_reads"] == 0
        assert_close(out, fused_moe_reference(x, *layers[0], w, ids), torch.float32)


@pytest.mark.parametrize("policy", ["lru", "priority"])
def test_a_failed_copy_batch_leaves_the_cache_consistent(policy):
    """A copy batch that fails midway (injected: invalidations written, the first copy half done) must
    leave no slot claiming an expert it does not hold, no map entry pointing at such a slot, and every
    later result right."""
    L, E, H, I, K = 2, 8, 32, 16, 2
    layers = random_layers(L=L, E=E, H=H, I=I)
    with ExpertCache(layers, num_slots=4, policy=policy, device="cpu") as cache:
        cache.prefetch(0, [0, 1, 2, 3])
        cache.synchronize()
        cache._core._inject_copy_failures(1)
        with pytest.raises(RuntimeError, match="injected failure"):
            cache.ensure(1, [4, 5, 6, 7]).release()
        assert cache._core.leases_held() == 0
        cache.synchronize()
        expert_map = cache._map.cpu()
        for layer in range(L):
            for e in range(E):
                slot = cache.slot_of(layer, e)
                assert expert_map[layer, e].item() == slot
                if slot >= 0:
                    assert_slot_holds(cache, layers, layer, e)
        for layer in range(L):  # and the cache still works, in place and by copying
            x = torch.randn(20, H)
            w, ids = route_reference(torch.randn(20, E), K)
            for misses in ("in_place", "copy"):
                assert_close(cache.moe(layer, x, w, ids, misses=misses),
                             fused_moe_reference(x, *layers[layer], w, ids), torch.float32)


def test_closing_while_threads_run_raises_cleanly():
    """Regression: closing the cache while other threads called it gave AttributeErrors."""
    L, E, H, I, K = 2, 8, 32, 16, 2
    layers = random_layers(L=L, E=E, H=H, I=I)
    cache = ExpertCache(layers, num_slots=3, device="cpu")
    errors, done = [], threading.Event()

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        while not done.is_set():
            x = torch.randn(20, H, generator=g)
            w, ids = route_reference(torch.randn(20, E, generator=g), K)
            try:
                cache.moe(seed % L, x, w, ids)
            except RuntimeError as exc:
                assert "closed" in str(exc), exc
                return
            except Exception as exc:  # surfaced below
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    cache.close()
    done.set()
    for t in threads:
        t.join()
    assert not errors, errors
    with pytest.raises(RuntimeError, match="closed"):
        cache.prefetch(0, [1])


def test_expert_dtype_and_empty_experts_are_refused():
    layers = random_layers(L=1, E=4, H=8, I=4)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        ExpertCache([(layers[0][0].double(), layers[0][1].double())], num_slots=2)
    with pytest.raises(ValueError, match="non-empty"):
        ExpertCache([(torch.empty(0, 8, 8), torch.empty(0, 8, 4))], num_slots=2)


# ------------------------------------------------------------------ GPU: streams, capture, failures
@pytest.mark.gpu
def test_gpu_prefetches_from_another_stream_never_corrupt_in_place_decode():
    """Evictions ordered against every stream that uses the cache: decode on one stream while another
    stream's prefetches evict and refill slots."""
    L, E, H, I, K = 3, 16, 256, 128, 2
    layers = random_layers(L=L, E=E, H=H, I=I, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    with ExpertCache(layers, num_slots=6) as cache:
        for step in range(40):
            layer = step % L
            x = torch.randn(2, H, device="cuda", dtype=torch.bfloat16)
            w, ids = route_reference(torch.randn(2, E, device="cuda"), K)
            out = cache.moe(layer, x, w, ids, misses="in_place")
            with torch.cuda.stream(side):
                cache.prefetch((layer + 1) % L, torch.randperm(E)[:6])
            ref = fused_moe_reference(x, *(t.cuda() for t in layers[layer]), w, ids)
            assert_close(out, ref, torch.bfloat16)
        torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_cache_calls_during_graph_capture_raise_clearly():
    layers = random_layers(L=1, E=4, H=64, I=32, dtype=torch.bfloat16)
    with ExpertCache(layers, num_slots=2) as cache:
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="captured"):
            with torch.cuda.graph(graph):
                cache.prefetch(0, [0, 1])


@pytest.mark.gpu
def test_gpu_a_failed_copy_batch_leaves_the_cache_consistent():
    L, E, H, I, K = 2, 8, 256, 128, 2
    layers = random_layers(L=L, E=E, H=H, I=I, dtype=torch.bfloat16)
    with ExpertCache(layers, num_slots=4) as cache:
        cache.prefetch(0, [0, 1, 2, 3])
        cache.synchronize()
        cache._core._inject_copy_failures(1)
        with pytest.raises(RuntimeError, match="injected failure"):
            cache.ensure(1, [4, 5, 6, 7]).release()
        cache.synchronize()
        expert_map = cache._map.cpu()
        for layer in range(L):
            for e in range(E):
                assert expert_map[layer, e].item() == cache.slot_of(layer, e)
                if cache.slot_of(layer, e) >= 0:
                    assert_slot_holds(cache, layers, layer, e)
        x = torch.randn(20, H, device="cuda", dtype=torch.bfloat16)
        w, ids = route_reference(torch.randn(20, E, device="cuda"), K)
        assert_close(cache.moe(1, x, w, ids), fused_moe_reference(x, *(t.cuda() for t in layers[1]), w, ids),
                     torch.bfloat16)
