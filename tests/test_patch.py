"""moecache.patch / unpatch / stats on tiny random models built from transformers config classes."""
import copy
import logging
import re

import numpy as np
import pytest
import torch

import moecache
from moecache import Offload
from moecache.layers import MoecacheExperts
from moecache.testing import assert_close, assert_model_restored, greedy, model_logits, model_snapshot, parameter_grads

import builders
from remote_code import VL2LanguageModel

transformers = pytest.importorskip("transformers")

COMMON = dict(builders.COMMON, num_key_value_heads=2)


def _deepseek(version, **kw):
    return builders.deepseek_config(version, num_key_value_heads=2, **kw)


FAMILIES = {
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=16)),
    "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2-greedy": lambda: transformers.DeepseekV2ForCausalLM(_deepseek("v2", topk_method="greedy")),
    "deepseek_v2-group_limited": lambda: transformers.DeepseekV2ForCausalLM(_deepseek(
        "v2", topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0)),
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM(_deepseek(
        "v3", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "gpt_oss": lambda: transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # non-gated fused experts (up_proj, down_proj) with a squared ReLU, between Mamba and attention layers
    "nemotron_h": lambda: transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
        **{k: v for k, v in COMMON.items() if k != "num_hidden_layers"}, moe_intermediate_size=32,
        intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2, head_dim=16, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=16, n_groups=1, layers_block_type=["full_attention", "moe", "mamba", "moe", "moe"])),
    # experts beside a dense MLP in every layer, GELU-tanh from config.hidden_activation, routed from the residual
    "gemma4": lambda: _gemma4(),
}


def _gemma4():
    model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=32, num_experts=8, top_k_experts=2, enable_moe_block=True,
        head_dim=16, global_head_dim=16, hidden_size_per_layer_input=0, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"]))
    with torch.no_grad():  # the experts' input norm weighs each dimension (randomize leaves norms at 1)
        for layer in model.model.layers:
            layer.pre_feedforward_layernorm_2.weight.normal_(1.0, 0.5)
    return model


def build(family, seed=0):
    torch.manual_seed(seed)
    return builders.randomize(FAMILIES[family](), seed)


snapshot, assert_restored, logits, generate = model_snapshot, assert_model_restored, model_logits, greedy


OFFLOADS = {
    "resident": None,
    "offload25": Offload(gpu_experts=0.25),
    "offload50": Offload(gpu_experts=0.5, policy="lfu"),
    "pool-below-topk": Offload(gpu_experts=1, prefetch=False),  # 1 per layer -> fewer slots than one layer's K
    # room beyond one call's experts: a pool that one call leases whole leaves a prefetch no slot
    "predictive50": Offload(gpu_experts=0.5, policy="predictive", lookahead=2),
}


@pytest.mark.parametrize("offload", list(OFFLOADS), ids=list(OFFLOADS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_and_unpatch_restores(family, offload):
    model = build(family)
    ids = torch.randint(3, 96, (2, 7))
    ref_logits, ref_tokens = logits(model, ids), generate(model, ids)
    before = snapshot(model)

    moecache.patch(model, offload=OFFLOADS[offload])
    patched = [m for m in model.modules() if isinstance(m, MoecacheExperts)]
    assert len(patched) == (2 if family.startswith("deepseek") else 3)
    assert_close(logits(model, ids), ref_logits, torch.float32)
    assert torch.equal(generate(model, ids), ref_tokens)
    s = moecache.stats(model)
    assert s["patched"] and s["calls"] > 0 and all(layer["calls"] > 0 for layer in s["layers"])
    if OFFLOADS[offload] is not None:
        cache = s["cache"]
        assert cache["hits"] + cache["misses"] == cache["requests"] > 0
        assert all(p.numel() == 0 for m in patched for p in m.fused_parameters()), "offloaded experts must free their memory"
        if OFFLOADS[offload].policy == "predictive":
            pred = s["prediction"]
            assert pred["depth"] == 2 and pred["per_layer"], "the predictor scored no guess"
            for row in pred["per_layer"]:
                assert 0 <= row["correct"] <= min(row["predicted"], row["actual"])
            assert cache["prefetches"] > 0
        if offload == "pool-below-topk":
            top_k = getattr(model.config, "num_experts_per_tok", None) or model.config.top_k_experts  # Gemma 4's name
            assert moecache.expert_cache(model).num_slots < top_k * len(patched)

    moecache.patch(model, offload=OFFLOADS[offload])  # twice: nothing more changes
    assert sum(isinstance(m, MoecacheExperts) for m in model.modules()) == len(patched)

    moecache.unpatch(model)
    assert_restored(model, before)
    assert torch.equal(logits(model, ids), ref_logits)
    assert moecache.stats(model)["patched"] is False


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_a_model_inside_a_plain_module_is_patched_by_its_own_config(family):
    """A wrapper without a config: the family (GPT-OSS's clamped GLU, transposed and interleaved) and the
    activation come from the config of the model inside."""
    model = build(family)
    ids = torch.randint(3, 96, (2, 7))
    ref = logits(model, ids)
    holder = torch.nn.ModuleDict({"lm": model})
    moecache.patch(holder, strict=True)
    assert [layer["activation"] for layer in moecache.stats(holder)["layers"]][:1] == [
        "swiglu_oai" if family == "gpt_oss" else "silu"]
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.unpatch(holder)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_temporal_prefetch_reaches_every_layer_after_the_first(policy, monkeypatch):
    """lru/lfu prefetch, after each layer, what the next layer used on the previous step. Regression: the
    last layer never kept what it used, so the layer before it never prefetched (with two MoE layers,
    nothing was ever prefetched)."""
    model = build("mixtral")
    moecache.patch(model, offload=Offload(gpu_experts=0.5, policy=policy))
    cache = moecache.expert_cache(model)
    targets = []
    real = cache.prefetch
    monkeypatch.setattr(cache, "prefetch", lambda layer, experts: (targets.append(layer), real(layer, experts))[1])
    steps = 6
    generate(model, torch.randint(3, 96, (1, 5)), n=steps)
    assert sorted(set(targets)) == [1, 2] and targets.count(2) == steps - 1
    moecache.unpatch(model)


def test_triton_kernels_in_a_patched_model(monkeypatch):
    """The same model through the Triton kernels (the interpreter on CPU), not the torch reference."""
    model = build("qwen2_moe")
    ids = torch.randint(3, 96, (1, 5))
    ref = logits(model, ids)
    monkeypatch.setenv("MOECACHE_BACKEND", "triton")
    moecache.patch(model)
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.patch(moecache.unpatch(model), offload=Offload(gpu_experts=0.5))
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.unpatch(model)


def _spy_value_checks(monkeypatch) -> list:
    """Record every run of the ops' value checks (each a host sync on a GPU)."""
    from moecache.ops import api, mla

    runs = []
    for module, name in ((api, "_check_fused_moe_values"), (mla, "_check_mla_values")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            runs.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    return runs


@pytest.mark.parametrize("offload", ["resident", "offload25", "predictive50", "pool-below-topk"])
def test_patched_layers_skip_the_value_checks(offload, monkeypatch):
    """A patched model's experts take the model's own top-k ids and its MLA layers moecache's own block
    table, so neither pays the ops' value checks (one host sync per call); the ops themselves still run
    them for a direct call."""
    model = build("deepseek_v3")
    ids = torch.randint(3, 96, (2, 5))
    ref = generate(model, ids, n=4)
    runs = _spy_value_checks(monkeypatch)
    moecache.patch(model, offload=OFFLOADS[offload])
    assert torch.equal(generate(model, ids, n=4), ref)
    calls = moecache.stats(model)
    assert runs == [], runs
    assert sum(c["decode"] for c in calls["attention"]) > 0  # the MLA decode path ran
    assert all(layer["calls"] > 0 for layer in calls["layers"])  # and every patched experts module

    moecache.unpatch(model)
    weights, top = moecache.ops.route(torch.randn(3, 8), 2)
    moecache.ops.fused_moe(torch.randn(3, 16), torch.randn(8, 12, 16), torch.randn(8, 16, 6), weights, top)
    assert runs == ["_check_fused_moe_values"]  # the spy sees a direct call's checks


def test_router_logits_and_aux_loss_still_work():
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 6))
    with torch.no_grad():
        ref = model(ids, output_router_logits=True)
    moecache.patch(model)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits)
    assert_close(out.aux_loss, ref.aux_loss, torch.float32)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v2-greedy"])
def test_gradients_through_a_patched_model_match_the_original(family, monkeypatch):
    """Fine-tuning a patched model (the Triton kernels; the interpreter on CPU): every parameter gets the
    gradient the original model gives, the router and the experts included. Offloaded, the forward
    under autograd still matches and the backward refuses clearly (the experts live in cache slots)."""
    monkeypatch.setenv("MOECACHE_BACKEND", "triton")
    model = build(family)
    ids = torch.randint(3, 96, (2, 7))
    expected = parameter_grads(model, ids)
    moecache.patch(model)
    got = parameter_grads(model, ids)
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], torch.float32, name=f"grad {name}")
    ref = logits(model, ids)
    moecache.patch(moecache.unpatch(model), offload=Offload(gpu_experts=0.5))
    loss = model(ids, labels=ids, use_cache=False)
    assert_close(loss.logits.detach(), ref, torch.float32)
    with pytest.raises(RuntimeError, match="no gradients through an expert_map"):
        loss.loss.backward()
    moecache.unpatch(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_resident_patch_keeps_the_parameters_in_their_order(family):
    """Optimizers and their saved states address parameters by position (GPT-OSS keeps each bias after
    its weight)."""
    model = build(family)
    before = [(name, id(p)) for name, p in model.named_parameters()]
    moecache.patch(model)
    assert [(name, id(p)) for name, p in model.named_parameters()] == before
    moecache.unpatch(model)


def test_a_float64_model_is_refused_by_its_patched_experts_with_the_way_out():
    model = build("mixtral").double()
    moecache.patch(model)
    with pytest.raises(TypeError, match=r"fp16, bf16 or fp32.*float64.*moecache.unpatch\(model\)"):
        model(torch.randint(3, 96, (1, 4)))
    moecache.unpatch(model)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_hooks_on_the_experts_module_fire_while_patched_and_stay_after_unpatch(family):
    model = build(family)
    ids = torch.randint(3, 96, (2, 7))
    experts = model.model.layers[1].mlp.experts
    seen = []
    experts.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    experts.register_forward_hook(lambda module, args, out: out * 0.5)  # changes what the model computes
    ref = logits(model, ids)
    calls = len(seen)
    moecache.patch(model)
    assert isinstance(model.model.layers[1].mlp.experts, MoecacheExperts)
    assert_close(logits(model, ids), ref, torch.float32)
    assert len(seen) == 2 * calls
    late = model.model.layers[1].mlp.experts.register_forward_hook(lambda module, args, out: seen.append(-1))
    grads = []
    model.model.layers[1].mlp.experts.register_full_backward_hook(lambda module, gin, gout: grads.append(1))
    moecache.unpatch(model)
    assert_close(logits(model, ids), ref, torch.float32)  # registered while patched: still there after
    assert seen.count(-1) == 1
    late.remove()
    model(ids, labels=ids).loss.backward()
    assert grads == [1]


def test_hooks_on_parts_the_kernels_stand_in_for_leave_the_layer_alone():
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 7))
    model.model.layers[0].mlp.experts.act_fn.register_forward_hook(lambda module, args, out: out * 2)
    ref = logits(model, ids)
    moecache.patch(model)
    (left,) = moecache.stats(model)["left_alone"]
    assert left["name"] == "model.layers.0.mlp.experts" and "code around parts the kernels do not call (act_fn: hooks)" \
        in left["reason"]
    assert len(moecache.stats(model)["layers"]) == 2
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.unpatch(model)


