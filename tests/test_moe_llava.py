"""MoE-LLaVA's language models (DeepSpeed-MoE layers, patched in place), the DeepSpeed-MoE stand-in's
gating, local-checkpoint loading, and transformers' non-gated MoE families (Switch, NLLB-MoE)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import moecache
from moecache.models import deepspeed_moe
from moecache.models.llava import SHAPES, build_language_model, parameter_count, scaled_down
from moecache.testing import assert_close, assert_model_restored, greedy, model_logits, model_snapshot, parameter_grads

transformers = pytest.importorskip("transformers")

FAMILIES = ("moe-llava-phi2", "moe-llava-stablelm", "moe-llava-qwen")
OFFLOADS = {"resident": None, "offload50": moecache.Offload(gpu_experts=0.5),
            "pool-below-topk": moecache.Offload(gpu_experts=1),
            "predictive": moecache.Offload(gpu_experts=0.5, policy="predictive")}


def tiny(family, **overrides):
    from dataclasses import replace

    return build_language_model(replace(scaled_down(SHAPES[family]), **overrides), seed=3)


def seeded(fn, *args, **kwargs):
    """DeepSpeed's top-2 gating samples the second expert with Gumbel noise from the global generator:
    the same seed before each run gives both runs the same draws."""
    torch.manual_seed(1234)
    return fn(*args, **kwargs)


def _moe_layers(model):
    return [m for m in model.modules() if isinstance(m, deepspeed_moe.MOELayer)]


# ------------------------------------------------------------------ the stand-in's gating
def _gshard_top2(gates: torch.Tensor, second: torch.Tensor, capacity: int):
    """Top-2 routing with capacity, written plainly: all first choices claim buffer places in token
    order, then all second choices; a route finding its expert full is dropped; kept gates renormalised."""
    S, E = gates.shape
    first = gates.argmax(dim=1)
    used = [0] * E
    kept = torch.zeros(S, 2, dtype=torch.bool)
    for k, choice in enumerate((first, second)):
        for t in range(S):
            e = int(choice[t])
            if used[e] < capacity:
                used[e] += 1
                kept[t, k] = True
    g = torch.stack([gates[torch.arange(S), first], gates[torch.arange(S), second]], dim=1) * kept
    g = g / g.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
    dense = torch.zeros(S, E)
    dense[torch.arange(S), first] += g[:, 0]
    dense[torch.arange(S), second] += g[:, 1]
    return dense, kept


@pytest.mark.parametrize("S,E,factor,min_capacity", [(40, 4, 0.5, 0), (40, 4, 1.0, 4), (7, 4, 0.25, 4), (33, 8, 0.3, 1)])
def test_stand_in_top2_drops_routes_beyond_capacity_in_token_order(S, E, factor, min_capacity):
    g = torch.Generator().manual_seed(S)
    logits = torch.randn(S, E, generator=g) + torch.tensor([1.5] + [0.0] * (E - 1))  # expert 0 oversubscribed
    torch.manual_seed(5)
    l_aux, combine, dispatch, counts = deepspeed_moe.top2gating(logits.clone(), factor, min_capacity)
    torch.manual_seed(5)
    second = (logits + deepspeed_moe._gumbel(logits.shape, logits.device)).masked_fill(
        torch.nn.functional.one_hot(logits.argmax(1), E).bool(), float("-inf")).argmax(1)
    capacity = max(int(torch.ceil(torch.tensor(S / E * factor * 2))), min_capacity)
    expected, kept = _gshard_top2(torch.softmax(logits, dim=1), second, capacity)
    assert combine.shape == (S, E, capacity) and torch.equal(dispatch, combine > 0)
    assert_close(combine.sum(dim=2), expected, torch.float32)
    assert (combine > 0).sum(dim=(0, 2)).max() <= capacity  # no expert over capacity
    if factor < 1:
        assert not kept.all()  # the cases with small factors do drop routes
    assert counts.sum() == 2 * S  # exp_counts counts routes before dropping, as DeepSpeed's does
    assert torch.isfinite(l_aux)


def test_stand_in_top1_keeps_at_most_capacity_per_expert():
    logits = torch.randn(30, 4) + torch.tensor([2.0, 0, 0, 0])
    _, combine, _, counts = deepspeed_moe.top1gating(logits, 0.5, 2, use_rts=True)
    capacity = 4  # ceil(30 / 4 * 0.5)
    per_expert = (combine > 0).sum(dim=(0, 2))
    assert combine.shape[2] == capacity and per_expert.max() <= capacity and per_expert.sum() < 30
    assert counts.sum() == 30
    chosen = combine.sum(dim=2)
    probs = torch.softmax(logits, dim=1)
    kept = chosen.sum(dim=1) > 0
    assert_close(chosen[kept].max(dim=1).values, probs[kept].max(dim=1).values, torch.float32)


def test_stand_in_rejects_what_it_does_not_model():
    with pytest.raises(ValueError, match="ep_size"):
        deepspeed_moe.MoE(16, torch.nn.Linear(16, 16), num_experts=4, ep_size=2)
    with pytest.raises(ValueError, match="k must be 1 or 2"):
        deepspeed_moe.MoE(16, torch.nn.Linear(16, 16), num_experts=4, k=3)


def test_moe_returns_deepspeeds_tuple_and_the_model_sees_the_output():
    model = tiny("moe-llava-phi2")
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    out, l_aux, counts = seeded(moe.forward, x)  # DeepSpeed's MoE.forward: the tuple
    assert out.shape == x.shape and l_aux.dim() == 0 and counts.shape == (4,)
    assert torch.equal(seeded(moe, x), out)  # called as a module (the builder's hook): the output, for the decoder layer
    assert isinstance(model.model.layers[1].mlp, transformers.models.phi.modeling_phi.PhiMLP)  # every other layer


# ------------------------------------------------------------------ patched in place
@pytest.mark.parametrize("offload", OFFLOADS.values(), ids=OFFLOADS.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_llava_patched_offloaded_and_unpatched_give_the_same_logits_and_tokens(family, offload):
    model = tiny(family)
    ids = torch.randint(3, 256, (2, 14), generator=torch.Generator().manual_seed(0))
    ref_logits = seeded(model_logits, model, ids)
    ref_tokens = seeded(greedy, model, ids, n=8)
    before = model_snapshot(model)
    moecache.patch(model, offload=offload)
    layers = _moe_layers(model)
    assert len(layers) == 2 and all("forward" in layer.__dict__ for layer in layers)
    assert_close(seeded(model_logits, model, ids), ref_logits, torch.float32)
    assert torch.equal(seeded(greedy, model, ids, n=8), ref_tokens)
    stats = moecache.stats(model)
    assert stats["calls"] > 0 and {l["activation"] for l in stats["layers"]} == {
        "gelu_tanh" if family == "moe-llava-phi2" else "silu"}
    if offload is not None:
        assert stats["cache"]["misses"] > 0
        assert all(e.fc1.weight.numel() == 0 if family == "moe-llava-phi2" else True
                   for e in layers[0].experts.deepspeed_experts)
    out, l_aux, counts = model.model.layers[0].mlp.forward(torch.randn(1, 3, 64))  # the MoE's tuple, unchanged
    assert out.shape == (1, 3, 64) and torch.isfinite(l_aux) and int(counts.sum()) == 6
    moecache.unpatch(model)
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert_model_restored(model, before)
    assert torch.equal(seeded(model_logits, model, ids), ref_logits)


@pytest.mark.parametrize("family", ["moe-llava-phi2", "moe-llava-qwen"])
def test_dropped_routes_weigh_zero_as_in_deepspeed(family):
    """A small capacity drops routes (over a batch of prompts, counted together as DeepSpeed does)."""
    model = tiny(family, eval_capacity_factor=0.3, min_capacity=0)
    ids = torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    ref = seeded(model_logits, model, ids)
    torch.manual_seed(1234)
    with torch.no_grad():
        x = model.model.embed_tokens(ids).reshape(-1, 64)
        _, combine, _, counts = _moe_layers(model)[0].gate(x)
    assert int((combine > 0).sum()) < int(counts.sum())  # some routes were dropped
    moecache.patch(model)
    assert_close(seeded(model_logits, model, ids), ref, torch.float32)
    moecache.unpatch(model)


@pytest.mark.parametrize("family", ["moe-llava-phi2", "moe-llava-qwen"])
def test_gradients_reach_each_expert_mlp_of_a_patched_model(family, monkeypatch):
    """The experts' linear layers are views of the stacks the kernels read: a backward through the
    patched model (Triton kernels) gives each of them, and every other parameter, the original's
    gradient. Before, the stacks were plain tensors and the experts' weights got none."""
    monkeypatch.setenv("MOECACHE_BACKEND", "triton")
    model = tiny(family)
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(4))
    expected = seeded(parameter_grads, model, ids)
    moecache.patch(model)
    got = seeded(parameter_grads, model, ids)
    assert got.keys() == expected.keys() and any(".deepspeed_experts." in name for name in got)
    for name in expected:
        assert_close(got[name], expected[name], torch.float32, name=f"grad {name}")
    moecache.unpatch(model)


