"""Every place moecache depends on transformers' internals, found by feature rather than by version.

Supported: transformers >= 5.17, < 6 (CI tests both ends). What differs across that range, and what
moecache reads here:
- the attention module's cache argument: `past_key_values` up to 5.24, `cache` from 5.25 (the old name
  deprecated); DeepSeek's own 4.x-era modelling code (DeepSeek-V2 / DeepSeek-VL2 repositories) takes
  `past_key_value` and returns (output, weights, cache) instead of (output, weights);
- where `generate` keeps the cache it prepared (`model_kwargs` under that same name), the keyword a
  model's forward takes it under, and the field of the outputs that returns it;
- the Cache base class: in 5.17 `max_cache_len` is a read-only property, so a subclass exposes it as a
  property too, never assigns it;
- experts modules: fused 3-D `gate_up_proj` / `down_proj` parameters (`up_proj` / `down_proj` where the
  experts decorator set `has_gate=False`: Nemotron-H), GPT-OSS's `is_transposed` / `is_concatenated`
  flags, and `set_experts_implementation` on the model (benchmarks only);
- `output_attentions`: recorded by forward hooks that `capture_outputs` installs on modules of the
  model's own attention classes at the first forward that asks, and an active collector naming what the
  running forward records.
"""
from __future__ import annotations

import inspect

import torch

SUPPORTED_TRANSFORMERS = ">=5.17,<6"