def test_experts_whose_forward_is_set_on_the_module_are_left_alone():
    """Regression: accelerate's device hooks (cpu_offload, dispatch_model) wrap forward on the instance;
    the replacement skipped them, and the kernels then read weights still on the meta device."""
    model = build("qwen3_moe")
    ids = torch.randint(3, 96, (2, 7))
    experts = model.model.layers[2].mlp.experts
    plain = experts.forward
    experts.forward = lambda *args, **kwargs: plain(*args, **kwargs) * 0.5
    ref = logits(model, ids)
    moecache.patch(model)
    (left,) = moecache.stats(model)["left_alone"]
    assert left["name"] == "model.layers.2.mlp.experts" and "a forward set on the module itself" in left["reason"]
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.unpatch(model)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_the_module_tree_of_a_patched_model_reads_as_unpatched(family):
    """Regression: while patched, the experts' activation module was missing from named_modules (and
    get_submodule on its path failed): the replacement did not hold it."""
    model = build(family)
    names = [name for name, _ in model.named_modules()]
    act_fn = model.model.layers[1].mlp.experts.__dict__["_modules"].get("act_fn")
    moecache.patch(model)
    assert [name for name, _ in model.named_modules()] == names
    if act_fn is not None:
        assert model.get_submodule("model.layers.1.mlp.experts.act_fn") is act_fn
    moecache.unpatch(model)


def test_torch_jit_trace_of_a_patched_model_is_refused():
    """Regression: a trace recorded the experts its example's routes chose and dropped the others: the
    traced patched model was 0.88 relative off on new inputs, with only tracer warnings."""
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 7))
    model.config.return_dict = False
    moecache.patch(model)
    with pytest.raises(RuntimeError, match="torch.jit.trace records the experts"):
        torch.jit.trace(model, (ids,), check_trace=False)
    moecache.unpatch(model)


def test_a_hook_put_on_act_fn_after_patch_is_refused():
    """Regression: a hook on an experts module's act_fn registered after patch never ran (0.84 off)."""
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 7))
    act_fn = model.model.layers[1].mlp.experts.act_fn
    moecache.patch(model)
    handle = act_fn.register_forward_hook(lambda module, args, out: out * 0)
    with pytest.raises(ValueError, match="hook was registered after moecache.patch"):
        logits(model, ids)
    handle.remove()
    logits(model, ids)
    moecache.unpatch(model)


def test_unpatching_a_wrapper_around_a_patched_model_unpatches_it():
    """Regression: unpatch(get_peft_model(patched_model)) said "not patched" and left every module patched."""
    model = build("deepseek_v3")
    before = snapshot(model)
    moecache.patch(model)
    wrapper = torch.nn.ModuleDict({"base_model": model})
    moecache.unpatch(wrapper)
    assert moecache.stats(model)["patched"] is False
    assert_restored(model, before)


class _AdaptedExperts(torch.nn.Module):
    """Experts inside an adapter layer that holds them as base_layer, as PEFT's target_parameters
    adapters do, with an update of its own added to their output."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.scale = torch.nn.Parameter(torch.full((base.down_proj.shape[1],), 0.25))

    def forward(self, hidden_states, *args, **kwargs):
        return self.base_layer(hidden_states, *args, **kwargs) + hidden_states * self.scale


def test_unpatch_keeps_a_wrapper_put_around_the_experts_after_patch():
    """Regression: unpatch set the original experts back where patch had put its own, replacing the
    adapter wrapped around them since (PEFT's, on the patched model): the adapter was silently dropped."""
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 7))
    twin = copy.deepcopy(model)
    moecache.patch(model)
    for m in (model, twin):
        for layer in m.model.layers:
            layer.mlp.experts = _AdaptedExperts(layer.mlp.experts)
    ref = logits(twin, ids)
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.unpatch(model)
    assert all(isinstance(layer.mlp.experts, _AdaptedExperts) for layer in model.model.layers)
    assert not any(isinstance(m, MoecacheExperts) for m in model.modules())
    assert_close(logits(model, ids), ref, torch.float32)


def test_offloading_experts_inside_an_adapter_is_refused():
    """Regression: offload emptied the parameters of experts an adapter layer wraps (and computes with):
    the first forward crashed inside the adapter."""
    model = build("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts = _AdaptedExperts(layer.mlp.experts)
    before = snapshot(model)
    with pytest.raises(ValueError, match="wrapped by a _AdaptedExperts"):
        moecache.patch(model, offload=Offload(gpu_experts=0.5))
    assert_restored(model, before)


def test_model_without_moe_layers_gets_a_clear_message(caplog):
    config = transformers.LlamaConfig(**COMMON, intermediate_size=32)
    model = transformers.LlamaForCausalLM(config)
    before = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="moecache"):
        assert moecache.patch(model) is model
    assert "no MoE experts found in LlamaForCausalLM" in caplog.text
    with pytest.raises(ValueError, match="no MoE experts found"):
        moecache.patch(model, strict=True)
    with pytest.raises(ValueError, match="no MoE experts found"):
        moecache.patch(model, offload=Offload())
    assert_restored(model, before)


def test_bad_offload_requests_leave_the_model_intact():
    model = build("mixtral")
    before = snapshot(model)
    with pytest.raises(ValueError, match="smaller than one expert"):
        moecache.patch(model, offload=Offload(gpu_experts="1KB"))
    with pytest.raises(ValueError, match="fraction"):
        moecache.patch(model, offload=Offload(gpu_experts=1.5))
    with pytest.raises(ValueError, match="per-layer count"):
        moecache.patch(model, offload=Offload(gpu_experts=9))
    with pytest.raises(ValueError, match="policy"):
        moecache.patch(model, offload=Offload(policy="fifo"))
    with pytest.raises(ValueError, match="lookahead"):
        moecache.patch(model, offload=Offload(policy="predictive", lookahead=0))
    with pytest.raises(TypeError, match="offload"):
        moecache.patch(model, offload=0.5)
    for call in (moecache.patch, moecache.unpatch, moecache.stats):  # regression: a bare AttributeError
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
            call(None)
    with pytest.raises(ValueError, match="experts=True"):  # regression: ignored without a word
        moecache.patch(model, experts=False, offload=Offload())
    assert_restored(model, before)
    assert not any(isinstance(m, MoecacheExperts) for m in model.modules())


def test_a_byte_budget_counts_slots_as_the_cache_stores_them():
    """Regression: slots were counted with an expert's bytes unaligned while the pool stores each one
    aligned, so a byte budget could be overshot."""
    config = transformers.MixtralConfig(**dict(COMMON, hidden_size=56), intermediate_size=33, num_local_experts=4,
                                        num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(config).eval()
    unaligned = 3 * 56 * 33 * 4  # gate, up and down of one fp32 expert
    moecache.patch(model, offload=Offload(gpu_experts=f"{2 * unaligned}B"))
    cache = moecache.expert_cache(model)
    assert cache.record_bytes > unaligned  # the case the regression needs
    assert cache.num_slots == 1 and cache.num_slots * cache.record_bytes <= 2 * unaligned
    moecache.unpatch(model)


def test_experts_spread_over_devices_are_refused_for_offload():
    model = build("mixtral")
    kept = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    model.model.layers[2].mlp.experts.to("meta")  # a second device the cache cannot serve
    with pytest.raises(ValueError, match="several devices"):
        moecache.patch(model, offload=Offload())
    assert not any(isinstance(m, MoecacheExperts) for m in model.modules())
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, kept)


def test_offload_of_layers_in_different_dtypes_names_each_layer():
    """Regression: bf16 and fp16 layers (slots of one size) got the expert cache's own message, which named
    layers by their index in its list and not offload's way out."""
    model = build("mixtral")
    model.model.layers[1].mlp.experts.to(torch.bfloat16)
    for layer in (0, 2):
        model.model.layers[layer].mlp.experts.to(torch.float16)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"slots of one size and dtype, and these layers differ \(model\.layers\.0\."
                                         r"mlp\.experts: 8 experts of \d+ bytes in torch\.float16, model\.layers\.1\."
                                         r"mlp\.experts: 8 experts of \d+ bytes in torch\.bfloat16, .*convert them"):
        moecache.patch(model, offload=Offload(gpu_experts=0.5))
    assert_restored(model, before)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_unpatch_after_a_conversion_that_makes_new_parameters_restores_the_offloaded_experts(family):
    """Regression: under torch's overwrite-on-conversion flag, model.float() puts new (empty) Parameter objects
    on the offloaded experts; unpatch copied the weights into the old ones, then gave the original the new,
    empty ones: the experts' weights were lost."""
    model = build(family)
    before, ids = snapshot(model), torch.randint(3, 96, (1, 6))
    expected = logits(model, ids)
    moecache.patch(model, offload=Offload(gpu_experts=0.5))
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.float()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)
    assert_close(logits(model, ids), expected, torch.float32)
    moecache.unpatch(model)
    assert_restored(model, before)
    assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_train_and_eval_while_patched_reach_the_original_experts(family):
    """Regression: the patched experts started in training mode in a model patched in eval mode, and
    model.train() while patched never reached the original experts (still eval after unpatch)."""
    model = build(family).eval()
    moecache.patch(model)
    assert not any(m.training for m in model.modules())
    model.train()
    moecache.unpatch(model)
    assert all(m.training for m in model.modules())
    moecache.patch(model)
    model.eval()
    moecache.unpatch(model)
    assert not any(m.training for m in model.modules())