def test_converting_a_patched_model_restacks_its_experts():
    """model.half() after patch gives every expert parameter new storage: the stacks the kernels read
    follow (before, a forward failed on the old fp32 stacks, and a conversion keeping the dtype would
    have left the layers computing with stale weights). Back to fp32, the model matches the unpatched one
    converted the same way, and unpatch gives its weights back."""
    model, plain = tiny("moe-llava-qwen"), tiny("moe-llava-qwen")
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    moecache.patch(model)
    model.half()
    plain.half()
    assert_close(seeded(model_logits, model, ids), seeded(model_logits, plain, ids), torch.float16)
    from moecache import patching

    stacked = [r.new.stacked for r in getattr(model, patching._STATE).replaced]
    assert len(stacked) == 2 and all(s.weights()[0].dtype == torch.float16 and s.is_current() for s in stacked)
    model.float()
    plain.float()
    assert_close(seeded(model_logits, model, ids), seeded(model_logits, plain, ids), torch.float32)
    before = model_snapshot(plain)
    moecache.unpatch(model)
    assert_model_restored(model, before)


def test_moe_llava_patch_in_half_precision_on_cpu_uses_the_reference_path():
    model = tiny("moe-llava-stablelm").half()
    ids = torch.randint(3, 256, (1, 9))
    ref = seeded(model_logits, model, ids).float()
    moecache.patch(model)
    assert_close(seeded(model_logits, model, ids).float(), ref, torch.float16)
    moecache.unpatch(model)


