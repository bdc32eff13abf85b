"""ops.route against direct reimplementations of the transformers routers it mirrors."""
import pytest
import torch

from moecache import ops
from moecache.testing import assert_close

from builders import DEVICE

BACKENDS = ["torch", "triton"]


def mixtral_router(logits, top_k):  # MixtralTopKRouter / Qwen3-MoE / OLMoE with norm_topk_prob
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def qwen2_router_no_norm(logits, top_k):  # Qwen2-MoE / OLMoE, norm_topk_prob=False
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1)


def deepseek_v2_router(logits, top_k, method, n_group, topk_group, scaling):  # DeepseekV2TopkRouter
    scores = logits.float().softmax(dim=-1)
    if method == "group_limited_greedy":
        T, E = scores.shape
        group_scores = scores.view(T, n_group, E // n_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    w, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return w * scaling, ids


def deepseek_v3_router(logits, bias, top_k, n_group, topk_group, norm, scaling):  # DeepseekV3TopkRouter
    scores = logits.float().sigmoid()
    choice = scores + bias
    T, E = scores.shape
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scaling, ids


def _assert_same_routing(w, ids, w_ref, ids_ref):
    """Same experts with the same weights per token (order-free: some routers use sorted=False)."""
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    order, order_ref = ids.long().sort(dim=1), ids_ref.long().sort(dim=1)
    assert torch.equal(order.values, order_ref.values)
    torch.testing.assert_close(w.gather(1, order.indices), w_ref.float().gather(1, order_ref.indices), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (37, 8, 2), (5, 60, 4), (19, 64, 8), (3, 7, 7)], ids=lambda v: str(v))
