"""MLA decode (DeepSeek-V2/V3 multi-head latent attention, absorbed form) over a paged latent cache.

Shapes: B requests (one new token each), Hq query heads, R = kv_lora_rank (512 in DeepSeek),
P = qk_rope_head_dim (64), block_size tokens per cache page, max_blocks pages per request.
Each cache row is [latent (R) | rope key (P)]; the latent is both the key's "nope" part (after W_UK is
absorbed into the query) and the value (W_UV is applied by the caller to the [B, Hq, R] output).
"""
from __future__ import annotations

import math

import torch

from .api import (
    _FLOAT_DTYPES,
    _check,
    _value_checks_allowed,
    device_arch,
    eager_inference,
    grads_by_recompute,
    refuse_double_backward,
    resolve_backend,
    run_direct,
    sm_count,
    wrap_for_trace,
)
from .reference import in_stated_precision


@in_stated_precision
def mla_decode_reference(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                         block_table: torch.Tensor, seq_lens: torch.Tensor, *, scale: float,
                         return_lse: bool = False):
    """Plain PyTorch MLA decode in fp32: gather every request's rows, softmax, weighted latent sum.

    score(b, h, t) = scale * (q_latent[b, h] . latent_t + q_rope[b, h] . rope_t) for t < seq_lens[b],
    row t of request b = kv_cache[block_table[b, t // block_size], t % block_size].
    Returns out [B, Hq, R] in q's dtype (and lse [B, Hq] fp32, natural log, with return_lse).
    Vectorised over the table's full width (no .tolist()), so it also traces under torch.compile.
    """
    B, Hq, R = q_latent.shape
    block_size = kv_cache.shape[1]
    max_tokens = block_table.shape[1] * block_size
    t = torch.arange(max_tokens, device=kv_cache.device)
    valid = t[None, :] < seq_lens[:, None].long()                                  # [B, T]
    # unused entries may hold any value; used ones out of range are clamped, as the kernel does
    pages = torch.where(valid, block_table.long()[:, t // block_size].clamp(0, kv_cache.shape[0] - 1), 0)
    rows = kv_cache[pages, (t % block_size)[None, :].expand(B, -1)].float()       # [B, T, R + P]
    rows = torch.where(valid[..., None], rows, 0.0)                               # rows past seq_len: any value
    latent, rope = rows[..., :R], rows[..., R:]
    scores = torch.einsum("bhr,btr->bht", q_latent.float(), latent)
    scores = (scores + torch.einsum("bhp,btp->bht", q_rope.float(), rope)) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # no tokens (or every score -inf): zeros and lse -inf, as the kernel gives; a NaN score stays NaN
    weights = torch.where(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0, torch.softmax(scores, dim=-1))
    out = torch.einsum("bht,btr->bhr", weights, latent).to(q_latent.dtype)
    return (out, lse) if return_lse else out


def _check_mla_args(q_latent, q_rope, kv_cache, block_table, seq_lens, scale, validate=True):
    def shape(t):
        return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("kv_cache", kv_cache)):
        _check(isinstance(t, torch.Tensor) and t.dim() == 3, f"{name} must be a 3-D tensor, got {shape(t)}")
    _check(q_latent.dtype in _FLOAT_DTYPES, f"q_latent must be fp16/bf16/fp32, got {q_latent.dtype}")
    B, Hq, R = q_latent.shape
    _check(q_rope.shape[:2] == (B, Hq), f"q_rope must be [B={B}, Hq={Hq}, P], got {tuple(q_rope.shape)}")
    P = q_rope.shape[2]
    _check(R > 0 and P > 0, f"q_latent and q_rope need non-empty last dims, got R={R}, P={P}")
    _check(kv_cache.shape[2] == R + P,
           f"kv_cache must be [num_blocks, block_size, R + P = {R} + {P}], got {tuple(kv_cache.shape)}")
    num_blocks, block_size, _ = kv_cache.shape
    _check(num_blocks > 0 and block_size > 0, f"kv_cache has no rows: {tuple(kv_cache.shape)}")
    for name, t in (("q_rope", q_rope), ("kv_cache", kv_cache)):
        _check(t.dtype == q_latent.dtype, f"{name} dtype {t.dtype} differs from q_latent's {q_latent.dtype}")
    _check(kv_cache.stride(2) == 1, f"kv_cache must have a unit stride in its last dim, got {kv_cache.stride()}")
    _check(isinstance(block_table, torch.Tensor) and block_table.dim() == 2 and block_table.shape[0] == B
           and block_table.shape[1] > 0,
           f"block_table must be [B={B}, max_blocks], got {shape(block_table)}")
    _check(block_table.dtype == torch.int32, f"block_table must be int32, got {block_table.dtype}")
    _check(isinstance(seq_lens, torch.Tensor) and tuple(seq_lens.shape) == (B,),
           f"seq_lens must be [B={B}], got {shape(seq_lens)}")
    _check(seq_lens.dtype == torch.int32, f"seq_lens must be int32, got {seq_lens.dtype}")
    for name, t in (("q_rope", q_rope), ("kv_cache", kv_cache), ("block_table", block_table), ("seq_lens", seq_lens)):
        _check(t.device == q_latent.device, f"{name} is on {t.device}, q_latent on {q_latent.device}")
    _check(isinstance(scale, (int, float)) and math.isfinite(scale), f"scale must be a finite float, got {scale!r}")
    _check(isinstance(validate, bool), f"validate must be a bool, got {validate!r}")
    if validate and _value_checks_allowed() and B > 0:
        _check_mla_values(block_table, seq_lens, num_blocks, block_size)


def _check_mla_values(block_table, seq_lens, num_blocks, block_size):
    """The checks that read seq_lens and the block table: reduced on the device, one host sync."""
    max_blocks = block_table.shape[1]
    # Only the pages a request uses must be valid; the rest of its row may hold anything (e.g. -1).
    used = torch.arange(max_blocks, device=block_table.device)[None, :] < \
        ((seq_lens.long() + block_size - 1) // block_size)[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    lo, hi, any_bad = torch.stack([*torch.aminmax(seq_lens.long()), bad.any().long()]).tolist()
    _check(lo >= 1 and hi <= max_blocks * block_size,
           f"seq_lens must lie in [1, max_blocks * block_size = {max_blocks * block_size}], "
           f"found values in [{lo}, {hi}]")
    if any_bad:
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} must lie in [0, num_blocks={num_blocks}) "
                         f"(request {b} uses its first {(int(seq_lens[b]) + block_size - 1) // block_size} pages)")


