"""MLA attention that decodes straight from the latent: a drop-in for DeepSeek-V2/V3 attention modules.

With a LatentKVCache, decode absorbs W_UK into the query and W_UV into the output, so the whole cache
is read once per step by ops.mla_decode and never expanded; multi-token steps (prefill) expand the
cached latents through kv_b_proj and run SDPA. With any other cache the original module runs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import ops
from ..compat import attentions_requested
from .latent_cache import LatentKVCache

LATENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the latent kernels compute in


class MoecacheMLA(nn.Module):
    """DeepSeek-V2/V3 attention over a LatentKVCache; any other cache (or none) runs the original module.

    Its submodules are the original's, in one table both modules hold, so parameters, state-dict keys and
    the projections' behaviour stay the model's, and a projection replaced on either (an adapter, say)
    is replaced on both and stays after unpatch. W_UK [H, Dn, R] and W_UV [H, Dv, R] are views of
    kv_b_proj's weight (no copy). `rope(q_rot, k_rot, call)` applies the model's rotary embedding,
    given the call's keyword arguments. `scale` is the softmax scale times any factor the module applies to
    its queries; `latent_scale` multiplies the normalized latent before it is cached (LongCat-Flash's
    mla_scale_q_lora and mla_scale_kv_lora).
    """

    def __init__(self, original: nn.Module, *, rope: Callable, scale: float, arg_names: tuple[str, ...],
                 cache_arg: str = "past_key_values", returns: int = 2, latent_scale: float = 1.0):
        super().__init__()
        object.__setattr__(self, "original", original)  # not a submodule: its children are ours below
        object.__setattr__(self, "_modules", original._modules)
        # The latent path reads kv_b_proj's weight rather than calling it: it runs only while kv_b_proj is
        # the module patch checked (not one swapped in later, which may compute more than its weight).
        object.__setattr__(self, "_read_kv_b_proj", (original.kv_b_proj, type(original.kv_b_proj)))
        self.hook_count = [0]  # hooks registered on kv_b_proj after patch, counted by its tables (patch watches them)
        self.num_heads = original.num_heads
        self.kv_lora_rank = original.kv_lora_rank
        self.qk_rope_head_dim = original.qk_rope_head_dim
        self.qk_nope_head_dim = original.qk_nope_head_dim
        self.v_head_dim = original.v_head_dim
        self.q_lora_rank = getattr(original, "q_lora_rank", None)
        self.layer_idx = original.layer_idx
        self.scale = float(scale)
        self.latent_scale = float(latent_scale)
        self.rope = rope
        self.arg_names = arg_names
        self.cache_arg = cache_arg
        self.returns = returns
        self.calls = {"decode": 0, "prefill": 0, "original": 0}
        self.training = original.training

    def __getattr__(self, name: str):
        # The original's plain attributes (config, attention_dropout, scaling, is_causal, ...) read through
        # this module, as code walking the model (model.apply, hasattr checks) reads them unpatched
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None or name not in original.__dict__:
                raise
            return original.__dict__[name]

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # ... and are set on the original too, which runs the calls without a latent cache
        original = self.__dict__.get("original")
        if original is not None and name in original.__dict__ and not isinstance(value, (nn.Module, torch.Tensor)):
            setattr(original, name, value)

    def train(self, mode: bool = True):
        # The original runs the calls without a latent cache and reads its own flag (attention dropout);
        # its children are this module's and follow through super().train.
        self.original.training = mode
        return super().train(mode)

    def latent_path_ready(self) -> bool:
        kv_b_proj = self._modules.get("kv_b_proj")
        return (kv_b_proj, type(kv_b_proj)) == self._read_kv_b_proj and not self.hook_count[0]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, Dn, R], W_UV [H, Dv, R]): views of kv_b_proj.weight [H * (Dn + Dv), R]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        call = dict(zip(self.arg_names, args))
        call.update(kwargs)
        cache = call.get(self.cache_arg)
        if not isinstance(cache, LatentKVCache):
            if not torch.compiler.is_compiling():
                self.calls["original"] += 1
            # .forward: the hooks registered on the original are this module's (patch shares them) and
            # have fired around this call already
            return self.original.forward(hidden_states, *args, **kwargs)
        if self.layer_idx >= len(cache.layers):
            raise ValueError(f"the LatentKVCache has {len(cache.layers)} layers but this is attention layer "
                             f"{self.layer_idx}: build it with the model's num_hidden_layers")
        if torch.jit.is_tracing():
            raise RuntimeError("torch.jit.trace cannot record moecache's latent cache, whose pages are handed out "
                               "call by call: trace with another cache, or use torch.compile")
        layer = cache.layers[self.layer_idx]
        if not torch.compiler.is_compiling() and not self.latent_path_ready():
            raise ValueError(f"moecache's latent MLA reads kv_b_proj's weight without calling it, and kv_b_proj was "
                             f"replaced or given hooks after patch (now a {type(self.kv_b_proj).__name__}): pass "
                             "another cache to run the original attention, or unpatch and patch again")
        if call.get("output_attentions") or (not torch.compiler.is_compiling() and attentions_requested()):
            keyword = "past_key_values" if self.cache_arg == "past_key_value" else self.cache_arg
            raise ValueError(f"output_attentions: moecache's latent MLA computes no attention weights; pass an "
                             f"explicit cache ({keyword}=DynamicCache(config=model.config)) to run the original "
                             "attention, or unpatch the model")
        if hidden_states.dtype not in LATENT_DTYPES:
            raise TypeError(f"moecache's latent MLA decodes in fp16, bf16 or fp32, and this model runs in "
                            f"{hidden_states.dtype}: pass another cache (generate does) to run the original "
                            "attention, or unpatch the model")
        B, S, _ = hidden_states.shape
        R, P, Dn = self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim

        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(B, S, self.num_heads, Dn + P).transpose(1, 2)                 # [B, H, S, Dn + P]
        q_nope, q_rot = q[..., :Dn], q[..., Dn:]
        latent, k_rot = self.kv_a_proj_with_mqa(hidden_states).split([R, P], dim=-1)
        latent = self.kv_a_layernorm(latent)
        if self.latent_scale != 1.0:
            latent = latent * self.latent_scale
        q_rot, k_rot = self.rope(q_rot, k_rot.view(B, 1, S, P), call)
        rows = torch.cat([latent, k_rot.reshape(B, S, P).to(latent.dtype)], dim=-1)
        w_uk, w_uv = self.absorbed_weights()

        # A one-token step after the first is a decode step, whose mask is not read (a host sync), unless
        # a request has stored nothing yet: its left padding is still being prefilled, one token a chunk.
        compiling = torch.compiler.is_compiling()
        if S == 1 and layer.is_initialized and (compiling or not layer.holds_an_empty_request()):
            if not compiling:
                self.calls["decode"] += 1
            layer.append(rows)
            # in the pages' dtype: under torch.autocast the einsum gives its lower dtype while the latent
            # (after the model's fp32 norm) was stored in fp32
            q_latent = torch.einsum("bhd,hdr->bhr", q_nope[:, :, 0], w_uk).to(layer.pages.dtype)
            out = ops.mla_decode(q_latent.contiguous(), q_rot[:, :, 0].contiguous().to(q_latent.dtype), layer.pages,
                                 layer.block_table, layer.seq_lens, scale=self.scale,
                                 validate=False)  # moecache's own table and lengths: no value checks (a sync)
            out = torch.einsum("bhr,hvr->bhv", out, w_uv).reshape(B, 1, self.num_heads * self.v_head_dim)
        else:
            if not torch.compiler.is_compiling():
                self.calls["prefill"] += 1
            out = self._prefill(layer, rows, q_nope, q_rot, w_uk, w_uv, call.get("attention_mask"))
        out = self.o_proj(out)
        return (out, None) if self.returns == 2 else (out, None, call.get(self.cache_arg))

    def _prefill(self, layer, rows, q_nope, q_rot, w_uk, w_uv, attention_mask):
        """Several new tokens: store them, expand every cached latent through kv_b_proj, run SDPA with a
        causal mask in each request's own (padding-free) token order."""
        B, S, _ = rows.shape
        R = self.kv_lora_rank
        valid = _new_token_validity(attention_mask, B, S, layer.positions)
        before = layer.seq_lens.clone() if layer.is_initialized else torch.zeros(B, dtype=torch.int32, device=rows.device)
        layer.append(rows, valid)
        cached, cached_valid = layer.gather(layer.max_length())
        latent, k_rot = cached[..., :R], cached[..., R:]
        k_nope = torch.einsum("btr,hdr->bhtd", latent, w_uk)
        value = torch.einsum("btr,hvr->bhtv", latent, w_uv)
        key = torch.cat([k_nope, k_rot[:, None].expand(-1, self.num_heads, -1, -1)], dim=-1)
        query = torch.cat([q_nope, q_rot.to(q_nope.dtype)], dim=-1)
        rank = torch.arange(S, device=rows.device)[None, :].expand(B, S) if valid is None else torch.cumsum(valid.int(), 1) - 1
        last_key = before.long()[:, None] + rank                                    # each query's own position
        if valid is not None:
            # A padding query sees the real tokens before it, as the model's own mask has it (its output
            # is what generate reads when the prompt ends in padding); one with none before it (left
            # padding) sees the first token: finite, and unused.
            last_key = torch.where(last_key >= 0, last_key, 0)
        t = torch.arange(cached.shape[1], device=rows.device)
        mask = (t[None, None, :] <= last_key[:, :, None]) & cached_valid[:, None, :]   # [B, S, T]
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None],
                                                               scale=self.scale)
        return out.transpose(1, 2).reshape(B, S, self.num_heads * self.v_head_dim)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, rope={self.qk_rope_head_dim}, "
                f"latent cache {self.kv_lora_rank + self.qk_rope_head_dim} values/token")


