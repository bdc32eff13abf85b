"""MLA attention patching: DeepSeek-V2/V3 attention over moecache's paged latent cache, on tiny models."""
import copy
import pickle

import pytest
import torch

import moecache
from moecache.compat import generate_cache_key, model_cache_argument
from moecache.layers import LatentKVCache, MoecacheMLA
from moecache.testing import assert_close
from moecache.testing import assert_model_restored as assert_restored
from moecache.testing import greedy as generate
from moecache.testing import model_logits as logits
from moecache.testing import model_snapshot as snapshot

import builders
from remote_code import VL2AttentionStack

transformers = pytest.importorskip("transformers")

R, P = 16, 8  # kv_lora_rank, qk_rope_head_dim of the tiny models


def _deepseek(version: str, **overrides):
    return builders.deepseek(version, seed=1, **overrides)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
MODELS = {
    "v2-q_lora": lambda: _deepseek("v2"),
    "v2-no_q_lora": lambda: _deepseek("v2", q_lora_rank=None),
    "v2-yarn": lambda: _deepseek("v2", rope_parameters=YARN),
    "v3-interleaved": lambda: _deepseek("v3", n_group=1, topk_group=1, rope_interleave=True),
    "v3-plain_rope-no_q_lora": lambda: _deepseek("v3", n_group=1, topk_group=1, rope_interleave=False,
                                                  q_lora_rank=None),
    "v3-yarn": lambda: _deepseek("v3", n_group=1, topk_group=1, rope_parameters=YARN),
    # its queries and its cached latent scaled (mla_scale_q_lora, mla_scale_kv_lora), two attentions a layer
    "longcat_flash": lambda: _longcat_flash(),
}


def _longcat_flash():
    if "longcat_flash" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no LongCat-Flash")
    config = transformers.AutoConfig.for_model(
        "longcat_flash", vocab_size=96, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
        expert_ffn_hidden_size=32, n_routed_experts=8, zero_expert_num=4, moe_topk=3, kv_lora_rank=R,
        q_lora_rank=24, qk_rope_head_dim=P, qk_nope_head_dim=8, v_head_dim=16, head_dim=P,
        max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(1)
    model = builders.randomize(transformers.AutoModelForCausalLM.from_config(config), 1)
    attn = model.model.layers[0].self_attn[0]
    assert (attn.mla_scale_q_lora, attn.mla_scale_kv_lora) == ((64 / 24) ** 0.5, (64 / R) ** 0.5)  # not 1
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_mla_matches_logits_and_greedy_tokens(name):
    model = MODELS[name]()
    ids = torch.randint(3, 96, (2, 9))
    ref_logits, ref_tokens = logits(model, ids), generate(model, ids)
    before = snapshot(model)

    moecache.patch(model)
    attn = [m for m in model.modules() if isinstance(m, MoecacheMLA)]
    assert len(attn) == model.config.num_hidden_layers  # on every supported transformers version
    assert moecache.stats(model)["left_alone"] == []
    if "yarn" in name:
        assert attn[0].scale != (8 + P) ** -0.5  # mscale^2 applied, taken from the model
    with torch.no_grad():  # the latent path, prefill through the cache
        cache = LatentKVCache(model.config.num_hidden_layers, block_size=4)
        out = model(ids, **{model_cache_argument(model): cache}).logits
    assert_close(out, ref_logits, torch.float32)
    assert cache.bytes_per_token() == model.config.num_hidden_layers * (R + P) * 4  # fp32: R + P values per layer
    assert all(int(layer.seq_lens.min()) == 9 for layer in cache.layers)

    assert torch.equal(generate(model, ids), ref_tokens)
    calls = moecache.stats(model)["attention"]
    assert len({(c["decode"], c["prefill"]) for c in calls}) == 1, calls  # every layer ran every step
    assert calls[0]["decode"] > 0 and calls[0]["prefill"] >= 2 and calls[0]["original"] == 0  # the forward above, generate

    moecache.unpatch(model)
    assert_restored(model, before)
    assert not any(isinstance(m, MoecacheMLA) for m in model.modules())
    assert "_prepare_cache_for_generation" not in model.__dict__
    # transformers' output recorders, which patch installs, are gone again: the model pickles as before
    assert torch.equal(logits(pickle.loads(pickle.dumps(model)), ids), ref_logits)


def test_decode_steps_through_the_triton_kernel(monkeypatch):
    """The same, with mla_decode forced onto the Triton kernel (the interpreter on CPU)."""
    model = MODELS["v3-interleaved"]()
    ids = torch.randint(3, 96, (2, 5))
    ref = generate(model, ids, n=6)
    monkeypatch.setenv("MOECACHE_BACKEND", "triton")
    moecache.patch(model, experts=False)
    assert torch.equal(generate(model, ids, n=6), ref)
    moecache.unpatch(model)


def _left_padded(length: int, pads: list[int]):
    """Random prompts of `length` tokens, request i left-padded with pads[i] zeros; (ids, mask)."""
    ids = torch.randint(3, 96, (len(pads), length))
    mask = (torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]).long()
    return ids * mask, mask


def _check_left_padded_generate(model, length: int, pads: list[int], new_tokens: int):
    """The patched model stores no padding and generates the unpatched model's tokens; unpatches it."""
    ids, mask = _left_padded(length, pads)
    greedy = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    with torch.no_grad():
        ref = model.generate(ids, **greedy)
    _patch_and_check_padded_prefill(model, ids, mask, [length - p for p in pads])
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **greedy), ref)
    moecache.unpatch(model)


def test_left_padded_batch_matches_unpatched():
    """Padding is never stored: each request attends over its own tokens; outputs match transformers'."""
    _check_left_padded_generate(MODELS["v2-q_lora"](), 8, [3, 0, 5], new_tokens=12)


