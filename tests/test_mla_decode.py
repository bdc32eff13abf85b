"""ops.mla_decode (Triton kernels; the interpreter on CPU) against decompressed MLA attention in fp64.

The test reference never uses the absorbed form: it expands each cached latent into per-head keys
(k_nope = W_UK latent) and values (v = W_UV latent), runs plain softmax attention with the
un-absorbed query q_nope, and checks the kernel's output (latent space) and out @ W_UV^T against it.
Cache rows a request does not use are NaN and unused block-table entries -1, so any read past
seq_len shows up as NaN.
"""
import math

import pytest
import torch

from moecache import ops
from moecache.ops.mla import mla_decode_reference
from moecache.testing import assert_close

from builders import DEVICE


def make_case(lens, Hq, R=32, P=8, Dn=16, Dv=24, block_size=16, dtype=torch.float32, device=DEVICE, seed=0,
              extra_width=1, unused_entry=-1):
    """Random MLA inputs with a shuffled paged cache: pages are a random permutation of the blocks."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    pages = [math.ceil(n / block_size) for n in lens]
    max_blocks = max(pages) + extra_width
    num_blocks = sum(pages) + 3
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((B, max_blocks), unused_entry, dtype=torch.int64)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    k = 0
    for b, (n, np_) in enumerate(zip(lens, pages)):
        block_table[b, :np_] = perm[k:k + np_]
        t = torch.arange(n)
        used[perm[k + t // block_size], t % block_size] = True
        k += np_
    kv_cache = torch.randn(num_blocks, block_size, R + P, generator=g).to(dtype)
    kv_cache[~used] = float("nan")
    w_uk = torch.randn(Hq, Dn, R, generator=g, dtype=torch.float64) / R**0.5
    w_uv = torch.randn(Hq, Dv, R, generator=g, dtype=torch.float64) / R**0.5
    q_nope = torch.randn(B, Hq, Dn, generator=g, dtype=torch.float64)
    q_rope = torch.randn(B, Hq, P, generator=g).to(dtype)
    q_latent = torch.einsum("bhd,hdr->bhr", q_nope, w_uk).to(dtype)  # W_UK absorbed into the query
    to = dict(device=device)
    return dict(q_latent=q_latent.to(**to), q_rope=q_rope.to(**to), kv_cache=kv_cache.to(**to),
                block_table=block_table.to(device=device, dtype=torch.int32),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                scale=(Dn + P) ** -0.5, q_nope=q_nope.to(**to), w_uk=w_uk.to(**to), w_uv=w_uv.to(**to))


def op_args(case):
    return {k: case[k] for k in ("q_latent", "q_rope", "kv_cache", "block_table", "seq_lens", "scale")}


def decompressed_attention(case):
    """fp64 MLA the long way: per-head keys [k_nope | k_rope] and values from each token's latent.

    Returns (latent-space output [B, Hq, R], lse [B, Hq], value-space output [B, Hq, Dv]).
    """
    kv, table = case["kv_cache"].double(), case["block_table"].long()
    R = case["q_latent"].shape[2]
    block_size = kv.shape[1]
    outs, lses, attns = [], [], []
    for b, n in enumerate(case["seq_lens"].tolist()):
        t = torch.arange(n, device=kv.device)
        rows = kv[table[b, t // block_size], t % block_size]                  # [n, R + P]
        latent, k_rope = rows[:, :R], rows[:, R:]
        k_nope = torch.einsum("hdr,tr->htd", case["w_uk"], latent)            # [Hq, n, Dn]
        v = torch.einsum("hvr,tr->htv", case["w_uv"], latent)                 # [Hq, n, Dv]
        scores = torch.einsum("hd,htd->ht", case["q_nope"][b], k_nope)
        scores = (scores + case["q_rope"][b].double() @ k_rope.T) * case["scale"]
        p = torch.softmax(scores, dim=-1)
        outs.append(p @ latent)
        lses.append(torch.logsumexp(scores, dim=-1))
        attns.append(torch.einsum("ht,htv->hv", p, v))
    return torch.stack(outs), torch.stack(lses), torch.stack(attns)


def check_against_decompressed(case, out, lse, dtype):
    ref_out, ref_lse, ref_attn = decompressed_attention(case)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype, name="lse")
    # The caller applies W_UV: the result is attention over the decompressed values.
    assert_close(torch.einsum("bhr,hvr->bhv", out.double(), case["w_uv"]), ref_attn, dtype, name="out @ W_UV^T")


CASES = [  # (lens, Hq, R, P, block_size)
    ([1], 1, 32, 8, 16),                   # one token, one head
    ([1, 37, 130], 4, 32, 8, 16),          # mixed lengths, not multiples of the block size
    ([70, 64], 16, 32, 8, 64),             # one block of 16 heads; a full page and a partial one
    ([45, 17], 20, 32, 8, 16),             # 20 heads: a padded head block
    ([50, 24, 3], 4, 32, 8, 24),           # a non-power-of-two block size
    ([33, 9], 4, 40, 12, 16),              # non-power-of-two R and P (masked padding)
    ([5, 80, 1, 16, 17, 33, 2, 64], 4, 32, 8, 16),  # B = 8: one split on CPU (no combine launch)
]


def case_id(c):
    lens, Hq, R, P, bs = c
    return f"B{len(lens)}-H{Hq}-S{'.'.join(map(str, lens))}-R{R}-P{P}-bs{bs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens,Hq,R,P,block_size", CASES, ids=[case_id(c) for c in CASES])
def test_matches_decompressed_attention(lens, Hq, R, P, block_size, dtype):
    case = make_case(lens, Hq, R=R, P=P, block_size=block_size, dtype=dtype)
    out, lse = ops.mla_decode(**op_args(case), backend="triton", return_lse=True)
    check_against_decompressed(case, out, lse, dtype)
    assert torch.equal(ops.mla_decode(**op_args(case), backend="triton"), out)  # deterministic


def _launch(case, launched=None, **overrides):
    """The launcher directly, with config overrides (split count, head block)."""
    from moecache.kernels import INTERPRETING
    from moecache.kernels.mla_decode import mla_decode_launch, select_config

    q_latent, q_rope, kv, table = case["q_latent"], case["q_rope"], case["kv_cache"], case["block_table"]
    B, Hq, R = q_latent.shape
    config = select_config(B, Hq, R, q_rope.shape[2], kv.shape[1], table.shape[1], 4, INTERPRETING)
    config.update(overrides)
    out = torch.full((B, Hq, R), float("nan"), dtype=q_latent.dtype, device=q_latent.device)
    lse = torch.full((B, Hq), float("nan"), dtype=torch.float32, device=q_latent.device)

    def launcher(kernel):
        if launched is not None:
            launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return kernel

    mla_decode_launch(q_latent, q_rope, kv, table, case["seq_lens"], out, lse, scale=case["scale"],
                      config=config, launcher=launcher)
    return out, lse


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 16, 128], ids=lambda s: f"splits{s}")
def test_split_counts_and_empty_splits(splits):
    """Any split count gives the same answer: splits past a request's pages (lengths 1 and 9 here)
    hold no tokens and must drop out of the combine; one split writes the output directly."""
    case = make_case([1, 9, 100], 4, block_size=16)
    launched = []
    out, lse = _launch(case, launched, num_splits=splits)
    check_against_decompressed(case, out, lse, torch.float32)
    assert len(launched) == (1 if splits == 1 else 2), launched


def test_combine_in_column_blocks():
    """40 splits (a 64-row tile of partials) over R = 96: the combine takes 64 columns per program, so
    two programs per head, the second one half masked; every split's weight reaches every column."""
    from moecache.kernels.mla_decode import combine_columns

    assert combine_columns(128, 64) == 64
    case = make_case([300, 17, 129], 4, R=96, block_size=8)
    out, lse = _launch(case, num_splits=40)
    check_against_decompressed(case, out, lse, torch.float32)


