"""Predictive caching: trace simulation (Belady, oracle), the live cache with an oracle, routing traces,
token scheduling."""
import random

import pytest
import torch

import moecache
from moecache import Offload
from moecache.analysis.simulate import POLICIES, Timing, simulate
from moecache.analysis.traces import RoutingTrace, record_routing
from moecache.cache import ExpertCache
from moecache.cache.scheduler import distinct_experts, generate_scheduled, group_by_routes

transformers = pytest.importorskip("transformers")

import builders  # noqa: E402


def random_trace(steps=120, layers=3, experts=16, k=4, seed=0, hot=None):
    """Routing with some locality: each layer prefers a drifting subset of experts."""
    rng = random.Random(seed)
    trace = []
    favourites = [rng.sample(range(experts), hot or experts // 2) for _ in range(layers)]
    for _ in range(steps):
        step = []
        for layer in range(layers):
            pool = favourites[layer] if rng.random() < 0.8 else list(range(experts))
            step.append(sorted(rng.sample(pool, k)))
            if rng.random() < 0.05:
                favourites[layer][rng.randrange(len(favourites[layer]))] = rng.randrange(experts)
        trace.append(step)
    return trace


@pytest.mark.parametrize("slots", [4, 8, 12, 24, 48])
def test_simulated_policies_add_up_and_belady_loads_least(slots):
    trace = random_trace()
    preds = [[[sorted(set(s[l]) | {0}) , None] for l in range(3)] for s in trace]  # a noisy predictor
    timing = Timing(layer_ms=0.5, load_ms=1.0)  # the budgeted policy needs one; the counts do not depend on it
    results = {p: simulate(trace, slots, p, predictions=preds, depth=2, timing=timing) for p in POLICIES}
    for r in results.values():
        assert r.hits + r.misses == r.requests == sum(len(set(l)) for s in trace for l in s)
        assert r.prefetch_hits <= r.prefetches and r.wasted_prefetches <= r.prefetches
    assert results["on_demand"].hits == 0
    demand = [results[p].loads for p in ("lru", "lfu", "on_demand")]
    assert all(results["belady"].loads <= d for d in demand)  # MIN is optimal among demand-loading caches
    for r in results.values():  # compute plus the exposed stall: every layer run once per step
        assert r.time_ms == pytest.approx(r.stall_ms + 0.5 * 3 * len(trace)) and r.stall_ms >= 0
    if slots >= 48:
        assert results["lru"].misses == len({(l, e) for s in trace for l, ex in enumerate(s) for e in ex})


def test_belady_matches_brute_force_on_a_tiny_trace():
    """Belady's MIN gives the fewest misses of any choice: which expert to evict, or to read the new one
    without caching it (checked exhaustively)."""
    accesses = [(0, 1), (0, 2), (0, 3), (0, 1), (0, 4), (0, 2), (0, 1), (0, 3), (0, 4), (0, 2)]
    trace = [[[e]] for _, e in accesses]

    def best(i, resident):
        if i == len(accesses):
            return 0
        key = accesses[i][1]
        if key in resident:
            return best(i + 1, resident)
        if len(resident) < 2:
            return 1 + best(i + 1, resident | {key})
        return 1 + min([best(i + 1, resident)] + [best(i + 1, (resident - {v}) | {key}) for v in resident])

    assert simulate(trace, 2, "belady", warmup_steps=0).misses == best(0, frozenset())


def test_oracle_prefetching_never_loads_on_demand_once_warm():
    trace = random_trace(k=4)
    r = simulate(trace, slots=8, policy="oracle", depth=1)  # 8 slots = two layers' active experts
    assert r.misses_after_warmup == 0 and r.prefetches > 0
    assert r.hit_rate > 0.95


def test_live_cache_with_an_oracle_predictor_only_prefetches_once_warm():
    """The real ExpertCache (host backend): prefetch the next layer's true experts while a layer runs."""
    L, E, K, H, I = 3, 8, 2, 16, 8
    layers = [(torch.randn(E, 2 * I, H), torch.randn(E, H, I)) for _ in range(L)]
    trace = random_trace(steps=40, layers=L, experts=E, k=K, seed=3)
    cache = ExpertCache(layers, num_slots=2 * K, policy="priority", device="cpu")
    flat = [(s, l) for s in range(len(trace)) for l in range(L)]
    warm = None
    for i, (s, l) in enumerate(flat):
        if s == 1 and l == 0:
            warm = cache.stats()
        with cache.ensure(l, trace[s][l]) as lease:
            assert all(slot >= 0 for slot in lease.slots)
            if i + 1 < len(flat):
                ns, nl = flat[i + 1]
                scores = [0.0] * E
                for e in trace[ns][nl]:
                    scores[e] = 1.0
                cache.set_priorities(nl, scores)
                cache.prefetch(nl, trace[ns][nl])
            cache.set_priorities(l, [0.0] * E)
    end = cache.stats()
    assert end["misses"] == warm["misses"], "a warmed oracle-fed cache must never miss"
    assert end["prefetches"] > warm["prefetches"]
    assert end["hits"] + end["misses"] == end["requests"]
    cache.close()


def _tiny_deepseek(layers=4):
    return builders.deepseek("v2", seed=0, num_hidden_layers=layers, num_experts_per_tok=2, q_lora_rank=None,
                             topk_method="greedy")


def test_record_routing_and_its_recall():
    model = _tiny_deepseek()
    moecache.patch(model)
    ids = torch.randint(3, 96, (2, 6))
    trace, out = record_routing(model, ids, moecache.patched_experts(model), moecache.routers(model),
                                max_new_tokens=5, depth=2)
    assert out.shape == (2, 11)
    assert len(trace.steps) == 5 and trace.num_layers == 3 and trace.top_k == 2  # prompt + 4 decode forwards
    assert trace.tokens == [12, 2, 2, 2, 2]
    for s in range(len(trace.steps)):
        assert trace.predictions[s][0] == [None, None]  # nothing runs before the first MoE layer
        assert trace.predictions[s][1][1] is None and trace.predictions[s][1][0] is not None
        assert trace.predictions[s][2][1] is not None
        for used in trace.steps[s]:
            assert 2 <= len(used) <= 8
    assert 0 <= trace.recall(depth=1)["overall"] <= 1
    assert RoutingTrace.from_json(trace.to_json()) == trace
    # The trace replays in the simulator: every (layer, expert) used is one request.
    result = simulate(trace.steps, 4, "predictive", predictions=trace.predictions, depth=2, warmup_steps=0)
    assert result.hits + result.misses == result.requests > 0
    # the trace itself replays with its recorded predictions and scores (it raised a TypeError)
    assert simulate(trace, 4, "predictive", depth=2, warmup_steps=0) == simulate(
        trace.steps, 4, "predictive", predictions=trace.predictions, scores=trace.scores or None, depth=2,
        warmup_steps=0)
    assert simulate(trace, 4, "lru") == simulate(trace.steps, 4, "lru")
    with pytest.raises(TypeError, match="trace must be a RoutingTrace or a list of steps"):
        simulate({"steps": trace.steps}, 4, "lru")
    moecache.unpatch(model)


def test_scheduling_and_traces_read_routes_flattened_token_by_token():
    """Regression: blocks whose moe_infer takes the routes flattened ([T*K] ids: DeepSeek-MoE's own code)
    crashed generate_scheduled's routing pass and record_routing, and with one request a pass the
    scheduler kept every prompt token's routes where last_tokens asked for the last ones."""
    from moecache.cache.scheduler import prompt_routes

    import remote_code

    models = []
    for cls in (remote_code.FlatRoutesMoE, remote_code.VL2MoE):  # the same weights, routes flat or [T, K]
        model = builders.deepseek("v2", seed=1)
        torch.manual_seed(5)
        for layer in model.model.layers[1:]:
            layer.mlp = cls(hidden=model.config.hidden_size)
        builders.randomize(model)
        moecache.patch(model.eval())
        models.append(model)
    flat, paired = models
    prompts = torch.randint(3, 96, (4, 7), generator=torch.Generator().manual_seed(0))
    experts = moecache.patched_experts(flat)
    assert [e.stacked is not None for e in experts] == [True, True]
    for last in (1, 3):
        assert prompt_routes(flat, prompts, experts, last_tokens=last, batch_size=2) == prompt_routes(
            paired, prompts, moecache.patched_experts(paired), last_tokens=last, batch_size=2)
    with torch.no_grad():
        plain = flat.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3, do_sample=False)
    out, info = generate_scheduled(flat, prompts, experts, batch_size=2, schedule=True, max_new_tokens=3)
    assert torch.equal(out, plain) and info["predicted_distinct_experts"] > 0
    trace, _ = record_routing(flat, prompts[:1], experts, moecache.routers(flat), max_new_tokens=3)
    assert trace.top_k == 2 and len(trace.steps) == 3  # the prompt, then two one-token steps
    assert all(len(used) <= 2 for step in trace.steps[1:] for used in step)


def test_trace_recall_on_a_hand_made_trace():
    """Layer 1 used {1, 2, 3} then {4, 5}; predicted {1, 2, 9} then {4}: recall 3/5 (step 0 skipped)."""
    trace = RoutingTrace(num_layers=2, num_experts=10, top_k=2, depth=1,
                         steps=[[[0, 1], [7, 8]], [[0, 1], [1, 2, 3]], [[0, 1], [4, 5]]],
                         predictions=[[[None], [[7]]], [[None], [[1, 2, 9]]], [[None], [[4]]]],
                         tokens=[3, 1, 1])
    assert trace.recall(depth=1) == {"per_layer": {1: 3 / 5}, "overall": 3 / 5}
    assert trace.recall(depth=1, skip_steps=0)["overall"] == 4 / 7
    for depth in (0, -1, 2, 1.0):  # -1 read the last depth held, 0 the deepest
        with pytest.raises(ValueError, match="depth"):
            trace.recall(depth=depth)
    # Nothing scored (only layer 0, never predicted): no recall, not 0%.
    assert trace.recall(depth=1, skip_steps=3) == {"per_layer": {}, "overall": None}


def test_simulate_looks_ahead_across_steps_and_checks_depth():
    """A one-layer trace: the guess at depth d is for step + d. The oracle then knows every next step's
    experts, so with room for them it never misses after the first step."""
    trace = [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]
    for depth in (1, 2, 3):
        result = simulate(trace, 6, "oracle", depth=depth, warmup_steps=0)
        assert result.misses == 2 and result.prefetches == 6, (depth, result.as_dict())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="depth"):
            simulate(trace, 6, "oracle", depth=bad)
    one_deep = [[[[1]]] for _ in trace]
    with pytest.raises(ValueError, match="depth=2 but the predictions hold 1"):
        simulate(trace, 6, "predictive", predictions=one_deep, depth=2)
    assert simulate([], 4, "oracle").requests == 0