def test_a_prompt_ending_in_padding_or_with_holes_matches_unpatched():
    """Regression: a padding query saw only the first token, so a prompt whose last token is masked (right
    padding, a hole at the end) gave generate's first token from another distribution."""
    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0     # ends in padding
    mask[1, 3:5] = 0    # a hole
    mask[2, :2] = 0     # left padding
    mask[2, 8] = 0      # and a hole at the end
    ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # queries with no real token at or before them attend to nothing: the others must match
    _patch_and_check_padded_prefill(model, ids, mask, mask.sum(1).tolist(), compared=mask.cumsum(1) > 0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0),
                       ref_tokens)
    moecache.unpatch(model)


def _patch_and_check_padded_prefill(model, ids, mask, stored, compared=None):
    """Patch the model; a padded prefill through a LatentKVCache stores `stored` tokens per request and
    gives the unpatched model's logits at the `compared` places (the real tokens unless given)."""
    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask).logits
    moecache.patch(model)
    with torch.no_grad():
        cache = LatentKVCache(model.config.num_hidden_layers, block_size=4)
        out_logits = model(ids, attention_mask=mask, **{model_cache_argument(model): cache}).logits
    assert cache.layers[0].seq_lens.tolist() == stored
    compared = mask.bool() if compared is None else compared
    assert_close(out_logits[compared], ref_logits[compared], torch.float32)


def test_left_padding_under_flex_attention_is_not_stored():
    """flex_attention hands the layers a BlockMask, not a tensor. Regression: the patched layer saw no
    padding in it, stored the padding as tokens and attended over it (relative error ~1 on real tokens)."""
    model = _deepseek("v2", attn_implementation="flex_attention")
    ids, mask = _left_padded(9, [3, 0, 6])
    _patch_and_check_padded_prefill(model, ids, mask, [6, 9, 3])
    moecache.unpatch(model)


def _padding_mask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA given what flash attention is given: the [B, T] padding mask (or None), causal implied."""
    S, T = query.shape[2], key.shape[2]
    mask = torch.ones(S, T, dtype=torch.bool, device=query.device).tril(T - S)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -T:].bool()
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_left_padding_under_a_padding_mask_is_not_stored():
    """flash_attention_2/3/4 hand the layers the 2-D [B, T] padding mask (emulated here on CPU with SDPA).
    Regression: the patched layer read no padding from a 2-D mask and stored it as tokens."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("padding_mask_sdpa", _padding_mask_attention)
    AttentionMaskInterface.register("padding_mask_sdpa", flash_attention_mask)
    _check_left_padded_generate(_deepseek("v2", attn_implementation="padding_mask_sdpa"), 9, [3, 0, 6], new_tokens=8)


@pytest.mark.parametrize("first_forward", ["before patch", "while patched"])
def test_output_attentions_is_refused_on_the_latent_path_and_recorded_elsewhere(first_forward):
    """Regression: attentions came back as empty tuples with no error; and when the model's first forward
    ran while patched, transformers' recording hooks never reached the original attention modules, so
    they stayed empty after unpatch too."""
    from transformers import DynamicCache

    model = _deepseek("v2", attn_implementation="eager")
    ids = torch.randint(3, 96, (2, 7))
    if first_forward == "before patch":
        with torch.no_grad():
            model(ids)
    with torch.no_grad():
        ref = model(ids, output_attentions=True).attentions if first_forward == "before patch" else None
    moecache.patch(model)
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions.*DynamicCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, output_attentions=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True,
                             **{model_cache_argument(model): DynamicCache(config=model.config)})
    layers = model.config.num_hidden_layers
    assert [len(step) for step in out.attentions] == [layers, layers]
    moecache.unpatch(model)
    with torch.no_grad():
        again = model(ids, output_attentions=True).attentions
    assert len(again) == layers and all(a.shape == (2, model.config.num_attention_heads, 7, 7) for a in again)
    if ref is not None:
        assert all(torch.equal(a, b) for a, b in zip(again, ref))


def test_static_cache_generate_uses_a_preallocated_latent_cache(monkeypatch):
    monkeypatch.setenv("MOECACHE_KV_BLOCK_SIZE", "8")
    model = MODELS["v3-interleaved"]()
    ids = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
    moecache.patch(model)
    seen = []
    original = model._prepare_cache_for_generation

    def spy(generation_config, model_kwargs, *args, **kwargs):
        result = original(generation_config, model_kwargs, *args, **kwargs)
        seen.append(model_kwargs[generate_cache_key(model_kwargs)])
        return result

    model._prepare_cache_for_generation = spy
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)
    (cache,) = seen
    assert isinstance(cache, LatentKVCache) and cache.is_compileable and cache.block_size == 8
    assert cache.layers[0].pages.shape[0] * cache.block_size >= 16  # preallocated for the whole generation
    del model._prepare_cache_for_generation
    moecache.unpatch(model)


def _assert_latent_generate(model, ids, ref, patched=None):
    """model.generate gives the `ref` tokens, every step of it through the latent cache of the patch on
    `patched` (the model itself unless given)."""
    assert torch.equal(generate(model, ids, n=4), ref)
    calls = moecache.stats(model if patched is None else patched)["attention"][0]
    assert calls["decode"] > 0 and calls["original"] == 0


@pytest.mark.parametrize("kind", ["deep", "shallow"])
def test_a_copy_of_a_patched_model_generates_through_the_latent_cache(kind):
    """A deep copy builds its own caches once the original is unpatched; a shallow copy, which shares the
    modules, still generates once the original is gone."""
    import gc

    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (2, 5))
    ref = generate(model, ids, n=4)
    moecache.patch(model)
    twin = copy.deepcopy(model) if kind == "deep" else copy.copy(model)
    if kind == "deep":
        assert twin._prepare_cache_for_generation.model is twin  # not the original
        moecache.unpatch(model)
        assert moecache.stats(model)["patched"] is False
    else:
        del model
        gc.collect()
    _assert_latent_generate(twin, ids, ref)
    moecache.unpatch(twin)
    assert "_prepare_cache_for_generation" not in twin.__dict__


