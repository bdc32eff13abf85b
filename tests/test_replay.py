"""Routing replayed from the shipped trained model onto other models (moecache.analysis.replay)."""
import pytest
import torch

import moecache
from moecache import Offload
from moecache.analysis.replay import RoutingReplay, map_routes, record_token_routes

transformers = pytest.importorskip("transformers")
data = pytest.importorskip("moecache.data")

import builders  # noqa: E402


@pytest.fixture(scope="module")
def source():
    model = data.load_tiny_moe()
    ids = data.encode(data.validation_text()[:4000])[0]
    prompts = torch.stack([ids[i * 300: i * 300 + 40] for i in range(4)])
    moecache.patch(model)
    recording = record_token_routes(model, prompts, moecache.patched_experts(model), moecache.routers(model),
                                    max_new_tokens=6, depth=1, source="trained-tiny-moe")
    moecache.unpatch(model)
    return model, prompts, recording


def test_recording_holds_every_tokens_routes_and_guesses(source):
    _, prompts, rec = source
    assert len(rec.routes) == 6 and rec.num_layers == 3 and rec.top_k == 4 and rec.num_experts == 32
    assert rec.routes[0][0].shape == (prompts.numel(), 4) and rec.routes[1][2].shape == (4, 4)
    assert rec.predictions[1][0][0] is None and rec.predictions[1][1][0].shape == (4, 4)
    assert all(len(set(row)) == 4 for row in rec.routes[0][1].tolist())