def test_predictive_offload_stats_add_up():
    model = _tiny_deepseek()
    ids = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    moecache.patch(model, offload=Offload(gpu_experts=0.25, policy="predictive", lookahead=2))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8), ref)
    s = moecache.stats(model)
    c, p = s["cache"], s["prediction"]
    assert c["hits"] + c["misses"] == c["requests"] > 0
    assert c["prefetch_hits"] <= c["prefetches"] and c["wasted_prefetches"] <= c["prefetches"]
    assert c["wasted_prefetch_bytes"] == c["wasted_prefetches"] * moecache.expert_cache(model).record_bytes
    assert p["predictor_seconds"] > 0 and set(p["by_depth"]) == {1, 2}
    for row in p["per_layer"]:
        assert row["correct"] <= min(row["predicted"], row["actual"])
    moecache.unpatch(model)


def test_reset_stats_zeroes_what_stats_counts_and_keeps_the_cache_warm():
    model = _tiny_deepseek()
    ids = torch.randint(3, 96, (1, 6))
    with pytest.raises(ValueError, match="not patched"):
        moecache.reset_stats(model)
    moecache.patch(model, offload=Offload(gpu_experts=0.25, policy="predictive", lookahead=2))
    with torch.no_grad():
        model(ids)
        before = moecache.stats(model)
        moecache.reset_stats(model)
        zeroed = moecache.stats(model)
        model(ids)
    after = moecache.stats(model)
    assert before["calls"] > 0 and before["cache"]["requests"] > 0 and before["prediction"]["predictor_seconds"] > 0
    assert zeroed["calls"] == zeroed["tokens"] == 0 and all(layer["calls"] == 0 for layer in zeroed["layers"])
    assert zeroed["attention"] and all(v == 0 for a in zeroed["attention"] for k, v in a.items() if k != "layer")
    for name, value in zeroed["cache"].items():
        assert value == ([0] * len(value) if isinstance(value, list) else 0), name
    assert zeroed["prediction"]["per_layer"] == [] and zeroed["prediction"]["predictor_seconds"] == 0
    # The same forward again counts the same calls, tokens and expert requests.
    assert (after["calls"], after["tokens"]) == (before["calls"], before["tokens"])
    assert [a["prefill"] for a in after["attention"]] == [a["prefill"] for a in before["attention"]]
    c = after["cache"]
    assert c["requests"] == before["cache"]["requests"] and c["hits"] + c["misses"] == c["requests"]
    moecache.unpatch(model)