def _new_token_validity(attention_mask, B: int, S: int, offset: int) -> torch.Tensor | None:
    """[B, S] bool: which new tokens are real (not padding); None if all are. The mask: the [B, T] padding
    mask (flash attention's), read at the new tokens' columns; a [B, 1 or H, S, T] tensor (bool, or
    additive float), or flex attention's BlockMask, whose mask_mod(b, h, q, kv) is evaluated on the
    diagonal (a token masked from itself is padding)."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        # The padding mask itself, [B, tokens so far] with 0 at padding (what flash attention is given).
        if attention_mask.shape[-1] < offset + S:
            raise ValueError(f"attention_mask [B, T] covers {attention_mask.shape[-1]} tokens; the cache holds "
                             f"{offset} and this call adds {S}")
        valid = attention_mask[:, offset + torch.arange(S, device=attention_mask.device)] != 0
        return None if bool(valid.all()) else valid
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() != 4:
            raise ValueError(f"moecache's MLA attention reads padding from a [B, T] padding mask or a "
                             f"[B, 1 or H, S, T] mask, got attention_mask of shape {tuple(attention_mask.shape)}")
        j = torch.arange(S, device=attention_mask.device)
        cols = (offset + j).clamp(max=attention_mask.shape[-1] - 1)
        diag = attention_mask[:, 0, j, cols]                                       # [B, S]
    elif callable(getattr(attention_mask, "mask_mod", None)):
        device = attention_mask.kv_num_blocks.device
        b = torch.arange(B, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        diag = attention_mask.mask_mod(b, torch.zeros_like(b), j, offset + j).expand(B, S)
    else:
        raise TypeError(f"moecache's MLA attention reads padding from a [B, T] padding mask, a [B, 1 or H, S, T] "
                        f"mask or a flex BlockMask, got {type(attention_mask).__name__}")
    valid = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    if bool(valid.all()):
        return None
    return valid