def test_full_size_shapes_build_on_the_meta_device_with_the_published_sizes():
    for name, shape in SHAPES.items():
        model = build_language_model(shape, device="meta")
        count = parameter_count(shape)
        assert sum(p.numel() for p in model.parameters()) == count["total"], name
        assert len(model.model.layers) == shape.layers
        assert len(_moe_layers(model)) == (shape.layers // 2 if shape.num_experts else 0)
    # Llama-2 7B / 13B, and MoE-LLaVA-Phi2's 2.7B x 4e: about 5.3B weights, 3.6B active per token
    assert round(parameter_count(SHAPES["llava-1.5-7b"])["total"] / 1e9, 2) == 6.74
    assert round(parameter_count(SHAPES["llava-1.5-13b"])["total"] / 1e9, 1) == 13.0
    phi = parameter_count(SHAPES["moe-llava-phi2"])
    assert round(phi["total"] / 1e9, 1) == 5.3 and round(phi["active"] / 1e9, 1) == 3.6
    # by name too, as build_language_model takes them (both raised an AttributeError on a name)
    assert parameter_count("moe-llava-phi2") == phi
    assert scaled_down("moe-llava-phi2") == scaled_down(SHAPES["moe-llava-phi2"])


def test_scheduling_warns_that_batch_wide_capacity_routes_a_request_by_its_group(caplog):
    """Regression: generate_scheduled said its outputs were plain greedy generate's, but DeepSpeed's gate
    counts expert capacity over the batch (and samples the second expert), so a MoE-LLaVA request's
    output changed with the requests grouped with it, silently."""
    import logging

    from moecache.cache.scheduler import generate_scheduled

    model = tiny("moe-llava-stablelm")
    moecache.patch(model)
    prompts = torch.randint(3, 200, (3, 6), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="moecache"):
        generate_scheduled(model, prompts, moecache.patched_experts(model), batch_size=2, max_new_tokens=2)
    assert "routes by the batch" in caplog.text and "deepspeed_moe.gate" in caplog.text
    with pytest.raises(ValueError, match="prompts holds no request"):
        generate_scheduled(model, prompts[:0], moecache.patched_experts(model), batch_size=2)
    moecache.unpatch(model)


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="shape must be a LanguageModelShape or one of"):
        build_language_model("moe-llava-phi3")