def test_predictions_without_prefetch_cost_no_copies():
    """policy predictive with prefetch=False: the predictor runs (its cost can be measured alone) and
    steers eviction, but copies only what is missed."""
    model = _tiny_deepseek()
    ids = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    moecache.patch(model, offload=Offload(gpu_experts=0.25, policy="predictive", prefetch=False))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8), ref)
    s = moecache.stats(model)
    assert s["cache"]["prefetches"] == 0 and s["cache"]["misses"] > 0
    assert s["prediction"]["predictor_seconds"] > 0 and s["prediction"]["by_depth"][1]["recall"] > 0
    moecache.unpatch(model)


def test_group_by_routes_partitions_and_groups_alike_requests():
    a, b = {(0, 1), (0, 2), (1, 3)}, {(0, 5), (0, 6), (1, 7)}
    routes = [a, b, set(a), set(b), a | {(1, 4)}, b | {(1, 0)}]
    groups = group_by_routes(routes, 3)
    assert sorted(i for g in groups for i in g) == list(range(6)) and all(len(g) <= 3 for g in groups)
    assert sorted(map(sorted, groups)) == [[0, 2, 4], [1, 3, 5]]
    in_order = [[0, 1, 2], [3, 4, 5]]
    assert distinct_experts(routes, groups) < distinct_experts(routes, in_order)
    assert group_by_routes(routes, 3) == groups  # deterministic
    with pytest.raises(ValueError, match="batch_size"):
        group_by_routes(routes, 0)