def test_a_model_replaying_its_own_routes_generates_its_own_tokens(source):
    model, prompts, rec = source
    reference = model.generate(prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    moecache.patch(model)
    experts = moecache.patched_experts(model)
    mapped = map_routes(rec, len(experts), 32, 4, seed=None)
    with RoutingReplay(model, experts, mapped):
        assert torch.equal(model.generate(prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False), reference)
    # a different recording's routes change the tokens: the replayed ids are the ones used
    shifted = map_routes(rec, len(experts), 32, 4, seed=5)
    with RoutingReplay(model, experts, shifted):
        assert not torch.equal(model.generate(prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False), reference)
    moecache.unpatch(model)


def test_replayed_guesses_score_as_the_sources_live_predictor(source):
    model, prompts, rec = source
    moecache.patch(model, offload=Offload(gpu_experts=0.5, policy="predictive", lookahead=1))
    model.generate(prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    live = moecache.stats(model)["prediction"]["by_depth"][1]
    moecache.unpatch(model)
    moecache.patch(model, offload=Offload(gpu_experts=0.5, policy="predictive", lookahead=1))
    experts = moecache.patched_experts(model)
    with RoutingReplay(model, experts, map_routes(rec, 3, 32, 4, seed=None)):
        model.generate(prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    replayed = moecache.stats(model)["prediction"]["by_depth"][1]
    moecache.unpatch(model)
    assert replayed == live and 0.2 < live["recall"] < 1.0


def test_mapping_onto_a_larger_target_follows_the_stated_rule(source):
    _, _, rec = source
    target = builders.deepseek(n_routed_experts=64, num_experts_per_tok=6, num_hidden_layers=8, first_k_dense_replace=1)
    moecache.patch(target)
    experts = moecache.patched_experts(target)
    mapped = map_routes(rec, len(experts), 64, 6, seed=0)
    seen = []

    def spy(module, args):
        seen.append(args[1].clone())

    with RoutingReplay(target, experts, mapped) as replay:
        handles = [m.register_forward_pre_hook(spy) for m in experts]  # after the replay's hook: sees its ids
        target(torch.randint(3, 96, (2, 9)))
        target(torch.randint(3, 96, (2, 1)))  # decode step 1 of requests 0 and 1
        replay.requests = [3, 6]  # a micro-batch of other requests: request 6 replays source request 2
        target(torch.randint(3, 96, (2, 1)))
        for h in handles:
            h.remove()
    moecache.unpatch(target)
    L = len(experts)
    assert len(seen) == 3 * L
    source_rows = (torch.arange(2).repeat_interleave(9) * 40 + torch.arange(9).repeat(2))  # request r, position p
    for j in range(L):
        src = rec.routes[0][j % 3][source_rows]
        ids = seen[j].long()
        assert ids.shape == (18, 6) and all(len(set(r)) == 6 for r in ids.tolist())
        assert torch.equal(ids[:, :4], mapped.permutations[j][src])  # replica 0 of each source pick, in rank order
        assert torch.equal(ids[:, 4:], mapped.permutations[j][(src[:, :2] + 32) % 64])
        assert torch.equal(seen[L + j].long()[:, :4], mapped.permutations[j][rec.routes[1][j % 3][:2]])
        assert torch.equal(seen[2 * L + j].long()[:, :4], mapped.permutations[j][rec.routes[2][j % 3][[3, 2]]])


def test_colliding_replicas_still_give_distinct_experts(source):
    _, _, rec = source
    mapped = map_routes(rec, 3, 32, 6, seed=1)  # as many target experts as source experts: replicas collide
    ids = mapped.routes(0, 1, [0, 1, 2, 3], rec.routes[0][0].shape[0])
    assert ids.shape == (160, 6) and all(len(set(r)) == 6 for r in ids.tolist())
    assert torch.equal(ids[:, :4], mapped.permutations[1][rec.routes[0][1]])


@pytest.mark.parametrize("source_shape,target_shape", [((8, 3), (9, 8)), ((4, 2), (8, 8)), ((8, 2), (8, 8)),
                                                       ((8, 3), (8, 8))])
def test_mapping_fills_every_top_k_where_replicas_run_out(source_shape, target_shape):
    """Regression: where the replicas of a row's experts cycled through too few ids, the fallback added
    one free id per source expert and came up short of the target's top-k (a shape error)."""
    from moecache.analysis.replay import RouteRecording

    (E_src, K_src), (E_tgt, K_tgt) = source_shape, target_shape
    g = torch.Generator().manual_seed(0)
    routes = torch.stack([torch.randperm(E_src, generator=g)[:K_src] for _ in range(5)])
    rec = RouteRecording("src", 5, 1, E_src, K_src, 1, routes=[[routes]], predictions=[[[None]]])
    ids = map_routes(rec, 1, E_tgt, K_tgt).routes(0, 0, [0, 1, 2, 3, 4], 5)
    assert ids.shape == (5, K_tgt) and all(len(set(row)) == K_tgt for row in ids.tolist())
    assert int(ids.min()) >= 0 and int(ids.max()) < E_tgt


def test_bad_mappings_are_refused_by_name(source):
    _, _, rec = source
    with pytest.raises(ValueError, match="num_experts=16"):
        map_routes(rec, 4, 16, 4)
    with pytest.raises(ValueError, match="top_k=0"):
        map_routes(rec, 4, 64, 0)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        map_routes(rec, 0, 64, 4)
    mapped = map_routes(rec, 4, 64, 8)
    # Regressions: each of these returned something quietly (fewer rows than asked, the deepest guess for
    # depth 0, prompt position 0 for every decode step) or failed with a bare error.
    with pytest.raises(ValueError, match="rows=11 must be a whole number of tokens for each of the 2"):
        mapped.routes(1, 0, [0, 1], 11)
    with pytest.raises(ValueError, match="rows=4 must be a whole number of tokens for each of the 0"):
        mapped.routes(1, 0, [], 4)
    with pytest.raises(ValueError, match="layer=4"):
        mapped.routes(1, 4, [0], 1)
    for depth in (0, -1):
        with pytest.raises(ValueError, match="depth"):
            mapped.prediction(1, 1, depth, [0], 1)
    from dataclasses import replace

    prompt_only = map_routes(replace(rec, routes=rec.routes[:1], predictions=rec.predictions[:1]), 4, 64, 8)
    assert prompt_only.routes(0, 0, [0], 40).shape == (40, 8)
    with pytest.raises(ValueError, match="prompt step only"):
        prompt_only.routes(1, 0, [0], 1)