def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, *, scale: float, backend: str = "auto", return_lse: bool = False,
               validate: bool = True):
    """One decode step of MLA attention (absorbed form) over a paged latent cache.

    Args:
        q_latent: [B, Hq, R] fp16/bf16/fp32, the "nope" query with W_UK absorbed (q_nope @ W_UK per head).
        q_rope: [B, Hq, P], the rotary part of the query (after rotary embedding).
        kv_cache: [num_blocks, block_size, R + P], rows [latent (after kv_a_layernorm) | rope key]; q's dtype.
            Any block_size; any page/row strides, unit stride in the last dim.
        block_table: [B, max_blocks] int32: request b's token t is at
            kv_cache[block_table[b, t // block_size], t % block_size]. Entries past the pages a request
            uses are never read.
        seq_lens: [B] int32, tokens in the cache per request, in [1, max_blocks * block_size].
        scale: softmax scale (DeepSeek: qk_head_dim ** -0.5, times mscale ** 2 under YaRN rope scaling).
        backend: "auto" | "torch" | "triton".
        return_lse: also return the log-sum-exp of the scaled scores.
        validate: check seq_lens and the used block_table entries, one host sync per call (skipped anyway
            while compiling or capturing, and with MOECACHE_VALIDATE=0). False where the caller built
            them, as moecache's latent cache does: the kernel clamps lengths and pages either way.
    Returns:
        out [B, Hq, R] in q's dtype = softmax_t(scale * (q_latent . latent_t + q_rope . rope_t)) @ latent;
        with return_lse, (out, lse [B, Hq] fp32, natural log).

    Example:
        >>> q_latent = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)           # absorb W_UK [Hq, Dn, R]
        >>> o = mla_decode(q_latent, q_pe, cache, table, lens, scale=192 ** -0.5)
        >>> attn = torch.einsum("bhr,hvr->bhv", o, w_uv)                     # apply W_UV [Hq, Dv, R]
    """
    _check_mla_args(q_latent, q_rope, kv_cache, block_table, seq_lens, scale, validate)
    if resolve_backend(backend, q_latent.device, kv_cache.dtype) == "torch":
        return mla_decode_reference(q_latent, q_rope, kv_cache, block_table, seq_lens, scale=scale,
                                    return_lse=return_lse)
    args = (q_latent.contiguous(), q_rope.contiguous(), kv_cache, block_table.contiguous(), seq_lens.contiguous(),
            float(scale))
    if eager_inference(*args[:5]):
        out, lse = run_direct("moecache::mla_decode", _mla_decode_kernels, *args, None)
    else:
        out, lse = torch.ops.moecache.mla_decode(*args)
    return (out, lse) if return_lse else out