def test_a_patched_mla_model_dropped_without_unpatch_is_freed_at_once():
    """Regression: generate's latent-cache hook held its model, which held the hook, so a dropped patched
    model (its device memory with it) lived on until the cycle collector ran."""
    import gc
    import pickle
    import weakref

    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (2, 5))
    ref = generate(model, ids, n=4)
    gc.collect()
    gc.disable()
    try:
        moecache.patch(model)
        _assert_latent_generate(model, ids, ref)
        alive = weakref.ref(model)
        del model
        assert alive() is None
    finally:
        gc.enable()
    # a weak reference does not pickle: the hook pickles its model itself (transformers' output recorders,
    # closures, keep a whole patched MLA model from pickling for now)
    from moecache.patching.generate import HOOK, LatentCacheDefault

    holder = torch.nn.Linear(2, 3)
    setattr(holder, HOOK, LatentCacheDefault(holder, owner=None))
    loaded = pickle.loads(pickle.dumps(holder))
    assert getattr(loaded, HOOK).model is loaded and torch.equal(loaded.weight, holder.weight)


def test_a_model_inside_a_plain_module_generates_through_the_latent_cache():
    model = MODELS["v3-interleaved"]()
    ids = torch.randint(3, 96, (2, 5))
    ref = generate(model, ids, n=4)
    holder = torch.nn.ModuleDict({"lm": model})
    moecache.patch(holder)
    _assert_latent_generate(model, ids, ref, patched=holder)
    moecache.unpatch(holder)
    assert "_prepare_cache_for_generation" not in model.__dict__
    assert torch.equal(generate(model, ids, n=4), ref)


class _Forwarding(torch.nn.Module):
    """A wrapper that hands the attribute reads it cannot answer to the model inside, as PEFT's PeftModel does."""

    def __init__(self, model):
        super().__init__()
        self.base_model = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)


def test_a_model_inside_a_forwarding_wrapper_generates_through_the_latent_cache():
    """Regression: the generate hook went on a wrapper that only forwards attribute reads (PEFT's
    PeftModel), where generate never looks: the latent cache was never used."""
    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (2, 5))
    ref = generate(model, ids, n=4)
    wrapper = _Forwarding(model)
    moecache.patch(wrapper)
    assert "_prepare_cache_for_generation" not in wrapper.__dict__
    _assert_latent_generate(wrapper.generate.__self__, ids, ref, patched=wrapper)
    moecache.unpatch(wrapper)
    assert "_prepare_cache_for_generation" not in model.__dict__


@pytest.mark.parametrize("inner_first", ["whole", "experts-only"])
def test_unpatching_a_wrapper_or_its_model_keeps_what_the_other_patched(inner_first):
    model = MODELS["v3-interleaved"]()
    ids = torch.randint(3, 96, (2, 5))
    ref = generate(model, ids, n=4)
    holder = torch.nn.ModuleDict({"lm": model})
    moecache.patch(model, attention=inner_first == "whole")
    moecache.patch(holder)
    owner, other = (model, holder) if inner_first == "whole" else (holder, model)
    moecache.unpatch(other)  # the latent cache's generate hook belongs to the owner's patch
    _assert_latent_generate(model, ids, ref, patched=owner)
    moecache.unpatch(owner)
    assert "_prepare_cache_for_generation" not in model.__dict__


def test_hooks_on_the_attention_fire_on_every_path_once():
    model = MODELS["v3-interleaved"]()
    ids = torch.randint(3, 96, (2, 5))
    seen = []
    attention = model.model.layers[1].self_attn
    attention.register_forward_hook(lambda module, args, out: seen.append(out[0].shape[1]))
    ref = generate(model, ids, n=4)
    unpatched = list(seen)
    seen.clear()
    moecache.patch(model)
    assert torch.equal(generate(model, ids, n=4), ref)  # the latent path
    assert seen == unpatched == [5, 1, 1, 1]
    seen.clear()
    logits(model, ids)  # no cache: the original attention, its hook once
    assert seen == [5]
    moecache.unpatch(model)


