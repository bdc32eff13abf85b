"""MLA decode (DeepSeek-V2/V3 multi-head latent attention, one new token per request) over a paged latent
cache, against baselines in the same run on the same device:
  - moecache:        ops.mla_decode(backend="triton") (split kernel + combine), absorbed form, paged cache
                     (the Triton interpreter under --quick, so the smoke run exercises the kernels too)
  - moecache_2stage: the same kernels with 2 pipeline stages (one row buffer: each step waits for its own
                     rows) and splits for about 2 programs per SM, so the gain of the default configuration
                     (two row buffers, splits that fill whole waves) is measured in the same run
  - moecache_64tok:  the default configuration but splits as short as 64 tokens (default: 256), so the
                     cost of more partials against more programs for short requests is measured
  - moecache_h32:    head blocks of 32 (mma.sync on sm_90) where the default takes 64 (sm_90, Hq >= 33 at
                     R = 512: warpgroup MMAs, and half the passes over the cache)
  - moecache_h64:    head blocks of 64 rows where the default takes 16 or 32 (heads padded to 64 rows, as
                     FlashMLA pads them): warpgroup MMAs on sm_90 against up to 4x the MMA work
  - torch_absorbed:  plain PyTorch, absorbed form, same paged cache: one gather of the pages by block
                     table, scores = [q_latent | q_rope] . [latent | rope] (one bmm), fp32 softmax, @ latent
  - transformers:    the installed transformers' DeepseekV2Attention, one decode step of the FULL module
                     (q/kv/o projections + DynamicCache append + kv_b_proj re-expansion of the whole cache
                     + attention) on a DynamicCache filled with the same S latent tokens per request

Grid: Hq in {16, 32, 128} x (B, S) in {(1,4K), (1,32K), (8,4K), (32,4K), (64,4K), (128,4K)}, DeepSeek sizes
(kv_lora_rank R=512, rope P=64, qk_nope 128, v 128), bf16, 64-token pages placed by a random permutation.
On the GPU every method runs as a CUDA-graph replay (launch overhead removed; eager if capture fails,
said in the row) timed by CUDA events with the L2 flushed before each run. Before timing, moecache is
checked against torch_absorbed (and both against the fp32 reference); a wrong point is reported loudly,
not timed, and makes the script exit non-zero.

GB/s counts the latent cache bytes a step must read, B*S*(R+P)*itemsize; ratios are to the HBM read
ceiling (frac_hbm_read, the one printed and judged; frac_hbm is to the copy ceiling) and the bf16 matmul
ceiling, measured at the start of the run; TFLOP/s counts 2*B*Hq*S*(R+P) + 2*B*Hq*S*R.

    python bench/bench_mla.py                      # GPU: full grid, rows appended to bench/results/bench_mla.jsonl
    python bench/bench_mla.py --quick --out x.jsonl  # CPU smoke run (Triton interpreter, tiny sizes, fp32)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, append_rows, cuda_graph_fn, measure_ceilings, row, time_ms  # noqa: E402

from moecache import ops  # noqa: E402  (switches the Triton interpreter on when there is no GPU)
from moecache.compat import attention_cache_argument  # noqa: E402
from moecache.ops.api import sm_count  # noqa: E402
from moecache.ops.mla import mla_decode_config, mla_decode_reference  # noqa: E402
from moecache.testing import TOLERANCES  # noqa: E402

FULL = {"R": 512, "P": 64, "nope": 128, "v": 128, "hidden": 2048, "q_lora_rank": 1536, "block_size": 64,
        "heads": (16, 32, 128), "points": ((1, 4096), (1, 32768), (8, 4096), (32, 4096), (64, 4096), (128, 4096)),
        "dtype": torch.bfloat16}
QUICK = {"R": 32, "P": 8, "nope": 16, "v": 16, "hidden": 64, "q_lora_rank": 32, "block_size": 16,
         "heads": (4,), "points": ((1, 64), (2, 100)), "dtype": torch.float32}
METHODS = ("moecache", "moecache_2stage", "moecache_64tok", "moecache_h32", "moecache_h64", "torch_absorbed",
           "transformers")
VARIANTS = ("moecache_2stage", "moecache_64tok", "moecache_h32", "moecache_h64")  # the same kernels, other configurations
HEAD_BLOCK_VARIANTS = {"moecache_h32": 32, "moecache_h64": 64}
HF_SKIP_BYTES = 20e9  # transformers re-expands the whole cache: B*S*Hq*(192+128)*2 bytes of K and V
REF_MAX_BYTES = 8e9  # fp32 reference check only where its gathered copies fit comfortably


def make_paged_cache(B, S, R, P, block_size, dtype, device, seed=0):
    """Random latent cache (never zeros) in B*ceil(S/block) pages, placed by a random permutation."""
    g = torch.Generator(device=device).manual_seed(seed)
    pages = -(-S // block_size)
    num_blocks = B * pages
    kv_cache = torch.randn(num_blocks, block_size, R + P, device=device, dtype=dtype, generator=g)
    block_table = torch.randperm(num_blocks, device=device, generator=g).view(B, pages).to(torch.int32)
    seq_lens = torch.full((B,), S, dtype=torch.int32, device=device)
    return kv_cache, block_table, seq_lens


def torch_absorbed(q_latent, q_rope, kv_cache, block_table, seq_lens, scale):
    """Plain-PyTorch absorbed MLA decode on the paged cache, batched: a padded gather of every request's
    pages ([B, max_blocks * block_size, R + P]), one bmm for the scores, fp32 softmax with the padding
    masked, one bmm with the latent. Inputs in the cache dtype (bf16 GEMMs accumulate in fp32)."""
    R = q_latent.shape[-1]
    rows = kv_cache[block_table.long()].flatten(1, 2)                                 # [B, T, R + P]
    valid = torch.arange(rows.shape[1], device=rows.device)[None, :] < seq_lens[:, None]  # [B, T]
    q = torch.cat([q_latent, q_rope], dim=-1)                                          # [B, Hq, R + P]
    scores = torch.matmul(q, rows.transpose(1, 2)).float() * scale                     # [B, Hq, T]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(rows.dtype)
    return torch.matmul(probs, rows[..., :R])                                          # [B, Hq, R]


def rel_err(actual, expected):
    """max|a - e| / max|e| (the measure moecache.testing.assert_close bounds), inf if a is not finite."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