class _Scale(torch.nn.Module):
    def forward(self, weight):
        return 1.5 * weight


def test_a_parametrization_put_on_patched_experts_is_refused_by_unpatch_before_it_changes_anything():
    """Regression: unpatch raised a bare TypeError halfway, with the original experts back in the tree
    without the parametrization (outputs 0.30 relative off) and every later unpatch raising the same."""
    from torch.nn.utils import parametrize

    model, ids = build("mixtral"), torch.randint(3, 96, (1, 6))
    twin = copy.deepcopy(model)
    parametrize.register_parametrization(twin.model.layers[0].mlp.experts, "down_proj", _Scale())
    moecache.patch(model)
    experts = model.model.layers[0].mlp.experts
    parametrize.register_parametrization(experts, "down_proj", _Scale())
    assert_close(logits(model, ids), logits(twin, ids), torch.float32)
    with pytest.raises(ValueError, match=r"patched experts model\.layers\.0\.mlp\.experts hold a parametrization "
                                         r"of down_proj .*Nothing was changed"):
        moecache.unpatch(model)
    assert moecache.stats(model)["patched"] and model.model.layers[0].mlp.experts is experts
    assert_close(logits(model, ids), logits(twin, ids), torch.float32)
    parametrize.remove_parametrizations(experts, "down_proj", leave_parametrized=True)
    parametrize.remove_parametrizations(twin.model.layers[0].mlp.experts, "down_proj", leave_parametrized=True)
    moecache.unpatch(model)
    assert type(model.model.layers[0].mlp.experts) is type(twin.model.layers[0].mlp.experts)
    assert torch.equal(logits(model, ids), logits(twin, ids))


def test_experts_parametrized_before_patch_are_left_alone_with_the_reason():
    """Regression: they were skipped without a word (not listed, and strict did not raise)."""
    from torch.nn.utils import parametrize

    model, ids = build("mixtral"), torch.randint(3, 96, (1, 6))
    parametrize.register_parametrization(model.model.layers[1].mlp.experts, "gate_up_proj", _Scale())
    expected = logits(model, ids)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts \(ParametrizedMixtralExperts\).*parametrized"):
        moecache.patch(model, strict=True)
    moecache.patch(model)
    left = moecache.stats(model)["left_alone"]
    assert [(item["name"], item["reason"].split(" (")[0]) for item in left] == [("model.layers.1.mlp.experts",
                                                                                 "parametrized")]
    assert isinstance(model.model.layers[0].mlp.experts, MoecacheExperts)
    assert_close(logits(model, ids), expected, torch.float32)
    moecache.unpatch(model)


def test_patching_an_offloaded_model_with_another_offload_is_refused():
    """Regression: the second request was ignored without a word. The same request again changes nothing."""
    model = build("mixtral")
    ids = torch.randint(3, 96, (1, 6))
    ref = logits(model, ids)
    first = Offload(gpu_experts=0.5, policy="lru")
    moecache.patch(model, offload=first)
    cache = moecache.expert_cache(model)
    moecache.patch(model, offload=Offload(gpu_experts=0.5, policy="lru"))
    with pytest.raises(ValueError, match="already offloaded with .*policy='lru'.*unpatch it first"):
        moecache.patch(model, offload=Offload(gpu_experts=1, policy="predictive"))
    assert moecache.expert_cache(model) is cache and cache.policy == "lru"
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.patch(moecache.unpatch(model), offload=Offload(gpu_experts=1))  # one expert per layer ...
    with pytest.raises(ValueError, match="already offloaded"):
        moecache.patch(model, offload=Offload(gpu_experts=1.0))  # ... is not every expert, though 1 == 1.0
    moecache.unpatch(model)


def test_offload_budget_forms():
    record = 3 * 64 * 32 * 4
    assert Offload(gpu_experts=0.25).slots(3, 8, record) == 6
    assert Offload(gpu_experts=np.int64(2)).slots(3, 8, record) == 6  # numpy numbers as Python's
    assert Offload(gpu_experts=np.int64(2), lookahead=np.int32(2)) == Offload(gpu_experts=2, lookahead=2)
    assert type(Offload(gpu_experts=np.float64(0.5)).gpu_experts) is float
    assert Offload(gpu_experts=np.float32(0.25)).slots(3, 8, record) == 6
    assert Offload(gpu_experts=np.int64(2 * record), bytes=True).slots(3, 8, record) == 2
    assert Offload(gpu_experts=2).slots(3, 8, record) == 6
    assert Offload(gpu_experts=f"{5 * record}B").slots(3, 8, record) == 5
    assert Offload(gpu_experts=10 * record, bytes=True).slots(3, 8, record) == 10
    assert Offload(gpu_experts="1GiB").slots(3, 8, record) == 24  # capped at every expert


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["resident", "offload25", "pool-below-topk", "predictive50"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_gpu_bf16_patched_model_matches(family, offload):
    model = build(family).to("cuda", torch.bfloat16)
    ids = torch.randint(3, 96, (2, 7), device="cuda")
    ref = logits(model, ids).float()
    before = snapshot(model)
    moecache.patch(model, offload=OFFLOADS[offload])
    assert_close(logits(model, ids).float(), ref, torch.bfloat16)
    moecache.unpatch(model)
    assert_restored(model, before)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen3_moe"])
def test_gpu_offload_of_a_model_in_host_memory(family, caplog):
    """The model loaded in host memory, Offload(device="cuda"): its experts go into the host store (pinned in
    place once filled), everything else to the GPU; it computes what it computed on the CPU; unpatch puts
    the experts back and the rest back in host memory, exactly."""
    model = build(family).to(torch.bfloat16)
    ids = torch.randint(3, 96, (2, 7))
    reference = copy.deepcopy(model).cuda()
    ref = logits(reference, ids.cuda()).float()
    del reference
    before, params = snapshot(model), [id(p) for p in model.parameters()]
    moecache.patch(model, offload=Offload(gpu_experts=0.5, device="cuda", policy="predictive"))
    assert [id(p) for p in model.parameters()] == params  # moved in place: references to them stay good
    cache = moecache.expert_cache(model)
    assert cache.device.type == "cuda" and cache.pinned and cache._store.pin_mode == "register"
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(b.device.type == "cuda" for b in model.buffers())
    assert_close(logits(model, ids.cuda()).float(), ref, torch.bfloat16)
    assert moecache.stats(model)["cache"]["misses"] > 0
    moecache.unpatch(model)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert_restored(model, before)
    real = torch.cuda.mem_get_info
    try:  # a GPU without room for the rest and the slots: refused before the store is filled
        torch.cuda.mem_get_info = lambda device=None: (2**20, real(device)[1])
        with pytest.raises(ValueError, match="GiB of GPU memory but 0.00 GiB of .* is free: lower gpu_experts"):
            moecache.patch(model, offload=Offload(gpu_experts=0.5, device="cuda"))
    finally:
        torch.cuda.mem_get_info = real
    assert_restored(model, before)
    assert moecache.stats(model)["patched"] is False
    with caplog.at_level(logging.WARNING, logger="moecache"):  # no device named: said, not guessed
        moecache.patch(model, offload=Offload(gpu_experts=0.5))
    assert "Offload(device='cuda') runs it on the GPU" in caplog.text
    assert moecache.expert_cache(model).device.type == "cpu"
    moecache.unpatch(model)


@pytest.mark.compile
@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["resident", "offload50", "predictive50"])
def test_gpu_static_cache_compiled_generate(offload):
    """Compiled forward + static cache = CUDA graphs; offloaded misses are read in place from the pinned
    store through its device alias, so nothing may make the graphs skip."""
    from torch._dynamo.utils import counters

    model = build("qwen3_moe").to("cuda", torch.bfloat16)
    ids = torch.randint(3, 96, (1, 6), device="cuda")
    with torch.no_grad():  # a static cache: generate compiles the decode step (reduce-overhead) on CUDA
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    moecache.patch(model, offload=OFFLOADS[offload])
    model.__dict__.pop("_compiled_call", None)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    new_ref, new_out = ref[:, ids.shape[1]:], out[:, ids.shape[1]:]
    assert (new_out == new_ref).float().mean() >= 0.75  # bf16: a near-tie may flip a token and what follows
    moecache.unpatch(model)


@pytest.mark.parametrize("offload", [None, Offload(gpu_experts=0.5), Offload(gpu_experts=1)], ids=["resident", "offload50", "pool-below-topk"])
def test_deepseek_vl2_moe_blocks_through_structural_detection(offload):
    torch.manual_seed(0)
    model = VL2LanguageModel().eval()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        ref = model(x)
    before = snapshot(model)
    moecache.patch(model, offload=offload)
    assert all(isinstance(block.__dict__.get("moe_infer"), MoecacheExperts) for block in model.layers)
    with torch.no_grad():
        assert_close(model(x), ref, torch.float32)
    if offload is None:  # the per-expert weights are views of one stack: no second copy
        gate_up, _ = model.layers[0].moe_infer.stacked.weights()
        assert model.layers[0].experts[3].up_proj.weight.data_ptr() == gate_up[3, 24:].data_ptr()
    else:
        assert model.layers[0].experts[3].up_proj.weight.numel() == 0
    assert moecache.stats(model)["calls"] == 3
    moecache.unpatch(model)
    assert "moe_infer" not in model.layers[0].__dict__
    assert_restored(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("deepseek_v2-group_limited", "deepseek_v3")])
def test_lookahead_router_reproduces_the_models_own_routing(family):
    """The predictor's router reading (find_router + RouterSpec) picks exactly the experts the model's
    router picks when fed the same layer's experts' input (group-limited routing aside), so a lookahead
    guess differs from the truth only through the hidden state it is applied to. (Gemma 4's router reads
    the residual through a norm and a per-dimension scale of its own, its experts another norm of it,
    with weights of its own: both are undone.)"""
    assert_router_reading_picks_each_layers_experts(build(family))