class _Adapted(torch.nn.Module):
    """A linear layer with a low-rank update beside it, held as PEFT's LoRA layers hold theirs."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.5)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class _ShiftedLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) + 0.5


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def _give_code_of_its_own(module: torch.nn.Module, change: str) -> torch.nn.Module:
    """`module` (a linear layer) with code beside its weights that a stand-in computing from the weights
    would skip; returns what goes in its place."""
    if change == "hook":
        module.register_forward_hook(lambda m, args, out: out * 0.5)
    elif change == "adapter":
        torch.manual_seed(5)
        return _Adapted(module)
    elif change == "subclass":
        module.__class__ = _ShiftedLinear
    elif change == "parametrized":
        torch.nn.utils.parametrize.register_parametrization(module, "weight", _Doubled())
    else:  # accelerate's device hooks wrap forward on the instance
        plain = module.forward
        module.forward = lambda x: plain(x) * 0.5
    return module


KV_B_PROJ_REASONS = {"hook": "has hooks", "adapter": "_Adapted, not a linear layer",
                     "subclass": "has a forward of its own (_ShiftedLinear)", "parametrized": "has parametrized weights",
                     "instance_forward": "has a forward set on the module itself"}


@pytest.mark.parametrize("change", list(KV_B_PROJ_REASONS))
def test_kv_b_proj_with_code_of_its_own_leaves_the_attention_alone(change):
    """Regression (all but hooks): the latent path reads kv_b_proj's weight, so a LoRA adapter (PEFT), a
    subclass's forward, a parametrization or accelerate's device hook there was silently skipped
    (greedy tokens diverged)."""
    model = MODELS["v2-q_lora"]()
    attn = model.model.layers[0].self_attn
    attn.kv_b_proj = _give_code_of_its_own(attn.kv_b_proj, change)
    ids = torch.randint(3, 96, (2, 5))
    ref = generate(model, ids, n=4)
    moecache.patch(model)
    (left,) = moecache.stats(model)["left_alone"]
    assert left["name"] == "model.layers.0.self_attn", left
    assert KV_B_PROJ_REASONS[change] in left["reason"], left
    assert torch.equal(generate(model, ids, n=4), ref)
    moecache.unpatch(model)


def test_an_attention_with_a_forward_set_on_it_is_left_alone():
    """accelerate's device hooks wrap the attention's forward on the instance: the latent path would skip it."""
    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (2, 5))
    attn = model.model.layers[1].self_attn
    plain = attn.forward
    attn.forward = lambda *args, **kwargs: (lambda out: (out[0] * 0.5, *out[1:]))(plain(*args, **kwargs))
    ref = generate(model, ids, n=4)
    moecache.patch(model)
    (left,) = moecache.stats(model)["left_alone"]
    assert left["name"] == "model.layers.1.self_attn" and "forward set on the module itself" in left["reason"]
    assert torch.equal(generate(model, ids, n=4), ref)
    moecache.unpatch(model)


def test_projections_replaced_after_patch_run_on_every_path_and_stay_after_unpatch():
    """Regression: an adapter put on q_b_proj or o_proj after patch (PEFT's get_peft_model on the patched
    model) reached the patched module only: the original attention, which runs without a latent cache,
    kept the plain layers (logits off by 1.29 relative), and unpatch put those back, dropping the adapter."""
    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (2, 5))
    twin = copy.deepcopy(model)
    moecache.patch(model)
    for m in (model, twin):
        for layer in m.model.layers:
            for name in ("q_b_proj", "o_proj"):
                setattr(layer.self_attn, name, _give_code_of_its_own(getattr(layer.self_attn, name), "adapter"))
    ref_logits, ref = logits(twin, ids), generate(twin, ids, n=4)
    assert_close(logits(model, ids), ref_logits, torch.float32)  # the original attention
    moecache.reset_stats(model)
    _assert_latent_generate(model, ids, ref)
    moecache.unpatch(model)
    assert isinstance(model.model.layers[0].self_attn.q_b_proj, _Adapted)
    assert_close(logits(model, ids), ref_logits, torch.float32)


@pytest.mark.parametrize("change", ["adapter", "hook"])
def test_kv_b_proj_changed_after_patch_turns_the_latent_path_off(change):
    """Regression: an adapter put on kv_b_proj after patch, or a hook registered there, was skipped by the
    latent path, which reads its weight (generate's tokens diverged; a x0.5 hook: 0.59 relative off).
    generate now keeps its default cache, and a LatentKVCache passed in is refused."""
    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (2, 5))
    twin = copy.deepcopy(model)
    moecache.patch(model)
    for m in (model, twin):
        attn = m.model.layers[1].self_attn
        if change == "adapter":
            attn.kv_b_proj = _give_code_of_its_own(attn.kv_b_proj, "adapter")
        else:
            attn.kv_b_proj.register_forward_hook(lambda module, args, out: out * 0.5)
    assert torch.equal(generate(model, ids, n=4), generate(twin, ids, n=4))
    assert moecache.stats(model)["attention"][0]["decode"] == 0
    with pytest.raises(ValueError, match="kv_b_proj was replaced or given hooks after patch"):
        model(ids, **{model_cache_argument(model): LatentKVCache(model.config.num_hidden_layers)})
    moecache.unpatch(model)


def test_a_compiled_forward_never_writes_a_dynamic_latent_cache_wrongly():
    """Regression: a compiled forward over a LatentKVCache without max_cache_len wrote every row where the
    trace had (pages are handed out on the host): logits 1.3 relative off, or an index error."""
    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (2, 7))
    twin = copy.deepcopy(model)
    moecache.patch(model, experts=False)
    compiled = torch.compile(model, backend="eager")
    caches = {twin: transformers.DynamicCache(config=twin.config), compiled: LatentKVCache(3, block_size=4)}
    with torch.no_grad():
        for start, stop in ((0, 5), (5, 6), (6, 7)):
            want, got = (m(ids[:, start:stop], **{model_cache_argument(model): c}).logits for m, c in caches.items())
            assert_close(got, want, torch.float32)
    torch._dynamo.reset()
    moecache.unpatch(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_under_autocast_matches_unpatched(dtype):
    """Regression: under torch.autocast the latent (after the model's fp32 norm) was stored in fp32 while
    the absorbed query came out of autocast's einsum in bf16/fp16: the first decode step raised."""
    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (2, 8))
    twin = copy.deepcopy(model)
    moecache.patch(model)
    caches = {twin: transformers.DynamicCache(config=twin.config), model: LatentKVCache(model.config.num_hidden_layers)}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        for start, stop in ((0, 5), (5, 6), (6, 7), (7, 8)):  # the prompt, then three decode steps
            want, got = (m(ids[:, start:stop], **{model_cache_argument(m): c}).logits for m, c in caches.items())
            assert got.dtype == want.dtype == dtype
            assert_close(got, want, dtype)
        assert moecache.stats(model)["attention"][0]["decode"] == 3
        generate(model, ids, n=3)  # and generate's own latent cache
    moecache.unpatch(model)


def test_backward_through_several_decode_steps_of_the_triton_kernel(monkeypatch):
    """Regression: the kernel's backward recomputed from the pages, which the next step had written in
    place: backward through two decode steps raised autograd's in-place error."""
    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (2, 7))
    twin = copy.deepcopy(model)
    monkeypatch.setenv("MOECACHE_BACKEND", "triton")
    moecache.patch(model, experts=False)
    losses = []
    for m, cache in ((twin, transformers.DynamicCache(config=twin.config)),
                     (model, LatentKVCache(model.config.num_hidden_layers))):
        key = model_cache_argument(m)
        loss = m(ids[:, :4], **{key: cache}).logits.logsumexp(-1).mean()
        for step in range(3):
            loss = loss + m(ids[:, 4 + step:5 + step], **{key: cache}).logits.logsumexp(-1).mean()
        loss.backward()
        losses.append(loss.detach())
    assert moecache.stats(model)["attention"][0]["decode"] == 3
    assert_close(losses[1], losses[0], torch.float32)
    for (name, want), got in zip(twin.named_parameters(), model.parameters()):
        assert_close(got.grad, want.grad, torch.float32, name=name)
    moecache.unpatch(model)


