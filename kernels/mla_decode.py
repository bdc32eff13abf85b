"""MLA (DeepSeek-V2/V3 multi-head latent attention) decode over a paged latent KV cache.

Split-KV flash-decoding in two launches, without host synchronisation:

- `_mla_decode_split_kernel`, one program per (head block, split, request): BLOCK_H heads of
  request b and the s-th of num_splits contiguous page ranges of that request's own length. Every
  latent row it loads ([BLOCK_N, R + P] per step) serves all BLOCK_H heads at once through tl.dot,
  so for Hq <= BLOCK_H the cache is read exactly once. Online softmax in fp32 (log2 domain), fp32
  accumulator [BLOCK_H, R]; it writes a partial output and the partial log-sum-exp.
- `_mla_decode_combine_kernel`, grid (B, Hq, column blocks of R): merges the splits by their log-sum-exp.

Why a second kernel rather than "the last program to arrive combines" (as the fused-MoE down GEMM
does): the arrival counters would need zeroing every call (a memset launch, or a zeroing pass in an
earlier kernel, which this op does not have), the combine is tiny next to the cache read, and one
extra launch inside a CUDA graph costs about 1 µs (measured on an H100). The combine is also deterministic by construction.
With one split the first kernel writes the final output and lse directly (no combine launch).

The split kernel's grid is one axis (a batch can pass CUDA's 65535 cap on the other two) with the head
block fastest in launch order, so the head blocks of one (split, request) run side by side and all but
the first read the pages from L2.

Split boundaries come from each request's own seq_len, read on the device: request b's
pages_b = ceil(seq_len_b / block_size) are cut into num_splits ranges of
pps_b = max(ceil(pages_b / num_splits), min_split_pages) pages, so a short request leaves its last
splits empty (they write lse = -inf and zeros) and a long one keeps every split busy. num_splits
itself depends only on shapes and the SM count (see `select_config`).
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side: folded into the scale
LN2 = tl.constexpr(0.6931471805599453)  # a kernel can only read constexpr globals


@triton.jit
def _mla_decode_split_kernel(
    q_lat_ptr, q_rope_ptr, kv_ptr, table_ptr, lens_ptr, o_ptr, lse_ptr,
    Hq, R, P, block_size, num_blocks, max_blocks, num_splits, min_split_pages, qk_scale,
    stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_kvb, stride_kvt, stride_tb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    IEEE: tl.constexpr, PAGE_ALIGNED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One (head block, split, request): partial out [BLOCK_H, R] and lse [BLOCK_H] of its pages.

    qk_scale = scale * log2(e): scores live in the log2 domain so the softmax uses exp2.
    o_ptr/lse_ptr are the fp32 partials [B, Hq, splits, R] / [B, Hq, splits], or, with one split,
    the final out [B, Hq, R] (q's dtype) and lse [B, Hq] (stride_os is then unused).
    """
    # One grid axis (CUDA caps the other two at 65535, a batch could pass that), head blocks fastest.
    pid = tl.program_id(0)
    head_blocks = tl.cdiv(Hq, BLOCK_H)
    pid_h = pid % head_blocks
    pid_s = (pid // head_blocks) % num_splits
    b = (pid // (head_blocks * num_splits)).to(tl.int64)

    # Clamps are for memory safety only: values are validated before the launch in eager mode.
    seq_len = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), max_blocks * block_size)
    pages = tl.cdiv(seq_len, block_size)
    pages_per_split = tl.maximum(tl.cdiv(pages, num_splits), min_split_pages)
    start = pid_s * pages_per_split * block_size
    end = tl.minimum(start + pages_per_split * block_size, seq_len)

    o_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < Hq
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    o_p = tl.arange(0, BLOCK_P)
    m_p = o_p < P
    b_ql = tl.load(q_lat_ptr + b * stride_qlb + o_h[:, None] * stride_qlh + o_r[None, :],
                   mask=m_h[:, None] & m_r[None, :], other=0.0)
    b_qr = tl.load(q_rope_ptr + b * stride_qrb + o_h[:, None] * stride_qrh + o_p[None, :],
                   mask=m_h[:, None] & m_p[None, :], other=0.0)

    b_m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_H], tl.float32)
    b_acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        o_t = t0 + tl.arange(0, BLOCK_N)
        m_t = o_t < end
        if PAGE_ALIGNED:
            page = tl.load(table_ptr + b * stride_tb + t0 // block_size)
            page = tl.minimum(tl.maximum(page, 0), num_blocks - 1)
            p_row = kv_ptr + page.to(tl.int64) * stride_kvb + ((t0 % block_size) + tl.arange(0, BLOCK_N)).to(tl.int64) * stride_kvt
        else:
            # Each token's page from the block table: any block_size works, pages in any order.
            page = tl.load(table_ptr + b * stride_tb + o_t // block_size, mask=m_t, other=0)
            page = tl.minimum(tl.maximum(page, 0), num_blocks - 1)
            p_row = kv_ptr + page.to(tl.int64) * stride_kvb + (o_t % block_size).to(tl.int64) * stride_kvt
        # Masked loads (not just masked scores): rows past seq_len may hold anything, NaN included.
        b_kv = tl.load(p_row[:, None] + o_r[None, :], mask=m_t[:, None] & m_r[None, :], other=0.0)
        b_kr = tl.load(p_row[:, None] + R + o_p[None, :], mask=m_t[:, None] & m_p[None, :], other=0.0)
        if IEEE:  # fp32 inputs: exact products, not TF32
            b_s = tl.dot(b_ql, tl.trans(b_kv), input_precision="ieee")
            b_s = tl.dot(b_qr, tl.trans(b_kr), b_s, input_precision="ieee")
        else:
            b_s = tl.dot(b_ql, tl.trans(b_kv))
            b_s = tl.dot(b_qr, tl.trans(b_kr), b_s)
        # fp32 scale: torch.compile types a Python float argument fp64, which would promote the scores
        # and the accumulator's update to fp64 (a compile error in tl.dot's accumulator).
        b_s = tl.where(m_t[None, :], b_s * tl.cast(qk_scale, tl.float32), float("-inf"))
        # Every step holds >= 1 valid token, but its scores can all be -inf (a -inf in the cache): the
        # max is then taken as 0, so alpha and p are exp2(-inf) = 0, not exp2(-inf - -inf) = NaN.
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_p = tl.exp2(b_s - b_m_safe[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        if IEEE:
            b_acc = tl.dot(b_p, b_kv, b_acc * b_alpha[:, None], input_precision="ieee")
        else:
            b_acc = tl.dot(b_p.to(b_kv.dtype), b_kv, b_acc * b_alpha[:, None])
        b_m = b_m_new

    # A split with no tokens (past seq_len) leaves l = 0: zeros and lse = -inf, which the combine
    # weighs by exp(-inf) = 0. A NaN in q or in a used cache row makes l NaN: NaN out and lse, as in the
    # reference, never a finite value.
    has = (b_l > 0.0) | (b_l != b_l)
    b_out = b_acc / tl.where(has, b_l, 1.0)[:, None]
    b_lse = tl.where(has, (b_m + tl.log2(tl.where(has, b_l, 1.0))) * LN2, float("-inf"))
    p_o = o_ptr + b * stride_ob + o_h[:, None] * stride_oh + pid_s * stride_os + o_r[None, :]
    tl.store(p_o, b_out.to(o_ptr.dtype.element_ty), mask=m_h[:, None] & m_r[None, :])
    tl.store(lse_ptr + b * stride_lb + o_h * stride_lh + pid_s, b_lse, mask=m_h)


@triton.jit
def _mla_decode_combine_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, Hq, R, num_splits,
    stride_pb, stride_ph, stride_ps, stride_ob, stride_oh, stride_lb, stride_lh,
    BLOCK_RC: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[b, h, cols] = sum_s exp(lse_s - lse) * part_o[b, h, s, cols], lse = logsumexp_s lse_s (fp32).

    One program per (request, head, BLOCK_RC columns of R) loads every split's partial as one tile, so it
    waits for memory once, not once per split (a loop over splits is a chain of dependent loads).
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pid_c = tl.program_id(2)
    bh = b * Hq + h
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < num_splits
    b_lse = tl.load(part_lse_ptr + bh * num_splits + o_s, mask=m_s, other=float("-inf"))
    m = tl.max(b_lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no tokens at all (seq_len 0): zeros, lse -inf
    b_w = tl.exp(b_lse - m)  # 0 for empty splits, which are not read at all
    b_sum = tl.sum(b_w, axis=0)
    o_r = pid_c * BLOCK_RC + tl.arange(0, BLOCK_RC)
    m_r = o_r < R
    b_o = tl.load(part_o_ptr + b * stride_pb + h * stride_ph + o_s[:, None] * stride_ps + o_r[None, :],
                  mask=(b_lse > float("-inf"))[:, None] & m_r[None, :], other=0.0)
    b_acc = tl.sum(b_w[:, None] * b_o, axis=0)
    b_out = b_acc / tl.where(b_sum > 0.0, b_sum, 1.0)
    b_final_lse = tl.where(b_sum > 0.0, m + tl.log(b_sum), float("-inf"))
    # A split whose partial is NaN (NaN in q or in a used cache row) makes the whole result NaN.
    nan = tl.max(((b_lse != b_lse) & m_s).to(tl.int32), axis=0) > 0
    b_out = tl.where(nan, float("nan"), b_out)
    b_final_lse = tl.where(nan, float("nan"), b_final_lse)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + o_r, b_out.to(out_ptr.dtype.element_ty), mask=m_r)
    tl.store(lse_ptr + b * stride_lb + h * stride_lh, b_final_lse, mask=pid_c == 0)


# ---------------------------------------------------------------- configuration and launcher
MAX_SPLITS = 128  # one request of 32K tokens in 256-token splits: 128 programs, about one per SM


def combine_columns(block_r: int, block_s: int) -> int:
    """Columns of R per combine program: a [splits, columns] fp32 tile of at most 4096 values (32 per
    thread at 4 warps), and at most 128 columns so a small batch still spreads over several SMs."""
    return max(16, min(block_r, 128, 4096 // block_s))


def select_config(batch: int, num_heads: int, kv_lora_rank: int, rope_dim: int, block_size: int,
                  max_blocks: int, sm_count: int, interpreting: bool, itemsize: int = 2,
                  min_split_tokens: int = 256, arch: int = 90, block_h: int | None = None) -> dict:
    """Block sizes and the split count from shapes only (no tensor values, so no host sync).

    BLOCK_H: all heads in one block up to 64, fewer when R is wide, since the fp32 accumulator
    [BLOCK_H, R] lives in registers. For R = 512 (DeepSeek) in fp16/bf16: on sm_90 (`arch` 90) 64 heads
    with 8 warps, where Triton gives the dots warpgroup MMAs (wgmma, M = 64 rows per warpgroup; ptxas,
    triton 3.6: 244-255 registers, no spills); with 32 heads it falls back to mma.sync, whose rate then
    sets the 128-head case's speed (about 242 flop per latent byte, near or above the ridge of an
    H100/H200 even at the warpgroup MMAs' peak), and 128 heads pass over the cache (through L2) four
    times instead of twice. Elsewhere 32 heads (sm_80: 64 heads take 255 registers and mma.sync
    anyway). tl.dot needs every dimension >= 16, so heads, rope and token blocks are padded to 16.
    `block_h` replaces the rule as given, with no register cap (benchmarks time the alternatives beside
    the default; fp32 at R = 512 spills above 16).
    BLOCK_N divides the page where it can (32 rows, 16 in fp32 or where 32 does not divide it), so a
    step reads within one page: one block-table entry per step instead of one per token.
    num_stages: the cache rows of a step are addressed through the block table, a load whose result
    makes the next load's address; Triton's pipeliner then keeps two row buffers (the copy of step
    i + 1 in flight while step i computes) only from 5 stages up (sm_90, triton 3.6: with 2-4 stages
    one buffer, so every step waits for its own copy; tests/aot_compile.py checks the buffers).
    num_splits: the count whose programs finish soonest, counting waves of `blocks_per_sm` programs
    per SM (the sm_90 footprint of these configs: 16 heads of R = 512 in fp16/bf16 take 179
    registers x 128 threads and 93 KB of shared memory, two per SM; tests/aot_compile.py checks it)
    times the pages each program reads; ties go to fewer splits, whose fp32 partials are fewer bytes.
    On the GPU a split spans >= min_split_tokens (256: fewer partials to write and combine; bench_mla
    times 64 beside it, where short requests gain from more programs). Not yet timed on a GPU.
    """
    block_r = triton.next_power_of_2(kv_lora_rank)
    block_p = max(16, triton.next_power_of_2(rope_dim))
    max_h = 64 if block_r <= 256 or arch // 10 == 9 else 32
    if itemsize >= 4 and block_r >= 512:
        max_h = 16  # fp32 rows are twice the registers: 32 heads spill at R = 512 (tests/aot_compile.py)
    if block_h is None:
        block_h = min(max_h, max(16, triton.next_power_of_2(num_heads)))
    elif block_h < 16 or block_h & (block_h - 1):
        raise ValueError(f"block_h must be a power of two >= 16, got {block_h}")
    head_blocks = triton.cdiv(num_heads, block_h)
    block_n = 16 if itemsize >= 4 else 32  # fp32: two buffers of 32 rows would exceed sm_80's shared memory
    if block_size % block_n and block_size % 16 == 0:
        block_n = 16
    num_warps = 4 if block_h * block_r * itemsize <= 16384 else 8
    blocks_per_sm = 2 if block_h * block_r * itemsize <= 16384 else 1
    # The interpreter takes one-page splits so small test sequences still exercise the combine.
    min_split_pages = 1 if interpreting else triton.cdiv(min_split_tokens, block_size)
    most = min(MAX_SPLITS, triton.cdiv(max_blocks, min_split_pages))

    def finish(splits):  # (waves of programs) x (pages per program), in page reads
        pages = max(triton.cdiv(max_blocks, splits), min_split_pages)
        return triton.cdiv(batch * head_blocks * splits, blocks_per_sm * sm_count) * pages

    num_splits = min(range(1, most + 1), key=lambda s: (finish(s), s))
    return {"BLOCK_H": block_h, "BLOCK_N": block_n, "BLOCK_R": block_r, "BLOCK_P": block_p,
            "num_splits": num_splits, "min_split_pages": min_split_pages, "blocks_per_sm": blocks_per_sm,
            "num_warps": num_warps, "num_stages": 1 if interpreting else 5}


def mla_decode_launch(q_latent, q_rope, kv_cache, block_table, seq_lens, out, lse, *, scale, config,
                      launcher=None):
    """Fill out [B, Hq, R] (q's dtype) and lse [B, Hq] fp32. q_*, out, block_table: unit last stride;
    kv_cache: unit last stride, any page/row strides; lse: any strides. `launcher` wraps kernels
    (wrap_triton)."""
    import torch

    wrap = (lambda k: k) if launcher is None else launcher
    B, Hq, R = q_latent.shape
    P = q_rope.shape[2]
    num_blocks, block_size, _ = kv_cache.shape
    max_blocks = block_table.shape[1]
    splits = config["num_splits"]
    block_h = config["BLOCK_H"]
    if splits == 1:
        part_o, part_lse = out, lse
        part_strides = (out.stride(0), out.stride(1), 0)
    else:
        part_o = torch.empty((B, Hq, splits, R), dtype=torch.float32, device=q_latent.device)
        part_lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q_latent.device)
        part_strides = part_o.stride()[:3]
    wrap(_mla_decode_split_kernel)[(triton.cdiv(Hq, block_h) * splits * B,)](
        q_latent, q_rope, kv_cache, block_table, seq_lens, part_o, part_lse,
        Hq, R, P, block_size, num_blocks, max_blocks, splits, config["min_split_pages"], float(scale) * LOG2E,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        *part_strides, part_lse.stride(0), part_lse.stride(1),
        IEEE=q_latent.dtype == torch.float32, PAGE_ALIGNED=block_size % config["BLOCK_N"] == 0, BLOCK_H=block_h, BLOCK_N=config["BLOCK_N"],
        BLOCK_R=config["BLOCK_R"], BLOCK_P=config["BLOCK_P"],
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        block_rc = combine_columns(config["BLOCK_R"], block_s)
        wrap(_mla_decode_combine_kernel)[(B, Hq, triton.cdiv(R, block_rc))](
            part_o, part_lse, out, lse, Hq, R, splits,
            part_o.stride(0), part_o.stride(1), part_o.stride(2), out.stride(0), out.stride(1),
            lse.stride(0), lse.stride(1), BLOCK_RC=block_rc, BLOCK_S=block_s, num_warps=4)
    return out, lse
