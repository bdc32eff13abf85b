"""DeepSeek-V2/V3 MLA attention modules, found by structure (their projections and head sizes), with
the model's own rotary embedding function, so MoecacheMLA can take their place."""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

from torch import nn

from .. import compat
from ..layers.mla import MoecacheMLA
from .hooks import own_forward, read_as_weights

MLA_PARTS = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")
MLA_SIZES = ("num_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# Everything MoecacheMLA computes with: a module with other parts (DeepSeek-V3.2's and GLM-DSA's sparse
# indexer, a gated query projection) or other scale factors (but LongCat's, compat.MLA_LORA_SCALES, where
# its forward reads them) computes something else.
MLA_CHILDREN = {*MLA_PARTS, "q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "rotary_emb"}
MLA_QUERY_PATHS = (("q_proj",), ("q_a_proj", "q_a_layernorm", "q_b_proj"))
MLA_FLOATS = {"scaling", "softmax_scale", "attention_dropout", "rope_theta"}


@dataclass
class AttentionPlan:
    """An MLA attention module to replace (parent.attr) and how to call its replacement."""

    name: str
    parent: nn.Module
    attr: str
    module: nn.Module
    kwargs: dict


def is_mla_attention(module: nn.Module) -> bool:
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in MLA_PARTS)
            and all(isinstance(getattr(module, a, None), int) for a in MLA_SIZES))


def unsupported_parts(module: nn.Module) -> str | None:
    """Why MoecacheMLA cannot stand in for this MLA module, or None."""
    extra = sorted(name for name, _ in module.named_children() if name not in MLA_CHILDREN)
    if extra:
        return f"it has parts moecache's MLA does not run ({', '.join(extra)})"
    if not any(all(isinstance(getattr(module, n, None), nn.Module) for n in path) for path in MLA_QUERY_PATHS):
        return "its query projection is neither q_proj nor q_a_proj, q_a_layernorm and q_b_proj"
    applied = _functions_called(module)  # LongCat's scales count where its forward reads them
    scales = sorted(name for name, value in vars(module).items()
                    if isinstance(value, float) and not name.startswith("_") and name not in MLA_FLOATS
                    and not (name in compat.MLA_LORA_SCALES and name in applied))
    if scales:
        return f"it has scale factors moecache's MLA does not apply ({', '.join(scales)})"
    position_scales = sorted(name for name in _functions_called(module) if "attn_scale" in name)
    if position_scales:  # Mistral-4: queries scaled by 1 + beta * log(1 + floor(position / original length))
        return f"it scales its queries by position ({', '.join(position_scales)}), which moecache's MLA does not"
    if not isinstance(module.kv_b_proj, nn.Linear):
        kind = type(module.kv_b_proj)
        return f"its kv_b_proj is a {kind.__module__}.{kind.__qualname__}, not a linear layer the latent path can read"
    why = read_as_weights(module.kv_b_proj)
    if why:
        return f"its kv_b_proj, which the latent path reads as weights and does not call, has {why}"
    why = own_forward(module)
    return f"it has {why}, which the latent path would skip" if why else None


def _functions_called(module: nn.Module) -> set[str]:
    """Global and attribute names the module's forward refers to (through its decorators)."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return set(code.co_names) if code is not None else set()


def rope_for(module: nn.Module, config):
    """The model's own rotary embedding, as rope(q_rot [B, H, S, P], k_rot [B, 1, S, P], call) -> (q, k),
    from the module that defines the attention class; None if none is recognised."""
    source = sys.modules[type(module).__module__]
    rotary = getattr(module, "rotary_emb", None)
    if rotary is not None and hasattr(source, "apply_rotary_pos_emb"):
        # DeepSeek's own code (DeepSeek-V2 / DeepSeek-VL2 repositories): the module owns a rotary_emb whose
        # cos/sin tables are indexed by position_ids inside apply_rotary_pos_emb (interleaved pairs).
        apply, table_len = source.apply_rotary_pos_emb, rotary.max_position_embeddings

        def own_rope(q, k, call):
            cos, sin = rotary(q, seq_len=table_len)
            return apply(q, k, cos, sin, call["position_ids"])
        return own_rope
    if hasattr(source, "apply_rotary_emb"):  # transformers DeepSeek-V2: complex freqs_cis, interleaved pairs
        apply = source.apply_rotary_emb
        return lambda q, k, call: apply(q, k, call["position_embeddings"].to(q.device))
    if hasattr(source, "apply_rotary_pos_emb") or hasattr(source, "apply_rotary_pos_emb_interleave"):
        # transformers DeepSeek-V3: (cos, sin). It picks by config.rope_interleave; some families (DeepSeek-V3.2,
        # LongCat, whose module has only the interleaved one) always interleave and have no such field: the
        # functions the forward calls decide.
        called = _functions_called(module)
        interleaved_only = "apply_rotary_pos_emb_interleave" in called and "apply_rotary_pos_emb" not in called
        interleave = interleaved_only or getattr(config, "rope_interleave", False)
        if not hasattr(source, "apply_rotary_pos_emb_interleave" if interleave else "apply_rotary_pos_emb"):
            return None
        apply = source.apply_rotary_pos_emb_interleave if interleave else source.apply_rotary_pos_emb

        def rope(q, k, call):
            cos, sin = call["position_embeddings"]
            return apply(q, k, cos, sin)
        return rope
    return None


def plan_attention(model: nn.Module, strict: bool, left_alone: list) -> list[AttentionPlan]:
    """Every MLA attention module not yet patched that can be; the others go to `left_alone` with the
    reason (or raise, with strict)."""
    plan = []
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, MoecacheMLA) or not is_mla_attention(child):
                continue
            qualified = f"{name}.{attr}" if name else attr
            rope = rope_for(child, compat.text_config(model, qualified))
            scale = getattr(child, "scaling", getattr(child, "softmax_scale", None))
            cache_arg = compat.attention_cache_argument(child.forward)
            why = unsupported_parts(child) or (
                "no rotary embedding function it uses was recognised" if rope is None else
                "no softmax scale attribute" if scale is None else
                f"its forward takes none of the cache arguments {compat.CACHE_ARGUMENTS}" if cache_arg is None
                else None)
            if why:
                if strict:
                    raise ValueError(f"moecache.patch: MLA attention {qualified} ({type(child).__name__}) "
                                     f"cannot be patched: {why}")
                left_alone.append({"name": qualified, "kind": "MLA attention", "type": type(child).__name__,
                                   "reason": why})
                continue
            query_scale, latent_scale = compat.mla_lora_scales(child)
            plan.append(AttentionPlan(qualified, parent, attr, child,
                                      dict(rope=rope, scale=scale * query_scale, latent_scale=latent_scale,
                                           arg_names=compat.positional_arguments(child.forward),
                                           cache_arg=cache_arg, returns=3 if compat.attention_returns_cache(cache_arg)
                                           else 2)))
    return plan