def test_mistral4_attention_which_scales_queries_by_position_is_left_alone():
    """Regression: Mistral-4's MLA (found by structure) multiplies its queries by 1 + beta * log(1 +
    floor(position / original length)), which the latent path left out: past that length every logit
    was off (0.93 relative), with no warning."""
    if not hasattr(transformers, "Mistral4Config"):
        pytest.skip(f"transformers {transformers.__version__} has no Mistral-4")
    config = transformers.Mistral4Config(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=0, kv_lora_rank=R, q_lora_rank=24, qk_rope_head_dim=P, qk_nope_head_dim=8,
        v_head_dim=16, head_dim=8, max_position_embeddings=128, n_group=1, topk_group=1, pad_token_id=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                         "llama_4_scaling_beta": 0.1, "partial_rotary_factor": 1.0})
    torch.manual_seed(0)
    model = builders.randomize(transformers.Mistral4ForCausalLM(config), 0)
    ids = torch.randint(3, 96, (2, 9))
    ref = generate(model, ids, n=4)
    moecache.patch(model)
    left = [item for item in moecache.stats(model)["left_alone"] if item["kind"] == "MLA attention"]
    assert len(left) == 2 and all("scales its queries by position" in item["reason"] for item in left)
    assert torch.equal(generate(model, ids, n=4), ref)
    moecache.unpatch(model)


def test_attention_dropout_follows_train_and_eval_after_patch():
    model = _deepseek("v2", attention_dropout=0.5)
    ids = torch.randint(3, 96, (1, 6))
    twin = copy.deepcopy(model)
    moecache.patch(model)
    for mode in (True, False):
        model.train(mode), twin.train(mode)
        torch.manual_seed(0)
        got = model(ids, use_cache=False).logits
        torch.manual_seed(0)
        assert_close(got, twin(ids, use_cache=False).logits, torch.float32)
    torch.manual_seed(1)
    assert not torch.equal(model.train()(ids, use_cache=False).logits, got)  # dropout acts in training
    moecache.unpatch(model)


def test_attributes_of_the_attention_read_and_set_through_the_patched_module():
    """Regression: code walking the model (model.apply, hasattr checks) did not see the original attention's
    attributes, so switching attention dropout off that way left it on in the original, which runs every
    call without a latent cache (training losses differed with dropout meant to be off)."""
    model = _deepseek("v2", attention_dropout=0.3)
    ids = torch.randint(3, 96, (1, 6))
    twin = copy.deepcopy(model)
    moecache.patch(model)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, MoecacheMLA) and attn.config is model.config and attn.scaling == attn.original.scaling

    def no_dropout(module):
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    for m in (model, twin):
        m.apply(no_dropout)
        m.train()
    assert attn.original.attention_dropout == 0.0
    for seed in (5, 6):
        torch.manual_seed(seed)
        got = model(ids, labels=ids, use_cache=False).loss
        torch.manual_seed(seed)
        assert_close(got, twin(ids, labels=ids, use_cache=False).loss, torch.float32)
    with pytest.raises(AttributeError):
        attn.no_such_attribute
    moecache.unpatch(model)


@pytest.mark.parametrize("implementation", ["sliding_window", "offloaded"])
def test_cache_implementations_other_than_dynamic_and_static_get_the_cache_they_ask_for(implementation):
    """Regression: an offloaded (or quantized, sliding-window) cache asked for was silently replaced by the
    latent cache."""
    model = MODELS["v2-q_lora"]()
    ids = torch.randint(3, 96, (1, 5))
    options = dict(max_new_tokens=3, do_sample=False, cache_implementation=implementation)

    def outcome():
        try:
            with torch.no_grad():
                return model.generate(ids, **options)
        except Exception as error:  # an offloaded cache needs CUDA: then both must fail alike
            return type(error)

    ref = outcome()
    moecache.patch(model)
    got = outcome()
    assert got == ref if isinstance(ref, type) else torch.equal(got, ref)
    calls = moecache.stats(model)["attention"][0]
    assert calls["decode"] == calls["prefill"] == 0 and (calls["original"] > 0 or isinstance(ref, type))
    moecache.unpatch(model)