# Names an attention module's forward may give its KV cache argument, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # transformers is needed only for patching models
    Cache = CacheLayerMixin = object


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def positional_arguments(forward) -> tuple[str, ...]:
    """Names of a forward's positional parameters after the first (hidden_states)."""
    params = [p for p in inspect.signature(forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(p.name for p in params[1:])


def attention_cache_argument(forward) -> str | None:
    """The name under which this attention forward receives its KV cache, or None."""
    names = set(positional_arguments(forward)) | set(inspect.signature(forward).parameters)
    return next((n for n in CACHE_ARGUMENTS if n in names), None)


def attention_returns_cache(cache_argument: str) -> bool:
    """DeepSeek's own code (argument `past_key_value`) returns (output, weights, cache)."""
    return cache_argument == "past_key_value"


def generate_cache_key(model_kwargs: dict) -> str | None:
    """The key under which generate's model_kwargs hold the cache it prepared (None: no cache)."""
    return next((k for k in CACHE_ARGUMENTS if model_kwargs.get(k) is not None), None)


def model_cache_argument(model) -> str:
    """The keyword a model's forward (and generate) takes its cache under: `cache` or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output):
    """The cache a model output or a generate result carries (`cache` or `past_key_values`), or None."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def owning_config(model, name: str = ""):
    """The model's config; for a model without one (a plain module holding a transformers model), the
    config of the nearest module on the way to the submodule `name` (that submodule included), or None."""
    config = getattr(model, "config", None)
    parts = name.split(".") if name else []
    while config is None and parts:
        config = getattr(model.get_submodule(".".join(parts)), "config", None)
        parts.pop()
    return config


def text_config(model, name: str = ""):
    """The language model's config of a (possibly multimodal) model, or None; `name` as in owning_config."""
    config = owning_config(model, name)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def config_value(config, key: str):
    """A config field by its config.json name; rope fields (rope_theta, partial_rotary_factor) are kept in
    rope_parameters from transformers 5 on, at the top level before. None where the config has no such field."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and key in rope:
        return rope[key]
    return getattr(config, key, None)


# Experts modules that store their weights transposed ([E, H, 2I], [E, I, H]) without transformers' experts
# decorator to say so (`is_transposed`).
TRANSPOSED_WITHOUT_FLAG = ("Llama4TextExperts",)


def is_llama4_moe(block) -> bool:
    """Llama 4's MoE block: a router (top-k sigmoid scores), experts called on inputs already scaled by
    the score, and a shared expert."""
    return type(block).__name__ == "Llama4TextMoe" and all(
        hasattr(block, name) for name in ("experts", "router", "shared_expert", "top_k", "hidden_dim"))


# Routers that add their selection bias to the logits themselves, or to their softmax, rather than to their
# sigmoid.
BIAS_ON_LOGITS = ("Kolibri1TopKRouter", "Kolibri1_1TopKRouter")
BIAS_ON_SOFTMAX = ("LongcatFlashTopkRouter",)


def router_selection_bias(block, router) -> tuple:
    """(selection bias, the function of the logits it is added to) by which a router ranks experts, as
    RouterSpec takes them: DeepSeek-V3's e_score_correction_bias on the router, or on the MoE block that
    passes it to the router (MiniMax-M2, HunYuan-V3), AFMoE's expert_bias on the block (all added to the
    sigmoid), ERNIE 4.5's on the router's moe_statics and LongCat-Flash's on the router (added to the
    softmax), Kolibri's on the router (added to the logits); (None, "sigmoid") for a router that ranks by
    its logits alone."""
    statics = getattr(router, "moe_statics", None)
    for holder, name, function in ((router, "e_score_correction_bias", "sigmoid"),
                                   (statics, "e_score_correction_bias", "softmax"),
                                   (block, "e_score_correction_bias", "sigmoid"),
                                   (block, "expert_bias", "sigmoid")):
        bias = getattr(holder, name, None) if holder is not None else None
        if isinstance(bias, torch.Tensor):
            kind = type(router).__name__
            return bias, ("logits" if kind in BIAS_ON_LOGITS else "softmax" if kind in BIAS_ON_SOFTMAX else function)
    return None, "sigmoid"


def routed_rows(router, weight, num_experts: int, hidden: int):
    """The rows of a router's [rows, H] weight that score the routed experts, or None: all of them when
    rows = E; the first E where the router scores its shared experts in rows after them (Inkling's
    n_shared_experts, whose gammas come from those rows)."""
    if weight.dim() != 2 or weight.shape[1] != hidden:
        return None
    if weight.shape[0] == num_experts:
        return weight
    shared = getattr(router, "n_shared_experts", None)
    if type(router).__name__ == "InklingTopkRouter" and isinstance(shared, int) and weight.shape[0] == num_experts + shared:
        return weight[:num_experts]
    return None


# LongCat-Flash's MLA: its forward multiplies the queries (both parts) by mla_scale_q_lora and the normalized
# latent, before caching it, by mla_scale_kv_lora.
MLA_LORA_SCALES = ("mla_scale_q_lora", "mla_scale_kv_lora")


def mla_lora_scales(attention) -> tuple[float, float]:
    """(query scale, latent scale) an MLA module applies (MLA_LORA_SCALES); 1.0 where it keeps none."""
    return tuple(float(getattr(attention, name, 1.0)) for name in MLA_LORA_SCALES)


def zero_expert_rows(block) -> int:
    """How many rows after the routed experts' of the router's weight score zero-computation experts, 0
    where none: LongCat-Flash's zero_expert_num. Those compete in the ranking; a token routed to one gets
    its input back, scaled by the weight, and no expert runs for it (the block points the route at a real
    expert with weight 0)."""
    zero = getattr(block, "zero_expert_num", 0)
    return zero if isinstance(zero, int) and not isinstance(zero, bool) and zero > 0 else 0


def router_score_fn(router):
    """The function of the logits a router declares it ranks by (DeepSeek-V4's and Inkling2's `score_fn`, an
    activation module from config.scoring_func: sqrtsoftplus), or None where it keeps none."""
    score_fn = getattr(router, "score_fn", None)
    return score_fn if callable(score_fn) else None


def token_id_table(router):
    """The [vocab, K] table of a router that picks experts from the token id, not the hidden state, or None:
    DeepSeek-V4's hash routers (its first MoE layers) look them up in a frozen `tid2eid`; their `weight`
    only weighs the picks."""
    table = getattr(router, "tid2eid", None)
    return table if isinstance(table, torch.Tensor) and table.dim() == 2 else None


def block_token_ids_reader(block):
    """A function (args, kwargs) -> the token ids an MoE block's forward was called with, or None (not
    given); None where its forward takes none. DeepSeek-V4's blocks are given the step's `input_ids` for
    their hash routers."""
    if "input_ids" not in inspect.signature(block.forward).parameters:
        return None
    names = positional_arguments(block.forward)
    position = 1 + names.index("input_ids") if "input_ids" in names else None

    def read(args: tuple, kwargs: dict):
        ids = kwargs.get("input_ids")
        if ids is None and position is not None and len(args) > position:
            ids = args[position]
        return ids if isinstance(ids, torch.Tensor) else None
    return read


def router_input_scales(block, router) -> tuple:
    """(input_scale, experts_input_scale) as RouterSpec takes them, for a router that reads the residual
    otherwise than its experts: Gemma 4's router normalizes the decoder layer's residual without a weight
    and scales it by `router.scale` (and a constant), the experts read `pre_feedforward_layernorm_2` of
    it. (None, None) for every other router."""
    if type(router).__name__ != "Gemma4TextRouter":
        return None, None
    scale = getattr(router, "scale", None)
    norm = getattr(getattr(block, "pre_feedforward_layernorm_2", None), "weight", None)
    return (scale if isinstance(scale, torch.Tensor) else None), (norm if isinstance(norm, torch.Tensor) else None)


def experts_gated(module) -> bool:
    """Whether a fused experts module computes act(gate) * up (`gate_up_proj`), or act(up) alone
    (`up_proj`: transformers' experts decorator sets `has_gate=False` on those, Nemotron-H's)."""
    return getattr(module, "has_gate", True) is not False


def fused_weight_names(module) -> tuple[str, str]:
    """(first projection, down projection): the names of a fused experts module's two 3-D parameters; the
    biases, where it has them, are named after them with `_bias`."""
    return ("gate_up_proj" if experts_gated(module) else "up_proj"), "down_proj"


def experts_flags(module) -> tuple[bool, bool, bool]:
    """(transposed, interleaved, has_bias) of a fused experts module: GPT-OSS stores gate_up_proj
    [E, H, 2I] with gate and up interleaved, and biases; the other families [E, 2I, H], concatenated."""
    first = fused_weight_names(module)[0]
    transposed = getattr(module, "is_transposed", type(module).__name__ in TRANSPOSED_WITHOUT_FLAG)
    return (bool(transposed), not getattr(module, "is_concatenated", True),
            getattr(module, f"{first}_bias", None) is not None)


def own_gate_function(module):
    """A fused experts module's own gate function, gate_up [..., 2I] -> [..., I], where its class has one
    (a clamp, GPT-OSS's GLU, act(gate) * up written out), else None: transformers' experts implementations
    call `_apply_gate`, which its experts decorator sets to act(gate) * up where a family defines none."""
    gate = getattr(type(module), "_apply_gate", None)
    if gate is None:
        return None
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        _default_apply_gate = None
    if gate is _default_apply_gate:
        return None
    return lambda gate_up: gate(module, gate_up)


def gate_constants(module) -> tuple[float | None, float | None]:
    """(limit, alpha) a fused experts module keeps for its gate function, None where it keeps none: the
    clamp limit (DeepSeek-V4's and Step's `limit`, GLM-5's and HunYuan-V4's `swiglu_limit`, None or 0
    where a layer has no clamp) and the GLU's alpha (GPT-OSS's `alpha`, MiniMax-M3's `swiglu_alpha`)."""
    def number(*names):
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return float(value)
        return None
    return number("limit", "swiglu_limit"), number("swiglu_alpha", "alpha")


def set_experts_implementation(model, name: str) -> None:
    """Select transformers' own experts implementation ("eager", "grouped_mm", ...) where it exists."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        raise NotImplementedError(f"transformers {transformers_version()} has no set_experts_implementation")
    setter(name)


def decode_experts_implementation(model) -> str:
    """The experts implementation transformers' generate runs while decoding, given the one selected now:
    from 5.17 its generate swaps grouped_mm for batched_mm on GPUs (GenerationMixin._optimize_model_for_decode).
    Read by entering that context itself, which restores the selection on exit."""
    optimize = getattr(model, "_optimize_model_for_decode", None)
    getter = getattr(model, "get_experts_implementation", None)
    if getter is None:
        raise NotImplementedError(f"transformers {transformers_version()} has no get_experts_implementation")
    if optimize is None:
        used = getter()
    else:
        with optimize():
            used = getter()
    return ",".join(sorted({str(v) for v in used.values()}))


def model_on_meta(path: str):
    """The model a checkpoint folder's config.json describes, built on the meta device in the config's
    dtype: no weight is read or initialised, nothing is downloaded. The image-text-to-text model of a config
    with a vision part (its causal LM would leave the vision tower out), else the causal LM, else the base
    model, as transformers has one for the config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    refusals = []
    order = ["AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel"]
    if getattr(config, "vision_config", None) is not None:
        order[:2] = order[1::-1]
    for auto in order:
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            with torch.device("meta"):
                model = cls.from_config(config)
        except ValueError as exc:  # the auto class has no model for this config
            refusals.append(f"{auto}: {str(exc).splitlines()[0]}")
            continue
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    raise ValueError(f"{path}: transformers {transformers.__version__} builds no model for model_type "
                     f"{getattr(config, 'model_type', None)!r} ({'; '.join(refusals)})")


def skip_weight_init():
    """A context in which transformers models are built without initialising their weights (they are
    about to be loaded); a no-op context where this transformers lacks one."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def _records_outputs(module) -> bool:
    """Whether the module's forward is wrapped by transformers' capture_outputs (the module that installs
    the recording hooks on its submodules)."""
    forward = type(module).forward
    while forward is not None:
        # functools.wraps copies the wrapped function's names; the wrapper's globals stay its own module's.
        if getattr(forward, "__globals__", {}).get("__name__") == "transformers.utils.output_capturing":
            return True
        forward = getattr(forward, "__wrapped__", None)
    return False


_RECORDERS_INSTALLED = "_output_capturing_hooks_installed"


def install_output_recorders(model) -> list:
    """Install now the hooks that record attentions and hidden states, as the first forward asking for them
    would: installed before patch swaps attention modules out, the originals carry them, so the paths
    that run the original attention record as before. Returns what remove_output_recorders takes to take
    exactly these away again (at unpatch: transformers then installs them on the first forward that asks,
    as if the model had never been patched)."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return []
    modules = list(model.modules())
    hooks_before = {id(m): set(m._forward_hooks) for m in modules}
    flagged_before = {id(m) for m in modules if getattr(m, _RECORDERS_INSTALLED, False)}
    for module in modules:
        if _records_outputs(module):
            maybe_install_capturing_hooks(module)
    # a composite model installs its submodels' recorders (and sets their flags) as well
    return [(m, key) for m in modules for key in set(m._forward_hooks) - hooks_before[id(m)]] + \
        [(m, None) for m in modules if getattr(m, _RECORDERS_INSTALLED, False) and id(m) not in flagged_before]


def remove_output_recorders(installed: list) -> None:
    for module, key in installed:
        if key is None:
            module.__dict__.pop(_RECORDERS_INSTALLED, None)
        else:
            module._forward_hooks.pop(key, None)


def attentions_requested() -> bool:
    """Whether the running forward records attention weights (output_attentions=True)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected
