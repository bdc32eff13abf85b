"""Grouped-GEMM MoE experts: alignment, gate/up GEMM with the activation fused, down GEMM with the
top-k weight fused, and a deterministic top-k combine.

Two paths, both without host synchronisation:
- decode (GEMV, no sort): `_gate_up_gemv_kernel` runs one program per (routed row, N block) and
  `_down_combine_gemv_kernel` one per (token, N block), looping over the token's K experts in order, so
  the combine is fused and deterministic. Each routed row streams its expert's weights. Taken only where
  a tuned table picks it (and by the interpreter at tiny sizes): measured on the H200, the grouped path
  was faster at every small token count tried.
- grouped (every token count by default): three launches (two for one token). `_align_kernel` (one program) buckets routed rows per expert
  (atomics give each row its place; the place never changes a value; one token needs no bucketing: its
  k-th routed row is the k-th M block, and the align launch is skipped), `_grouped_gate_up_kernel` and
  `_grouped_down_kernel` run tl.dot tiles per expert, and the down kernel's last-arriving program for a
  token sums that token's K rows in k order (deterministic, no combine launch). A configuration may
  say COMBINE "separate": the down kernel then only stores the partials and `_sum_partials_kernel` adds
  them in the same order (bit-identical output, one more launch, no arrival tail in the GEMM).

Expert e's weights are at slot expert_map[e] of w_gate_up / w_down; a slot of -1 reads expert e from the
host tensors in place (pinned memory is device-addressable through unified addressing). In the
grouped path every M tile of an expert re-reads its weights, so for large T a missing expert should
be copied to a slot first (the cache does that); the kernel itself never synchronises.
"""
import triton
import triton.language as tl

# Activation codes (constexpr inside the kernels); launchers take the activation's name.
ACT_SILU = tl.constexpr(0)
ACT_GELU_TANH = tl.constexpr(1)
ACT_SWIGLU_OAI = tl.constexpr(2)
ACT_GELU = tl.constexpr(3)
ACT_RELU = tl.constexpr(4)
ACT_RELU2 = tl.constexpr(5)
ACTIVATION_CODES = {"silu": ACT_SILU.value, "gelu_tanh": ACT_GELU_TANH.value, "swiglu_oai": ACT_SWIGLU_OAI.value,
                    "gelu": ACT_GELU.value, "relu": ACT_RELU.value, "relu2": ACT_RELU2.value}
# Where a gated activation's clamp applies (CLAMP constexpr): none, on the gate, or on act(gate).
CLAMP_NONE = tl.constexpr(0)
CLAMP_BEFORE = tl.constexpr(1)
CLAMP_AFTER = tl.constexpr(2)


@triton.jit
def _act(h, ACTIVATION: tl.constexpr):
    """The activation alone (non-gated experts, and the gate of gated ones)."""
    if ACTIVATION == ACT_SILU:
        return h / (1.0 + tl.exp(-h))
    elif ACTIVATION == ACT_GELU_TANH:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # sqrt(2 / pi) * (x + 0.044715 x^3)
        return 0.5 * h * (2.0 / (1.0 + tl.exp(-2.0 * inner)))  # 0.5 h (1 + tanh(inner))
    elif ACTIVATION == ACT_GELU:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACTIVATION == ACT_RELU2:  # squared ReLU (Nemotron-H)
        r = tl.maximum(h, 0.0)
        return r * r
    else:
        return tl.maximum(h, 0.0)


@triton.jit
def _activate(gate, up, ACTIVATION: tl.constexpr, SWIGLU_ALPHA: tl.constexpr, LIMIT: tl.constexpr,
              CLAMP: tl.constexpr):
    """act(gate) * up, or GPT-OSS's SwiGLU (up + 1) * gate * sigmoid(alpha * gate); with a clamp, up is
    kept in [-LIMIT, LIMIT] and the gate (CLAMP_BEFORE) or act(gate) (CLAMP_AFTER) at most LIMIT."""
    if CLAMP != CLAMP_NONE:
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
    if CLAMP == CLAMP_BEFORE:
        gate = tl.minimum(gate, LIMIT)
    if ACTIVATION == ACT_SWIGLU_OAI:
        return (up + 1.0) * (gate / (1.0 + tl.exp(-SWIGLU_ALPHA * gate)))
    elif CLAMP == CLAMP_AFTER:
        return tl.minimum(_act(gate, ACTIVATION), LIMIT) * up
    else:
        return _act(gate, ACTIVATION) * up