def test_scheduling_preserves_every_requests_tokens():
    model = _tiny_deepseek()
    moecache.patch(model)
    prompts = torch.randint(3, 96, (6, 5))
    experts = moecache.patched_experts(model)
    plain, info_plain = generate_scheduled(model, prompts, experts, batch_size=2, schedule=False, max_new_tokens=6)
    scheduled, info = generate_scheduled(model, prompts, experts, batch_size=2, schedule=True, max_new_tokens=6)
    assert torch.equal(plain, scheduled)
    assert sorted(i for g in info["groups"] for i in g) == list(range(6))
    assert info["scheduler_s"] > 0 and info["predicted_distinct_experts"] > 0
    moecache.unpatch(model)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_scheduled_generation_stops_at_eos_as_generate_does(batch_size):
    """Regression: every group generated max_new_tokens tokens (EOS suppressed), so a request that ends
    early got other tokens than plain greedy generate gives it."""
    model = _tiny_deepseek()
    moecache.patch(model)
    torch.manual_seed(0)
    prompts = torch.randint(3, 96, (3, 5))
    with torch.no_grad():
        free = model.generate(prompts, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        eos = int(free[0, 5 + 2])  # request 0's third new token ends it
        plain = model.generate(prompts, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert (plain[0, 5:] == 0).any(), "request 0 did not stop early: the test does not test EOS"
    for schedule in (False, True):
        out, _ = generate_scheduled(model, prompts, moecache.patched_experts(model), batch_size=batch_size,
                                    schedule=schedule, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out, plain), (schedule, out.tolist(), plain.tolist())
    moecache.unpatch(model)


def test_scheduling_left_padded_prompts_of_different_lengths_match_each_alone():
    model = _tiny_deepseek()
    moecache.patch(model)
    torch.manual_seed(3)
    lengths = [7, 4, 6, 3]
    S = max(lengths)
    prompts = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros_like(prompts)
    alone = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 96, (1, n))
        prompts[i, S - n:], mask[i, S - n:] = ids[0], 1
        alone.append(model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, n:])
    experts = moecache.patched_experts(model)
    for schedule in (False, True):
        out, info = generate_scheduled(model, prompts, experts, batch_size=2, schedule=schedule, max_new_tokens=5,
                                       attention_mask=mask)
        for i in range(len(lengths)):
            assert torch.equal(out[i, S:], alone[i]), (schedule, i)
        # Without a mask, the pad token's places are masked, as generate infers them (the pad token from
        # the model's generation_config where the one passed leaves it unset)
        assert torch.equal(generate_scheduled(model, prompts, experts, batch_size=2, schedule=schedule,
                                              max_new_tokens=5)[0], out)
        assert torch.equal(generate_scheduled(model, prompts, experts, batch_size=2, schedule=schedule,
                                              generation_config=transformers.GenerationConfig(max_new_tokens=5),
                                              max_new_tokens=5)[0], out)
    # Several rows per prompt, a dict, or sampling would be cut to the wrong rows: refused up front.
    for bad, match in (({"num_return_sequences": 2, "num_beams": 2}, "num_return_sequences=2"),
                       ({"return_dict_in_generate": True}, "return_dict_in_generate=True"),
                       ({"num_beams": 2}, "num_beams=2"),
                       ({"do_sample": True}, "do_sample=True")):
        with pytest.raises(ValueError, match=match):
            generate_scheduled(model, prompts, experts, batch_size=2, max_new_tokens=5, attention_mask=mask, **bad)
    # Greedy even where the model's own generation_config samples; do_sample=False may still be passed.
    model.generation_config.do_sample = True
    out, _ = generate_scheduled(model, prompts, experts, batch_size=2, schedule=False, max_new_tokens=5,
                                attention_mask=mask, do_sample=False)
    for i in range(len(lengths)):
        assert torch.equal(out[i, S:], alone[i]), i
    moecache.unpatch(model)