# ------------------------------------------------------------------ local checkpoints
def _qwen1_state(model, hidden):
    """The tiny Qwen-shaped model's weights under Qwen-1's names (what MoE-LLaVA-Qwen checkpoints hold)."""
    out = {}
    sd = model.state_dict()
    for key, t in sd.items():
        if key.startswith("model.embed_tokens."):
            out[key.replace("model.embed_tokens.", "transformer.wte.")] = t
        elif key.startswith("model.norm."):
            out[key.replace("model.norm.", "transformer.ln_f.")] = t
        elif key.startswith("model.layers."):
            k = key.replace("model.layers.", "transformer.h.", 1)
            if ".self_attn.q_proj." in k:
                kv = [sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[k.replace(".self_attn.q_proj.", ".attn.c_attn.")] = torch.cat(kv)
            elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
                continue
            else:
                for new, old in ((".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                                 (".attn.c_proj.", ".self_attn.o_proj.")):
                    k = k.replace(old, new)
                out[k] = t
        else:
            out[key] = t
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_reads_back_with_load_language_model(family, tmp_path):
    """Regression: the config of a built (or loaded) model described no MoE layers, so its save_pretrained
    checkpoint was refused by load_language_model for 'missing' dense MLP weights (and a Qwen one for its
    qwen2 model_type). The config now carries MoE-LLaVA's moe section."""
    from moecache.models.llava import load_language_model

    model = tiny(family)
    moecache.patch(model)  # saved while patched: the checkpoint is the model's own
    model.save_pretrained(tmp_path)
    moecache.unpatch(model)
    saved = json.loads((tmp_path / "config.json").read_text())["moe"]
    assert saved["moe_layers_idx"] == scaled_down(SHAPES[family]).moe_layers and saved["top_k_experts"] == 2
    loaded = load_language_model(tmp_path)
    ids = torch.randint(3, 256, (1, 9))
    assert torch.equal(seeded(model_logits, loaded, ids), seeded(model_logits, model, ids))
    assert loaded.config.moe == model.config.moe


def test_layers_of_different_expert_counts_offload_the_larger_and_keep_the_other_resident(tmp_path, caplog):
    """A checkpoint may give each MoE layer its own expert count. One expert cache's slots are of one size:
    offload takes the layers whose experts hold the most bytes (here the one with 8 experts) and leaves the
    other resident, says so, and unpatch restores both (it was refused before)."""
    from moecache.models.llava import load_language_model

    model = tiny("moe-llava-stablelm", num_experts=8)
    moecache.patch(model)
    model.save_pretrained(tmp_path)
    moecache.unpatch(model)
    config = json.loads((tmp_path / "config.json").read_text())
    config["moe"]["num_experts"] = [4, 8]
    (tmp_path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    prefix = "model.layers.0.mlp.deepspeed_moe."
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{prefix}experts.deepspeed_experts.{e}.")
                                                       for e in range(4, 8))}
    state[f"{prefix}gate.wg.weight"] = state[f"{prefix}gate.wg.weight"][:4].contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    mixed = load_language_model(tmp_path)
    before = model_snapshot(mixed)
    ids = torch.randint(3, 96, (2, 7))
    ref = seeded(model_logits, mixed, ids)
    offload = moecache.Offload(gpu_experts=0.5)
    assert moecache.plan(mixed, offload=offload)["offload"]["resident"] == ["model.layers.0.mlp.deepspeed_moe.experts"]
    with caplog.at_level(logging.WARNING, logger="moecache"):
        moecache.patch(mixed, offload=offload)
    assert "the MoE layers hold experts of 2 shapes and one expert cache takes one: the 1 layers of 8 experts" in caplog.text
    assert [layer["name"] for layer in moecache.stats(mixed)["layers"]] == [
        "model.layers.0.mlp.deepspeed_moe.experts", "model.layers.2.mlp.deepspeed_moe.experts"]
    cache = moecache.expert_cache(mixed)
    assert (cache.num_layers, cache.num_experts, cache.num_slots) == (1, 8, 4)
    assert_close(seeded(model_logits, mixed, ids), ref, torch.float32)
    assert moecache.stats(mixed)["cache"]["requests"] > 0
    moecache.unpatch(mixed)
    assert_model_restored(mixed, before)
    moecache.patch(mixed)  # resident: each layer its own count
    assert [layer["name"] for layer in moecache.stats(mixed)["layers"]] == [
        "model.layers.0.mlp.deepspeed_moe.experts", "model.layers.2.mlp.deepspeed_moe.experts"]
    moecache.unpatch(mixed)


@pytest.mark.parametrize("family", FAMILIES)
def test_local_checkpoint_loads_the_language_model(family, tmp_path):
    from safetensors.torch import save_file

    from moecache.models.llava import load_language_model

    shape = scaled_down(SHAPES[family])
    model = build_language_model(shape, seed=7)
    state = _qwen1_state(model, shape.hidden) if family == "moe-llava-qwen" else dict(model.state_dict())
    state = {k: v.contiguous() for k, v in state.items()}
    prefix = "transformer" if family == "moe-llava-qwen" else "model"
    state[f"{prefix}.mm_projector.0.weight"] = torch.randn(64, 32)  # vision parts: not the language model
    state[f"{prefix}.image_tower.proj.weight"] = torch.randn(8, 8)
    save_file(state, str(tmp_path / "model.safetensors"))
    base = {"moe-llava-phi2": "phi", "moe-llava-stablelm": "stablelm", "moe-llava-qwen": "qwen"}[family]
    config = {"model_type": f"moe_llava_{base}", "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
              "num_attention_heads": shape.heads, "vocab_size": shape.vocab, "torch_dtype": "float32",
              "intermediate_size": shape.ffn * (2 if base == "qwen" else 1), "max_position_embeddings": 256,
              "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": shape.moe_layers, "ep_size": 1,
                      "top_k_experts": 2, "capacity_factor": 1.5, "eval_capacity_factor": 1.0, "min_capacity": 4,
                      "use_residual": False, "num_experts": [4] * len(shape.moe_layers)}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_language_model(tmp_path)
    ids = torch.randint(3, 256, (1, 11))
    assert_close(seeded(model_logits, loaded, ids), seeded(model_logits, model, ids), torch.float32)
    moecache.patch(loaded, offload=moecache.Offload(gpu_experts=0.5))
    assert_close(seeded(model_logits, loaded, ids), seeded(model_logits, model, ids), torch.float32)


def test_local_checkpoint_errors_name_the_problem(tmp_path):
    from moecache.models.llava import load_language_model

    with pytest.raises(ValueError, match="no config.json"):
        load_language_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        load_language_model(tmp_path)
    fields = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64,
              "intermediate_size": 128}
    for cfg, match in (
            ({"model_type": "llava", "text_config": {"model_type": "llama", **fields}}, "text_config"),
            ({"model_type": "llava_llama", **{k: v for k, v in fields.items() if k != "vocab_size"}},
             "lacks vocab_size"),
            ({"model_type": "moe_llava_phi", **fields, "moe": {"moe_enable": True, "moe_layers_idx": [0, 1],
                                                              "num_experts": [4]}}, "one per layer"),
            # RoPE scaling would load and silently rotate every position otherwise than the checkpoint was trained.
            ({"model_type": "llava_llama", **fields, "rope_scaling": {"type": "linear", "factor": 4.0}},
             "rope_scaling=.*linear"),
            ({"model_type": "llava_llama", **fields, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
             "rope_parameters=.*yarn")):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match):
            load_language_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama", **fields,
                                                      "rope_scaling": None}))  # as LLaVA-1.5 ships it
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_language_model(tmp_path)
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="language-model weights missing"):
        load_language_model(tmp_path)