def assert_router_reading_picks_each_layers_experts(model, with_selection_bias=False) -> None:
    """Patch `model`, run it, and check that every MoE layer's router reading (find_router's RouterSpec,
    with a selection bias where asked) applied to that layer's experts' input picks the experts the layer
    ran; unpatch it."""
    from moecache.patching.families import find_router

    moecache.patch(model, strict=True)
    seen = []
    for block in model.modules():
        for child in block.children():
            if isinstance(child, MoecacheExperts):
                spec = find_router(block, child.num_experts, child.weights()[0].shape[2])
                assert spec is not None, f"no router found in {type(block).__name__}"
                assert spec.correction is not None or not with_selection_bias, type(block).__name__
                child.register_forward_hook(lambda mod, args, out, spec=spec: seen.append((spec, args[0], args[1])))
    with torch.no_grad():
        model(torch.randint(3, 96, (2, 9)))
    assert seen
    for spec, hidden, top_k_index in seen:
        guess = spec.scores(spec.router_input(hidden)).topk(top_k_index.shape[1], dim=1).indices
        assert torch.equal(guess.sort(dim=1).values, top_k_index.long().sort(dim=1).values)
    moecache.unpatch(model)


def test_router_input_undoes_the_experts_norm_weight_and_scores_apply_the_routers_scale():
    from moecache.cache.predictor import RouterSpec, lookahead_scores

    H, E = 8, 5
    torch.manual_seed(0)
    residual = torch.randn(4, H)
    norm_weight = torch.randn(H)
    norm_weight[3] = 0.0  # that dimension never reaches the experts: it stays 0, not NaN
    scale, weight = torch.randn(H), torch.randn(E, H)
    spec = RouterSpec(weight, input_scale=scale, experts_input_scale=norm_weight)
    experts_input = residual * norm_weight
    seen = residual.clone()
    seen[:, 3] = 0.0
    assert torch.allclose(spec.router_input(experts_input), seen)
    assert torch.allclose(spec.scores(seen), (seen * scale) @ weight.T, atol=1e-6)
    plain = RouterSpec(torch.randn(E, H))
    assert torch.allclose(lookahead_scores([spec, plain], 0, 1, experts_input), seen @ plain.weight.T, atol=1e-6)
    assert torch.allclose(lookahead_scores([None, spec], 0, 1, seen), (seen * scale) @ weight.T, atol=1e-6)


def test_lookahead_predictor_counts_and_scores():
    from moecache.cache.predictor import LookaheadPredictor, RouterSpec

    H, E = 16, 6
    routers = [RouterSpec(torch.randn(E, H)) for _ in range(3)]
    pred = LookaheadPredictor(routers, depth=2)
    x = torch.randn(5, H)
    out = pred.predict(0, x, top_k=2)
    assert [(t, d) for t, d, _ in out] == [(1, 1), (2, 2)]
    for target, _, counts in out:
        direct = (x @ routers[target].weight.T).topk(2, dim=1).indices
        assert torch.equal(counts, torch.bincount(direct.reshape(-1), minlength=E))
        assert int(counts.sum()) == 10
    truth = sorted(pred.pending[(1, 1)])[:1] + [e for e in range(E) if e not in pred.pending[(1, 1)]][:1]
    pred.observe(1, truth)
    s = pred.stats[(1, 1)]
    assert (s.predicted, s.correct, s.actual) == (len(out[0][2].nonzero()), 1, 2)
    assert pred.summary()["by_depth"][1]["recall"] == 0.5
    assert pred.predict(2, x, top_k=2) == []  # nothing after the last layer


@pytest.mark.compile
def test_compiled_offloaded_model_reads_misses_in_place():
    """Under torch.compile the offloaded layer takes its traced path (no host bookkeeping, misses read
    through the expert map from the host store); on CPU the torch reference graph-breaks, so no fullgraph."""
    model = build("qwen3_moe")
    ids = torch.randint(3, 96, (1, 6))
    ref = logits(model, ids)
    moecache.patch(model, offload=Offload(gpu_experts=0.25, policy="predictive"))
    logits(model, ids)  # eager warm-up fills some slots; the rest stay misses
    cache = moecache.expert_cache(model)
    assert 0 < sum(len(cache.resident(layer)) for layer in range(cache.num_layers)) < cache.num_layers * 8
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    requests = moecache.stats(model)["cache"]["requests"]
    with torch.no_grad():
        assert_close(compiled(ids).logits, ref, torch.float32)
    assert moecache.stats(model)["cache"]["requests"] == requests  # traced path: no bookkeeping
    moecache.unpatch(model)
    torch._dynamo.reset()


@pytest.mark.compile
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_patched_model_exports(family, monkeypatch):
    """Regression: torch.export of a patched model failed on the torch backend, whose reference visited
    the routed experts by value (torch.unique(...).tolist(): a data-dependent guard that named no
    moecache code). Under a trace it visits every expert, with each one's token rows a traced size."""
    monkeypatch.setenv("MOECACHE_BACKEND", "torch")
    model = build(family)
    ids = torch.randint(3, 96, (2, 7))
    ref = logits(model, ids)
    moecache.patch(model)

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids, use_cache=False).logits

    exported = torch.export.export(Logits(model), (ids,), strict=False)
    other = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        assert_close(exported.module()(ids), ref, torch.float32)
        assert_close(exported.module()(other), logits(model, other), torch.float32)  # not the example's routes
    moecache.unpatch(model)