def test_learned_route_predictor_learns_a_routing_function_and_round_trips(tmp_path):
    from moecache.cache.learned import LearnedRoutePredictor, top_k_recall, train_route_predictor

    H, E, K, N = 16, 8, 2, 4096
    torch.manual_seed(0)
    W = torch.randn(E, H)
    x = torch.randn(N, H)
    ids = (x @ W.T).topk(K, dim=1).indices  # a router the MLP must discover from examples alone
    predictor = train_route_predictor({(1, 1): (x[:3072], ids[:3072])}, H, E, width=64, epochs=15, batch_size=256)
    held = top_k_recall(predictor.scores(1, 1, x[3072:]), ids[3072:])
    assert held > 0.85, held  # chance: K / E = 0.25; measured 0.90
    path = tmp_path / "p.pt"
    predictor.save(path)
    again = LearnedRoutePredictor.load(path)
    assert torch.equal(again.scores(1, 1, x[:10]), predictor.scores(1, 1, x[:10]))
    assert again.has(1, 1) and not again.has(2, 1)


def test_offload_with_a_learned_predictor(tmp_path):
    from moecache.cache.learned import train_route_predictor

    model = _tiny_deepseek()
    ids = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    x, routed = torch.randn(64, 64), torch.randint(0, 8, (64, 2))
    path = tmp_path / "p.pt"
    train_route_predictor({(1, 1): (x, routed), (2, 1): (x, routed)}, 64, 8, width=16, epochs=1).save(path)
    with pytest.raises(ValueError, match="predictive"):
        moecache.patch(model, offload=Offload(policy="lru", predictor=str(path)))
    with pytest.raises(ValueError, match="no such file"):
        moecache.patch(model, offload=Offload(policy="predictive", predictor=str(tmp_path / "missing.pt")))
    (tmp_path / "garbage.pt").write_bytes(b"not a predictor")
    with pytest.raises(ValueError, match="garbage.pt' is not a route predictor saved by LearnedRoutePredictor"):
        moecache.patch(model, offload=Offload(policy="predictive", predictor=str(tmp_path / "garbage.pt")))
    torch.save({"hidden": 64}, tmp_path / "other.pt")  # readable, but not a predictor's contents
    with pytest.raises(ValueError, match="other.pt' is not a route predictor"):
        moecache.patch(model, offload=Offload(policy="predictive", predictor=str(tmp_path / "other.pt")))
    # Another model's predictor: refused before the model changes, not at the first forward.
    for hidden, experts, targets, match in ((64, 16, [(1, 1)], "hidden size 64 and 16 experts; this model's MoE "
                                             "layers have 64 and 8"),
                                            (32, 8, [(1, 1)], "hidden size 32 and 8 experts"),
                                            (64, 8, [(1, 1), (7, 2)], "predicts MoE layer 7; this model has 3")):
        train_route_predictor({t: (torch.randn(8, hidden), torch.randint(0, experts, (8, 2))) for t in targets},
                              hidden, experts, width=8, epochs=1).save(tmp_path / "another.pt")
        with pytest.raises(ValueError, match=match):
            moecache.patch(model, offload=Offload(policy="predictive", predictor=str(tmp_path / "another.pt")))
    assert not moecache.stats(model)["patched"]
    moecache.patch(model, offload=Offload(gpu_experts=0.25, policy="predictive", predictor=str(path)))
    assert moecache.patched_experts(model)[0].provider.predictor.learned is not None
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6), ref)
    assert moecache.stats(model)["prediction"]["per_layer"]
    moecache.unpatch(model)