# ------------------------------------------------------------------ transformers' non-gated families
def _switch(expert_capacity=64, seed=0):
    config = transformers.SwitchTransformersConfig(
        vocab_size=128, d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, expert_capacity=expert_capacity, encoder_sparse_step=1, decoder_sparse_step=2,
        router_jitter_noise=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # routers and experts with spread, so routing and drops are exercised
        for name, p in model.named_parameters():
            if "router" in name or "experts" in name:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


@pytest.mark.parametrize("capacity", [64, 3], ids=["no-drops", "drops"])
@pytest.mark.parametrize("offload", [None, moecache.Offload(gpu_experts=0.5),
                                     moecache.Offload(gpu_experts=0.5, policy="predictive")],
                         ids=["resident", "offload50", "predictive"])
def test_switch_transformers_top1_relu_experts(capacity, offload):
    model = _switch(capacity)
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    dec = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    masks = []
    # the router's one-hot dispatch mask: the integer output (transformers 5.17 returns it second, 5.25 first)
    hook = model.encoder.block[0].layer[-1].mlp.router.register_forward_hook(
        lambda m, a, out: masks.append(next(t for t in out if not t.is_floating_point())))
    ref = model_logits(model, ids, decoder_input_ids=dec)
    hook.remove()
    routed = int(masks[0].sum())
    # Tokens over capacity are dropped where the router counts capacity along the sequence; transformers
    # 5.17 hands it the tokens flattened to [T, 1, H], so there it never drops (and neither does moecache).
    counts_along_sequence = masks[0].shape[-2] > 1
    assert routed < ids.numel() if capacity == 3 and counts_along_sequence else routed == ids.numel()
    ref_tokens = greedy(model, ids, n=6)
    before = model_snapshot(model)
    moecache.patch(model, offload=offload)
    stats = moecache.stats(model)
    assert len(stats["layers"]) == 3 and {l["activation"] for l in stats["layers"]} == {"relu"}
    assert_close(model_logits(model, ids, decoder_input_ids=dec), ref, torch.float32)
    assert torch.equal(greedy(model, ids, n=6), ref_tokens)
    if offload is not None and offload.policy == "predictive":
        assert moecache.stats(model)["prediction"] is not None
    moecache.unpatch(model)
    assert_model_restored(model, before)
    assert torch.equal(model_logits(model, ids, decoder_input_ids=dec), ref)


def test_nllb_moe_is_left_alone_with_the_reason(caplog):
    config = transformers.NllbMoeConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_experts=4, expert_capacity=8,
        encoder_sparse_step=1, decoder_sparse_step=1, max_position_embeddings=64)
    model = transformers.NllbMoeForConditionalGeneration(config).eval()
    before = model_snapshot(model)
    with caplog.at_level(logging.WARNING, logger="moecache"):
        moecache.patch(model)
    left = moecache.stats(model)["left_alone"]
    assert left and all("NLLB-MoE" in item["reason"] and item["kind"] == "experts" for item in left)
    # One warning, with the reason; not also "no MoE experts found" (they were found).
    assert "NLLB-MoE" in caplog.text and "no MoE experts found" not in caplog.text
    assert_model_restored(model, before)
    with pytest.raises(ValueError, match="NLLB-MoE"):
        moecache.patch(model, strict=True)
    with pytest.raises(ValueError, match="no experts module could be patched: .*NLLB-MoE"):
        moecache.patch(model, offload=moecache.Offload(gpu_experts=0.5))
    assert_model_restored(model, before)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_moe_llava_bf16_patched_and_offloaded(family):
    from dataclasses import replace

    shape = replace(SHAPES[family], layers=4, vocab=1024)  # full width, fewer layers
    model = build_language_model(shape, dtype=torch.bfloat16, device="cuda", seed=3)
    ids = torch.randint(3, 1024, (2, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    ref_inputs, ref_outputs = moe_layer_io(model, shape, ids)
    for offload in (None, moecache.Offload(gpu_experts=0.5, policy="predictive")):
        moecache.patch(model, offload=offload)
        _, outputs = moe_layer_io(model, shape, ids, inputs=ref_inputs)
        for layer, (out, ref) in enumerate(zip(outputs, ref_outputs)):
            assert_close(out.float(), ref.float(), torch.bfloat16, name=f"MoE layer {layer}")
        moecache.unpatch(model)


def moe_layer_io(model, shape, ids, inputs=None):
    """Each MoE layer's input and output in one seeded forward. With `inputs`, each MoE layer reads the
    given input instead of its own: in bf16 the hidden states reaching a later MoE layer differ by rounding
    between two runs, which can flip a near-tied top-2 choice (seen on CPU for MoE-LLaVA-Qwen's second MoE
    layer) and then whole tokens differ; fed the same input, a layer must give the same output."""
    seen_in, seen_out, hooks = [], [], []

    def record(module, args, output):
        seen_in.append(args[0].detach().clone())
        seen_out.append(output.detach().clone())

    for i, layer_idx in enumerate(shape.moe_layers):
        moe = model.model.layers[layer_idx].mlp
        if inputs is not None:
            hooks.append(moe.register_forward_pre_hook(lambda module, args, i=i: (inputs[i],) + tuple(args[1:])))
        hooks.append(moe.register_forward_hook(record))  # after the layer's own hook, which unwraps its tuple
    try:
        seeded(model_logits, model, ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen_out) == len(shape.moe_layers)
    return seen_in, seen_out


@pytest.mark.parametrize("offload", ["resident", "offload50"])
@pytest.mark.parametrize("family", ["moe-llava-phi2", "switch"])
def test_a_patched_model_dropped_is_freed_without_the_cycle_collector(family, offload):
    """Regression: patch closed reference cycles (an adapter set as a module's forward held that module;
    list experts' load hooks held their stack; the Switch experts' replacement held the experts whose
    forward calls it), so `del model` freed neither the expert weights nor the expert cache (host store,
    slots, copy thread) until the cycle collector happened to run."""
    import gc
    import weakref

    model = tiny(family) if family != "switch" else _switch()
    moecache.patch(model, offload=OFFLOADS[offload])
    ids = torch.randint(3, 96, (1, 5))
    if family == "switch":
        model(input_ids=ids, decoder_input_ids=ids[:, :2])
    else:
        model(ids)
    watched = [weakref.ref(p) for p in model.parameters()]
    if OFFLOADS[offload] is not None:
        watched.append(weakref.ref(moecache.expert_cache(model)))
    gc.collect()
    gc.disable()
    try:
        del model
        alive = sum(ref() is not None for ref in watched)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of {len(watched)} parameters / caches outlived the model"