def test_unpatch_takes_away_the_recorders_of_a_model_nested_in_another():
    """A recording model holding another: patch installs the inner one's recorders through the outer one,
    and unpatch takes those away with the inner flag, so the inner model records again when asked."""
    from transformers.modeling_outputs import BaseModelOutputWithPast
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as deepseek_v2
    from transformers.utils.output_capturing import capture_outputs

    class Outer(deepseek_v2.DeepseekV2PreTrainedModel):
        _can_record_outputs = {"hidden_states": deepseek_v2.DeepseekV2DecoderLayer}

        def __init__(self, config):
            super().__init__(config)
            self.inner = deepseek_v2.DeepseekV2Model(config)
            self.post_init()

        @capture_outputs
        def forward(self, input_ids=None, **kwargs):
            return BaseModelOutputWithPast(last_hidden_state=self.inner(input_ids=input_ids, **kwargs).last_hidden_state)

    config = builders.deepseek_config("v2")
    model = builders.randomize(Outer(config))
    ids = torch.randint(3, 96, (1, 5))
    moecache.patch(model)
    moecache.unpatch(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with torch.no_grad():
        assert len(model.inner(ids, output_hidden_states=True).hidden_states) == config.num_hidden_layers + 1


def test_paged_layer_grows_and_reorders_beams():
    from moecache.layers import PagedLatentLayer

    layer = PagedLatentLayer(block_size=3)
    rows = torch.randn(2, 5, 6)
    layer.append(rows)
    for _ in range(7):  # past the initial page pool: it must grow and keep every row
        layer.append(torch.randn(2, 1, 6))
    got, valid = layer.gather(12)
    assert valid.all() and torch.equal(got[:, :5], rows)
    before = got.clone()
    layer.reorder_cache(torch.tensor([1, 1]))
    after, _ = layer.gather(12)
    assert torch.equal(after[0], before[1]) and torch.equal(after[1], before[1])
    blocks = layer.block_table[:, :4].reshape(-1).tolist()
    assert len(set(blocks)) == len(blocks), "each request owns its pages"
    with pytest.raises(ValueError, match="block_size"):
        PagedLatentLayer(block_size=0)


def test_prompt_lookup_decoding_rolls_the_latent_cache_back(monkeypatch):
    """Prompt-lookup (and assisted) decoding rolls back rejected candidates with crop(-k). Regression: the
    latent cache read -k as "keep k" and crop(0) as "keep none", and generated other tokens."""
    from moecache.layers.latent_cache import PagedLatentLayer

    model = _deepseek("v2")
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    options = dict(max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=2)
    with torch.no_grad():
        ref = model.generate(ids, **options)
    moecache.patch(model)
    crops = []
    real = PagedLatentLayer.crop
    monkeypatch.setattr(PagedLatentLayer, "crop", lambda self, n: (crops.append(n), real(self, n))[1])
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **options), ref)
    assert any(n < 0 for n in crops), "no candidate was rejected: the prompt does not test the roll-back"

    L = model.config.num_hidden_layers
    new = torch.tensor([[11, 12, 13]])
    with torch.no_grad():
        kept = LatentKVCache(L, block_size=4)
        model(ids[:, :8], **{model_cache_argument(model): kept})
        expected = model(new, **{model_cache_argument(model): kept}).logits
        cache = LatentKVCache(L, block_size=4)
        model(ids[:, :10], **{model_cache_argument(model): cache})
        for length, after in ((0, 10), (-2, 8), (9, 8), (0, 8)):  # remove 2; keep 9 (older form): nothing to drop
            cache.crop(length)
            assert cache.get_seq_length() == after and all(int(layer.seq_lens[0]) == after for layer in cache.layers)
        assert_close(model(new, **{model_cache_argument(model): cache}).logits, expected, torch.float32)
        cache.crop(5)  # the older form: keep 5
        assert cache.get_seq_length() == 5


def test_a_latent_cache_with_too_few_layers_is_a_clear_error():
    model = _deepseek("v2")
    moecache.patch(model)
    short = LatentKVCache(model.config.num_hidden_layers - 1)
    with torch.no_grad(), pytest.raises(ValueError, match="LatentKVCache has 2 layers but this is attention layer 2"):
        model(torch.randint(3, 96, (1, 5)), **{model_cache_argument(model): short})
    used = LatentKVCache(model.config.num_hidden_layers)
    with torch.no_grad():
        model(torch.randint(3, 96, (2, 5)), **{model_cache_argument(model): used})
        with pytest.raises(ValueError, match=r"holds 2 sequences of 24 values per token .*got rows \(3, 5, 24\)"):
            model(torch.randint(3, 96, (3, 5)), **{model_cache_argument(model): used})
    moecache.unpatch(model)


def test_generate_with_a_preallocated_latent_cache_too_short_is_refused_before_the_first_token():
    """Regression: a compiled forward's writes past max_cache_len are not checked (an index error, or rows
    written into a page's spare rows and read as tokens); generate now says so before it starts."""
    model = _deepseek("v2")
    moecache.patch(model)
    ids = torch.randint(3, 96, (1, 6))
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    short = LatentKVCache(model.config.num_hidden_layers, block_size=4, max_cache_len=10)
    with torch.no_grad(), pytest.raises(ValueError, match=r"holds 10 tokens per request \(max_cache_len\), and "
                                                          r"this generate stores up to 11 .*max_cache_len >= 11"):
        model.generate(ids, max_new_tokens=6, do_sample=False, **{model_cache_argument(model): short})
    assert calls == []
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        exact = LatentKVCache(model.config.num_hidden_layers, block_size=4, max_cache_len=10)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False,
                                          **{model_cache_argument(model): exact}), expected)
    handle.remove()
    moecache.unpatch(model)