def test_warm_up_can_be_the_prompt_steps_of_several_micro_batches():
    """Regression: a trace of micro-batches one after another has a prompt step at each one's start, and
    only the first was left out of the after-warm-up figures (bench_cache's per-token loads counted
    every other prompt's loads)."""
    from moecache.analysis.simulate import Timing

    trace = [[[0]], [[1]], [[0]], [[1]]]  # one layer; steps 0 and 2 are prompts
    for policy in ("lru", "belady"):
        r = simulate(trace, 2, policy, warmup_steps={0, 2}, timing=Timing(1.0, 2.0))
        assert (r.requests, r.hits, r.misses) == (4, 2, 2)
        assert (r.requests_after_warmup, r.hits_after_warmup, r.misses_after_warmup, r.loads_after_warmup) == (2, 1, 1, 1)
        assert r.hit_rate_after_warmup == 0.5
        assert (r.stall_ms_after_warmup, r.time_ms_after_warmup) == (2.0, 4.0)  # step 1: 2 stalled + 1; step 3: 1
        first_two = simulate(trace, 2, policy, warmup_steps=2)
        assert (first_two.requests_after_warmup, first_two.hits_after_warmup) == (2, 2)
    with pytest.raises(ValueError, match="warmup_steps must be"):
        simulate(trace, 2, "lru", warmup_steps=[-1])


def test_token_id_router_is_predicted_from_the_step_token_ids_only():
    """A TokenIdRouter layer is predicted exactly from `token_ids` (its table's picks, counted per token), and
    not at all while the ids are unknown or are not this step's (another count of tokens)."""
    from moecache.cache.predictor import LookaheadPredictor, RouterSpec, TokenIdRouter

    g = torch.Generator().manual_seed(0)
    table = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(20)])
    predictor = LookaheadPredictor([RouterSpec(torch.randn(6, 8, generator=g)), TokenIdRouter(table, 6)], depth=1)
    hidden = torch.randn(5, 8, generator=g)
    assert predictor.predict(0, hidden, 2) == []  # no token ids yet
    predictor.token_ids = torch.tensor([[3, 3, 17, 0, 9]])
    (target, depth, counts), = predictor.predict(0, hidden, 2)
    assert (target, depth) == (1, 1)
    assert torch.equal(counts, torch.bincount(table[[3, 3, 17, 0, 9]].reshape(-1), minlength=6))
    predictor.token_ids = torch.tensor([3, 17])  # an earlier step's, of another size
    assert predictor.predict(0, hidden, 2) == []


def test_block_token_ids_reader_reads_them_by_keyword_or_position():
    from moecache import compat

    class Block(torch.nn.Module):
        def forward(self, hidden_states, input_ids=None):
            return hidden_states

    class Plain(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    read, ids, hidden = compat.block_token_ids_reader(Block()), torch.tensor([[4, 5]]), torch.randn(2, 3)
    assert read((hidden,), {"input_ids": ids}) is ids
    assert read((hidden, ids), {}) is ids
    assert read((hidden,), {}) is None
    assert compat.block_token_ids_reader(Plain()) is None