def mla_decode_config(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                      block_table: torch.Tensor, **overrides) -> dict:
    """The kernels' configuration mla_decode takes for these inputs (shapes, dtype and device only);
    `overrides` (select_config's min_split_tokens, block_h) give the variants benchmarks time beside it."""
    from moecache import kernels
    from moecache.kernels.mla_decode import select_config

    B, Hq, R = q_latent.shape
    return select_config(B, Hq, R, q_rope.shape[2], kv_cache.shape[1], block_table.shape[1], sm_count(q_latent.device),
                         kernels.INTERPRETING, itemsize=q_latent.element_size(), arch=device_arch(q_latent.device),
                         **overrides)


@torch.library.triton_op("moecache::mla_decode", mutates_args=())
def _mla_decode_op(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _mla_decode_kernels(q_latent, q_rope, kv_cache, block_table, seq_lens, scale, wrap_for_trace)


def _mla_decode_setup_context(ctx, inputs, output):
    q_latent, q_rope, kv_cache, block_table, seq_lens = inputs[:5]
    if any(ctx.needs_input_grad[:3]):
        # A paged cache (its pages, table and lengths) is written in place by the steps after this one:
        # the backward recomputes from the rows as this step read them
        kv_cache, block_table, seq_lens = kv_cache.clone(), block_table.clone(), seq_lens.clone()
    ctx.save_for_backward(q_latent, q_rope, kv_cache, block_table, seq_lens)
    ctx.scale = inputs[5]


def _mla_decode_backward(ctx, grad_out, grad_lse):
    """Gradients for the queries and the cache (the pages read), differentiated through
    mla_decode_reference (PyTorch ops, recomputed: no Triton backward kernels)."""
    refuse_double_backward("mla_decode")
    def attention(q_latent, q_rope, kv_cache, block_table, seq_lens):
        return mla_decode_reference(q_latent, q_rope, kv_cache, block_table, seq_lens, scale=ctx.scale,
                                    return_lse=True)
    return grads_by_recompute(attention, ctx.saved_tensors, ctx.needs_input_grad, (grad_out, grad_lse), 6)


torch.library.register_autograd("moecache::mla_decode", _mla_decode_backward, setup_context=_mla_decode_setup_context)


def _mla_decode_kernels(q_latent, q_rope, kv_cache, block_table, seq_lens, scale, launcher):
    from moecache.kernels.mla_decode import mla_decode_launch

    B, Hq, R = q_latent.shape
    out = torch.empty((B, Hq, R), dtype=q_latent.dtype, device=q_latent.device)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q_latent.device)
    if B == 0 or Hq == 0:
        return out, lse
    config = mla_decode_config(q_latent, q_rope, kv_cache, block_table)
    mla_decode_launch(q_latent, q_rope, kv_cache, block_table, seq_lens, out, lse, scale=scale, config=config,
                      launcher=launcher)
    return out, lse