@triton.jit
def _expert_base(w_ptr, host_w_ptr, map_ptr, e, stride_e, num_slots, HAS_MAP: tl.constexpr, HAS_HOST: tl.constexpr):
    """Base pointer of expert e: its slot in the device tensor, or the host copy when the slot is -1.

    Memory safety only (the op validates maps before the launch unless told not to): a slot past the
    pool is clamped to the last slot, and -1 without host weights to slot 0, so no map value can make
    the kernel read outside the weights it was given.
    """
    if HAS_MAP:
        slot = tl.minimum(tl.load(map_ptr + e), num_slots - 1)
        if HAS_HOST:
            if slot >= 0:
                base = w_ptr + slot.to(tl.int64) * stride_e
            else:
                base = host_w_ptr + e.to(tl.int64) * stride_e
        else:
            base = w_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_e
    else:
        base = w_ptr + e.to(tl.int64) * stride_e
    return base


# ---------------------------------------------------------------- decode path
@triton.jit
def _gate_up_gemv_kernel(
    x_ptr, w_ptr, host_w_ptr, bias_ptr, ids_ptr, map_ptr, inter_ptr,
    H, I, E, K, num_slots,
    stride_xt, stride_we, stride_wn, stride_wk, stride_be, stride_bn,
    gate_step, up_row0,
    ACTIVATION: tl.constexpr, SWIGLU_ALPHA: tl.constexpr, LIMIT: tl.constexpr, CLAMP: tl.constexpr,
    GATED: tl.constexpr,
    HAS_MAP: tl.constexpr, HAS_HOST: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    token = pair // K
    e = tl.load(ids_ptr + pair)
    e = tl.minimum(tl.maximum(e, 0), E - 1)  # memory safety only: ids are validated before the launch
    base = _expert_base(w_ptr, host_w_ptr, map_ptr, e, stride_we, num_slots, HAS_MAP, HAS_HOST)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < I
    o_gate = o_n.to(tl.int64) * gate_step
    o_up = up_row0 + o_n.to(tl.int64) * gate_step
    b_gate = tl.zeros([BLOCK_N], tl.float32)
    b_up = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        b_x = tl.load(x_ptr + token * stride_xt + o_k, mask=m_k, other=0.0).to(tl.float32)
        m_w = m_n[:, None] & m_k[None, :]
        b_wg = tl.load(base + o_gate[:, None] * stride_wn + o_k[None, :] * stride_wk, mask=m_w, other=0.0)
        b_gate += tl.sum(b_wg.to(tl.float32) * b_x[None, :], axis=1)
        if GATED:
            b_wu = tl.load(base + o_up[:, None] * stride_wn + o_k[None, :] * stride_wk, mask=m_w, other=0.0)
            b_up += tl.sum(b_wu.to(tl.float32) * b_x[None, :], axis=1)
    if HAS_BIAS:
        b_gate += tl.load(bias_ptr + e * stride_be + o_gate * stride_bn, mask=m_n, other=0.0).to(tl.float32)
        if GATED:
            b_up += tl.load(bias_ptr + e * stride_be + o_up * stride_bn, mask=m_n, other=0.0).to(tl.float32)
    if GATED:
        b_h = _activate(b_gate, b_up, ACTIVATION, SWIGLU_ALPHA, LIMIT, CLAMP)
    else:
        b_h = _act(b_gate, ACTIVATION)
    tl.store(inter_ptr + pair * I + o_n, b_h.to(inter_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _down_combine_gemv_kernel(
    inter_ptr, w_ptr, host_w_ptr, bias_ptr, ids_ptr, topk_w_ptr, map_ptr, out_ptr,
    H, I, E, num_slots,
    stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_ot,
    K: tl.constexpr, HAS_MAP: tl.constexpr, HAS_HOST: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < H
    b_out = tl.zeros([BLOCK_N], tl.float32)
    for kk in range(K):
        pair = token * K + kk
        e = tl.load(ids_ptr + pair)
        e = tl.minimum(tl.maximum(e, 0), E - 1)
        weight = tl.load(topk_w_ptr + pair).to(tl.float32)
        base = _expert_base(w_ptr, host_w_ptr, map_ptr, e, stride_we, num_slots, HAS_MAP, HAS_HOST)
        b_acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, I, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < I
            b_h = tl.load(inter_ptr + pair * I + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_w = tl.load(base + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :] * stride_wk,
                          mask=m_n[:, None] & m_k[None, :], other=0.0)
            b_acc += tl.sum(b_w.to(tl.float32) * b_h[None, :], axis=1)
        if HAS_BIAS:
            b_acc += tl.load(bias_ptr + e * stride_be + o_n * stride_bn, mask=m_n, other=0.0).to(tl.float32)
        b_out += weight * b_acc
    tl.store(out_ptr + token * stride_ot + o_n, b_out.to(out_ptr.dtype.element_ty), mask=m_n)


# ---------------------------------------------------------------- prefill path
@triton.jit
def _align_kernel(ids_ptr, counts_ptr, offsets_ptr, rows_ptr, num_rows, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program buckets the routed rows by expert: counts[e] rows go to expert e, listed at
    rows[offsets[e] : offsets[e] + counts[e]] (atomics give each row its place; a place never changes a
    value). It zeroes its own counts, so the layer needs no memset launch; rows are visited BLOCK at a
    time (256K routed rows are 64 steps of 4096). An id outside [0, E) (possible only where the op's
    value checks are skipped) is clamped, as in the decode path, so every row is placed and computed.
    Within this one program the barriers order the passes and the kernel boundary orders the next
    launch, so the atomics need no fences (relaxed).
    """
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    tl.store(counts_ptr + o_e, tl.zeros([BLOCK_E], tl.int32), mask=m_e)
    tl.debug_barrier()
    for r0 in range(0, num_rows, BLOCK):
        o = r0 + tl.arange(0, BLOCK)
        m = o < num_rows
        e = tl.minimum(tl.maximum(tl.load(ids_ptr + o, mask=m, other=0), 0), E - 1)
        tl.atomic_add(counts_ptr + e, 1, mask=m, sem="relaxed")
    tl.debug_barrier()
    b_cnt = tl.load(counts_ptr + o_e, mask=m_e, other=0, cache_modifier=".cg")
    tl.store(offsets_ptr + o_e, tl.cumsum(b_cnt, axis=0) - b_cnt, mask=m_e)
    tl.store(counts_ptr + o_e, tl.zeros([BLOCK_E], tl.int32), mask=m_e)  # counted again below, as places
    tl.debug_barrier()
    for r0 in range(0, num_rows, BLOCK):
        o = r0 + tl.arange(0, BLOCK)
        m = o < num_rows
        e = tl.minimum(tl.maximum(tl.load(ids_ptr + o, mask=m, other=0), 0), E - 1)
        place = tl.atomic_add(counts_ptr + e, 1, mask=m, sem="relaxed")
        start = tl.load(offsets_ptr + e, mask=m, other=0, cache_modifier=".cg")
        tl.store(rows_ptr + start + place, o.to(tl.int32), mask=m)


@triton.jit
def _tile(num_m_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(M block, N block) of this program. Programs run GROUP_M M blocks (laid out expert by expert)
    over each N block before the next N block, so an expert's weight tile is read from HBM once and
    served from L2 to its other M blocks, while the GROUP_M activation tiles stay in L2 across N."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _locate_block(counts_ptr, offsets_ptr, rows_ptr, pid_m, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Which expert the pid_m-th M block belongs to (blocks laid out expert by expert), and its rows."""
    o_e = tl.arange(0, BLOCK_E)
    b_cnt = tl.load(counts_ptr + o_e, mask=o_e < E, other=0)
    b_blocks = (b_cnt + BLOCK_M - 1) // BLOCK_M
    b_end = tl.cumsum(b_blocks, axis=0)
    e = tl.sum((b_end <= pid_m).to(tl.int32), axis=0)
    first_block = tl.sum(tl.where(o_e == e, b_end - b_blocks, 0), axis=0)
    count = tl.sum(tl.where(o_e == e, b_cnt, 0), axis=0)
    start = tl.load(offsets_ptr + tl.minimum(e, E - 1))
    o_r = (pid_m - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_r = (o_r < count) & (e < E)
    rows = tl.load(rows_ptr + start + o_r, mask=m_r, other=0).to(tl.int64)
    return e, rows, m_r


@triton.jit
def _routed_row(ids_ptr, pid_m, E, BLOCK_M: tl.constexpr):
    """One token: M block pid_m is the token's pid_m-th routed row alone (the first lane of the tile)."""
    e = tl.load(ids_ptr + pid_m)
    e = tl.minimum(tl.maximum(e, 0), E - 1)  # memory safety only, as in the align kernel
    o = tl.arange(0, BLOCK_M)
    return e, (pid_m + 0 * o).to(tl.int64), o == 0


@triton.jit
def _block_rows(ids_ptr, counts_ptr, offsets_ptr, rows_ptr, pid_m, E, ONE_TOKEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    if ONE_TOKEN:
        return _routed_row(ids_ptr, pid_m, E, BLOCK_M)
    else:
        return _locate_block(counts_ptr, offsets_ptr, rows_ptr, pid_m, E, BLOCK_M, BLOCK_E)


@triton.jit
def _grouped_gate_up_kernel(
    x_ptr, w_ptr, host_w_ptr, bias_ptr, map_ptr, ids_ptr, counts_ptr, offsets_ptr, rows_ptr, inter_ptr,
    arrivals_ptr, H, I, E, K, num_slots, down_blocks, num_m_blocks,
    stride_xt, stride_we, stride_wn, stride_wk, stride_be, stride_bn,
    gate_step, up_row0,
    ACTIVATION: tl.constexpr, SWIGLU_ALPHA: tl.constexpr, LIMIT: tl.constexpr, CLAMP: tl.constexpr,
    GATED: tl.constexpr,
    HAS_MAP: tl.constexpr, HAS_HOST: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ZERO_ARRIVALS: tl.constexpr, ONE_TOKEN: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DOWN: tl.constexpr,
):
    pid_m, pid_n = _tile(num_m_blocks, I, BLOCK_N, GROUP_M)
    e, rows, m_r = _block_rows(ids_ptr, counts_ptr, offsets_ptr, rows_ptr, pid_m, E, ONE_TOKEN, BLOCK_M, BLOCK_E)
    if e < E:
        tokens = rows // K
        if ZERO_ARRIVALS:
            # The down kernel counts arrivals per (token, N block); zero them here, a launch earlier.
            if pid_n == 0:
                o_j = tl.arange(0, BLOCK_DOWN)
                tl.store(arrivals_ptr + tokens[:, None] * down_blocks + o_j[None, :],
                         tl.zeros([BLOCK_M, BLOCK_DOWN], tl.int32),
                         mask=m_r[:, None] & (o_j[None, :] < down_blocks))
        base = _expert_base(w_ptr, host_w_ptr, map_ptr, e, stride_we, num_slots, HAS_MAP, HAS_HOST)
        o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < I
        o_gate = o_n.to(tl.int64) * gate_step
        o_up = up_row0 + o_n.to(tl.int64) * gate_step
        b_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        b_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < H
            b_x = tl.load(x_ptr + tokens[:, None] * stride_xt + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
            m_w = m_k[:, None] & m_n[None, :]
            b_wg = tl.load(base + o_k[:, None] * stride_wk + o_gate[None, :] * stride_wn, mask=m_w, other=0.0)
            if IEEE:
                b_gate = tl.dot(b_x, b_wg.to(b_x.dtype), b_gate, input_precision="ieee")
            else:
                b_gate = tl.dot(b_x, b_wg.to(b_x.dtype), b_gate)
            if GATED:
                b_wu = tl.load(base + o_k[:, None] * stride_wk + o_up[None, :] * stride_wn, mask=m_w, other=0.0)
                if IEEE:
                    b_up = tl.dot(b_x, b_wu.to(b_x.dtype), b_up, input_precision="ieee")
                else:
                    b_up = tl.dot(b_x, b_wu.to(b_x.dtype), b_up)
        if HAS_BIAS:
            b_gate += tl.load(bias_ptr + e * stride_be + o_gate * stride_bn, mask=m_n, other=0.0).to(tl.float32)[None, :]
            if GATED:
                b_up += tl.load(bias_ptr + e * stride_be + o_up * stride_bn, mask=m_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            b_h = _activate(b_gate, b_up, ACTIVATION, SWIGLU_ALPHA, LIMIT, CLAMP)
        else:
            b_h = _act(b_gate, ACTIVATION)
        tl.store(inter_ptr + rows[:, None] * I + o_n[None, :], b_h.to(inter_ptr.dtype.element_ty),
                 mask=m_r[:, None] & m_n[None, :])


@triton.jit
def _grouped_down_kernel(
    inter_ptr, w_ptr, host_w_ptr, bias_ptr, map_ptr, ids_ptr, counts_ptr, offsets_ptr, rows_ptr, topk_w_ptr,
    partial_ptr, arrivals_ptr, out_ptr, H, I, E, K, num_slots, down_blocks, num_m_blocks,
    stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_ot,
    HAS_MAP: tl.constexpr, HAS_HOST: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    FUSED_COMBINE: tl.constexpr, ONE_TOKEN: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Down GEMM, times the top-k weight, with the top-k combine fused (or left to _sum_partials_kernel).

    K == 1 writes the output directly. Otherwise each routed row's fp32 partial goes to partial[row]; with
    FUSED_COMBINE the program whose arrival completes a token's K rows (for this N block) sums them in k
    order, so the sum is deterministic whichever program finishes last, and no separate combine launch is
    needed. Without it the program only stores its partials, and _sum_partials_kernel adds them up in the
    same order (the same bits): a plain store epilogue, for shapes where the arrival's tail costs more
    than a launch.
    """
    pid_m, pid_n = _tile(num_m_blocks, H, BLOCK_N, GROUP_M)
    e, rows, m_r = _block_rows(ids_ptr, counts_ptr, offsets_ptr, rows_ptr, pid_m, E, ONE_TOKEN, BLOCK_M, BLOCK_E)
    if e < E:
        base = _expert_base(w_ptr, host_w_ptr, map_ptr, e, stride_we, num_slots, HAS_MAP, HAS_HOST)
        o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < H
        b_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, I, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < I
            b_h = tl.load(inter_ptr + rows[:, None] * I + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(base + o_k[:, None] * stride_wk + o_n[None, :].to(tl.int64) * stride_wn,
                          mask=m_k[:, None] & m_n[None, :], other=0.0)
            if IEEE:
                b_acc = tl.dot(b_h, b_w.to(b_h.dtype), b_acc, input_precision="ieee")
            else:
                b_acc = tl.dot(b_h, b_w.to(b_h.dtype), b_acc)
        if HAS_BIAS:
            b_acc += tl.load(bias_ptr + e * stride_be + o_n * stride_bn, mask=m_n, other=0.0).to(tl.float32)[None, :]
        b_acc = b_acc * tl.load(topk_w_ptr + rows, mask=m_r, other=0.0).to(tl.float32)[:, None]
        tokens = rows // K
        m_tile = m_r[:, None] & m_n[None, :]
        if K == 1:
            tl.store(out_ptr + tokens[:, None] * stride_ot + o_n[None, :], b_acc.to(out_ptr.dtype.element_ty),
                     mask=m_tile)
        else:
            tl.store(partial_ptr + rows[:, None] * H + o_n[None, :], b_acc, mask=m_tile)
            if FUSED_COMBINE:
                # Every thread's partial stores must be ordered before the (release) arrival.
                tl.debug_barrier()
                arrived = tl.atomic_add(arrivals_ptr + tokens * down_blocks + pid_n, 1, mask=m_r,
                                        sem="acq_rel", scope="gpu")
                m_last = m_r & (arrived == K - 1)
                tl.debug_barrier()
                b_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for kk in range(K):
                    # .cg: read through L2, where the other programs' partials are; never a stale L1 line.
                    b_sum += tl.load(partial_ptr + (tokens * K + kk)[:, None] * H + o_n[None, :],
                                     mask=m_last[:, None] & m_n[None, :], other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + tokens[:, None] * stride_ot + o_n[None, :], b_sum.to(out_ptr.dtype.element_ty),
                         mask=m_last[:, None] & m_n[None, :])


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, H, stride_ot, K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[token] = sum over k, in k order, of the fp32 partials of the token's K routed rows."""
    token = tl.program_id(0).to(tl.int64)
    o_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < H
    b_sum = tl.zeros([BLOCK_N], tl.float32)
    for kk in range(K):
        b_sum += tl.load(partial_ptr + (token * K + kk) * H + o_n, mask=m_n, other=0.0)
    tl.store(out_ptr + token * stride_ot + o_n, b_sum.to(out_ptr.dtype.element_ty), mask=m_n)


# ---------------------------------------------------------------- configurations and launcher
COMBINES = ("fused", "separate")  # config["COMBINE"] (optional, grouped path): see _grouped_down_kernel
GROUP_M = 8  # M blocks that sweep the N blocks together (tile order: see _tile)

def shape_key(hidden: int, inter: int, num_experts: int, top_k: int) -> str:
    """Key of a shape in a tuned table: "H2048-I768-E128-K8"."""
    return f"H{hidden}-I{inter}-E{num_experts}-K{top_k}"


def select_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, interpreting: bool,
                  table: dict | None = None, itemsize: int = 2, arch: int = 90) -> dict:
    """Block configuration from token count, shape and element size, without autotuning.

    `table` (written by bench/tune_moe.py, tuned in bf16) maps shape_key -> {token count: config}; a tuned
    shape takes the entry of the smallest tuned token count >= num_tokens (above the largest, and for
    fp32, the heuristic decides). The heuristic: the grouped path, with tl.dot tiles whose M grows with
    the rows each expert receives; fp32 gets tiles half as deep with 8 warps, widths that are not
    multiples of 64 narrower tiles, and sm_8x (`arch` 80-89: no wgmma, more registers per tile) narrower
    large tiles; each otherwise spills (tests/aot_compile.py compiles them for sm_90 and sm_80).
    The interpreter gets small tiles, and the decode (GEMV) path up to 4 tokens so tests cover it.
    """
    tuned = (table or {}).get(shape_key(hidden, inter, num_experts, top_k)) if itemsize == 2 else None
    if tuned:
        counts = sorted(int(t) for t in tuned)
        pick = next((t for t in counts if t >= num_tokens), None)
        if pick is not None:  # above the largest tuned count the heuristic below decides
            return dict(tuned[str(pick)])
    if interpreting:
        if num_tokens <= 4:
            return {"path": "decode", "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
        return {"path": "grouped", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    # No GEMV path by default on a GPU: on the H200 the grouped path with 16-row tiles beat it at every
    # small token count measured (V2-Lite shape, T=1: 0.046 vs 0.066 ms; T=16: 0.23 vs 0.48 ms; Mixtral
    # T=16: the GEMVs took 2.7 ms, the grouped path 0.92 ms at T=64). The grouped path reads each touched
    # expert once per layer, where the GEMVs stream it once per routed row. Tables can still pick "decode".
    rows_per_expert = num_tokens * top_k / num_experts
    if itemsize >= 4:
        if rows_per_expert <= 16:
            return {"path": "grouped", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
        return {"path": "grouped", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
    aligned = hidden % 64 == 0 and inter % 64 == 0
    if rows_per_expert <= 16:
        if not aligned:
            return {"path": "grouped", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
        return {"path": "grouped", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if rows_per_expert <= 64:
        return {"path": "grouped", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    if arch < 90:
        return {"path": "grouped", "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    return {"path": "grouped", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def fused_moe_launch(x, w_gate_up, w_down, topk_weights, topk_ids, out, *, activation, expert_map,
                     host_w_gate_up, host_w_down, b_gate_up, b_down, gate_up_interleaved, config, launcher=None,
                     gated=True, activation_limit=None, limit_after_activation=False, swiglu_alpha=1.702):
    """Run the expert layer into `out` [T, H]; `launcher` wraps kernels (torch.library.wrap_triton).

    gated: w_gate_up is [E, 2I, H] and the layer computes act(gate) * up; otherwise it is [E, I, H]
    (fc1) and the layer computes act(fc1 x). activation: "silu", "gelu_tanh", "gelu", "relu", "relu2", or
    (gated only) "swiglu_oai", with swiglu_alpha. activation_limit (gated only; None: no clamp): up is
    clamped to [-limit, limit], and the gate to at most limit, or act(gate) with limit_after_activation.
    """
    import torch

    wrap = (lambda k: k) if launcher is None else launcher
    activation_code = ACTIVATION_CODES[activation]
    swiglu_alpha = float(swiglu_alpha)
    if activation_limit is None:
        limit, clamp = 0.0, CLAMP_NONE.value
    else:
        limit, clamp = float(activation_limit), (CLAMP_AFTER if limit_after_activation else CLAMP_BEFORE).value
    T, H = x.shape
    I = w_gate_up.shape[1] // 2 if gated else w_gate_up.shape[1]
    K = topk_ids.shape[1]
    num_rows = T * K
    has_map = expert_map is not None
    has_host = host_w_gate_up is not None
    E = expert_map.numel() if has_map else w_gate_up.shape[0]  # experts, not slots
    num_slots = w_gate_up.shape[0]
    has_bias = b_gate_up is not None
    map_arg = expert_map if has_map else topk_ids
    host_gu = host_w_gate_up if host_w_gate_up is not None else w_gate_up
    host_d = host_w_down if host_w_down is not None else w_down
    bgu = b_gate_up if has_bias else x
    bd = b_down if has_bias else x
    bgu_strides = (b_gate_up.stride(0), b_gate_up.stride(1)) if has_bias else (0, 0)
    bd_strides = (b_down.stride(0), b_down.stride(1)) if has_bias else (0, 0)
    gate_step, up_row0 = (2, 1) if gate_up_interleaved else (1, I if gated else 0)
    inter = torch.empty((num_rows, I), dtype=x.dtype, device=x.device)
    meta = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    BN, BK = config["BLOCK_N"], config["BLOCK_K"]

    if config["path"] == "decode":
        wrap(_gate_up_gemv_kernel)[(num_rows, triton.cdiv(I, BN))](
            x, w_gate_up, host_gu, bgu, topk_ids, map_arg, inter,
            H, I, E, K, num_slots,
            x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), *bgu_strides,
            gate_step, up_row0,
            ACTIVATION=activation_code, SWIGLU_ALPHA=swiglu_alpha, LIMIT=limit, CLAMP=clamp, GATED=gated,
            HAS_MAP=has_map, HAS_HOST=has_host, HAS_BIAS=has_bias, BLOCK_N=BN, BLOCK_K=BK, **meta)
        bn_down = config.get("BLOCK_N_DOWN", BN)
        wrap(_down_combine_gemv_kernel)[(T, triton.cdiv(H, bn_down))](
            inter, w_down, host_d, bd, topk_ids, topk_weights, map_arg, out,
            H, I, E, num_slots,
            w_down.stride(0), w_down.stride(1), w_down.stride(2), *bd_strides, out.stride(0),
            K=K, HAS_MAP=has_map, HAS_HOST=has_host, HAS_BIAS=has_bias, BLOCK_N=bn_down, BLOCK_K=BK, **meta)
        return out

    BM = config["BLOCK_M"]
    ieee = x.dtype.itemsize == 4  # fp32 inputs: exact fp32 products, not TF32
    block_e = triton.next_power_of_2(E)
    one_token = T == 1  # each routed row is an M block of its own: nothing to bucket
    if one_token:
        counts = offsets = rows = topk_ids  # not read
        max_blocks = K
    else:
        counts = torch.empty((2 * E,), dtype=torch.int32, device=x.device)  # counts, then offsets
        offsets = counts[E:]
        rows = torch.empty((num_rows,), dtype=torch.int32, device=x.device)
        align_block = min(4096, triton.next_power_of_2(num_rows))
        wrap(_align_kernel)[(1,)](topk_ids, counts, offsets, rows, num_rows, E, BLOCK=align_block,
                                  BLOCK_E=block_e, num_warps=8 if align_block >= 1024 else 4)
        max_blocks = triton.cdiv(num_rows, BM) + min(E, num_rows)
    down_blocks = triton.cdiv(H, BN)
    combine = K > 1
    fused_combine = config.get("COMBINE", "fused") == "fused"
    # fp32 partials for the combine, and arrival counters for the fused one (stand-ins where unused).
    arrivals = torch.empty((T * down_blocks,) if combine and fused_combine else (1,), dtype=torch.int32,
                           device=x.device)
    partial = torch.empty((num_rows, H) if combine else (1, 1), dtype=torch.float32, device=x.device)
    group_m = config.get("GROUP_M", GROUP_M)
    wrap(_grouped_gate_up_kernel)[(max_blocks * triton.cdiv(I, BN),)](
        x, w_gate_up, host_gu, bgu, map_arg, topk_ids, counts, offsets, rows, inter,
        arrivals, H, I, E, K, num_slots, down_blocks, max_blocks,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), *bgu_strides,
        gate_step, up_row0,
        ACTIVATION=activation_code, SWIGLU_ALPHA=swiglu_alpha, LIMIT=limit, CLAMP=clamp, GATED=gated,
        HAS_MAP=has_map, HAS_HOST=has_host, HAS_BIAS=has_bias, IEEE=ieee, ZERO_ARRIVALS=combine and fused_combine,
        ONE_TOKEN=one_token, GROUP_M=group_m,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_E=block_e, BLOCK_DOWN=triton.next_power_of_2(down_blocks),
        **meta)
    wrap(_grouped_down_kernel)[(max_blocks * down_blocks,)](
        inter, w_down, host_d, bd, map_arg, topk_ids, counts, offsets, rows, topk_weights, partial,
        arrivals, out, H, I, E, K, num_slots, down_blocks, max_blocks,
        w_down.stride(0), w_down.stride(1), w_down.stride(2), *bd_strides, out.stride(0),
        HAS_MAP=has_map, HAS_HOST=has_host, HAS_BIAS=has_bias, IEEE=ieee, FUSED_COMBINE=fused_combine,
        ONE_TOKEN=one_token, GROUP_M=group_m, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_E=block_e, **meta)
    if combine and not fused_combine:
        block_sum = min(1024, triton.next_power_of_2(H))
        wrap(_sum_partials_kernel)[(T, triton.cdiv(H, block_sum))](
            partial, out, H, out.stride(0), K=K, BLOCK_N=block_sum, num_warps=4)
    return out