class HFStep:
    """One decode step of transformers' DeepseekV2Attention over a DynamicCache holding S tokens.

    The cache is filled through cache.update(k_nope [B,1,S,R], k_pe [B,1,S,P], 0), as the module itself
    does (transformers >= 5.15 caches the latent and re-expands it every step). Each step appends one
    token (torch.cat copies the whole layer) and is followed, inside the timed call, by cache.crop(-1):
    a view (no GPU work) that puts the cache back at S tokens, so every timed step sees S past tokens.
    """

    def __init__(self, spec, Hq, k_nope, k_pe, device, dtype, attn_impl):
        from transformers import DeepseekV2Config, DynamicCache
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention, DeepseekV2RotaryEmbedding

        B, _, S, _ = k_nope.shape
        config = DeepseekV2Config(
            hidden_size=spec["hidden"], num_attention_heads=Hq, num_key_value_heads=Hq, num_hidden_layers=1,
            kv_lora_rank=spec["R"], q_lora_rank=spec["q_lora_rank"], qk_rope_head_dim=spec["P"],
            qk_nope_head_dim=spec["nope"], v_head_dim=spec["v"], max_position_embeddings=max(S + 1, 4096))
        config._attn_implementation = attn_impl
        self.config, self.S = config, S
        with torch.device(device):
            self.attn = DeepseekV2Attention(config, layer_idx=0).to(dtype).eval()
            rotary = DeepseekV2RotaryEmbedding(config)
            g = torch.Generator(device=device).manual_seed(1)
            self.x = torch.randn(B, 1, spec["hidden"], dtype=dtype, generator=g)
            self.o_in = torch.randn(B, 1, Hq * spec["v"], dtype=dtype, generator=g)
            self.pos = rotary(self.x, torch.full((B, 1), S))  # the new token sits at position S
        self.cache = DynamicCache(config=config)
        self.cache.update(k_nope, k_pe, 0)
        layer = self.cache.layers[0]
        self.cache_bytes = layer.keys.numel() * layer.keys.element_size() + \
            layer.values.numel() * layer.values.element_size()
        self.kv_bytes_per_token = self.cache_bytes / (B * S)
        self._held = []

    def step(self):
        layer = self.cache.layers[0]
        # Keep this call's inputs alive: a CUDA graph captured from it reads them on every replay.
        self._held[:] = [layer.keys, layer.values]
        out = self.attn(self.x, position_embeddings=self.pos, attention_mask=None,
                        **{attention_cache_argument(self.attn.forward): self.cache})[0]
        self.cache.crop(-1)
        return out

    def projections(self):
        """The module's per-token projections alone (q_a, q_b, kv_a, o); not kv_b, which HF applies to the cache."""
        a = self.attn
        q = a.q_b_proj(a.q_a_layernorm(a.q_a_proj(self.x))) if a.q_a_proj is not None else a.q_proj(self.x)
        return q, a.kv_a_proj_with_mqa(self.x), a.o_proj(self.o_in)


