"""A paged latent KV cache for MLA attention (the transformers Cache API): per token and layer only
kv_lora_rank + qk_rope_head_dim values (576 in DeepSeek), the normalised latent and the rotated shared
key, in pages of `block_size` tokens that ops.mla_decode reads directly.
"""
from __future__ import annotations

import math

import torch

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

    def holds_an_empty_request(self) -> bool:
        """Whether some request has no token stored yet (all its tokens so far were padding: a long left
        padding prefilled in chunks). Host bookkeeping only: no sync."""
        return self._host_lengths is not None and 0 in self._host_lengths

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
            raise ValueError(f"this LatentKVCache holds {self.batch_size} sequences of {self.width} values per token "
                             f"(filled by another batch or model), got rows {tuple(rows.shape)}: pass a new cache")
        tracing = torch.compiler.is_compiling()
        if tracing and self.max_cache_len is None:
            # pages are handed out on the host, call by call: a traced graph would write where the trace did
            raise RuntimeError("a LatentKVCache without max_cache_len cannot be written from a compiled forward; "
                               "build it with max_cache_len (generate does, with cache_implementation='static')")
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

    def crop(self, length: int) -> None:
        """Roll back the newest tokens, as transformers' caches do: a negative `length` removes that many
        (prompt-lookup and assisted decoding drop rejected candidates so); a positive one, the older
        form, keeps that many; 0 changes nothing."""
        if length == 0 or not self.is_initialized:
            return
        positions = int(self.positions)
        tokens_to_remove = -length if length < 0 else positions - length
        if tokens_to_remove <= 0:
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