def test_softmax_renormalized_matches_mixtral(backend, T, E, K):
    logits = torch.randn(T, E) * 2
    w, ids = ops.route(logits, K, backend=backend)
    _assert_same_routing(w, ids, *mixtral_router(logits, K))
    assert torch.equal(ids, ids.gather(1, w.argsort(dim=1, descending=True, stable=True))), "not sorted best first"


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_not_renormalized_matches_qwen2(backend):
    logits = torch.randn(23, 60)
    w, ids = ops.route(logits, 4, renormalize=False, backend=backend)
    _assert_same_routing(w, ids, *qwen2_router_no_norm(logits, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_and_vl2_small(backend, method):
    T, E, K, n_group, topk_group, scaling = 17, 64, 6, 8, 3, 16.0  # DeepSeek-V2(-Lite)/VL2-Small style
    logits = torch.randn(T, E) * 3
    kwargs = dict(n_group=n_group, topk_group=topk_group) if method == "group_limited_greedy" else {}
    w, ids = ops.route(logits, K, renormalize=False, scaling=scaling, backend=backend, **kwargs)
    _assert_same_routing(w, ids, *deepseek_v2_router(logits, K, method, n_group, topk_group, scaling))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,n_group,topk_group,K,scaling", [(256, 8, 4, 8, 2.5), (72, 1, 1, 6, 2.0), (32, 4, 2, 4, 1.0)],
                         ids=["v3", "vl2-base", "small"])
def test_deepseek_v3_noaux_tc(backend, E, n_group, topk_group, K, scaling):
    T = 11
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 0.3
    w, ids = ops.route(logits, K, scoring="sigmoid", bias=bias, n_group=n_group, topk_group=topk_group,
                       scaling=scaling, backend=backend)
    _assert_same_routing(w, ids, *deepseek_v3_router(logits, bias, K, n_group, topk_group, True, scaling))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_expert_id(backend):
    logits = torch.randn(4, 16)
    logits[:, ::3] = 5.0  # six experts tie for first place
    w, ids = ops.route(logits, 4, backend=backend)
    expected = torch.sort(torch.softmax(logits, -1), dim=1, descending=True, stable=True).indices[:, :4]
    assert torch.equal(ids.long(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_logits(backend):
    logits = torch.randn(9, 16).half()
    w, ids = ops.route(logits, 3, backend=backend)
    _assert_same_routing(w, ids, *mixtral_router(logits, 3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=0), "top_k"),
    (dict(top_k=9), "top_k"),
    (dict(top_k=2, scoring="relu"), "scoring"),
    (dict(top_k=2, n_group=3, topk_group=1), "n_group"),
    (dict(top_k=2, n_group=4, topk_group=5), "topk_group"),
    (dict(top_k=5, n_group=4, topk_group=2), "top_k=5 exceeds"),
    (dict(top_k=2, bias=torch.zeros(7)), "bias"),
    (dict(top_k=2, bias=torch.zeros(8), n_group=8, topk_group=4), "one expert per group"),
    (dict(top_k=2, backend="cuda"), "backend"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.route(torch.randn(3, 8), **kwargs)
    with pytest.raises(ValueError, match="router_logits"):
        ops.route(torch.randn(3, 8, 2), 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["nan-logit", "inf-logit-softmax", "all-nan", "nan-bias-sigmoid", "grouped-nan"])
def test_non_finite_rows_get_valid_ids_and_nan_weights(case, backend):
    """Regression: the Triton route returned id E and weight 0 for rows of NaN/inf logits or a NaN bias,
    which the grouped kernel then skipped. Both backends now agree: every row K distinct ids in [0, E),
    NaN weights for a row whose chosen scores are NaN, the other rows untouched."""
    T, E, K = 5, 16, 4
    logits = torch.randn(T, E)
    kw = {}
    if case == "nan-logit":
        logits[2, 7] = float("nan")
    elif case == "inf-logit-softmax":
        logits[2, 3] = float("inf")
    elif case == "all-nan":
        logits[2] = float("nan")
    elif case == "nan-bias-sigmoid":
        kw = dict(scoring="sigmoid", bias=torch.randn(E) * 0.1)
        kw["bias"][5] = float("nan")
    else:
        kw = dict(n_group=4, topk_group=2)
        logits[2, 9] = float("nan")
    w, ids = ops.route(logits, K, backend=backend, **kw)
    assert ((ids >= 0) & (ids < E)).all()
    assert all(len(set(row.tolist())) == K for row in ids)
    ref_w, ref_ids = ops.route(logits, K, backend="torch", **kw)
    bad = torch.isnan(ref_w).any(dim=1)
    if case == "nan-bias-sigmoid":  # the bias only selects: every row picks expert 5 first, weights stay finite
        assert not bad.any() and (ids[:, 0] == 5).all()
    else:
        assert bad.tolist() == [False, False, True, False, False]
    assert torch.equal(torch.isnan(w).any(dim=1), bad)
    assert torch.equal(ids[~bad], ref_ids[~bad]) and torch.allclose(w[~bad], ref_w[~bad])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_or_expanded_bias_is_read_by_its_strides(backend):
    """Regression: the kernel read the bias as a contiguous row, so a strided view picked other experts
    and an expanded one read past its storage."""
    logits = torch.randn(6, 8)
    wide = torch.randn(8, 3)
    for bias in (wide[:, 1], torch.tensor([0.3]).expand(8), torch.randn(16)[::2]):
        w, ids = ops.route(logits, 3, scoring="sigmoid", bias=bias, backend=backend)
        ref_w, ref_ids = deepseek_v3_router(logits, bias.contiguous(), 3, 1, 1, True, 1.0)
        _assert_same_routing(w, ids, ref_w, ref_ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grouped", [False, True], ids=["ungrouped", "grouped"])
def test_experts_with_a_minus_inf_bias_are_picked_last_and_once(backend, grouped):
    """Regression: the kernel marked picked experts with -inf, so with experts disabled by a -inf bias it
    picked the same expert again (and, grouped, the same group again)."""
    E, K = 16, 8
    logits = torch.randn(4, E)
    bias = torch.full((E,), float("-inf"))
    usable = [5, 6, 9, 10, 13, 14]  # two in each of groups 1, 2 and 3 of 4; group 0 scores -inf
    bias[usable] = 0.0
    kw = dict(n_group=4, topk_group=3) if grouped else {}
    w, ids = ops.route(logits, K, scoring="sigmoid", bias=bias, backend=backend, **kw)
    for row, scores in zip(ids.tolist(), logits.sigmoid()):
        assert len(set(row)) == K
        assert row[:6] == sorted(usable, key=lambda e: (-scores[e].item(), e))
        # Then the disabled ones, lowest ids first, and grouped only from the picked groups.
        assert row[6:] == ([4, 7] if grouped else [0, 1])
    assert_close(w, logits.sigmoid().gather(1, ids.long()) / logits.sigmoid().gather(1, ids.long()).sum(1, True),
                 torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeping_every_group_is_no_restriction(backend):
    """Regression: with one expert per group and every group kept, the kernel still scored groups by their
    top two experts (-inf for a lone expert) and returned expert 0 K times."""
    logits, bias = torch.randn(5, 8), torch.randn(8) * 0.1
    plain = ops.route(logits, 3, scoring="sigmoid", bias=bias, backend=backend)
    grouped = ops.route(logits, 3, scoring="sigmoid", bias=bias, n_group=8, topk_group=8, backend=backend)
    assert torch.equal(plain[1], grouped[1]) and torch.equal(plain[0], grouped[0])
    assert all(len(set(row)) == 3 for row in grouped[1].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_argument_types_are_checked(backend):
    logits = torch.randn(4, 8)
    for kw, match in ((dict(top_k=True), "top_k"), (dict(top_k=2, n_group=0), "n_group"),
                      (dict(top_k=2, scaling="2"), "scaling"), (dict(top_k=2, scaling=float("nan")), "scaling"),
                      (dict(top_k=2, n_group=2, topk_group=0), "topk_group")):
        with pytest.raises(ValueError, match=match):
            ops.route(logits, backend=backend, **kw)


@pytest.mark.parametrize("options", [dict(), dict(scoring="sigmoid", renormalize=False, scaling=2.5),
                                     dict(scaling=16.0, n_group=4, topk_group=2)],
                         ids=["softmax-renormalized", "sigmoid-scaled", "grouped"])
def test_route_backward_gives_the_logits_the_gradient_of_the_chosen_weights(options):
    """The chosen experts' weights are differentiable in the logits (the choice is not): with softmax
    scores renormalised over the chosen ones they are a softmax over the chosen logits; sigmoid scores
    without renormalisation are the chosen logits' sigmoids."""
    T, E, K = 7, 8, 3
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, generator=g).to(DEVICE).requires_grad_(True)
    grad_w = torch.randn(T, K, generator=g).to(DEVICE)
    weights, ids = ops.route(logits, K, backend="triton", **options)
    (weights * grad_w).sum().backward()
    expected_logits = logits.detach().clone().requires_grad_(True)
    chosen = expected_logits.gather(1, ids.long())
    scores = chosen.sigmoid() if options.get("scoring") == "sigmoid" else chosen.softmax(-1)
    (scores * options.get("scaling", 1.0) * grad_w).sum().backward()
    assert_close(logits.grad, expected_logits.grad, torch.float32)
