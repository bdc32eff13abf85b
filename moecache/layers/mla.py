"""MLA attention that caches only the latent: a paged latent KV cache (transformers Cache API) and a
drop-in for DeepSeek-V2/V3 attention modules that decodes straight from it with ops.mla_decode.

Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim values (576 in DeepSeek): the
normalised latent and the rotated shared key. Decode absorbs W_UK into the query and W_UV into the
output, so the whole cache is read once per step and never expanded; multi-token steps (prefill)
expand the cached latents through kv_b_proj and run SDPA.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .. import ops

from ..compat import Cache, CacheLayerMixin


class PagedLatentLayer(CacheLayerMixin):
    """One layer's latent rows in pages of `block_size` tokens: pages [num_blocks, block_size, R + P],
    block_table [B, max_blocks] int32 (a request's pages, in order), seq_lens [B] int32 (tokens stored).

    Requests are stored ragged: left padding is dropped at prefill (its rows are never written), so
    every request attends over exactly its own tokens without a mask. `max_cache_len` preallocates
    every page up front (fixed addresses: what CUDA-graph decode needs); without it pages are handed
    out as requests grow and the page pool doubles when it runs out.
    """

    is_sliding = False
    is_croppable = True
    supports_early_init = False  # its rows are [B, S, R + P], not the [B, heads, S, D] early_initialization makes

    def __init__(self, block_size: int = 64, max_cache_len: int | None = None):
        super().__init__()
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if max_cache_len is not None and max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int or None, got {max_cache_len!r}")
        self.block_size = block_size
        self.max_cache_len = max_cache_len
        self.is_compileable = max_cache_len is not None
        self.pages = self.block_table = self.seq_lens = None
        # Positions seen, padding included (what generate's cache_position counts). A tensor when
        # preallocated, so compiled decode steps advance it without recompiling (as StaticLayer does).
        self.positions = torch.tensor(0, dtype=torch.int64) if self.is_compileable else 0
        self._host_lengths: list[int] | None = None  # tokens stored per request, known without a sync
        self._tables: list[list[int]] = []
        self._next_block = 0

    # -- allocation
    def lazy_initialization(self, rows: torch.Tensor, _unused=None) -> None:
        B, _, width = rows.shape
        self.dtype, self.device, self.width, self.batch_size = rows.dtype, rows.device, width, B
        if self.max_cache_len is not None:
            per_request = math.ceil(self.max_cache_len / self.block_size)
            self.pages = torch.zeros(B * per_request, self.block_size, width, dtype=rows.dtype, device=rows.device)
            self._tables = [list(range(b * per_request, (b + 1) * per_request)) for b in range(B)]
            self._next_block = B * per_request
        else:
            self.pages = torch.zeros(max(B, 4), self.block_size, width, dtype=rows.dtype, device=rows.device)
            self._tables = [[] for _ in range(B)]
            self._next_block = 0
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=rows.device)
        self._host_lengths = [0] * B
        self._publish_tables()
        if self.is_compileable:
            self.positions = self.positions.to(rows.device)
        if self.is_compileable and not torch.compiler.is_compiling():
            for t in (self.pages, self.block_table, self.seq_lens, self.positions):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _publish_tables(self) -> None:
        width = max(1, max(len(t) for t in self._tables))
        table = torch.zeros(len(self._tables), width, dtype=torch.int32)
        for b, blocks in enumerate(self._tables):
            table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.block_table = table.to(self.device)

    def _reserve(self, lengths: list[int]) -> None:
        """Make sure request b has pages for lengths[b] tokens (dynamic mode; host bookkeeping only)."""
        need = [math.ceil(n / self.block_size) - len(t) for n, t in zip(lengths, self._tables)]
        if self.max_cache_len is not None:
            if max(lengths) > self.max_cache_len:
                raise ValueError(f"the latent cache holds {self.max_cache_len} tokens per request "
                                 f"(max_cache_len); a request needs {max(lengths)}")
            return
        if max(need) <= 0:
            return
        total = self._next_block + sum(n for n in need if n > 0)
        if total > self.pages.shape[0]:
            grown = torch.zeros(max(total, 2 * self.pages.shape[0]), *self.pages.shape[1:], dtype=self.pages.dtype,
                                device=self.device)
            grown[: self.pages.shape[0]].copy_(self.pages)
            self.pages = grown
        for blocks, n in zip(self._tables, need):
            for _ in range(max(n, 0)):
                blocks.append(self._next_block)
                self._next_block += 1
        self._publish_tables()

    # -- writes
    def append(self, rows: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Store rows [B, S, R + P] after each request's last token; valid [B, S] bool drops padding."""
        if not self.is_initialized:
            self.lazy_initialization(rows)
        B, S, width = rows.shape
        if B != self.batch_size or width != self.width:
            raise ValueError(f"rows must be [B={self.batch_size}, S, {self.width}], got {tuple(rows.shape)}")
        tracing = torch.compiler.is_compiling()
        if valid is None:
            rank = torch.arange(S, device=rows.device).expand(B, S)
            counts = [S] * B
        else:
            rank = torch.cumsum(valid.to(torch.int32), dim=1) - 1
            counts = valid.sum(dim=1).tolist()  # prefill only (eager): one sync
        if not tracing:
            lengths = [n + c for n, c in zip(self._host_lengths, counts)]
            self._reserve(lengths)
            self._host_lengths = lengths
        pos = self.seq_lens.long()[:, None] + rank                                  # [B, S]
        if valid is not None:
            pos = torch.where(valid, pos, 0)
        blocks = self.block_table.long().gather(1, pos // self.block_size)
        flat_rows, flat_blocks, flat_offsets = rows.reshape(B * S, width), blocks.reshape(-1), (pos % self.block_size).reshape(-1)
        if valid is not None:
            keep = valid.reshape(-1)
            flat_rows, flat_blocks, flat_offsets = flat_rows[keep], flat_blocks[keep], flat_offsets[keep]
        self.pages.index_put_((flat_blocks, flat_offsets), flat_rows.to(self.pages.dtype))
        self.seq_lens.add_(torch.tensor(counts, dtype=torch.int32, device=rows.device) if valid is not None else S)
        if isinstance(self.positions, torch.Tensor):
            self.positions.add_(S)
        elif not tracing:
            self.positions += S

    def gather(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every request's rows as [B, max_len, R + P] (rows past seq_lens hold anything) and valid [B, max_len]."""
        nblocks = math.ceil(max_len / self.block_size)
        table = self.block_table[:, :nblocks].long()
        rows = self.pages[table].reshape(self.batch_size, nblocks * self.block_size, self.width)[:, :max_len]
        valid = torch.arange(max_len, device=self.device)[None, :] < self.seq_lens[:, None]
        return rows, valid

    def max_length(self) -> int:
        """Longest request, in tokens: host bookkeeping when pages grow on demand; the device lengths
        (one sync) when preallocated, since compiled decode steps advance only those."""
        if self.max_cache_len is None and self._host_lengths is not None:
            return max(self._host_lengths)
        return int(self.seq_lens.max())

    # -- Cache API
    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("PagedLatentLayer is written by moecache's MLA attention (append), not update()")

    def get_seq_length(self) -> int:
        return self.positions

    def get_max_length(self) -> int:
        return self.max_cache_len if self.max_cache_len is not None else -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.max_cache_len is not None:
            return self.max_cache_len, 0
        return self.positions + query_length, 0

    def reset(self) -> None:
        if self.is_initialized:
            self.seq_lens.zero_()
            self._host_lengths = [0] * self.batch_size
        if isinstance(self.positions, torch.Tensor):
            self.positions.zero_()
        else:
            self.positions = 0

    def crop(self, tokens_to_remove: int) -> None:
        positions = int(self.positions)
        if tokens_to_remove < 0:  # transformers passes a negative count as "keep this many"
            tokens_to_remove = positions + tokens_to_remove
        if tokens_to_remove <= 0 or not self.is_initialized:
            return
        self.seq_lens.sub_(tokens_to_remove).clamp_(min=0)
        self._host_lengths = [max(n - tokens_to_remove, 0) for n in self._host_lengths]
        if isinstance(self.positions, torch.Tensor):
            self.positions.fill_(max(positions - tokens_to_remove, 0))
        else:
            self.positions = max(positions - tokens_to_remove, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: request b continues beam beam_idx[b]; pages are copied, never shared."""
        if not self.is_initialized:
            return
        beam_idx = beam_idx.to(self.device)
        source = self.gather(self.max_length())[0][beam_idx]
        lengths = self.seq_lens[beam_idx]
        self.seq_lens.zero_()
        host = self._host_lengths
        self._host_lengths = [0] * self.batch_size
        valid = torch.arange(source.shape[1], device=self.device)[None, :] < lengths[:, None]
        positions = int(self.positions)
        self.append(source, valid)
        self._host_lengths = [host[i] for i in beam_idx.tolist()]
        if isinstance(self.positions, torch.Tensor):
            self.positions.fill_(positions)
        else:
            self.positions = positions

    def bytes_per_token(self) -> int:
        return self.width * self.pages.element_size() if self.is_initialized else 0


class LatentKVCache(Cache):
    """A transformers Cache of PagedLatentLayer, one per decoder layer: what model.generate passes to a
    model whose MLA attention moecache patched (moecache.patch installs it as the generate default)."""

    def __init__(self, num_layers: int, *, block_size: int = 64, max_cache_len: int | None = None):
        super().__init__(layers=[PagedLatentLayer(block_size, max_cache_len) for _ in range(num_layers)])
        self.block_size = block_size

    @property
    def max_cache_len(self) -> int | None:
        """Tokens preallocated per request (None: pages grow on demand). A read-only property, as the
        Cache base class of some transformers versions declares it."""
        return self.layers[0].max_cache_len if self.layers else None

    def bytes_per_token(self) -> int:
        """Cache bytes per token summed over layers (R + P values per layer)."""
        return sum(layer.bytes_per_token() for layer in self.layers)

    def get_usable_length(self, new_seq_length: int, layer_idx: int = 0) -> int:
        """transformers 4.x name that DeepSeek's own modelling code calls."""
        return self.get_seq_length(layer_idx)


class MoecacheMLA(nn.Module):
    """DeepSeek-V2/V3 attention over a LatentKVCache; any other cache (or none) runs the original module.

    The original's submodules are re-registered under their own names, so parameters, state-dict keys
    and the projections' behaviour stay the model's. W_UK [H, Dn, R] and W_UV [H, Dv, R] are views of
    kv_b_proj's weight (no copy). `rope(q_rot, k_rot, call)` applies the model's rotary embedding,
    given the call's keyword arguments.
    """

    def __init__(self, original: nn.Module, *, rope: Callable, scale: float, arg_names: tuple[str, ...],
                 cache_arg: str = "past_key_values", returns: int = 2):
        super().__init__()
        object.__setattr__(self, "original", original)  # not a submodule: its children are ours below
        for name, child in original.named_children():
            self.add_module(name, child)
        self.num_heads = original.num_heads
        self.kv_lora_rank = original.kv_lora_rank
        self.qk_rope_head_dim = original.qk_rope_head_dim
        self.qk_nope_head_dim = original.qk_nope_head_dim
        self.v_head_dim = original.v_head_dim
        self.q_lora_rank = getattr(original, "q_lora_rank", None)
        self.layer_idx = original.layer_idx
        self.scale = float(scale)
        self.rope = rope
        self.arg_names = arg_names
        self.cache_arg = cache_arg
        self.returns = returns
        self.calls = {"decode": 0, "prefill": 0, "original": 0}

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
            return self.original(hidden_states, *args, **kwargs)
        layer = cache.layers[self.layer_idx]
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
        q_rot, k_rot = self.rope(q_rot, k_rot.view(B, 1, S, P), call)
        rows = torch.cat([latent, k_rot.reshape(B, S, P).to(latent.dtype)], dim=-1)
        w_uk, w_uv = self.absorbed_weights()

        if S == 1 and layer.is_initialized:
            if not torch.compiler.is_compiling():
                self.calls["decode"] += 1
            layer.append(rows)
            q_latent = torch.einsum("bhd,hdr->bhr", q_nope[:, :, 0], w_uk)
            out = ops.mla_decode(q_latent.contiguous(), q_rot[:, :, 0].contiguous().to(q_latent.dtype), layer.pages,
                                 layer.block_table, layer.seq_lens, scale=self.scale)
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
            last_key = torch.where(valid, last_key, 0)  # padding queries see the first token: finite, unused
        t = torch.arange(cached.shape[1], device=rows.device)
        mask = (t[None, None, :] <= last_key[:, :, None]) & cached_valid[:, None, :]   # [B, S, T]
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None],
                                                               scale=self.scale)
        return out.transpose(1, 2).reshape(B, S, self.num_heads * self.v_head_dim)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, rope={self.qk_rope_head_dim}, "
                f"latent cache {self.kv_lora_rank + self.qk_rope_head_dim} values/token")


def _new_token_validity(attention_mask, B: int, S: int, offset: int) -> torch.Tensor | None:
    """[B, S] bool: which new tokens are real (not padding), read off the mask's diagonal; None if all are."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return None
    j = torch.arange(S, device=attention_mask.device)
    cols = (offset + j).clamp(max=attention_mask.shape[-1] - 1)
    diag = attention_mask[:, 0, j, cols]                                           # [B, S]
    valid = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    if bool(valid.all()):
        return None
    return valid