def test_a_float64_model_generates_with_the_original_attention_and_a_latent_cache_is_refused_clearly():
    """Regression: generate built a LatentKVCache for a float64 model (MLA patched alone), prefilled, then
    failed at the first decode step with the op's message about q_latent."""
    model = _deepseek("v2")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # transformers' grouped_mm refuses float64 itself
    twin = copy.deepcopy(model).double()
    moecache.patch(model, experts=False)
    model.double()
    ids = torch.randint(3, 96, (2, 5))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                           twin.generate(ids, max_new_tokens=4, do_sample=False))
        assert all(row["original"] > 0 and row["decode"] == 0 for row in moecache.stats(model)["attention"])
        with pytest.raises(TypeError, match="latent MLA decodes in fp16, bf16 or fp32, and this model runs in "
                                            "torch.float64"):
            model(ids, **{model_cache_argument(model): LatentKVCache(model.config.num_hidden_layers)})
    moecache.unpatch(model)


def test_attention_false_leaves_attention_alone_and_non_mla_models_are_untouched():
    model = MODELS["v2-q_lora"]()
    moecache.patch(model, attention=False)
    assert not any(isinstance(m, MoecacheMLA) for m in model.modules())
    moecache.unpatch(model)
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **builders.COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)).eval()
    moecache.patch(mixtral)
    assert not any(isinstance(m, MoecacheMLA) for m in mixtral.modules())
    assert "_prepare_cache_for_generation" not in mixtral.__dict__
    moecache.unpatch(mixtral)


def _decode_greedy(model, cache, ids, steps):
    with torch.no_grad():
        prefill = model(ids, cache, torch.arange(ids.shape[1]).expand(ids.shape[0], -1))
        logits, token = [prefill], prefill[:, -1:].argmax(-1)
        tokens = [token]
        for step in range(steps):
            position = torch.full((ids.shape[0], 1), ids.shape[1] + step)
            out = model(token, cache, position)
            logits.append(out)
            token = out[:, -1:].argmax(-1)
            tokens.append(token)
    return torch.cat(logits, dim=1), torch.cat(tokens, dim=1)


def test_deepseek_vl2_attention_through_structural_detection():
    torch.manual_seed(0)
    model = VL2AttentionStack().eval()
    ids = torch.randint(0, 50, (2, 6))
    ref_logits, ref_tokens = _decode_greedy(model, transformers.DynamicCache(), ids, steps=8)
    before = snapshot(model)

    moecache.patch(model)
    assert all(isinstance(layer, MoecacheMLA) for layer in model.layers)
    cache = LatentKVCache(len(model.layers), block_size=4)
    out_logits, out_tokens = _decode_greedy(model, cache, ids, steps=8)
    assert_close(out_logits, ref_logits, torch.float32)
    assert torch.equal(out_tokens, ref_tokens)
    assert cache.bytes_per_token() == len(model.layers) * (R + P) * 4
    assert all(c["decode"] == 8 for c in moecache.stats(model)["attention"])
    # DeepSeek's own code asks the attention for its weights by keyword: refused on the latent path,
    # naming the keyword its generate takes the cache under.
    with torch.no_grad(), pytest.raises(ValueError, match="past_key_values=DynamicCache"):
        model.layers[0](torch.randn(2, 1, model.layers[0].kv_a_proj_with_mqa.in_features), position_ids=torch.full((2, 1), 14),
                        past_key_value=cache, output_attentions=True)

    moecache.unpatch(model)
    assert_restored(model, before)


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["v2-q_lora", "v3-interleaved", "v3-plain_rope-no_q_lora"])
def test_gpu_bf16_patched_mla_generate(name):
    """bf16 is judged against the model's own bf16 error: both runs are compared with the fp32 model, and
    the patched one may not stray further than twice the original's distance (plus 1% of the logits'
    scale). A fixed tolerance would test the random model's sensitivity to rounding, not the patch."""
    model = MODELS[name]().to("cuda")
    ids = torch.randint(3, 96, (4, 70), device="cuda")  # > one 64-token page
    fp32_logits = logits(model, ids).double()
    model.to(torch.bfloat16)
    ref_logits, ref = logits(model, ids).double(), generate(model, ids)
    moecache.patch(model)
    with torch.no_grad():
        cache = LatentKVCache(model.config.num_hidden_layers)
        out_logits = model(ids, **{model_cache_argument(model): cache}).logits.double()
    assert torch.isfinite(out_logits).all()
    scale = fp32_logits.abs().max()
    own_err = float((ref_logits - fp32_logits).abs().max() / scale)
    patched_err = float((out_logits - fp32_logits).abs().max() / scale)
    assert patched_err <= 2 * own_err + 1e-2, f"patched bf16 err {patched_err:.3e}, the model's own bf16 err {own_err:.3e}"
    out = generate(model, ids)
    new_tokens = slice(ids.shape[1], None)
    assert (out[:, new_tokens] == ref[:, new_tokens]).float().mean() >= 0.75  # bf16: a near-tie may flip a token
    assert all(c["decode"] > 0 for c in moecache.stats(model)["attention"])
    moecache.unpatch(model)


@pytest.mark.compile
@pytest.mark.gpu
def test_gpu_static_cache_compiled_mla_decode():
    """Static cache + compiled forward (CUDA graphs) over the preallocated latent cache."""
    from torch._dynamo.utils import counters

    model = MODELS["v3-interleaved"]().to("cuda", torch.bfloat16)
    ids = torch.randint(3, 96, (2, 9), device="cuda")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    moecache.patch(model)
    model.__dict__.pop("_compiled_call", None)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():  # generate builds a preallocated LatentKVCache and compiles the decode step
        out = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert (out[:, ids.shape[1]:] == ref[:, ids.shape[1]:]).float().mean() >= 0.75
    moecache.unpatch(model)