# ------------------------------------------------------------------ state dicts, saving, copying
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_offloaded_state_dict_holds_the_real_weights_and_save_pretrained_round_trips(family, tmp_path):
    """Regression: an offloaded model's state_dict held (0,) tensors for its experts and save_pretrained
    failed after writing config.json. The state dict now reads the masters from the host store."""
    model = build(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 96, (2, 7))
    ref = model_logits(model, ids)
    moecache.patch(model, offload=Offload(gpu_experts=0.5))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert_close(model_logits(reloaded, ids), ref, torch.float32)
    with pytest.raises(RuntimeError, match="unpatch"):
        model.load_state_dict(before)
    # A load into a submodule holding experts is refused before anything loads too (regression: the
    # attention weights loaded, then a size mismatch left the model half-loaded).
    inner = {k[len("model."):]: v + 1 for k, v in before.items() if k.startswith("model.")}
    layer = {k[len("model.layers.0."):]: v + 1 for k, v in before.items() if k.startswith("model.layers.0.")}
    for module, state in ((model.model, inner), (model.model.layers[0], layer)):
        with pytest.raises(RuntimeError, match="nothing was loaded"):
            module.load_state_dict(state, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.lm_head.load_state_dict({"weight": before["lm_head.weight"]})  # no experts below: loads as ever
    assert_close(model_logits(model, ids), ref, torch.float32)  # the refused loads changed nothing
    moecache.unpatch(model)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_resident_patched_model_pickles_and_its_copy_runs_and_unpatches(family):
    """Regression: pickle and torch.save of a resident patched model failed on a weak reference (cannot
    pickle 'weakref.ReferenceType'), with no word of unpatch; a layer pickles without the whole model."""
    import io
    import pickle

    model, ids = build(family), torch.randint(3, 96, (1, 6))
    before, expected = snapshot(model), logits(model, ids)
    moecache.patch(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    layer = pickle.dumps(model.model.layers[0].mlp.experts)
    assert len(layer) < len(buffer.getvalue()) / 2
    assert_close(logits(loaded, ids), expected, torch.float32)
    assert moecache.stats(loaded)["patched"]
    moecache.unpatch(loaded)
    assert_restored(loaded, before)
    assert not any(isinstance(m, MoecacheExperts) for m in loaded.modules())
    moecache.unpatch(model)
    assert_restored(model, before)


def test_offloaded_model_refuses_deepcopy_pickle_and_conversion_clearly():
    import copy
    import io

    model = build("mixtral")
    moecache.patch(model, offload=Offload(gpu_experts=0.5))
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        torch.save(model, io.BytesIO())
    model.to(torch.float64)
    with pytest.raises(TypeError, match="converted .* after moecache offloaded its experts"):
        model_logits(model, torch.randint(3, 96, (1, 4)))
    # The state dict is of one dtype, the experts' included (regression: they stayed float32).
    assert {t.dtype for t in model.state_dict().values()} == {torch.float64}
    model.to(torch.float32)
    moecache.unpatch(model)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_an_offloaded_model_converted_there_and_back_is_refused_and_a_no_op_conversion_is_not(family):
    """Regression: after model.half().float() the forward was accepted (fp32 again) and computed with the
    masters as they were at patch, while the model's other weights were rounded (1e-4 to 2e-3 relative
    off a model given the same conversion)."""
    model, ids = build(family), torch.randint(3, 96, (1, 6))
    expected = logits(model, ids)
    experts_before = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    moecache.patch(model, offload=Offload(gpu_experts=0.5))
    model.float()  # a no-op: the same storage
    assert_close(logits(model, ids), expected, torch.float32)
    model.half().float()
    with pytest.raises(TypeError, match=r"converted \(model\.half\(\), \.to\(dtype\) and the like\) after "
                                        r"moecache offloaded its experts.*unpatch\(model\), convert, then patch"):
        logits(model, ids)
    moecache.unpatch(model)  # the experts come back as they were at patch: the conversion never reached them
    assert all(torch.equal(model.state_dict()[k], v) for k, v in experts_before.items())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_vl2"])
def test_load_state_dict_with_assign_survives_unpatch(family):
    """Regression: load_state_dict(sd, assign=True) on a patched model was undone by unpatch (the old
    expert weights came back)."""
    model = build("mixtral") if family == "mixtral" else VL2LanguageModel()
    x = torch.randint(3, 96, (2, 6)) if family == "mixtral" else torch.randn(2, 5, 48)
    run = (lambda m: model_logits(m, x)) if family == "mixtral" else (lambda m: m(x))
    new_state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
    moecache.patch(model)
    model.load_state_dict(new_state, assign=True)
    with torch.no_grad():
        patched = run(model)
    moecache.unpatch(model)
    after = model.state_dict()
    for k in new_state:
        assert torch.equal(after[k], new_state[k]), k
    with torch.no_grad():
        assert_close(run(model), patched, torch.float32)


@pytest.mark.parametrize("family,offload", [("mixtral", "offload50"), ("deepseek_v2-greedy", "resident")])
def test_unpatching_a_shallow_copy_leaves_the_original_unpatched_and_working(family, offload):
    """copy.copy shares the submodules (and the patch state): unpatching the copy restores both, and the
    original says so instead of reporting a patch whose cache is closed or handing its restored attention
    a latent cache."""
    import copy

    model = build(family)
    ids = torch.randint(3, 96, (2, 7))
    ref_logits, ref_tokens = logits(model, ids), generate(model, ids)
    before = snapshot(model)
    moecache.patch(model, offload=OFFLOADS[offload])
    moecache.unpatch(copy.copy(model))
    assert torch.equal(generate(model, ids), ref_tokens)  # before any moecache call on it
    assert moecache.stats(model)["patched"] is False
    assert "_prepare_cache_for_generation" not in model.__dict__
    assert torch.equal(logits(model, ids), ref_logits)
    moecache.unpatch(model)
    assert_restored(model, before)


def test_an_offloaded_model_dropped_without_unpatch_is_freed_at_once():
    """Regression: the offloaded state-dict hook held its module, so a dropped model, with its expert cache
    (host store, device slots), lived on until the cycle collector ran."""
    import gc
    import weakref

    model = build("mixtral")
    gc.collect()
    gc.disable()
    try:
        moecache.patch(model, offload=OFFLOADS["offload50"])
        logits(model, torch.randint(3, 96, (1, 5)))
        alive = [weakref.ref(model), weakref.ref(moecache.expert_cache(model))]
        del model
        assert [ref() for ref in alive] == [None, None]
    finally:
        gc.enable()


def test_an_interrupted_offload_of_list_experts_leaves_them_as_they_were(monkeypatch):
    """Ctrl-C while the host store fills (the slow step): the stacked experts were left as views of a stack."""
    from moecache.patching import offload as offload_module

    model = VL2LanguageModel()
    before = model_snapshot(model)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(offload_module, "ExpertCache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        moecache.patch(model, offload=Offload(gpu_experts=0.5))
    assert_restored(model, before)
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_vl2"])
@pytest.mark.parametrize("where", ["filling", "after"])
def test_an_offload_that_fails_after_freeing_experts_gives_them_back(family, where, monkeypatch):
    """Offload frees each layer's experts as soon as the host store holds them. Interrupted while the store
    fills (after a layer was freed), or after it (while the predictor is made), the freed layers get their
    weights back from the store, exactly, and the model is as it was; patching again then works."""
    from moecache.patching import offload as offload_module

    model = build(family) if family != "deepseek_vl2" else VL2LanguageModel()
    ids = torch.randint(3, 96, (2, 7))
    ref = logits(model, ids) if family != "deepseek_vl2" else None
    before = model_snapshot(model)
    if where == "filling":
        real = offload_module._HandOver.release

        def release(self, layer):
            if layer == 1:
                raise KeyboardInterrupt
            real(self, layer)
        monkeypatch.setattr(offload_module._HandOver, "release", release)
    else:
        def find_router(*args):
            raise KeyboardInterrupt
        monkeypatch.setattr(offload_module, "find_router", find_router)
        monkeypatch.setattr("moecache.patching.validate_offload", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        moecache.patch(model, offload=Offload(gpu_experts=0.5, policy="predictive" if where == "after" else "lru"))
    assert_restored(model, before)
    assert moecache.stats(model)["patched"] is False
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
    monkeypatch.undo()
    if ref is not None:
        moecache.patch(model, offload=Offload(gpu_experts=0.5))
        assert_close(logits(model, ids), ref, torch.float32)
        moecache.unpatch(model)
        assert_restored(model, before)


def test_offload_to_a_named_device():
    """Offload(device=...): the device the slots live on. Named as the CPU for a model there, nothing else
    moves and the model runs as with no device named; a name that is no device, or one the slots cannot
    live on, or CUDA where moecache cannot use it, is refused before anything changes, naming `device`."""
    model = build("mixtral")
    ids = torch.randint(3, 96, (2, 7))
    ref = logits(model, ids)
    before = snapshot(model)
    moecache.patch(model, offload=Offload(gpu_experts=0.5, device="cpu"))
    assert moecache.expert_cache(model).device == torch.device("cpu")
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.patch(model, offload=Offload(gpu_experts=0.5, device=torch.device("cpu")))  # the same request
    with pytest.raises(ValueError, match="already offloaded"):
        moecache.patch(model, offload=Offload(gpu_experts=0.5))  # another: no device named
    moecache.unpatch(model)
    assert_restored(model, before)
    refusals = [("bogus", "offload device='bogus' is not a device"),
                ("meta", "offload device='meta': the slots live on a CUDA device or the CPU")]
    if not moecache._C.cuda_available():
        refusals.append(("cuda", "offload device='cuda' but moecache._C cannot use CUDA"))
    for device, message in refusals:
        with pytest.raises(ValueError, match=re.escape(message)):
            moecache.patch(model, offload=Offload(device=device))
        assert moecache.stats(model)["patched"] is False
    assert_restored(model, before)
    # moecache.plan checks the name alone (planning for a GPU on a machine without one is fine)
    assert moecache.plan(model, offload=Offload(gpu_experts=0.5, device="cuda:0"))["offload"]["slots"] > 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_vl2"])
def test_the_bytes_an_offload_moves_to_its_device_are_the_weights_but_the_experts(family):
    """What Offload(device=<GPU>) checks against the GPU's free memory before filling the store: every
    parameter and buffer but the experts, each tensor once (plan's parameter bytes less its expert bytes)."""
    from moecache.patching.families import find_experts
    from moecache.patching.offload import bytes_to_move

    model = build(family) if family != "deepseek_vl2" else VL2LanguageModel()
    found = find_experts(model)
    planned = moecache.plan(model)
    expected = planned["parameter_bytes"] - planned["expert_parameter_bytes"]
    assert 0 < bytes_to_move(model, found, torch.device("cuda", 0)) == expected
    assert bytes_to_move(model, found, torch.device("cpu")) == 0  # already there


@pytest.mark.parametrize("family", ["mixtral", "deepseek_vl2"])
def test_an_interrupted_unpatch_can_be_run_again(family, monkeypatch):
    """Ctrl-C in unpatch's last steps, after the weights were back and the cache closed: running unpatch
    again finishes it (it said the cache was closed before unpatch, and left the model half patched)."""
    import moecache.patching as patching

    model = build("mixtral") if family == "mixtral" else VL2LanguageModel()
    before = model_snapshot(model)
    moecache.patch(model, offload=Offload(gpu_experts=0.5))
    real, calls = patching._give_back_parameters, []

    def interrupted_once(new, original):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(new, original)
    monkeypatch.setattr(patching, "_give_back_parameters", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        moecache.unpatch(model)
    moecache.unpatch(model)
    assert moecache.stats(model)["patched"] is False
    assert_restored(model, before)
    assert not any(isinstance(m, MoecacheExperts) for m in model.modules())


def test_unpatch_gives_each_expert_weight_storage_of_its_own():
    """Regression: with one expert per layer (a contiguous slice of the host store), unpatch on the CPU put
    views of the store back, which kept the closed cache's whole store alive."""
    model = builders.randomize(transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=32, num_local_experts=1, num_experts_per_tok=1)))
    ids = torch.randint(3, 96, (1, 5))
    ref = logits(model, ids)
    moecache.unpatch(moecache.patch(model, offload=Offload(gpu_experts=1)))
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
    assert torch.equal(logits(model, ids), ref)


def test_offload_budget_garbage_is_a_clear_error():
    for budget, kw, match in (("1.2.3GiB", {}, "expected a byte budget"), (float("inf"), {"bytes": True}, "finite"),
                              (float("nan"), {}, "fraction"), (0, {"bytes": True}, "finite")):
        with pytest.raises(ValueError, match=match):
            Offload(gpu_experts=budget, **kw).slots(3, 8, 1 << 20)


def test_the_cache_of_an_offloaded_model_closes_only_through_unpatch():
    """Regression: closing the cache under a patched model, then unpatching, left (0,) parameters."""
    model = build("mixtral")
    before = model_snapshot(model)
    moecache.patch(model, offload=Offload(gpu_experts=0.5))
    with pytest.raises(RuntimeError, match="only copy"):
        moecache.expert_cache(model).close()
    moecache.unpatch(model)
    assert_model_restored(model, before)


class _ClampedExperts(transformers.models.mixtral.modeling_mixtral.MixtralExperts):
    """A gate function of its own, as DeepSeek-V4's and Step-3's experts have."""

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate.clamp(max=0.1)) * up


class _FarClampedExperts(transformers.models.mixtral.modeling_mixtral.MixtralExperts):
    """A clamp at a large limit, as BailingHybrid's and Step-3.7's experts take from their configs."""

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up.clamp(-40.0, 40.0)


class _Softcap(torch.nn.Module):
    def forward(self, x):
        return 3 * torch.tanh(torch.nn.functional.silu(x) / 3)


def _change_experts(model, change):
    for layer in model.model.layers:
        experts = layer.mlp.experts
        if change == "apply_gate":
            experts.__class__ = _ClampedExperts
        elif change == "apply_gate_far_clamp":
            experts.__class__ = _FarClampedExperts
        elif change == "post_norm":
            experts.post_expert_norm = torch.nn.RMSNorm(experts.hidden_dim)
        elif change == "scale":
            experts.output_scale = torch.nn.Parameter(torch.ones(()))
        elif change == "unknown_activation":
            experts.act_fn = _Softcap()
        else:  # a config field other than hidden_act names it (Gemma 4: hidden_activation)
            experts.act_fn = torch.nn.GELU(approximate="tanh")


@pytest.mark.parametrize("change", ["apply_gate", "apply_gate_far_clamp", "post_norm", "scale", "unknown_activation"])
def test_experts_computing_more_than_act_gate_times_up_are_left_alone(change, caplog):
    """Regression: any module with 3-D gate_up_proj/down_proj was patched as a plain GLU with the config's
    hidden_act, so experts with a clamp (_apply_gate), a norm or scale of their own, or an activation
    module the kernels lack gave other outputs with no warning."""
    model = build("mixtral")
    _change_experts(model, change)
    ids = torch.randint(3, 96, (2, 7))
    ref, before = logits(model, ids), snapshot(model)
    with caplog.at_level(logging.WARNING, logger="moecache"):
        moecache.patch(model)
    left = moecache.stats(model)["left_alone"]
    assert len(left) == 3 and all(item["kind"] == "experts" for item in left)
    assert "left alone" in caplog.text and not moecache.stats(model)["patched"]
    assert torch.equal(logits(model, ids), ref)
    assert_restored(model, before)
    with pytest.raises(ValueError, match="mlp.experts"):
        moecache.patch(model, strict=True)


def test_fused_experts_take_their_own_activation_module_over_the_config():
    """Gemma 4's experts apply ACT2FN[config.hidden_activation] and its config has no hidden_act: the
    module's own act_fn decides, not the silu default."""
    model = build("mixtral")
    _change_experts(model, "own_activation")
    ids = torch.randint(3, 96, (2, 7))
    ref = logits(model, ids)
    moecache.patch(model)
    assert [layer["activation"] for layer in moecache.stats(model)["layers"]] == ["gelu_tanh"] * 3
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.unpatch(model)


NEWER_FAMILIES = {  # (model_type, extra config): experts the structural detection must not take for a plain GLU
    "inkling2_text": dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2),
}
# Experts with a gate function of their own that clamps (limits small enough for these weights to cross):
# (model_type, extra config, the activation stats reports)
CLAMPED_FAMILIES = {
    # a layer routed by token id (see test_layers_routed_by_token_id_...), then one by its router
    "deepseek_v4": (dict(moe_intermediate_size=32, n_routed_experts=8, num_local_experts=8, num_experts_per_tok=2,
                         swiglu_limit=0.5, mlp_layer_types=["hash_moe", "moe"]),
                    {"silu, clamped at 0.5 before the activation"}),
    "glm5_next_text": (dict(moe_intermediate_size=32, intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                            swiglu_limit=0.5, mlp_layer_types=["sparse", "sparse"],
                            layer_types=["linear_attention", "full_attention"]),
                       {"silu, clamped at 0.5 before the activation"}),
    "hy_v4": (dict(moe_intermediate_size=32, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                   swiglu_limit=0.5, first_k_dense_replace=0), {"silu, clamped at 0.5 before the activation"}),
    # a limit per layer, applied to act(gate); 0 is no clamp
    "bailing_hybrid": (dict(moe_intermediate_size=32, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                            expert_swiglu_limit_list=[0.5, 0.0], first_k_dense_replace=0, layer_group_size=1,
                            n_group=1, topk_group=1), {"silu", "silu, clamped at 0.5 after the activation"}),
    # GPT-OSS's GLU with its own constants, gate and up concatenated
    "minimax_m3_vl_text": (dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, swiglu_limit=0.5,
                                swiglu_alpha=1.3), {"swiglu_oai, alpha 1.3, clamped at 0.5 before the activation"}),
}


