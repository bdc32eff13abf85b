"""Property-based checks (hypothesis): drawn shapes, dtypes, non-contiguous routing tensors, expert maps
with host experts, and NaN positions; the Triton path against the fp32 reference, and the expert cache
against the resident weights. CPU-sized (the interpreter runs the kernels here)."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moecache import ops  # noqa: E402
from moecache.cache import ExpertCache  # noqa: E402
from moecache.ops.reference import fused_moe_reference, route_reference  # noqa: E402
from moecache.testing import TOLERANCES, assert_close  # noqa: E402

from builders import DEVICE  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def moe_cases(draw):
    E = draw(st.integers(2, 9))
    K = draw(st.integers(1, min(E, 4)))
    return dict(T=draw(st.integers(1, 22)), H=draw(st.integers(8, 48)), I=draw(st.integers(4, 32)), E=E, K=K,
                dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                strided=draw(st.booleans()), mapped=draw(st.booleans()),
                nan_row=draw(st.one_of(st.none(), st.integers(0, 21))), seed=draw(st.integers(0, 2**16)))


@SETTINGS
@given(moe_cases())
def test_triton_fused_moe_matches_the_reference(case):
    T, H, I, E, K, dtype = case["T"], case["H"], case["I"], case["E"], case["K"], case["dtype"]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(T, H, generator=g).to(DEVICE, dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(DEVICE, dtype)
    wd = (torch.randn(E, H, I, generator=g) / I**0.5).to(DEVICE, dtype)
    wide = min(E, K + 2) if case["strided"] else K
    w, ids = route_reference(torch.randn(T, E, generator=g), wide)
    w, ids = w[:, :K].to(DEVICE), ids[:, :K].to(DEVICE)  # a column slice: non-contiguous when wide > K
    if case["nan_row"] is not None and case["nan_row"] < T:
        w[case["nan_row"], 0] = float("nan")
    kwargs = {}
    if case["mapped"]:
        resident = torch.randperm(E, generator=g)[: max(1, E // 2)]
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[resident] = torch.arange(len(resident), dtype=torch.int32)
        kwargs = dict(expert_map=expert_map.to(DEVICE), host_w_gate_up=wgu.cpu(), host_w_down=wd.cpu())
        slots = (wgu[resident].contiguous(), wd[resident].contiguous())
    else:
        slots = (wgu, wd)
    out = torch.full_like(x, float("nan"))
    ops.fused_moe(x, *slots, w, ids, out=out, backend="triton", **kwargs)
    ref = fused_moe_reference(x, wgu, wd, w, ids)
    nan_rows = torch.isnan(ref).any(dim=1)
    assert torch.equal(torch.isnan(out).any(dim=1), nan_rows)
    if (~nan_rows).any():
        assert_close(out[~nan_rows], ref[~nan_rows], dtype)


@st.composite
def cache_cases(draw):
    E = draw(st.integers(2, 8))
    return dict(L=draw(st.integers(1, 3)), E=E, K=draw(st.integers(1, min(E, 3))), slots=draw(st.integers(1, 10)),
                policy=draw(st.sampled_from(["lru", "lfu", "priority"])),
                misses=draw(st.sampled_from(["auto", "in_place", "copy"])),
                calls=draw(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 24)), min_size=1, max_size=6)),
                seed=draw(st.integers(0, 2**16)))


@SETTINGS
@given(cache_cases())
def test_expert_cache_matches_the_resident_weights(case):
    """Whatever the budget (down to one slot), policy and order of calls, a layer served by the cache
    computes what the resident weights compute."""
    L, E, K, H, I = case["L"], case["E"], case["K"], 16, 8
    g = torch.Generator().manual_seed(case["seed"])
    layers = [((torch.randn(E, 2 * I, H, generator=g) / H**0.5), (torch.randn(E, H, I, generator=g) / I**0.5))
              for _ in range(L)]
    with ExpertCache(layers, num_slots=case["slots"], policy=case["policy"]) as cache:
        for layer, T in case["calls"]:
            layer %= L
            x = torch.randn(T, H, generator=g)
            w, ids = route_reference(torch.randn(T, E, generator=g), K)
            if case["policy"] == "priority":
                cache.set_priorities(layer, torch.rand(E, generator=g))
            out = cache.moe(layer, x, w, ids, misses=case["misses"])
            assert_close(out, fused_moe_reference(x, *layers[layer], w, ids), torch.float32)
        assert cache._core.leases_held() == 0
        s = cache.stats()
        assert s["hits"] + s["misses"] == s["requests"]


@SETTINGS
@given(st.integers(1, 12), st.integers(2, 24), st.integers(1, 4), st.booleans(), st.integers(0, 2**16))
def test_triton_route_matches_the_reference(T, E, K, sigmoid, seed):
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g).to(DEVICE)
    kw = dict(scoring="sigmoid", bias=(torch.randn(E, generator=g) * 0.1).to(DEVICE)) if sigmoid else {}
    w, ids = ops.route(logits, K, backend="triton", **kw)
    ref_w, ref_ids = ops.route(logits, K, backend="torch", **kw)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=TOLERANCES[torch.float32], atol=1e-6)