def test_a_batch_past_the_grid_axis_limit_launches():
    """CUDA caps grid axes 1 and 2 at 65535: 70000 requests still launch (the split kernel's grid is one
    axis; the combine puts requests on axis 0)."""
    from moecache.kernels.mla_decode import mla_decode_launch, select_config

    B, Hq, R, P, block_size, max_blocks = 70000, 16, 512, 64, 64, 8
    grids = []

    def launcher(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: grids.append(tuple(grid))
        return Grid()

    meta = dict(device="meta")
    config = select_config(B, Hq, R, P, block_size, max_blocks, 132, False)
    config["num_splits"] = 2  # both launches
    mla_decode_launch(torch.empty(B, Hq, R, **meta), torch.empty(B, Hq, P, **meta),
                      torch.empty(64, block_size, R + P, **meta), torch.empty(B, max_blocks, dtype=torch.int32, **meta),
                      torch.empty(B, dtype=torch.int32, **meta), torch.empty(B, Hq, R, **meta),
                      torch.empty(B, Hq, **meta), scale=0.1, config=config, launcher=launcher)
    assert len(grids) == 2
    for grid in grids:
        assert all(g <= 65535 for g in grid[1:]), grids
    assert grids[0] == (B * 2,) and grids[1][:2] == (B, Hq), grids


@pytest.mark.parametrize("block_size,block_n", [(32, 32), (64, 16), (48, 32)], ids=["page-32rows", "page-16rows", "per-token"])
def test_steps_within_a_page_and_across_pages(block_size, block_n):
    """A step that lies within one page looks the page up once (block sizes BLOCK_N divides); otherwise
    every row looks up its own page (48-token pages, 32-row steps). Both read the same rows."""
    case = make_case([1, 47, 100, 129], 4, block_size=block_size)
    out, lse = _launch(case, BLOCK_N=block_n, num_splits=3)
    check_against_decompressed(case, out, lse, torch.float32)


def test_split_count_fills_whole_waves():
    """The split count minimises waves x pages per program: 64 requests of 64 pages with 2 programs on
    each of 132 SMs take 4 splits (256 programs, one wave of 16 pages), not 5 (two waves of 13)."""
    from moecache.kernels.mla_decode import select_config

    config = select_config(64, 16, 512, 64, 64, 64, 132, False, itemsize=2)
    assert (config["num_splits"], config["blocks_per_sm"]) == (4, 2)
    # One request: as many splits as its pages allow (>= 256 tokens each), one wave.
    assert select_config(1, 16, 512, 64, 64, 64, 132, False, itemsize=2)["num_splits"] == 16
    # Splits as short as 64 tokens (bench_mla times this beside the default): one 4K request in 64.
    assert select_config(1, 16, 512, 64, 64, 64, 132, False, itemsize=2, min_split_tokens=64)["num_splits"] == 64
    assert select_config(64, 16, 512, 64, 64, 64, 132, False, itemsize=2, min_split_tokens=64)["num_splits"] == 4
    # One request of 32K tokens: 128 splits of 256 tokens, about one program per SM.
    assert select_config(1, 16, 512, 64, 64, 512, 132, False, itemsize=2)["num_splits"] == 128
    # More requests than programs fit: no split (the combine would only add bytes).
    assert select_config(512, 16, 512, 64, 64, 64, 132, False, itemsize=2)["num_splits"] == 1


def test_head_block_follows_the_architecture():
    """R = 512 in fp16/bf16: 64 heads a block on sm_90 (the size at which Triton gives the dots warpgroup
    MMAs, checked in tests/aot_compile.py), 32 on sm_80; fp32 rows 16; few heads are padded only to 16."""
    from moecache.kernels.mla_decode import select_config

    def pick(Hq, **kw):
        c = select_config(64, Hq, 512, 64, 64, 64, 132, False, **kw)
        return c["BLOCK_H"], c["num_warps"], c["blocks_per_sm"]

    assert pick(128, itemsize=2, arch=90) == (64, 8, 1)
    assert pick(40, itemsize=2, arch=90) == (64, 8, 1)
    assert pick(128, itemsize=2, arch=80) == (32, 8, 1)
    assert pick(128, itemsize=4, arch=90) == (16, 8, 1)
    assert pick(16, itemsize=2, arch=90) == (16, 4, 2)
    assert pick(16, itemsize=2, arch=90, block_h=64) == (64, 8, 1)  # an override re-derives warps and splits
    with pytest.raises(ValueError, match="block_h"):
        select_config(64, 16, 512, 64, 64, 64, 132, False, block_h=48)


def test_sixty_four_row_head_block_at_deepseek_width():
    """The sm_90 configuration for many heads at R = 512 (fp16; the interpreter): 40 heads in one 64-row
    block, 24 rows of it padding. The outputs are views of taller buffers whose extra head rows must stay
    untouched, and NaN cache rows past each length would show any stray read."""
    from moecache.kernels.mla_decode import mla_decode_launch, select_config

    case = make_case([70, 3, 129], 40, R=512, P=64, block_size=32, dtype=torch.float16)
    config = select_config(3, 40, 512, 64, 32, case["block_table"].shape[1], 4, True, itemsize=2, arch=90)
    assert config["BLOCK_H"] == 64
    for splits in (1, 2):  # the final output written directly, and through the combine
        out_rows = torch.full((3, 64, 512), float("nan"), dtype=torch.float16)
        lse_rows = torch.full((3, 64), float("nan"))
        out, lse = out_rows[:, :40], lse_rows[:, :40]
        mla_decode_launch(case["q_latent"], case["q_rope"], case["kv_cache"], case["block_table"], case["seq_lens"],
                          out, lse, scale=case["scale"], config={**config, "num_splits": splits})
        check_against_decompressed(case, out, lse, torch.float16)
        assert out_rows[:, 40:].isnan().all() and lse_rows[:, 40:].isnan().all()


def test_value_checks_read_the_device_once(monkeypatch):
    from moecache.ops.mla import _check_mla_args

    from builders import count_host_reads

    case = make_case([5, 40, 17], 4, block_size=16)
    reads = count_host_reads(monkeypatch)
    _check_mla_args(case["q_latent"], case["q_rope"], case["kv_cache"], case["block_table"], case["seq_lens"],
                    case["scale"])
    assert reads == ["tolist"]


def test_several_head_blocks():
    """20 heads in blocks of 16: two head blocks re-read the same pages."""
    case = make_case([40, 7], 20, block_size=16)
    out, lse = _launch(case, BLOCK_H=16, num_splits=2)
    check_against_decompressed(case, out, lse, torch.float32)


def test_minimum_split_length():
    """min_split_pages (256 tokens on the GPU) caps how finely a request is cut."""
    case = make_case([100, 30], 4, block_size=16)
    out, lse = _launch(case, num_splits=8, min_split_pages=3)
    check_against_decompressed(case, out, lse, torch.float32)


def test_unused_table_entries_are_never_read():
    case = make_case([20, 3], 4, block_size=16, extra_width=3, unused_entry=2**30)
    out, lse = ops.mla_decode(**op_args(case), backend="triton", return_lse=True)
    check_against_decompressed(case, out, lse, torch.float32)


def test_strided_cache_view():
    """A cache that is a view into a wider buffer (page and row strides only; unit last stride)."""
    case = make_case([30, 50], 4, block_size=16)
    kv = case["kv_cache"]
    wide = torch.full((kv.shape[0], kv.shape[1], kv.shape[2] + 8), float("nan"), device=kv.device)
    wide[..., :kv.shape[2]] = kv
    case["kv_cache"] = wide[..., :kv.shape[2]]
    out, lse = ops.mla_decode(**op_args(case), backend="triton", return_lse=True)
    check_against_decompressed(case, out, lse, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_backend_is_the_reference(dtype):
    case = make_case([1, 37, 130], 4, dtype=dtype)
    out, lse = ops.mla_decode(**op_args(case), backend="torch", return_lse=True)
    check_against_decompressed(case, out, lse, dtype)
    ref_out, ref_lse = mla_decode_reference(**op_args(case), return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    if DEVICE == "cpu":  # "auto" on CPU tensors is the reference
        assert torch.equal(ops.mla_decode(**op_args(case)), ref_out)


def test_the_reference_computes_in_fp32_under_autocast():
    """Regression: inside torch.autocast the reference's products ran in autocast's dtype (5e-3 off in bf16)
    though it states fp32 math, so the torch backend disagreed with the kernels there."""
    case = make_case([1, 37, 130], 4, dtype=torch.float32)
    want = ops.mla_decode(**op_args(case), backend="torch")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = ops.mla_decode(**op_args(case), backend="torch")
    assert got.dtype == torch.float32 and torch.equal(got, want)


def _bad(match, **overrides):
    case = make_case([5, 20], 4, block_size=16, extra_width=1)
    args = op_args(case)
    kwargs = {"backend": "triton"}
    for k, v in overrides.items():
        (args if k in args else kwargs)[k] = v
    with pytest.raises(ValueError, match=match):
        ops.mla_decode(**args, **kwargs)


def test_bad_input_names_the_argument():
    case = make_case([5, 20], 4, block_size=16, extra_width=1)
    ql, qr, kv, bt, sl = (case[k] for k in ("q_latent", "q_rope", "kv_cache", "block_table", "seq_lens"))
    _bad("q_latent must be a 3-D", q_latent=ql[0])
    _bad("q_rope must be", q_rope=qr[:1])
    _bad("q_rope must be", q_rope=qr[:, :2])
    _bad("kv_cache must be", kv_cache=kv[..., :-1])
    _bad("kv_cache dtype", kv_cache=kv.half())
    _bad("q_rope dtype", q_rope=qr.half())
    _bad("q_latent must be fp16/bf16/fp32", q_latent=ql.double(), q_rope=qr.double(), kv_cache=kv.double())
    _bad("kv_cache must have a unit stride", kv_cache=kv.transpose(0, 2).contiguous().transpose(0, 2))
    _bad("block_table must be int32", block_table=bt.long())
    _bad(r"block_table must be \[B=2", block_table=bt[:1])
    _bad("seq_lens must be int32", seq_lens=sl.long())
    _bad(r"seq_lens must be \[B=2\]", seq_lens=sl[:1])
    _bad(r"seq_lens must lie in \[1, max_blocks \* block_size = 48\]", seq_lens=torch.tensor([0, 20], dtype=torch.int32, device=sl.device))
    _bad(r"seq_lens must lie in \[1, max_blocks \* block_size = 48\]", seq_lens=torch.tensor([49, 20], dtype=torch.int32, device=sl.device))
    bad_table = bt.clone()
    bad_table[1, 1] = kv.shape[0]
    _bad(r"block_table\[1, 1\] = \d+ must lie in \[0, num_blocks=", block_table=bad_table)
    bad_table[1, 1] = -1
    _bad(r"block_table\[1, 1\] = -1 must lie in", block_table=bad_table)
    _bad("scale must be a finite float", scale=float("nan"))
    _bad("backend", backend="numpy")
    _bad("validate must be a bool", validate="no")


@pytest.mark.parametrize("skip", ["environment", "argument"])
def test_value_checks_skip_when_disabled(skip, monkeypatch):
    """MOECACHE_VALIDATE=0 (as while compiling/capturing) or validate=False skips the checks that read
    values; the kernel clamps, so a bad page index still reads inside the cache."""
    case = make_case([5, 20], 4, block_size=16)
    case["kv_cache"] = torch.nan_to_num(case["kv_cache"], nan=0.5)  # the clamped page may be an unused one
    case["block_table"][1, 0] = 10**6
    if skip == "environment":
        monkeypatch.setenv("MOECACHE_VALIDATE", "0")
    out = ops.mla_decode(**op_args(case), backend="triton", **({"validate": False} if skip == "argument" else {}))
    clamped = {**case, "block_table": case["block_table"].clamp(max=case["kv_cache"].shape[0] - 1)}
    assert_close(out, mla_decode_reference(**op_args(clamped)), torch.float32)


def test_unchecked_pages_and_lengths_clamp_alike_in_both_backends():
    """validate=False: a page out of range (either side) reads the nearest page and a request with no
    tokens gives zeros and lse -inf, in the torch backend as in the kernel."""
    case = make_case([5, 20, 9], 4, block_size=16)
    case["kv_cache"] = torch.nan_to_num(case["kv_cache"], nan=0.5)
    case["block_table"][1, 0] = 10**6
    case["block_table"][2, 0] = -1
    case["seq_lens"][0] = 0
    got = {backend: ops.mla_decode(**op_args(case), backend=backend, validate=False, return_lse=True)
           for backend in ("torch", "triton")}
    assert_close(got["torch"][0], got["triton"][0], torch.float32)
    assert torch.equal(got["torch"][0][0], torch.zeros_like(got["torch"][0][0]))
    assert torch.isneginf(got["torch"][1][0]).all() and torch.isneginf(got["triton"][1][0]).all()
    assert torch.isfinite(got["torch"][0][1:]).all()


def test_a_first_step_of_minus_inf_scores_weighs_those_tokens_zero():
    """Regression: every score of a split's first step -inf (a -inf in the cache) gave exp2(-inf - -inf)
    = NaN for the whole request; the reference weighs those tokens 0."""
    case = make_case([40, 7], 4, block_size=16)
    first_page = case["block_table"][0, 0]
    case["q_rope"][0, :, 0] = case["q_rope"][0, :, 0].abs() + 0.1
    case["kv_cache"][first_page, :, -case["q_rope"].shape[2]] = float("-inf")  # rope element 0 of 16 rows
    ref = mla_decode_reference(**op_args(case))
    assert torch.isfinite(ref).all()
    out = ops.mla_decode(**op_args(case), backend="triton")
    assert_close(out, ref, torch.float32)
    # every score of request 1 -inf: zeros and lse -inf from both backends
    case["q_rope"][1, :, 0] = case["q_rope"][1, :, 0].abs() + 0.1
    case["kv_cache"][case["block_table"][1, 0], :, -case["q_rope"].shape[2]] = float("-inf")
    for backend in ("torch", "triton"):
        out, lse = ops.mla_decode(**op_args(case), backend=backend, return_lse=True)
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all(), backend
        assert_close(out[0], ref[0], torch.float32)


# ------------------------------------------------------------------ GPU (bf16 at DeepSeek sizes, compile, graphs)
DEEPSEEK = dict(R=512, P=64, Dn=128, Dv=128, block_size=64, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_gpu_validate_false_never_synchronises():
    """validate=False enqueues the step without a host sync; the default checks sync once (caught)."""
    case = make_case([1, 777, 4096], 16, **DEEPSEEK)
    ops.mla_decode(**op_args(case), validate=False)  # compiles the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.mla_decode(**op_args(case), validate=False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            ops.mla_decode(**op_args(case))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(out, mla_decode_reference(**op_args(case)), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq", [16, 40, 128])  # 40: a padded 64-row head block on sm_90
@pytest.mark.parametrize("lens", [[1, 777, 4096, 5000], [5000, 4999, 64, 65]], ids=["mixed", "long"])
def test_gpu_bf16_deepseek_sizes(Hq, lens):
    case = make_case(lens, Hq, **DEEPSEEK)
    out, lse = ops.mla_decode(**op_args(case), return_lse=True)  # auto = triton on CUDA
    check_against_decompressed(case, out, lse, torch.bfloat16)
    ref_out, ref_lse = mla_decode_reference(**op_args(case), return_lse=True)
    assert_close(out, ref_out, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_bf16_one_long_request_many_splits():
    """One 32K-token request: over a hundred splits, so the combine's tallest tile (128 splits x 32
    columns) runs at DeepSeek sizes."""
    from moecache.kernels.mla_decode import select_config

    case = make_case([32000], 16, **DEEPSEEK)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert select_config(1, 16, 512, 64, DEEPSEEK["block_size"], case["block_table"].shape[1], sms,
                         False)["num_splits"] > 64
    out, lse = ops.mla_decode(**op_args(case), return_lse=True)
    check_against_decompressed(case, out, lse, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("B,block_size", [(1, 64), (64, 16), (200, 64), (8, 24)],
                         ids=["B1", "B64-bs16", "B200", "B8-bs24-per-token-pages"])
def test_gpu_bf16_batch_and_block_sizes(B, block_size):
    lens = torch.randint(1, 1500, (B,), generator=torch.Generator().manual_seed(B)).tolist()
    case = make_case(lens, 16, **{**DEEPSEEK, "block_size": block_size})
    out = ops.mla_decode(**op_args(case))
    assert_close(out, mla_decode_reference(**op_args(case)), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_with_new_lengths():
    """Captured once, replayed as the requests grow: no host value is baked into the graph."""
    case = make_case([300, 1, 2000, 4000], 16, **DEEPSEEK)
    args = op_args(case)
    full = case["seq_lens"].clone()
    args["seq_lens"] = (full - 200).clamp_min(1).to(torch.int32)
    holder = {}

    def step():
        holder["out"], holder["lse"] = ops.mla_decode(**args, return_lse=True)

    step()  # warm-up (compiles the kernels) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lens in (args["seq_lens"].clone(), full):
        args["seq_lens"].copy_(lens)
        holder["out"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = mla_decode_reference(**args, return_lse=True)
        assert_close(holder["out"], ref_out, torch.bfloat16)
        assert_close(holder["lse"], ref_lse, torch.float32, rtol=1e-3, name="lse")


@pytest.mark.compile
@pytest.mark.gpu
def test_gpu_compiles_fullgraph():
    case = make_case([100, 1000], 16, **DEEPSEEK)
    args = op_args(case)
    w_uv = case["w_uv"].to(torch.bfloat16)

    def attention(q_latent, q_rope):
        o = ops.mla_decode(q_latent, q_rope, args["kv_cache"], args["block_table"], args["seq_lens"],
                           scale=args["scale"])
        return torch.einsum("bhr,hvr->bhv", o, w_uv)

    compiled = torch.compile(attention, fullgraph=True)
    assert_close(compiled(args["q_latent"], args["q_rope"]), attention(args["q_latent"], args["q_rope"]),
                 torch.bfloat16)


@pytest.mark.parametrize("where", ["q_latent", "q_rope", "used_latent", "used_rope"])
def test_nan_input_gives_nan_output_for_that_request_only(where):
    """Regression: a NaN in q gave zeros and a NaN in a used cache row a finite output; the reference
    (and now the kernel, through the split combine too) gives NaN for that request and head."""
    case = make_case([40, 100], 4, block_size=16)
    if where == "q_latent":
        case["q_latent"][1, 2, 5] = float("nan")
    elif where == "q_rope":
        case["q_rope"][1, 2, 3] = float("nan")
    else:
        page = case["block_table"][1, 3].item()  # request 1's tokens 48..63: used (length 100)
        case["kv_cache"][page, 5, 7 if where == "used_latent" else 32 + 2] = float("nan")
    out, lse = ops.mla_decode(**op_args(case), backend="triton", return_lse=True)
    ref, ref_lse = mla_decode_reference(**op_args(case), return_lse=True)
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(ref).any(-1))
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    assert torch.isnan(out[1]).any() and not torch.isnan(out[0]).any()
    assert_close(out[0], ref[0], torch.float32)


def test_zero_heads_gives_empty_outputs():
    case = make_case([5, 20], 4, block_size=16)
    args = op_args(case)
    args["q_latent"], args["q_rope"] = args["q_latent"][:, :0], args["q_rope"][:, :0]
    out, lse = ops.mla_decode(**args, backend="triton", return_lse=True)
    assert out.shape == (2, 0, args["q_latent"].shape[2]) and lse.shape == (2, 0)


def test_backward_reaches_the_queries_and_the_pages_read():
    """Gradients of out and lse, checked against attention over each request's tokens gathered one by
    one; cache rows no request reads (NaN here) get zero gradient."""
    case = make_case([5, 20, 33], 4, block_size=16)
    args = op_args(case)
    g = torch.Generator().manual_seed(7)
    B, Hq, R = args["q_latent"].shape
    grad_out = torch.randn(B, Hq, R, generator=g).to(DEVICE)
    grad_lse = torch.randn(B, Hq, generator=g).to(DEVICE)

    def leaves():
        return [args[k].clone().requires_grad_(True) for k in ("q_latent", "q_rope", "kv_cache")]

    got = leaves()
    out, lse = ops.mla_decode(*got, args["block_table"], args["seq_lens"], scale=args["scale"], backend="triton",
                              return_lse=True)
    ((out * grad_out).sum() + (lse * grad_lse).sum()).backward()

    want = leaves()
    q_latent, q_rope, kv_cache = want
    block_size, total = kv_cache.shape[1], 0
    for b, n in enumerate(args["seq_lens"].tolist()):
        t = torch.arange(n)
        rows = kv_cache[args["block_table"][b, t // block_size].long(), t % block_size]
        scores = (q_latent[b] @ rows[:, :R].T + q_rope[b] @ rows[:, R:].T) * args["scale"]
        total = total + (scores.softmax(-1) @ rows[:, :R] * grad_out[b]).sum()
        total = total + (torch.logsumexp(scores, -1) * grad_lse[b]).sum()
    total.backward()
    for name, a, e in zip(("q_latent", "q_rope", "kv_cache"), got, want):
        assert_close(a.grad, torch.nan_to_num(e.grad), torch.float32, name=f"grad {name}")
    unread = torch.isnan(args["kv_cache"])
    assert torch.all(got[2].grad[unread] == 0)


@pytest.mark.skipif(DEVICE != "cpu", reason="the Triton interpreter runs CPU tensors only")
def test_triton_backend_refuses_bf16_under_the_interpreter():
    """Regression: the interpreter's bf16 tl.dot gave finite garbage, silently."""
    case = make_case([5, 17], Hq=4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend='triton' on bfloat16 CPU tensors"):
        ops.mla_decode(**op_args(case), backend="triton")
    out = ops.mla_decode(**op_args(case))  # the torch backend
    ref = mla_decode_reference(**{k: v.float() if getattr(v, "dtype", None) == torch.bfloat16 else v
                                  for k, v in op_args(case).items()})
    assert_close(out.float(), ref, torch.bfloat16)