def _newer_family(model_type, **extra):
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = transformers.AutoConfig.for_model(model_type, **{**dict(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, pad_token_id=0), **extra})
    torch.manual_seed(0)
    return builders.randomize(transformers.AutoModel.from_config(config), 0)


SELECTION_BIAS_FAMILIES = {  # routers that rank by a selection bias added to some function of the logits
    "minimax_m2": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16),  # block's, sigmoid
    "hy_v3": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_local_experts=8,
                  num_experts_per_tok=2, head_dim=16, first_k_dense_replace=0),  # block's, sigmoid
    "afmoe": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16,
                  num_dense_layers=0),  # the block's expert_bias, sigmoid
    "ernie4_5_moe": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         moe_layer_start_index=0),  # the router's moe_statics, softmax
    "kolibri1": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                     shared_expert_intermediate_size=32, head_dim=16),  # the router's, on the logits
    # the router's, sigmoid; its weight also scores the shared experts, in rows after the routed ones
    "inkling_text": dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, head_dim=16, first_k_dense_replace=0),
}


@pytest.mark.parametrize("model_type", list(SELECTION_BIAS_FAMILIES))
def test_lookahead_ranks_with_the_routers_selection_bias(model_type):
    """Regression: the lookahead found a selection bias only on the router and added it to the sigmoid, so
    for these routers (the bias on the MoE block, or added to the softmax or to the logits) a layer's router
    reading did not pick that layer's own experts."""
    model = _newer_family(model_type, **SELECTION_BIAS_FAMILIES[model_type])
    assert_router_reading_picks_each_layers_experts(model, with_selection_bias=True)


def test_a_gate_function_computing_act_gate_times_up_is_patched():
    """Beam's _apply_gate is act(gate) * up computed in fp32: the probe finds it equal, so it is patched
    (an identity check against transformers' default refused it)."""
    model = _newer_family("beam", intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                          num_experts_per_tok=2, n_group=2, topk_group=1, head_dim=16,
                          mlp_layer_types=["sparse", "sparse"])
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    moecache.patch(model)
    assert moecache.stats(model)["left_alone"] == [] and moecache.stats(model)["layers"]
    with torch.no_grad():
        assert_close(model(ids).last_hidden_state, ref, torch.float32)
    moecache.unpatch(model)


def test_non_gated_fused_experts_with_a_squared_relu_keep_their_names():
    """Nemotron-H's experts: up_proj [E, I, H] and down_proj [E, H, I] (no gate), relu2(up x) then down.
    They run as non-gated experts with the squared ReLU, and an offloaded model's state dict gives the
    module's own names and weights."""
    model = build("nemotron_h")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.up_proj") for k in expected)
    moecache.patch(model, strict=True)
    layers = moecache.stats(model)["layers"]
    assert len(layers) == 3 and {layer["activation"] for layer in layers} == {"relu2"}
    assert all(not m.layout.gated for m in model.modules() if isinstance(m, MoecacheExperts))
    moecache.patch(moecache.unpatch(model), offload=Offload(gpu_experts=0.5))
    state = model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    moecache.unpatch(model)


def test_transposed_non_gated_fused_experts_are_read_by_the_flag():
    """Non-gated experts stored transposed (up_proj [E, H, I], down_proj [E, I, H], `is_transposed` set, as
    transformers' experts decorator sets it): the same outputs as the model with the usual layout, resident and
    offloaded; the offloaded state dict and unpatch give the transposed weights back."""
    reference = build("nemotron_h")
    ids = torch.randint(3, 96, (2, 7))
    ref_logits, ref_tokens = logits(reference, ids), generate(reference, ids)
    model = copy.deepcopy(reference)
    experts = [m for m in model.modules() if type(m).__name__ == "NemotronHExperts"]
    assert len(experts) == 3
    for m in experts:
        m.up_proj = torch.nn.Parameter(m.up_proj.detach().transpose(1, 2).contiguous())
        m.down_proj = torch.nn.Parameter(m.down_proj.detach().transpose(1, 2).contiguous())
        m.is_transposed = True
    before = snapshot(model)
    for offload in (None, Offload(gpu_experts=0.5)):
        moecache.patch(model, strict=True, offload=offload)
        assert all(m.layout.transposed and not m.layout.gated for m in model.modules()
                   if isinstance(m, MoecacheExperts))
        assert_close(logits(model, ids), ref_logits, torch.float32)
        assert torch.equal(generate(model, ids), ref_tokens)
        state = model.state_dict()
        assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
        moecache.unpatch(model)
        assert_restored(model, before)


def _llama4(top_k=1):
    config = transformers.Llama4TextConfig(**COMMON, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4,
                                           num_experts_per_tok=top_k, head_dim=16, interleave_moe_layer_step=1,
                                           no_rope_layers=[1, 1, 1])
    torch.manual_seed(0)
    return builders.randomize(transformers.Llama4ForCausalLM(config), 0)


def test_llama4_experts_run_on_inputs_scaled_by_the_router_score():
    """Llama 4's block scales each token's input by its expert's sigmoid score and runs the experts (stored
    transposed, without transformers' flag) on that, unweighted; its block forward is overridden, the
    experts module stays in the tree. Resident and offloaded; a load into the experts is seen; the offloaded
    state dict holds the weights."""
    model = _llama4()
    ids = torch.randint(3, 96, (2, 7))
    ref_logits, ref_tokens = logits(model, ids), generate(model, ids)
    before = snapshot(model)
    moecache.patch(model, strict=True)
    layers = moecache.stats(model)["layers"]
    assert len(layers) == 3 and {layer["activation"] for layer in layers} == {"silu"}
    assert_close(logits(model, ids), ref_logits, torch.float32)
    assert torch.equal(generate(model, ids), ref_tokens)
    assert moecache.stats(model)["layers"][0]["tokens"] > 0
    experts = model.model.layers[0].feed_forward.experts
    new = {"gate_up_proj": torch.nn.Parameter(experts.gate_up_proj.detach() * 1.5)}
    experts.load_state_dict({**experts.state_dict(), **new}, assign=True)  # a new Parameter: read from the module
    scaled = logits(model, ids)
    moecache.unpatch(model)
    assert_close(scaled, logits(model, ids), torch.float32)
    assert not torch.allclose(scaled, ref_logits)
    model = _llama4()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for policy in ("lru", "predictive"):
        moecache.patch(model, offload=Offload(gpu_experts=0.5, policy=policy))
        assert_close(logits(model, ids), ref_logits, torch.float32)
        assert torch.equal(generate(model, ids), ref_tokens)
        assert moecache.stats(model)["cache"]["requests"] > 0
        state = model.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
        moecache.unpatch(model)
        assert_restored(model, before)


def llama4_multimodal_config():
    text = dict(COMMON, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1,
                head_dim=16, interleave_moe_layer_step=1, no_rope_layers=[1, 1, 1])
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=28,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
                  pixel_shuffle_ratio=0.5)  # one image token per 28x28 image
    return transformers.Llama4Config(text_config=text, vision_config=vision, image_token_index=COMMON["vocab_size"] - 1)


