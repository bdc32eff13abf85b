"""Top-k expert routing: softmax/sigmoid scores, optional selection bias, group-limited top-k,
renormalisation and scaling, all in one kernel (one program per BLOCK_T tokens, no host sync).

Non-finite input: every row gets K distinct ids in [0, E); a row whose chosen scores are NaN gets NaN
weights (so its tokens' expert output is NaN, as with the plain PyTorch reference), never an id out of
range or a silently finite weight."""
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    T, E, stride_lt, stride_le, scaling,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_BY_TOP2: tl.constexpr,
):
    pid = tl.program_id(0)
    o_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    o_e = tl.arange(0, BLOCK_E)
    m_t = o_t < T
    m_e = o_e < E
    p_logits = logits_ptr + o_t.to(tl.int64)[:, None] * stride_lt + o_e[None, :] * stride_le
    b_x = tl.load(p_logits, mask=m_t[:, None] & m_e[None, :], other=float("-inf")).to(tl.float32)
    b_x = tl.where(m_t[:, None], b_x, 0.0)  # rows past T: finite, never stored
    if SIGMOID:
        b_scores = tl.where(m_e[None, :], 1.0 / (1.0 + tl.exp(-b_x)), 0.0)
    else:
        b_max = tl.max(b_x, axis=1)
        b_p = tl.exp(b_x - b_max[:, None])
        b_p = tl.where(m_e[None, :], b_p, 0.0)
        b_scores = b_p / tl.sum(b_p, axis=1)[:, None]
    b_choice = b_scores
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_e, mask=m_e, other=0.0).to(tl.float32)
        b_choice = b_choice + b_bias[None, :]
    # A NaN score (NaN logits, +inf under softmax, a NaN bias) ranks first, as in a descending sort, so
    # every row still gets K distinct valid ids; its weight stays NaN and so does the token's output.
    b_choice = tl.where(b_choice != b_choice, float("inf"), b_choice)
    b_choice = tl.where(m_e[None, :], b_choice, float("-inf"))

    if N_GROUP > 1:
        group_size = E // N_GROUP
        o_g = tl.arange(0, BLOCK_G)
        g_of_e = o_e // group_size
        b_gscore = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (g_of_e == g)[None, :]
            b_in = tl.where(in_g, b_choice, float("-inf"))
            b_m1 = tl.max(b_in, axis=1)
            if GROUP_BY_TOP2:
                b_i1 = tl.min(tl.where(b_in == b_m1[:, None], o_e[None, :], BLOCK_E), axis=1)
                b_m2 = tl.max(tl.where(o_e[None, :] == b_i1[:, None], float("-inf"), b_in), axis=1)
                b_m1 = b_m1 + b_m2
            b_gscore = tl.where(o_g[None, :] == g, b_m1[:, None], b_gscore)
        # Picked groups are tracked in a mask, not by overwriting their score with -inf: a group whose
        # score is already -inf (a -inf bias) must stay distinguishable from a picked one.
        b_gfree = tl.broadcast_to((o_g < N_GROUP)[None, :], [BLOCK_T, BLOCK_G])
        b_allowed = tl.zeros([BLOCK_T, BLOCK_E], tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            b_gm = tl.max(tl.where(b_gfree, b_gscore, float("-inf")), axis=1)
            b_gi = tl.min(tl.where(b_gfree & (b_gscore == b_gm[:, None]), o_g[None, :], BLOCK_G), axis=1)
            b_allowed = b_allowed | (g_of_e[None, :] == b_gi[:, None])
            b_gfree = b_gfree & (o_g[None, :] != b_gi[:, None])
        b_choice = tl.where(b_allowed & m_e[None, :], b_choice, float("-inf"))
        b_free = b_allowed & m_e[None, :]
    else:
        b_free = tl.broadcast_to(m_e[None, :], [BLOCK_T, BLOCK_E])

    o_k = tl.arange(0, BLOCK_K)
    b_w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    b_id = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for k in tl.static_range(TOP_K):
        # Only experts not yet picked (and in a picked group) compete, so a -inf choice (a -inf bias)
        # can still be picked, once, when nothing better is left.
        b_best = tl.max(tl.where(b_free, b_choice, float("-inf")), axis=1)
        # Ties go to the lowest expert index (torch.topk's order on CUDA, and a stable descending sort's).
        b_idx = tl.min(tl.where(b_free & (b_choice == b_best[:, None]), o_e[None, :], BLOCK_E), axis=1)
        b_val = tl.sum(tl.where(o_e[None, :] == b_idx[:, None], b_scores, 0.0), axis=1)
        b_w = tl.where(o_k[None, :] == k, b_val[:, None], b_w)
        b_id = tl.where(o_k[None, :] == k, b_idx[:, None], b_id)
        b_free = b_free & (o_e[None, :] != b_idx[:, None])
    if RENORMALIZE:
        b_w = b_w / (tl.sum(b_w, axis=1)[:, None] + 1e-20)
    b_w = b_w * tl.cast(scaling, tl.float32)  # fp32 even where torch.compile passes the float as fp64
    m_out = m_t[:, None] & (o_k < TOP_K)[None, :]
    o_out = o_t.to(tl.int64)[:, None] * TOP_K + o_k[None, :]
    tl.store(weights_ptr + o_out, b_w, mask=m_out)
    tl.store(ids_ptr + o_out, b_id, mask=m_out)


def route_launch(logits, bias, weights, ids, top_k, *, sigmoid, renormalize, n_group, topk_group, scaling,
                 group_by_top2, launcher=None):
    """Fill weights fp32 [T, K] and ids int32 [T, K] from logits [T, E]. `launcher` wraps the kernel
    (torch.library.wrap_triton when called inside a custom op)."""
    T, E = logits.shape
    block_e = triton.next_power_of_2(E)
    # One warp per program, few enough tokens that the row reductions stay inside it: for DeepSeek-V3
    # (E = 256, groups) 4 warps x 8 tokens compile to 149 barriers and 724 shuffles at 165 registers,
    # 1 warp x 1 token to 1 barrier and 169 shuffles at 94 (sm_90, ptxas; tests/aot_compile.py).
    block_t = max(1, min(16, 256 // block_e))
    kernel = _route_kernel if launcher is None else launcher(_route_kernel)
    grouped = n_group is not None and n_group > 1
    kernel[(triton.cdiv(T, block_t),)](
        logits, bias if bias is not None else logits, weights, ids,
        T, E, logits.stride(0), logits.stride(1), float(scaling),
        TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        SIGMOID=sigmoid, HAS_BIAS=bias is not None, RENORMALIZE=renormalize,
        N_GROUP=n_group if grouped else 1, TOPK_GROUP=topk_group if grouped else 1,
        BLOCK_G=triton.next_power_of_2(n_group) if grouped else 1, GROUP_BY_TOP2=group_by_top2,
        num_warps=1,
    )