def timed(fn, *, on_gpu, mode, rep):
    """(timing dict, mode actually used): a CUDA-graph replay where asked and capture works, else eager."""
    if on_gpu and mode == "graph":
        try:
            fn_g = cuda_graph_fn(fn)
        except Exception as exc:  # report, do not hide
            print(f"    CUDA graph capture failed ({type(exc).__name__}: {exc}); timing eagerly")
            torch.cuda.synchronize()
        else:
            return time_ms(fn_g, warmup=5, rep=rep, flush_l2=True, device="cuda"), "graph"
    if on_gpu:
        return time_ms(fn, warmup=3, rep=rep, flush_l2=True, device="cuda"), "eager"
    return time_ms(fn, warmup=1, rep=rep, device="cpu"), "eager"


def back_to_back_us(kv_cache, call, *, rep):
    """Per-call microseconds of n calls captured back to back in one CUDA graph, each on its own copy of
    the cache (n copies > L2, so every call reads HBM), L2 flushed before each replay: the launch and
    event overhead of a single timed replay is spread over n calls, as in a graph-captured model
    whose layers each read their own cache. Used for small caches only."""
    n = max(2, min(32, -(-(256 << 20) // kv_cache.nbytes)))
    copies = [kv_cache] + [kv_cache.clone() for _ in range(n - 1)]
    graph = cuda_graph_fn(lambda: [call(kv) for kv in copies])
    t = time_ms(graph, warmup=3, rep=rep, flush_l2=True, device="cuda")
    return t["ms"] * 1e3 / n, n


def _mla_decode_configured(q_latent, q_rope, kv_cache, block_table, seq_lens, scale, *, min_split_tokens=256,
                           two_stage=False, block_h=None):
    """ops.mla_decode's kernels under another configuration than the op's own (the variants bench_mla
    times beside it)."""
    import triton

    from moecache import kernels
    from moecache.kernels.mla_decode import mla_decode_launch

    B, Hq, R = q_latent.shape
    config = mla_decode_config(q_latent, q_rope, kv_cache, block_table, min_split_tokens=min_split_tokens,
                               block_h=block_h)
    if two_stage:  # the earlier configuration: at most 64 splits, about 2 programs per SM
        most = min(64, triton.cdiv(block_table.shape[1], config["min_split_pages"]))
        head_blocks = triton.cdiv(Hq, config["BLOCK_H"])
        config.update(num_stages=1 if kernels.INTERPRETING else 2,
                      num_splits=max(1, min(most, triton.cdiv(2 * sm_count(q_latent.device), B * head_blocks))))
    out = torch.empty_like(q_latent)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q_latent.device)
    mla_decode_launch(q_latent, q_rope, kv_cache, block_table, seq_lens, out, lse, scale=scale, config=config)
    return out


def mla_decode_2stage(*args):
    """The 2-stage configuration: one row buffer, and splits = cdiv(2 * SMs, B * head blocks) (at most 64,
    each >= 256 tokens on a GPU)."""
    return _mla_decode_configured(*args, two_stage=True)


def mla_decode_short_splits(*args):
    """The op's own rule for the split count, with splits as short as 64 tokens."""
    return _mla_decode_configured(*args, min_split_tokens=64)


def evaluate_targets(rows):
    """The project's speed targets, judged on the moecache rows: [(target, 'pass'|'FAIL'|'n/a', detail)].
    The first is the ratio target (80% of the HBM read rate measured in the same run); the absolute
    figures after it were set against an H100's HBM and are diagnostics on other GPUs."""
    m = {(r["Hq"], r["B"], r["S"]): r for r in rows if r.get("method") == "moecache" and "us" in r}

    def check(name, keys, value, ok, fmt):
        have = [(k, value(m[k])) for k in keys if k in m]
        if not have:
            return name, "n/a", "no measured rows"
        passed = all(ok(v) for _, v in have)
        return name, "pass" if passed else "FAIL", ", ".join(f"Hq{k[0]} B{k[1]} S{k[2]}: {fmt(v)}" for k, v in have)

    def gbps(r):
        return r["gbps"]

    out = [
        check(">= 80% of the measured HBM read rate, 16 heads, B >= 64, S=4K", [(16, 64, 4096), (16, 128, 4096)],
              lambda r: r.get("frac_hbm_read"), lambda v: v is not None and v >= 0.80,
              lambda v: "no read ceiling" if v is None else f"{100 * v:.0f}%"),
        check(">= 2500 GB/s (H100 figure), 16 heads, B >= 64, S=4K", [(16, 64, 4096), (16, 128, 4096)], gbps,
              lambda v: v >= 2500, lambda v: f"{v:.0f} GB/s"),
        check(">= 1600 GB/s (H100 figure), 16 heads, B=8, S=4K", [(16, 8, 4096)], gbps, lambda v: v >= 1600, lambda v: f"{v:.0f} GB/s"),
        check(">= 1800 GB/s (H100 figure), 16 heads, B=1, S=32K", [(16, 1, 32768)], gbps, lambda v: v >= 1800,
              lambda v: f"{v:.0f} GB/s"),
        # Judged on the back-to-back per-call time where measured (the single replay adds launch/event overhead).
        check("<= 12 us, 16 heads, B=1, S=4K", [(16, 1, 4096)], lambda r: (r.get("us_back_to_back", r["us"]), r["us"]),
              lambda v: v[0] <= 12, lambda v: f"{v[0]:.1f} us back to back ({v[1]:.1f} us single replay)"),
    ]
    pairs = [k for k in m if k[0] == 32 and (16,) + k[1:] in m]
    out.append(check("32 heads at the 16-head bandwidth (>= 0.9x)", pairs,
                     lambda r: r["gbps"] / m[(16, r["B"], r["S"])]["gbps"], lambda v: v >= 0.9, lambda v: f"{v:.2f}x"))
    out.append(check(">= 300 TFLOP/s, 128 heads, B >= 64, S=4K", [(128, 64, 4096), (128, 128, 4096)],
                     lambda r: r["tflops"], lambda v: v >= 300, lambda v: f"{v:.0f} TFLOP/s"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", "--json", dest="out", default=str(RESULTS_DIR / "bench_mla.jsonl"),
                        help="append JSON rows to this file (default: bench/results/bench_mla.jsonl)")
    parser.add_argument("--heads", help="comma-separated Hq values (default 16,32,128)")
    parser.add_argument("--points", help="comma-separated BxS points, e.g. 1x4096,64x4096")
    parser.add_argument("--rep", type=int, default=50)
    parser.add_argument("--mode", choices=("graph", "eager"), default="graph", help="GPU timing mode")
    parser.add_argument("--hf-attn", default="sdpa", help="transformers attention implementation (sdpa, eager)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes on CPU, fp32 (checks the script, measures nothing useful)")
    args = parser.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        parser.error("no CUDA device: the full grid needs a GPU (use --quick for the CPU smoke run)")
    on_gpu = not args.quick
    device = "cuda" if on_gpu else "cpu"
    spec = dict(QUICK if args.quick else FULL)
    if args.heads:
        spec["heads"] = tuple(int(h) for h in args.heads.split(","))
    if args.points:
        spec["points"] = tuple(tuple(int(v) for v in p.split("x")) for p in args.points.split(","))
    rep = 3 if args.quick else args.rep
    dtype, R, P, bs = spec["dtype"], spec["R"], spec["P"], spec["block_size"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    scale = (spec["nope"] + P) ** -0.5
    tol = TOLERANCES[dtype]
    dtype_name = str(dtype).replace("torch.", "")
    import transformers

    t_start = time.perf_counter()
    ceilings = measure_ceilings() if on_gpu else {}
    if ceilings:
        print(f"ceilings: HBM copy {ceilings['hbm_gbps']:.0f} GB/s, HBM read {ceilings['hbm_read_gbps']:.0f} GB/s, "
              f"bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s")
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(it, **_):
            return it

    rows, lines, failures = [], [], []
    common_extra = {"transformers": transformers.__version__,
                    "timing_method": ("CUDA-graph replay (unless mode says eager), CUDA events, L2 flushed before each run"
                               if on_gpu else "perf_counter around eager calls (CPU, Triton interpreter)")}
    work = [(B, S, Hq) for (B, S) in spec["points"] for Hq in spec["heads"]]
    state = {}
    with torch.no_grad():
        for B, S, Hq in tqdm(work, desc="bench_mla", disable=not on_gpu):
            first_row = len(rows)
            if state.get("key") != (B, S):
                state.clear()
                if on_gpu:
                    torch.cuda.empty_cache()
                kv_cache, block_table, seq_lens = make_paged_cache(B, S, R, P, bs, dtype, device)
                rows_bs = kv_cache[block_table.long()].flatten(1, 2)[:, :S]  # [B, S, R + P], same tokens, in order
                state.update(key=(B, S), kv=(kv_cache, block_table, seq_lens),
                             hf_latent=(rows_bs[..., :R].unsqueeze(1), rows_bs[..., R:].unsqueeze(1)))
                del rows_bs
            kv_cache, block_table, seq_lens = state["kv"]
            g = torch.Generator(device=device).manual_seed(Hq)
            q_latent = torch.randn(B, Hq, R, device=device, dtype=dtype, generator=g)
            q_rope = torch.randn(B, Hq, P, device=device, dtype=dtype, generator=g)
            latent_bytes = B * S * (R + P) * itemsize
            flops = 2 * B * Hq * S * (R + P) + 2 * B * Hq * S * R
            shape = {"B": B, "S": S, "Hq": Hq, "R": R, "P": P, "qk_nope_head_dim": spec["nope"],
                     "v_head_dim": spec["v"], "block_size": bs, "dtype": dtype_name}
            base = {"method": None, "dtype": dtype_name, "Hq": Hq, "B": B, "S": S, "latent_bytes": latent_bytes,
                    **common_extra}

            # Correctness first: a wrong kernel is not worth timing.
            args_mla = (q_latent, q_rope, kv_cache, block_table, seq_lens)
            out_m = ops.mla_decode(*args_mla, scale=scale, backend="triton")
            out_t = torch_absorbed(*args_mla, scale)
            err = rel_err(out_m, out_t)
            errs = {"max_err_vs_torch_absorbed": err}
            judged, judged_by = err, "torch_absorbed"
            if B * S * (R + P) * 4 * 3 <= REF_MAX_BYTES:
                # The fp32 reference judges where it fits: the bf16 torch baseline carries its own
                # rounding error (as large as the tolerance at B=64), so comparing to it alone misjudges.
                ref = mla_decode_reference(*args_mla, scale=scale)
                errs["max_err_vs_fp32_ref"] = rel_err(out_m, ref)
                errs["torch_absorbed_err_vs_fp32_ref"] = rel_err(out_t, ref)
                judged, judged_by = errs["max_err_vs_fp32_ref"], "the fp32 reference"
                del ref
            del out_t
            if not judged <= tol:
                msg = (f"!!! WRONG RESULT Hq={Hq} B={B} S={S}: moecache vs {judged_by} max rel err {judged:.3e} "
                       f"> {tol:.0e} ({errs}); point not timed")
                print(msg, file=sys.stderr)
                failures.append(msg)
                rows.append({"benchmark": "bench_mla", "shape": shape, "provider": "moecache", **base,
                             "method": "moecache", "error": "wrong result", **errs})
                path = append_rows(args.out, [{**r, "ceilings": ceilings} for r in rows[first_row:]])
                continue

            point = {}
            fns = {
                "moecache": lambda: ops.mla_decode(*args_mla, scale=scale, backend="triton"),
                "moecache_2stage": lambda: mla_decode_2stage(*args_mla, scale),
                "moecache_64tok": lambda: mla_decode_short_splits(*args_mla, scale),
                "torch_absorbed": lambda: torch_absorbed(*args_mla, scale),
                # the op's own configuration with other head blocks (the split count re-derived for them)
                **{name: (lambda h=h: _mla_decode_configured(*args_mla, scale, block_h=h))
                   for name, h in HEAD_BLOCK_VARIANTS.items()},
            }
            default_h = mla_decode_config(*args_mla[:4])["BLOCK_H"]
            for method in METHODS:
                if not {"moecache_h32": default_h > 32, "moecache_h64": default_h < 64}.get(method, True):
                    continue  # the default's own block, or on its side of it
                extra = {}
                if method == "transformers":
                    est = B * S * Hq * (spec["nope"] + P + spec["v"]) * itemsize
                    if est > HF_SKIP_BYTES:
                        reason = (f"would expand the cache to ~{est / 1e9:.0f} GB of K/V "
                                  f"(B*S*Hq*(192+128)*itemsize > {HF_SKIP_BYTES / 1e9:.0f} GB)")
                        rows.append({"benchmark": "bench_mla", "shape": shape, "provider": "transformers",
                                     **base, "method": "transformers", "skipped": reason})
                        lines.append(f"{Hq:>4}{B:>5}{S:>7}  {'transformers':<22}  skipped: {reason}")
                        continue
                try:
                    if method == "transformers":
                        hf = HFStep(spec, Hq, *state["hf_latent"], device, dtype, args.hf_attn)
                        fn = hf.step
                        fn()
                        assert hf.cache.get_seq_length() == S, f"cache holds {hf.cache.get_seq_length()} tokens, not {S}"
                        state["hf_kv_bytes_per_token"] = hf.kv_bytes_per_token
                        proj_t, _ = timed(hf.projections, on_gpu=on_gpu, mode=args.mode, rep=rep)
                        extra = {"what": "full attention module step: q/kv/o projections (hidden "
                                         f"{spec['hidden']}, q_lora_rank {spec['q_lora_rank']}) + DynamicCache append "
                                         "+ kv_b_proj re-expansion of the cache + attention; cache.crop(-1) (a view, "
                                         "no GPU work) inside the timed call keeps the cache at S tokens",
                                 "hidden_size": spec["hidden"], "q_lora_rank": spec["q_lora_rank"],
                                 "attn_implementation": args.hf_attn, "proj_us": proj_t["ms"] * 1e3,
                                 "kv_bytes_per_token": hf.kv_bytes_per_token, "hf_cache_bytes": hf.cache_bytes}
                    else:
                        fn = fns[method]
                        extra = {"kv_bytes_per_token": (R + P) * itemsize}
                        if method == "moecache":
                            extra["backend"] = "triton"
                        if method in VARIANTS:
                            err_variant = rel_err(fn(), out_m)
                            if not err_variant <= tol:
                                raise AssertionError(f"{method} result off by {err_variant:.2e} (> {tol:.0e})")
                            extra["max_err_vs_moecache"] = err_variant
                    timing, mode = timed(fn, on_gpu=on_gpu, mode=args.mode,
                                         rep=rep if method != "transformers" else max(3, rep // 2))
                except Exception as exc:  # report and go on: one baseline failing must not lose the run
                    reason = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                    print(f"  {method} Hq={Hq} B={B} S={S}: {reason}")
                    rows.append({"benchmark": "bench_mla", "shape": shape, "provider": method, **base,
                                 "method": method, "skipped": reason})
                    lines.append(f"{Hq:>4}{B:>5}{S:>7}  {method:<22}  {reason[:100]}")
                    hf = fn = None
                    if on_gpu:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                    continue
                if method == "moecache" and mode == "graph" and latent_bytes < (64 << 20):
                    try:
                        extra["us_back_to_back"], extra["back_to_back_calls"] = back_to_back_us(
                            kv_cache, lambda kv: ops.mla_decode(q_latent, q_rope, kv, block_table, seq_lens,
                                                                scale=scale, backend="triton"), rep=rep)
                    except Exception as exc:
                        print(f"    back-to-back timing failed: {type(exc).__name__}: {exc}")
                hf = fn = None
                if method != "transformers":
                    extra.update(errs if method == "moecache" else
                                 {k: v for k, v in errs.items() if k.startswith("torch_absorbed")})
                r = row("bench_mla", shape, f"{method}:{mode}", timing, bytes_moved=latent_bytes,
                        flops=flops if method != "transformers" else None, ceilings=ceilings,
                        **{**base, "method": method, "mode": mode, "us": timing["ms"] * 1e3}, **extra)
                rows.append(r)
                point[method] = r
            if on_gpu:
                torch.cuda.empty_cache()
            m = point.get("moecache")
            if m:
                for other in (*VARIANTS, "torch_absorbed", "transformers"):
                    if other in point:
                        m[f"speedup_vs_{other}"] = point[other]["us"] / m["us"]
                if "hf_kv_bytes_per_token" in state:
                    m["kv_bytes_per_token_transformers"] = state["hf_kv_bytes_per_token"]
            # After each point: a run stopped at its time limit keeps the points it finished.
            path = append_rows(args.out, [{**r, "ceilings": ceilings} for r in rows[first_row:]])
            for method, r in point.items():
                speed = (f"{r.get('speedup_vs_torch_absorbed', 0):>6.1f}x {r.get('speedup_vs_transformers', 0):>7.1f}x"
                         if method == "moecache" else f"proj {r['proj_us']:.0f} us" if "proj_us" in r else "")
                tfl = f"{r['tflops']:>8.1f}" if "tflops" in r else f"{'':>8}"
                err_s = f"{r['max_err_vs_torch_absorbed']:.1e}" if "max_err_vs_torch_absorbed" in r else ""
                lines.append(f"{Hq:>4}{B:>5}{S:>7}  {method + ':' + r['mode']:<22}{r['us']:>10.1f}{r['gbps']:>8.0f}"
                             f"{100 * r.get('frac_hbm_read', 0):>6.0f}%{tfl}  {speed:<16}{r['kv_bytes_per_token']:>7.0f}  {err_s}"
                             + (f"  back-to-back {r['us_back_to_back']:.1f} us" if "us_back_to_back" in r else ""))

    print(f"{'Hq':>4}{'B':>5}{'S':>7}  {'method:mode':<22}{'us':>10}{'GB/s':>8}{'read%':>7}{'TFLOP/s':>8}  "
          f"{'vs absorbed/HF':<16}{'KV B/tok':>8}  err")
    print("\n".join(lines))
    if on_gpu:
        print("\ntargets (the ratio first; then absolute figures set against an H100; moecache rows):")
        for name, status, detail in evaluate_targets(rows):
            print(f"  [{status:>4}] {name}: {detail}")
    if rows:
        print(f"{len(rows)} rows appended to {path} ({time.perf_counter() - t_start:.1f} s)")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