def test_llama4_multimodal_model_patches_its_text_model_and_runs_images():
    """Llama4ForConditionalGeneration (Scout's and Maverick's class) holds the same text blocks under
    language_model: patch finds them there, and image tokens (their features merged in by the vision
    adapter) run through the experts like text; offloaded too, and unpatch restores the model."""
    config = llama4_multimodal_config()
    image_token = config.image_token_index
    torch.manual_seed(0)
    model = builders.randomize(transformers.Llama4ForConditionalGeneration(config), 0).eval()
    ids = torch.randint(3, image_token, (2, 9))
    ids[:, 2] = image_token
    pixels = torch.randn(2, 3, 28, 28)
    ref_logits = logits(model, ids, pixel_values=pixels)
    ref_tokens = generate(model, ids[:, 3:])
    before = snapshot(model)
    for offload in (None, Offload(gpu_experts=0.5)):
        moecache.patch(model, strict=True, offload=offload)
        layers = moecache.stats(model)["layers"]
        assert [layer["name"] for layer in layers] == [f"language_model.model.layers.{i}.feed_forward.experts"
                                                       for i in range(3)]
        assert_close(logits(model, ids, pixel_values=pixels), ref_logits, torch.float32)
        assert moecache.stats(model)["layers"][0]["tokens"] == ids.numel()
        assert torch.equal(generate(model, ids[:, 3:]), ref_tokens)
        moecache.unpatch(model)
        assert_restored(model, before)


LEFT_ALONE_FAMILIES = {  # (model_type, config, words of the reason): experts found, whose math the kernels lack
    "llama4_text": (dict(intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=2,
                         head_dim=16, interleave_moe_layer_step=1, no_rope_layers=[1, 1]), "top-k 2"),
    "jetmoe": (dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, kv_channels=16), "JetMoE"),
    # each projection flattened over the experts in a child module: found by class, not skipped in silence
    "dbrx": (dict(ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
                  attn_config=dict(kv_n_heads=2, rope_theta=10000.0)), "flattened over the experts"),
    # non-gated experts (up_proj, down_proj) followed by a norm of their own
    "ergo": (dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2),
             "post_expert_norm"),
}


@pytest.mark.parametrize("model_type", list(LEFT_ALONE_FAMILIES))
def test_experts_of_other_math_are_found_and_left_alone_with_the_reason(model_type):
    """Not silently skipped: stats name them (and strict refuses), and the model is untouched."""
    extra, reason = LEFT_ALONE_FAMILIES[model_type]
    model = _newer_family(model_type, **extra)
    before = model_snapshot(model)
    moecache.patch(model)
    left = moecache.stats(model)["left_alone"]
    assert left and all(item["kind"] == "experts" and reason in item["reason"] for item in left), left
    assert not moecache.stats(model)["patched"]
    assert_model_restored(model, before)
    with pytest.raises(ValueError, match=reason):
        moecache.patch(model, strict=True)


def _with_limits_lifted(model):
    """A copy whose experts keep no clamp (their limit far past any value): what the model computes without it."""
    free = copy.deepcopy(model)
    for module in free.modules():
        for name in ("limit", "swiglu_limit"):
            if type(module).__name__.endswith("Experts") and isinstance(getattr(module, name, None), float):
                setattr(module, name, 1e9)
    return free


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model_type", list(CLAMPED_FAMILIES))
def test_experts_with_a_clamped_gate_run_through_moecache(model_type, backend, monkeypatch):
    """DeepSeek-V4, GLM-5-Next and HunYuan-V4 clamp gate and up before the SiLU, Ling (and Step 3.5/3.7) clamp
    act(gate) and up, per layer, MiniMax-M3 runs GPT-OSS's GLU with its own constants: these were left alone
    ("a gate function of its own"). Each is matched to the kernels' clamped gate on a probe, then runs resident
    and offloaded (the Triton kernels under the interpreter too) with the model's outputs; unpatch restores it."""
    extra, activations = CLAMPED_FAMILIES[model_type]
    model = _newer_family(model_type, **extra).eval()
    ids = torch.randint(3, 96, (2, 7))

    def hidden(m):
        with torch.no_grad():
            return m(ids).last_hidden_state
    ref = hidden(model)
    assert (hidden(_with_limits_lifted(model)) - ref).abs().max() > 0.1  # the clamp binds at these sizes
    before = snapshot(model)
    monkeypatch.setenv("MOECACHE_BACKEND", backend)
    for offload in (None, Offload(gpu_experts=0.5, policy="predictive")):
        moecache.patch(model, offload=offload)
        stats = moecache.stats(model)
        assert {layer["activation"] for layer in stats["layers"]} == activations
        assert not [item for item in stats["left_alone"] if item["kind"] == "experts"]
        assert_close(hidden(model), ref, torch.float32)
        moecache.unpatch(model)
        assert_restored(model, before)


def _deepseek_v4_with_hash_layers(mlp_layer_types):
    """DeepSeek-V4 whose hash routers' token table sends each token to K distinct random experts."""
    model = _newer_family("deepseek_v4", **{**CLAMPED_FAMILIES["deepseek_v4"][0], "mlp_layer_types": mlp_layer_types,
                                             "num_hidden_layers": len(mlp_layer_types)})
    g = torch.Generator().manual_seed(5)
    for block in model.modules():
        table = getattr(getattr(block, "gate", None), "tid2eid", None)
        if table is not None:
            table.copy_(torch.stack([torch.randperm(8, generator=g)[:table.shape[1]] for _ in range(table.shape[0])]))
    return model


def test_layers_routed_by_token_id_are_predicted_from_the_token_ids():
    """DeepSeek-V4's first MoE layers pick experts from the token id (a frozen tid2eid table), and their router
    weight only weighs the picks: reading that weight as a router guesses wrong. Such a layer's router is a
    TokenIdRouter, and predictive offload predicts its experts exactly from the step's token ids (each MoE
    block hands them to the predictor before it runs, so a later step never reuses an earlier one's); the
    layer after them is read from its router as before; outputs are the model's."""
    from moecache.cache.predictor import TokenIdRouter
    from moecache.patching.families import find_router

    model = _deepseek_v4_with_hash_layers(["hash_moe", "hash_moe", "moe"])
    steps = [torch.randint(3, 96, (2, 7)) for _ in range(3)]
    with torch.no_grad():
        refs = [model(ids).last_hidden_state for ids in steps]
    before = snapshot(model)
    moecache.patch(model, offload=Offload(gpu_experts=0.5, policy="predictive", lookahead=2))
    routers = moecache.routers(model)
    assert [type(r).__name__ for r in routers] == ["TokenIdRouter", "TokenIdRouter", "RouterSpec"]
    assert routers[1].table is model.layers[1].mlp.gate.tid2eid
    seen = []
    block = model.layers[2].mlp
    block.experts.register_forward_hook(lambda mod, args, out: seen.append((args[0], args[1])))
    for ids, ref in zip(steps, refs):
        with torch.no_grad():
            assert_close(model(ids).last_hidden_state, ref, torch.float32)
    # the routed layer's reading picks its experts
    spec = find_router(block, 8, 64)
    hidden, top_k_index = seen[0]
    guess = spec.scores(spec.router_input(hidden)).topk(top_k_index.shape[1], dim=1).indices
    assert torch.equal(guess.sort(dim=1).values, top_k_index.long().sort(dim=1).values)
    # layer 1 from layer 0 (depth 1) and layer 2 from layer 0 (depth 2) read token ids and the router: the
    # token-id guesses are exact on every step (token ids of different steps route differently)
    per_layer = {(row["layer"], row["depth"]): row for row in moecache.stats(model)["prediction"]["per_layer"]}
    exact = per_layer[(1, 1)]
    assert exact["recall"] == exact["precision"] == 1.0
    assert exact["actual"] == sum(len(torch.unique(model.layers[1].mlp.gate.tid2eid[ids])) for ids in steps)
    assert len({tuple(torch.unique(model.layers[1].mlp.gate.tid2eid[ids]).tolist()) for ids in steps}) > 1
    assert (2, 1) in per_layer and (2, 2) in per_layer and (1, 2) not in per_layer  # no layer before layer 0
    assert isinstance(routers[0], TokenIdRouter) and torch.equal(
        routers[0].picks(steps[0]), model.layers[0].mlp.gate.tid2eid[steps[0].reshape(-1)])
    moecache.unpatch(model)
    assert_restored(model, before)
    assert not model.layers[0].mlp._forward_pre_hooks  # the token-id hooks went with the patch


def test_a_routing_trace_predicts_layers_routed_by_token_id_from_the_generated_ids():
    """record_routing hands each step's input_ids to its predictor: the trace's guesses for a layer routed by
    token id are its table's picks for the tokens of that step, prompt and decode steps alike (recall 1)."""
    from moecache.analysis.traces import record_routing

    base = _deepseek_v4_with_hash_layers(["hash_moe", "hash_moe", "moe"])
    model = transformers.AutoModelForCausalLM.from_config(base.config)
    model.model.load_state_dict(base.state_dict())
    model.eval()
    moecache.patch(model)
    ids = torch.randint(3, 96, (2, 5))
    trace, out = record_routing(model, ids, moecache.patched_experts(model), moecache.routers(model),
                                max_new_tokens=3, depth=1)
    table = model.model.layers[1].mlp.gate.tid2eid
    step_ids = [ids, out[:, 5:6], out[:, 6:7]]
    assert len(trace.steps) == 3
    for s, step in enumerate(step_ids):
        assert trace.predictions[s][1][0] == sorted(torch.unique(table[step]).tolist()) == trace.steps[s][1]
    assert trace.recall(depth=1, skip_steps=0)["per_layer"][1] == 1.0
    moecache.unpatch(model)


def test_a_model_routed_by_token_id_alone_is_predicted_exactly_or_refused():
    """Every MoE layer routed by token id: predictive offload predicts each from the step's token ids (recall
    and precision 1); where the blocks are not given the token ids, nothing could be predicted, and the
    predictive policy is refused, naming why."""
    model = _deepseek_v4_with_hash_layers(["hash_moe", "hash_moe"])
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    moecache.patch(model, offload=Offload(gpu_experts=0.5, policy="predictive"))
    with torch.no_grad():
        assert_close(model(ids).last_hidden_state, ref, torch.float32)
    (row,) = moecache.stats(model)["prediction"]["per_layer"]
    assert (row["layer"], row["depth"], row["recall"], row["precision"]) == (1, 1, 1.0, 1.0)
    moecache.unpatch(model)

    unfed = _deepseek_v4_with_hash_layers(["hash_moe", "hash_moe"])
    for layer in unfed.layers:  # a block whose forward takes no token ids
        layer.mlp.forward = lambda hidden_states: hidden_states
    with pytest.raises(ValueError, match="every MoE block here picks its experts by token id and none is given "
                                         "the token ids: use 'lru' or 'lfu'"):
        moecache.patch(unfed, offload=Offload(gpu_experts=0.5, policy="predictive"))
    assert not moecache.stats(unfed)["layers"]