@pytest.mark.parametrize("chunk,cache", [(1, "dynamic"), (1, "static"), (2, "dynamic"), (3, "static")])
def test_left_padded_prompts_prefilled_in_chunks_match(chunk, cache):
    """Regression: with prefill_chunk_size=1, each padding token after the first chunk was taken for a
    decode step (whose mask is not read) and stored as a real token: a row with 3 left pads got other
    tokens (scores 2.9 off)."""
    model = MODELS["v2-q_lora"]()
    twin = copy.deepcopy(model)
    moecache.patch(model)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[0, :3] = mask[0, :3] = 0
    runs = []
    for m in (twin, model):
        with torch.no_grad():
            runs.append(m.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   prefill_chunk_size=chunk, cache_implementation=cache,
                                   return_dict_in_generate=True, output_scores=True))
    assert torch.equal(runs[1].sequences, runs[0].sequences)
    for got, want in zip(runs[1].scores, runs[0].scores):
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        assert_close(got[finite], want[finite], torch.float32)
    calls = moecache.stats(model)["attention"][0]
    assert calls["original"] == 0 and calls["prefill"] >= 1 and calls["decode"] >= 3  # the latent path ran


def test_stats_follow_layers_copied_in_and_removed_after_patch():
    """Regression: stats listed the layers as patched: a patched layer deep-copied into the model was not
    counted (nor zeroed by reset_stats), and a removed one kept its name."""
    model = MODELS["v2-q_lora"]()
    moecache.patch(model)
    assert [layer["name"] for layer in moecache.stats(model)["layers"]] == [
        "model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    model.model.layers.append(copy.deepcopy(model.model.layers[1]))
    del model.model.layers[0]
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 4)), use_cache=False)
    stats = moecache.stats(model)
    assert [(layer["name"], layer["calls"]) for layer in stats["layers"]] == [
        (f"model.layers.{i}.mlp.experts", 1) for i in range(3)]
    assert [a["original"] for a in stats["attention"]] == [1, 1, 1] and stats["calls"] == 3
    moecache.reset_stats(model)
    stats = moecache.stats(model)
    assert stats["calls"] == 0 and all(a["original"] == 0 for a in stats["attention"])
    moecache.unpatch(model)


def test_attention_left_alone_is_reported_once_with_a_count_and_in_stats(caplog):
    """A transformers version whose attention takes its cache under a name moecache does not know: one
    warning per patch() with the count and the reason, each module named in stats; strict raises."""
    import logging

    model = MODELS["v2-q_lora"]()
    attention_cls = type(model.model.layers[0].self_attn)

    class RenamedCacheAttention(attention_cls):
        def forward(self, hidden_states, attention_mask=None, kv_store=None, position_embeddings=None, **kwargs):
            return super().forward(hidden_states, attention_mask, position_embeddings=position_embeddings,
                                   **kwargs)

    RenamedCacheAttention.__module__ = attention_cls.__module__  # where its rope functions live
    for layer in model.model.layers:
        layer.self_attn.__class__ = RenamedCacheAttention
    with caplog.at_level(logging.WARNING, logger="moecache"):
        moecache.patch(model)
    warnings = [r for r in caplog.records if "left alone" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "3 MLA attention modules" in warnings[0].getMessage()
    left = moecache.stats(model)["left_alone"]
    assert [item["name"] for item in left] == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert all("cache arguments" in item["reason"] for item in left)
    assert moecache.stats(model)["layers"]  # the experts were still patched
    moecache.unpatch(model)
    assert "_moecache_left_alone" not in model.__dict__
    with pytest.raises(ValueError, match="cannot be patched"):
        moecache.patch(model, strict=True)


@pytest.mark.parametrize("change,reason", [
    ("indexer", "it has parts moecache's MLA does not run (indexer)"),
    ("gated_query", "it has parts moecache's MLA does not run (q_gate_proj)"),
    ("lora_scales", "it has scale factors moecache's MLA does not apply (mla_scale_kv_lora, mla_scale_q_lora)"),
])
def test_mla_modules_with_parts_or_scales_of_their_own_are_left_alone(change, reason):
    """Regression: DeepSeek-V3.2 and GLM-DSA (a sparse indexer), AXK2 (a gated query projection) and
    LongCat (scaled latents) passed the structural check and were patched as plain MLA: dense attention
    over other queries and keys, or an AttributeError in generate."""
    model = MODELS["v3-interleaved"]()
    for layer in model.model.layers:
        attn = layer.self_attn
        if change == "indexer":
            attn.indexer = torch.nn.Linear(8, 8)
        elif change == "gated_query":
            attn.q_gate_proj = attn.q_b_proj
            del attn.q_b_proj
        else:
            attn.mla_scale_q_lora, attn.mla_scale_kv_lora = 2.0, 1.5
    moecache.patch(model)
    left = [item for item in moecache.stats(model)["left_alone"] if item["kind"] == "MLA attention"]
    assert [item["reason"] for item in left] == [reason] * model.config.num_hidden_layers
    assert not any(isinstance(m, MoecacheMLA) for m in model.modules())
    moecache.unpatch(model)


def test_rope_follows_the_function_the_attention_calls_when_the_config_does_not_say():
    """Regression: DeepSeek-V3.2 always interleaves its rope and its config has no rope_interleave, so the
    plain rope was used."""
    if "deepseek_v32" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-V3.2")
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as source

    from moecache.patching.attention import rope_for

    config = transformers.AutoConfig.for_model(
        "deepseek_v32", vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, kv_lora_rank=R, q_lora_rank=24, qk_rope_head_dim=P, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1)
    assert not hasattr(config, "rope_interleave")
    attn = transformers.AutoModelForCausalLM.from_config(config).model.layers[0].self_attn
    q, k = torch.randn(1, 4, 5, P), torch.randn(1, 1, 5, P)
    cos, sin = torch.randn(1, 5, P), torch.randn(1, 5, P)
    got = rope_for(attn, config)(q, k, {"position_embeddings": (cos, sin)})
    want = source.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not all(torch.equal(a, b) for a, b in zip(got, source.apply_rotary_pos_emb(q, k, cos, sin)))