def test_gpt_oss_with_other_constants_runs_them():
    """GPT-OSS's GLU with another alpha and limit (refused before: "other constants than GPT-OSS's")."""
    model = build("gpt_oss")
    for module in model.modules():
        if type(module).__name__ == "GptOssExperts":
            module.alpha, module.limit = 1.3, 0.5
    ids = torch.randint(3, 96, (2, 7))
    ref = logits(model, ids)
    assert (logits(_with_limits_lifted(model), ids) - ref).abs().max() > 0.1
    moecache.patch(model, strict=True)
    assert {layer["activation"] for layer in moecache.stats(model)["layers"]} == {
        "swiglu_oai, alpha 1.3, clamped at 0.5 before the activation"}
    assert_close(logits(model, ids), ref, torch.float32)
    moecache.unpatch(model)


def test_a_gate_function_no_kernel_gate_computes_is_left_alone_with_its_constants():
    """A clamp the kernels lack (here the gate clamped from below too, before the SiLU) is matched by no
    candidate: left alone, naming the limit it was tried with."""
    model = _newer_family("deepseek_v4", **CLAMPED_FAMILIES["deepseek_v4"][0])
    experts = [m for m in model.modules() if type(m).__name__ == "DeepseekV4Experts"]

    def symmetric_clamp(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate.clamp(-self.limit, self.limit)) * up.clamp(-self.limit, self.limit)
    type_gate = type(experts[0])._apply_gate
    try:
        type(experts[0])._apply_gate = symmetric_clamp
        moecache.patch(model)
        left = moecache.stats(model)["left_alone"]
        assert len(left) == len(experts) and all("none of the kernels' silu gates computes with its limit 0.5"
                                                 in item["reason"] for item in left), left
        moecache.unpatch(model)
    finally:
        type(experts[0])._apply_gate = type_gate


@pytest.mark.parametrize("model_type", list(NEWER_FAMILIES))
def test_newer_families_with_other_expert_math_are_left_alone(model_type):
    model = _newer_family(model_type, **NEWER_FAMILIES[model_type])
    moecache.patch(model)
    left = moecache.stats(model)["left_alone"]
    assert left and all(item["kind"] == "experts" for item in left), left
    assert not moecache.stats(model)["patched"]


LONGCAT_FLASH = dict(num_hidden_layers=4, ffn_hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=8,
                     zero_expert_num=4, moe_topk=3, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                     qk_nope_head_dim=8, v_head_dim=16, head_dim=8)


def test_zero_computation_experts_fetch_nothing_and_their_router_is_read():
    """LongCat-Flash's router ranks E routed and Z zero-computation experts (softmax over E + Z, plus its
    selection bias); a pick of a zero expert returns the input, scaled, and the block points that route at
    a real expert with weight 0. Offloaded, only experts whose routes weigh are fetched; the router's
    reading (E + Z rows) picks exactly the experts each layer weighs, so policy predictive works."""
    from moecache.patching.families import find_router

    model = _newer_family("longcat_flash", **LONGCAT_FLASH)
    if not moecache.plan(model)["experts"]:
        pytest.skip(f"transformers {transformers.__version__} runs LongCat's zero experts inside its experts module "
                    "(gate_up_proj holds E + Z experts, down_proj E): no fused experts module moecache reads")
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    moecache.patch(model, strict=True)
    calls = []
    for block in model.modules():
        if isinstance(getattr(block, "experts", None), MoecacheExperts):
            spec = find_router(block, 8, 64)
            assert (spec.num_experts, spec.zero_experts, spec.score_function) == (8, 4, "softmax")
            block.experts.register_forward_pre_hook(lambda mod, args, spec=spec: calls.append((spec, *args)))
    with torch.no_grad():
        assert_close(model(ids).last_hidden_state, ref, torch.float32)
    assert len(calls) == 2
    weighted = all_routed = 0
    for spec, hidden, top_k_index, top_k_weights in calls:
        picks = spec.scores(spec.router_input(hidden)).topk(3, dim=1).indices
        for token in range(hidden.shape[0]):
            assert set(picks[token][picks[token] < 8].tolist()) == set(
                top_k_index[token][top_k_weights[token] != 0].tolist())
        weighted += len(set(top_k_index[top_k_weights != 0].tolist()))
        all_routed += len(set(top_k_index.reshape(-1).tolist()))
    assert (picks >= 8).any(), "no token picked a zero-computation expert: the case is not exercised"
    from moecache.analysis.replay import record_token_routes
    with pytest.raises(ValueError, match="zero-computation experts"):  # it would count routes of weight 0 as used
        record_token_routes(model, ids, moecache.patched_experts(model), moecache.routers(model), max_new_tokens=1)
    moecache.unpatch(model)

    counted = []
    for policy in ("lru", "predictive"):
        moecache.patch(model, offload=Offload(gpu_experts=1.0, policy=policy))
        with torch.no_grad():
            assert_close(model(ids).last_hidden_state, ref, torch.float32)
        counted.append(moecache.stats(model)["cache"]["requests"])
        if policy == "predictive":
            assert moecache.stats(model)["prediction"]["per_layer"]
        moecache.unpatch(model)
    assert counted == [weighted, weighted] and weighted < all_routed


def _ernie_vl_text_model():
    modeling = pytest.importorskip("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe")
    config = modeling.Ernie4_5_VLMoeTextConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, moe_intermediate_size=[48, 16], moe_num_experts=8, moe_k=2, moe_layer_start_index=0,
        moe_num_shared_experts=0, max_position_embeddings=128, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]})
    torch.manual_seed(0)
    return builders.randomize(modeling.Ernie4_5_VLMoeTextModel(config), 0)


def test_layers_with_experts_of_two_sizes_offload_the_larger_and_keep_the_others_resident(caplog):
    """Ernie-4.5-VL's layers hold text experts and smaller vision experts; one expert cache's slots are of one
    size. Offload (refused before) takes the text experts, which hold the most bytes; the vision experts
    stay resident and run on the vision tokens; plan says which; unpatch restores both."""
    model = _ernie_vl_text_model()
    ids = torch.randint(3, 96, (2, 9))
    token_types = torch.zeros_like(ids)
    token_types[:, 2:6] = 1  # image tokens: the vision experts
    with torch.no_grad():
        ref = model(ids, moe_mm_token_type_ids=token_types).last_hidden_state
    before = snapshot(model)
    offload = Offload(gpu_experts=0.5, policy="predictive")
    names = [layer["name"] for layer in moecache.plan(model)["experts"]]
    vision = [n for n in names if "vision_moe" in n]
    text = [n for n in names if "text_moe" in n]
    assert len(vision) == len(text) == 2
    planned = moecache.plan(model, offload=offload)["offload"]
    assert planned["resident"] == vision
    with caplog.at_level(logging.WARNING, logger="moecache"):
        moecache.patch(model, offload=offload, strict=True)
    on_device = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    assert planned["device_weight_bytes"] == sum(t.numel() * t.element_size() for t in on_device) + planned["slot_bytes"]
    assert re.search(rf"experts of 2 shapes .*: the 2 layers of 8 experts of 0\.0\d MiB \({re.escape(text[0])}, \.\.\.\) "
                     rf"are offloaded, the other 2 stay resident \({re.escape(vision[0])}", caplog.text)
    cache = moecache.expert_cache(model)
    assert (cache.num_layers, cache.num_experts) == (2, 8)
    for name in vision:  # their weights stay where they were; the text experts' are in the host store
        assert model.get_submodule(name).gate_up_proj.numel() == 8 * 32 * 64
    assert all(model.get_submodule(name).gate_up_proj.numel() == 0 for name in text)
    with torch.no_grad():
        assert_close(model(ids, moe_mm_token_type_ids=token_types).last_hidden_state, ref, torch.float32)
    stats = moecache.stats(model)
    assert all(layer["calls"] == 1 for layer in stats["layers"]) and stats["cache"]["requests"] > 0
    assert stats["prediction"]["per_layer"]
    from moecache.analysis.replay import RouteRecording, RoutingReplay, map_routes
    experts = moecache.patched_experts(model)
    recording = RouteRecording("test", 1, len(experts), 8, 2, 1,
                               routes=[[torch.tensor([[0, 1]])] * len(experts)])
    with pytest.raises(ValueError, match="keeps some resident"):  # its predictor numbers the offloaded layers only
        RoutingReplay(model, experts, map_routes(recording, len(experts), 8, 2))
    RoutingReplay(model, experts, map_routes(recording, len(experts), 8, 2), predictions=False)
    moecache.unpatch(model)
    assert_restored(model, before)


def test_experts_of_one_record_size_but_other_shapes_are_not_cached_together():
    """Gated experts (I=32: gate, up, down) and non-gated ones (I=48: up, down) take records of the same
    bytes, but one cache serves one shape: offload caches one kind and keeps the other resident (grouping by
    record bytes put both in one cache, whose constructor then refused them)."""
    non_gated = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
        **{k: v for k, v in COMMON.items() if k != "num_hidden_layers"}, moe_intermediate_size=48,
        intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2, head_dim=16, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=16, n_groups=1, layers_block_type=["moe", "moe"]))
    both = torch.nn.ModuleDict({"gated": build("mixtral"), "non_gated": builders.randomize(non_gated, 1)})
    layers = moecache.plan(both)["experts"]
    assert len({layer["expert_bytes"] for layer in layers}) == 1 and len(layers) == 5
    offload = Offload(gpu_experts=0.5)
    assert moecache.plan(both, offload=offload)["offload"]["resident"] == [
        layer["name"] for layer in layers if layer["name"].startswith("non_gated")]
    ids = torch.randint(3, 96, (2, 7))

    def run():
        with torch.no_grad():
            return [both[name](ids, use_cache=False).logits for name in ("gated", "non_gated")]
    ref = run()
    before = snapshot(both)
    moecache.patch(both, offload=offload)
    assert moecache.expert_cache(both).num_layers == 3
    for got, expected in zip(run(), ref):
        assert_close(got, expected, torch.float32)
    moecache.unpatch(both)
    assert_restored(both, before)
