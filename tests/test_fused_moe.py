"""ops.fused_moe (Triton kernels; the interpreter on CPU) against the fp32 reference."""
import pytest
import torch

from moecache import ops
from moecache.ops.reference import fused_moe_reference, route_reference
from moecache.testing import assert_close, poisoned

from builders import DEVICE, count_host_reads, random_layer


def run_triton(x, *args, **kwargs):
    out = poisoned(x.shape, x.dtype, x.device)
    result = ops.fused_moe(x, *args, backend="triton", out=out, **kwargs)
    assert result.data_ptr() == out.data_ptr()
    return out


CASES = [  # (T, H, I, E, K): decode-sized and grouped-sized token counts, odd and prime sizes
    (1, 72, 40, 5, 3), (1, 64, 32, 8, 1), (3, 64, 48, 8, 2), (4, 72, 40, 5, 5),
    (5, 72, 40, 5, 3), (16, 64, 32, 16, 2), (37, 72, 40, 7, 2), (20, 48, 24, 4, 1), (9, 32, 16, 4, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,H,I,E,K", CASES, ids=[f"T{c[0]}-H{c[1]}-I{c[2]}-E{c[3]}-K{c[4]}" for c in CASES])
def test_matches_reference(T, H, I, E, K, dtype):
    x, wgu, wd, w, ids = random_layer(T, H, I, E, K, dtype)
    out = run_triton(x, wgu, wd, w, ids)
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_leaves_the_math_in_fp32(backend):
    """Regression: inside torch.autocast the torch backend (the reference) ran its products in autocast's
    dtype (5e-3 off in bf16, and whole models 0.15 off after routing flipped), while the kernels and the
    unpatched fused experts compute fp32 inputs in fp32."""
    x, wgu, wd, w, ids = random_layer(9, 64, 32, 8, 2, torch.float32)
    want = fused_moe_reference(x, wgu, wd, w, ids)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = ops.fused_moe(x, wgu, wd, w, ids, backend=backend)
    assert got.dtype == torch.float32
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("T,K", [(2, 1), (2, 2), (33, 1), (33, 3)], ids=["decode-K1", "decode-K2", "grouped-K1", "grouped-K3"])
def test_all_tokens_on_one_expert_and_most_experts_idle(T, K):
    x, wgu, wd, w, _ = random_layer(T, 40, 24, 12, K, torch.float32)
    ids = (torch.arange(K, device=DEVICE) + 5).repeat(T, 1).to(torch.int32)  # every token -> experts 5..5+K-1
    out = run_triton(x, wgu, wd, w, ids)
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids), torch.float32)


@pytest.mark.parametrize("T", [2, 21], ids=["decode", "grouped"])
def test_expert_map_permutes_slots(T):
    x, wgu, wd, w, ids = random_layer(T, 48, 32, 6, 2, torch.float32)
    perm = torch.randperm(6)
    expert_map = torch.empty(6, dtype=torch.int32)
    expert_map[perm] = torch.arange(6, dtype=torch.int32)  # expert perm[s] sits in slot s
    slots_gu, slots_d = wgu[perm].contiguous(), wd[perm].contiguous()
    out = run_triton(x, slots_gu, slots_d, w, ids, expert_map=expert_map.to(DEVICE))
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids), torch.float32)


@pytest.mark.parametrize("T", [2, 21], ids=["decode", "grouped"])
def test_a_strided_expert_map_is_read_by_its_strides(T):
    """Regression: the kernels read the map as a contiguous row, so a column of a wider table (the value
    checks indexed it correctly) sent tokens to other slots' experts."""
    x, wgu, wd, w, ids = random_layer(T, 48, 32, 6, 2, torch.float32)
    perm = torch.randperm(6)
    table = torch.full((6, 3), 5, dtype=torch.int32)
    table[perm, 1] = torch.arange(6, dtype=torch.int32)  # column 1: expert perm[s] sits in slot s
    out = run_triton(x, wgu[perm].contiguous(), wd[perm].contiguous(), w, ids, expert_map=table[:, 1].to(DEVICE))
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids), torch.float32)


@pytest.mark.parametrize("T", [3, 26], ids=["decode", "grouped"])
def test_non_resident_experts_read_from_host(T):
    E, S = 8, 3  # 8 experts, 3 device slots
    x, wgu, wd, w, ids = random_layer(T, 40, 24, E, 3, torch.float32)
    expert_map = torch.full((E,), -1, dtype=torch.int32)
    resident = [6, 1, 3]
    expert_map[resident] = torch.arange(S, dtype=torch.int32)
    pin = torch.cuda.is_available()
    host_gu, host_d = wgu.cpu(), wd.cpu()
    if pin:
        host_gu, host_d = host_gu.pin_memory(), host_d.pin_memory()
    out = run_triton(x, wgu[resident].contiguous(), wd[resident].contiguous(), w, ids,
                     expert_map=expert_map.to(DEVICE), host_w_gate_up=host_gu, host_w_down=host_d)
    assert (expert_map[ids.cpu().long()] == -1).any(), "the case must route to a non-resident expert"
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids), torch.float32)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu", "relu2"])
@pytest.mark.parametrize("T", [2, 19], ids=["decode", "grouped"])
def test_gated_activations(activation, T):
    x, wgu, wd, w, ids = random_layer(T, 40, 24, 6, 2, torch.float32)
    out = run_triton(x, wgu, wd, w, ids, activation=activation)
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids, activation=activation), torch.float32)


@pytest.mark.parametrize("T", [1, 18], ids=["decode", "grouped"])
def test_gpt_oss_transposed_interleaved_with_biases(T):
    """GPT-OSS keeps gate_up as [E, H, 2I] with gate/up interleaved, biases, and a clamped SwiGLU."""
    E, H, I, K = 6, 40, 24, 2
    x, _, wd, w, ids = random_layer(T, H, I, E, K, torch.float32)
    gpt_oss_gate_up = torch.randn(E, H, 2 * I, device=DEVICE) * 0.6  # large enough to hit the clamp
    b_gu, b_d = torch.randn(E, 2 * I, device=DEVICE), torch.randn(E, H, device=DEVICE)
    view = gpt_oss_gate_up.transpose(1, 2)  # [E, 2I, H] without a copy
    kwargs = dict(activation="swiglu_oai", b_gate_up=b_gu, b_down=b_d, gate_up_interleaved=True)
    out = run_triton(x, view, wd, w, ids, **kwargs)
    ref = fused_moe_reference(x, view, wd, w, ids, **kwargs)
    assert_close(out, ref, torch.float32)


CLAMPS = [  # (activation, limit, after, alpha): DeepSeek-V4 / GLM-5 / HunYuan-V4, Step 3.7 / Ling, MiniMax-M3-like
    ("silu", 0.3, False, None), ("silu", 0.3, True, None), ("gelu_tanh", 0.25, False, None),
    ("swiglu_oai", 0.4, False, 1.3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T", [1, 3, 19], ids=["gemv", "decode", "grouped"])
@pytest.mark.parametrize("activation,limit,after,alpha", CLAMPS,
                         ids=["clamp-before", "clamp-after", "gelu-clamp", "swiglu-oai-own-constants"])
def test_clamped_gated_activations(activation, limit, after, alpha, T, dtype):
    """Limits small enough that random data crosses them in both directions (the clamp is exercised)."""
    x, wgu, wd, w, ids = random_layer(T, 40, 24, 6, 2, dtype)
    kw = dict(activation=activation, activation_limit=limit, limit_after_activation=after, swiglu_alpha=alpha)
    out = run_triton(x, wgu, wd, w, ids, **kw)
    ref = fused_moe_reference(x, wgu, wd, w, ids, **kw)
    assert_close(out, ref, dtype)
    h = x.float() @ wgu[ids[0, 0]].float().t()
    assert (h[0, :24] > limit).any() and (h[0, 24:].abs() > limit).any()  # both clamps bind on some unit
    assert not torch.allclose(ref.float(), fused_moe_reference(x, wgu, wd, w, ids, activation=activation).float(),
                              rtol=1e-2, atol=1e-3)


def test_clamped_activation_reference_written_out():
    """The reference's clamps as the families write them (transformers' _apply_gate)."""
    from moecache.ops.reference import activation_reference
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    silu = torch.nn.functional.silu
    before = silu(gate.clamp(max=2.0)) * up.clamp(-2.0, 2.0)
    after = silu(gate).clamp(max=2.0) * up.clamp(-2.0, 2.0)
    assert torch.equal(activation_reference(gate, up, "silu", activation_limit=2.0), before)
    assert torch.equal(activation_reference(gate, up, "silu", activation_limit=2.0, limit_after_activation=True), after)
    gc, uc = gate.clamp(max=2.0), up.clamp(-2.0, 2.0)
    oai = (uc + 1) * (gc * torch.sigmoid(gc * 1.5))
    assert torch.equal(activation_reference(gate, up, "swiglu_oai", activation_limit=2.0, swiglu_alpha=1.5), oai)
    assert not torch.equal(before, after)


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation_limit=0.0), "activation_limit must be a finite number > 0"),
    (dict(activation_limit=float("inf")), "activation_limit must be a finite number > 0"),
    (dict(activation_limit=True), "activation_limit must be a finite number > 0"),
    (dict(limit_after_activation=True), "limit_after_activation needs an activation_limit"),
    (dict(limit_after_activation=1, activation_limit=1.0), "limit_after_activation must be a bool"),
    (dict(swiglu_alpha=1.0), "swiglu_alpha is swiglu_oai's"),
    (dict(activation="swiglu_oai", swiglu_alpha=-1.0), "swiglu_alpha must be a finite number > 0"),
    (dict(activation="swiglu_oai", activation_limit=1.0, limit_after_activation=True),
     "swiglu_oai clamps its gate before"),
    (dict(activation="relu", gated=False, activation_limit=1.0), "activation_limit clamps the gate and up"),
])
def test_clamp_argument_errors(kwargs, match):
    x, wgu, wd, w, ids = random_layer(3, 16, 8, 4, 2, torch.float32)
    if not kwargs.get("gated", True):
        wgu = wgu[:, :8]
    with pytest.raises(ValueError, match=match):
        ops.fused_moe(x, wgu, wd, w, ids, **kwargs)


@pytest.mark.skipif(DEVICE != "cpu", reason="the Triton interpreter runs CPU tensors only")
def test_triton_backend_refuses_bf16_under_the_interpreter():
    """Regression: the interpreter's bf16 tl.dot gave finite garbage (relative error ~1e10), silently;
    the default CPU backend (torch) computes bf16 right."""
    x, wgu, wd, w, ids = random_layer(4, 32, 16, 4, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="backend='triton' on bfloat16 CPU tensors"):
        ops.fused_moe(x, wgu, wd, w, ids, backend="triton")
    ref = fused_moe_reference(x.float(), wgu.float(), wd.float(), w, ids)
    assert_close(ops.fused_moe(x, wgu, wd, w, ids), ref.to(torch.bfloat16), torch.bfloat16)


def test_zero_tokens():
    x, wgu, wd, w, ids = random_layer(0, 32, 16, 4, 2, torch.float32)
    assert ops.fused_moe(x, wgu, wd, w, ids, backend="triton").shape == (0, 32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens_give_zero_gradients(backend):
    """Regression: the empty output hung off no input, so a backward through a step with no tokens
    raised, or left the experts' gradients None instead of zeros (as a matmul with no rows gives)."""
    x, wgu, wd, w, ids = random_layer(0, 32, 16, 4, 2, torch.float32)
    leaves = [t.requires_grad_() for t in (x, wgu, wd, w)]
    out = ops.fused_moe(x, wgu, wd, w, ids, backend=backend)
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_int64_ids_and_deterministic():
    x, wgu, wd, w, ids = random_layer(23, 32, 16, 5, 2, torch.float32)
    a = run_triton(x, wgu, wd, w, ids.long())
    b = run_triton(x, wgu, wd, w, ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("T,K,launches", [(3, 2, 2), (30, 1, 3), (30, 4, 3)], ids=["decode", "grouped-K1", "grouped-K4"])
def test_launch_count(T, K, launches):
    """Decode is two kernels; the grouped path three (align, gate/up, down with the combine fused; no align
    for one token)."""
    from moecache.kernels import INTERPRETING
    from moecache.kernels.fused_moe import fused_moe_launch, select_config

    x, wgu, wd, w, ids = random_layer(T, 40, 24, 6, K, torch.float32)
    launched = []

    def launcher(kernel):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return kernel

    out = poisoned(x.shape, x.dtype, x.device)
    config = select_config(T, K, 6, 40, 24, INTERPRETING)
    fused_moe_launch(x, wgu, wd, w, ids, out, activation="silu", expert_map=None, host_w_gate_up=None,
                     host_w_down=None, b_gate_up=None, b_down=None, gate_up_interleaved=False,
                     config=config, launcher=launcher)
    assert len(launched) == launches, launched
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids), torch.float32)


@pytest.mark.parametrize("where", ["resident", "map-host"])
@pytest.mark.parametrize("combine", ["fused", "separate"])
@pytest.mark.parametrize("K,bias", [(1, False), (3, True), (6, False)], ids=["K1", "K3-bias", "K6"])
def test_one_token_on_the_grouped_path_needs_no_alignment(K, bias, combine, where):
    """One token: the grouped kernels take its k-th routed row as their k-th M block, so the align launch
    is skipped; resident experts, and a map with non-resident experts read from host memory in place."""
    from moecache.kernels import INTERPRETING
    from moecache.kernels.fused_moe import fused_moe_launch, select_config

    E, S, H, I = 6, 4, 40, 24
    x, wgu, wd, w, ids = random_layer(1, H, I, E, K, torch.float32)
    g = torch.Generator(device="cpu").manual_seed(7)
    b_gate_up = torch.randn(E, 2 * I, generator=g).to(x.device) if bias else None
    b_down = torch.randn(E, H, generator=g).to(x.device) if bias else None
    maps = {}
    if where == "map-host":
        expert_map = torch.tensor([2, -1, 0, -1, 3, 1], dtype=torch.int32, device=x.device)
        slots_gu, slots_d = torch.empty(S, 2 * I, H), torch.empty(S, H, I)
        for e, s in enumerate(expert_map.tolist()):
            if s >= 0:
                slots_gu[s], slots_d[s] = wgu[e], wd[e]
        maps = dict(expert_map=expert_map, host_w_gate_up=wgu, host_w_down=wd)
        weights = (slots_gu.to(x.device), slots_d.to(x.device))
    else:
        maps = dict(expert_map=None, host_w_gate_up=None, host_w_down=None)
        weights = (wgu, wd)
    launched = []

    def launcher(kernel):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return kernel

    config = {**select_config(30, K, E, H, I, INTERPRETING), "COMBINE": combine}
    assert config["path"] == "grouped"
    out = poisoned(x.shape, x.dtype, x.device)
    fused_moe_launch(x, *weights, w, ids, out, activation="silu", b_gate_up=b_gate_up, b_down=b_down, gate_up_interleaved=False, config=config,
                     launcher=launcher, **maps)
    assert "_align_kernel" not in launched and launched[:2] == ["_grouped_gate_up_kernel", "_grouped_down_kernel"]
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids, b_gate_up=b_gate_up, b_down=b_down), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,K,bias", [(30, 4, False), (37, 2, True), (21, 1, False)], ids=["K4", "K2-bias", "K1"])
def test_separate_combine_gives_the_fused_combines_bits(T, K, bias, dtype):
    """COMBINE "separate": the down kernel stores its partials and a fourth kernel adds them in k order,
    the order the fused combine uses, so the two outputs are identical bit for bit (K = 1: no combine)."""
    from moecache.kernels import INTERPRETING
    from moecache.kernels.fused_moe import fused_moe_launch, select_config

    E, H, I = 6, 40, 24
    x, wgu, wd, w, ids = random_layer(T, H, I, E, K, dtype)
    g = torch.Generator(device="cpu").manual_seed(5)
    b_gate_up = torch.randn(E, 2 * I, generator=g).to(dtype=dtype, device=x.device) if bias else None
    b_down = torch.randn(E, H, generator=g).to(dtype=dtype, device=x.device) if bias else None
    outs = {}
    for combine in ("fused", "separate"):
        launched = []

        def launcher(kernel):
            launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
            return kernel

        config = {**select_config(T, K, E, H, I, INTERPRETING), "COMBINE": combine}
        assert config["path"] == "grouped"
        out = poisoned(x.shape, x.dtype, x.device)
        fused_moe_launch(x, wgu, wd, w, ids, out, activation="silu", expert_map=None, host_w_gate_up=None, host_w_down=None, b_gate_up=b_gate_up, b_down=b_down,
                         gate_up_interleaved=False, config=config, launcher=launcher)
        outs[combine] = out
        assert ("_sum_partials_kernel" in launched) == (combine == "separate" and K > 1), launched
    assert_close(outs["fused"], fused_moe_reference(x, wgu, wd, w, ids, b_gate_up=b_gate_up, b_down=b_down), dtype)
    assert torch.equal(outs["separate"], outs["fused"])


def _bad(match, **overrides):
    x, wgu, wd, w, ids = random_layer(4, 32, 16, 4, 2, torch.float32)
    args = dict(hidden_states=x, w_gate_up=wgu, w_down=wd, topk_weights=w, topk_ids=ids)
    kwargs = {"backend": "triton", **{k: v for k, v in overrides.items() if k not in args}}
    args.update({k: v for k, v in overrides.items() if k in args})
    with pytest.raises(ValueError, match=match):
        ops.fused_moe(**args, **kwargs)


def test_bad_input_names_the_argument():
    x, wgu, wd, w, ids = random_layer(4, 32, 16, 4, 2, torch.float32)
    _bad("hidden_states", hidden_states=x[None])
    _bad("w_gate_up", w_gate_up=wgu[:, :, :8])
    _bad("w_down", w_down=wd[:, :, :8])
    _bad("w_gate_up dtype", w_gate_up=wgu.half())
    _bad(r"topk_ids must lie in \[0, E=4\)", topk_ids=ids + 3)
    _bad(r"topk_ids must lie in \[0, E=4\)", topk_ids=ids - 5)
    _bad("K must be in", topk_ids=torch.zeros(4, 5, dtype=torch.int32), topk_weights=torch.rand(4, 5))
    _bad("topk_weights", topk_weights=w[:, :1])
    _bad("repeats an expert", topk_ids=torch.ones_like(ids))
    _bad("zero or negative stride", w_gate_up=wgu[:1].expand(4, -1, -1))
    _bad("activation", activation="tanh")
    _bad("fc1", gated=False, w_gate_up=wgu[:, :, :8])
    _bad("gated must be a bool", gated=1)
    _bad("validate must be a bool", validate=0)
    _bad("topk_weights must be fp16", topk_weights=w.to(torch.int32))
    _bad("backend", backend="numpy")
    _bad("expert_map must be", expert_map=torch.arange(4))
    _bad("points at slot 7", expert_map=torch.tensor([7, 7, 7, 7], dtype=torch.int32, device=x.device))
    _bad("no host weights", expert_map=torch.tensor([-1, -1, -1, -1], dtype=torch.int32, device=x.device))
    _bad("host_w_gate_up must be", expert_map=torch.arange(4, dtype=torch.int32),
         host_w_gate_up=wgu[:, :4], host_w_down=wd)
    _bad("out must be", out=torch.empty(4, 16))
    _bad("w_down must be a torch.Tensor, got NoneType", w_down=None)
    _bad("topk_ids must be a torch.Tensor, got list", topk_ids=ids.tolist())
    _bad("b_down must be a torch.Tensor or None, got list", b_gate_up=torch.rand(4, 32), b_down=[0.5] * 32)
    _bad("b_gate_up must be fp16/bf16/fp32/fp64, got torch.complex64",
         b_gate_up=torch.rand(4, 32, dtype=torch.complex64), b_down=torch.rand(4, 32))
    _bad("b_gate_up must be fp16/bf16/fp32/fp64, got torch.int32",
         b_gate_up=torch.randint(1, 5, (4, 32), dtype=torch.int32), b_down=torch.rand(4, 32))
    _bad("out must be a torch.Tensor or None", out=x.tolist())
    _bad("gate_up_interleaved must be a bool", gate_up_interleaved="yes")
    if x.device.type == "cpu":  # on a GPU, host weights are read in place from pinned memory
        _bad("host_w_gate_up is on meta, hidden_states on cpu", expert_map=torch.arange(4, dtype=torch.int32),
             host_w_gate_up=wgu.to("meta"), host_w_down=wd.to("meta"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_may_be_the_hidden_states_but_nothing_read_while_it_is_written(backend):
    """Regression: out aliasing w_down or b_down, or with rows sharing memory, was written while the kernels
    still read it (wrong rows, no error)."""
    x, wgu, wd, w, ids = random_layer(4, 4, 4, 4, 2, torch.float32)  # T = H = I = E: out fits in w_down[e]
    b_gate_up, b_down = torch.randn(4, 8, device=x.device), torch.randn(4, 4, device=x.device)
    ref = fused_moe_reference(x, wgu, wd, w, ids, b_gate_up=b_gate_up, b_down=b_down)
    in_place = x.clone()
    got = ops.fused_moe(in_place, wgu, wd, w, ids, b_gate_up=b_gate_up, b_down=b_down, out=in_place, backend=backend)
    assert got.data_ptr() == in_place.data_ptr()
    assert_close(got, ref, torch.float32)
    for name, out in (("w_down", wd[1]), ("b_down", b_down), ("w_gate_up", wgu[2, :4])):
        with pytest.raises(ValueError, match=f"out overlaps {name}"):
            ops.fused_moe(x, wgu, wd, w, ids, b_gate_up=b_gate_up, b_down=b_down, out=out, backend=backend)
    with pytest.raises(ValueError, match="out's rows overlap"):
        ops.fused_moe(x, wgu, wd, w, ids, out=torch.empty(1, 4, device=x.device).expand(4, 4), backend=backend)
    # with an expert_map, the down kernel reads the host weights of experts not in a slot
    host_gu, host_d = wgu.cpu().clone(), wd.cpu().clone()
    if host_d.device == x.device:
        with pytest.raises(ValueError, match="out overlaps host_w_down"):
            ops.fused_moe(x, wgu[:2], wd[:2], w, ids, expert_map=torch.tensor([0, 1, -1, -1], dtype=torch.int32),
                          host_w_gate_up=host_gu, host_w_down=host_d, out=host_d[2], backend=backend)


def test_value_checks_read_the_device_once(monkeypatch):
    """The value checks (ids in range, no repeats, map slots) cost eager calls one host sync, not five."""
    from moecache.ops.api import _check_fused_moe_args

    x, wgu, wd, w, ids = random_layer(6, 32, 16, 8, 3, torch.float32)
    expert_map = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.int32, device=x.device)
    reads = count_host_reads(monkeypatch)
    _check_fused_moe_args(x, wgu, wd, w, ids, "silu", expert_map, None, None, None, None)
    assert reads == ["tolist"]
    reads.clear()
    with pytest.raises(ValueError, match=r"found values in \[0, 8\]"):
        _check_fused_moe_args(x, wgu, wd, w, torch.where(ids == ids.max(), 8, ids), "silu", None, None, None, None, None)
    assert reads == ["tolist"]


# ------------------------------------------------------------------ GPU (bf16 and graph capture)
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 300])
def test_gpu_model_routing_dtypes_give_the_same_bits(T):
    """bf16 weights and int64 ids, read as given, give the bits of the fp32 / int32 conversions."""
    x, wgu, wd, w, ids = random_layer(T, 2048, 1408, 64, 6, torch.bfloat16, device="cuda")
    w16 = w.to(torch.bfloat16)
    assert torch.equal(run_triton(x, wgu, wd, w16, ids.long()), run_triton(x, wgu, wd, w16.float(), ids.int()))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_validate_false_never_synchronises(T):
    """validate=False enqueues the layer without a host sync; the default checks sync once (caught)."""
    x, wgu, wd, w, ids = random_layer(T, 2048, 1408, 64, 6, torch.bfloat16, device="cuda")
    ops.fused_moe(x, wgu, wd, w, ids, validate=False)  # compiles the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.fused_moe(x, wgu, wd, w, ids, validate=False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            ops.fused_moe(x, wgu, wd, w, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 16, 17, 64, 300, 2048])
@pytest.mark.parametrize("shape", [(2048, 1408, 64, 6), (512, 192, 72, 6), (1024, 768, 8, 2)], ids=["v2lite", "small72", "mixtral-ish"])
def test_gpu_bf16_matches_reference(T, shape):
    H, I, E, K = shape
    x, wgu, wd, w, ids = random_layer(T, H, I, E, K, torch.bfloat16, device="cuda")
    out = run_triton(x, wgu, wd, w, ids)
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [300, 4096])
def test_gpu_fused_combine_is_deterministic(T):
    """The last-arriving program sums a token's K rows in k order: bitwise equal across runs."""
    x, wgu, wd, w, ids = random_layer(T, 1024, 512, 64, 8, torch.bfloat16, device="cuda")
    first = run_triton(x, wgu, wd, w, ids)
    assert_close(first, fused_moe_reference(x, wgu, wd, w, ids), torch.bfloat16)
    for _ in range(10):
        assert torch.equal(run_triton(x, wgu, wd, w, ids), first)


@pytest.mark.gpu
@pytest.mark.parametrize("T,shape", [(256, (2048, 1408, 64, 6)), (4096, (1024, 512, 64, 8))],
                         ids=["v2lite-T256", "K8-T4096"])
def test_gpu_separate_combine_gives_the_fused_combines_bits(T, shape):
    """On the GPU the fused combine (acq_rel arrivals, .cg reads of other programs' partials) and the
    separate sum kernel add the same fp32 partials in the same order: the same bits, at the configuration
    the op picks for these shapes."""
    from moecache.kernels.fused_moe import fused_moe_launch
    from moecache.ops.api import _moe_config

    H, I, E, K = shape
    x, wgu, wd, w, ids = random_layer(T, H, I, E, K, torch.bfloat16, device="cuda")
    config = _moe_config(T, K, E, H, I, x.device, x.element_size())
    assert config["path"] == "grouped"
    outs = []
    for combine in ("fused", "separate"):
        out = poisoned(x.shape, x.dtype, x.device)
        fused_moe_launch(x, wgu, wd, w, ids, out, activation="silu", expert_map=None, host_w_gate_up=None, host_w_down=None, b_gate_up=None, b_down=None,
                         gate_up_interleaved=False, config={**config, "COMBINE": combine})
        outs.append(out)
    assert_close(outs[0], fused_moe_reference(x, wgu, wd, w, ids), torch.bfloat16)
    assert torch.equal(outs[1], outs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("T", [2, 64])
def test_gpu_pinned_host_experts_and_cuda_graph(T):
    E, S, H, I, K = 16, 6, 512, 256, 4
    x, wgu, wd, w, ids = random_layer(T, H, I, E, K, torch.bfloat16, device="cuda")
    expert_map = torch.full((E,), -1, dtype=torch.int32)
    expert_map[:S] = torch.arange(S, dtype=torch.int32)
    host_gu, host_d = wgu.cpu().pin_memory(), wd.cpu().pin_memory()
    slots_gu, slots_d = wgu[:S].contiguous(), wd[:S].contiguous()
    emap = expert_map.cuda()
    out = poisoned(x.shape, x.dtype, "cuda")

    def layer():
        ops.fused_moe(x, slots_gu, slots_d, w, ids, expert_map=emap, host_w_gate_up=host_gu,
                      host_w_down=host_d, out=out)

    layer()
    torch.cuda.synchronize()
    ref = fused_moe_reference(x, wgu, wd, w, ids)
    assert_close(out, ref, torch.bfloat16)
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.compile
@pytest.mark.gpu
def test_gpu_route_matches_torch_topk_and_compiles():
    logits = torch.randn(64, 64, device="cuda")
    w, ids = ops.route(logits, 6)
    ref_w, ref_ids = route_reference(logits, 6)
    assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w)
    x, wgu, wd, _, _ = random_layer(8, 256, 128, 64, 6, torch.bfloat16, device="cuda")
    router = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)

    def layer(h):
        rw, rid = ops.route(h @ router.t(), 6)
        return ops.fused_moe(h, wgu, wd, rw, rid)

    compiled = torch.compile(layer, fullgraph=True)
    assert_close(compiled(x), layer(x), torch.bfloat16)


# ------------------------------------------------------------------ hardening: skipped checks, strides, NaN
@pytest.mark.parametrize("T", [2, 20], ids=["decode", "grouped"])
def test_bad_map_slots_never_read_outside_the_weights_when_checks_are_skipped(T, monkeypatch):
    """Regression: with MOECACHE_VALIDATE=0 a slot of 10**6 segfaulted and a routed -1 without host
    weights read past the pool. Slots are now clamped in the kernel: the result is the one for the
    clamped map (last slot; slot 0 for -1), computed from memory the call was given."""
    E, S, H, I, K = 6, 4, 40, 24, 2
    x, wgu, wd, w, ids = random_layer(T, H, I, E, K, torch.float32)
    slots_gu, slots_d = wgu[:S].contiguous(), wd[:S].contiguous()
    expert_map = torch.tensor([0, 1, 2, 3, 10**6, -1], dtype=torch.int32, device=DEVICE)
    clamped = torch.tensor([0, 1, 2, 3, S - 1, 0], dtype=torch.int32, device=DEVICE)
    monkeypatch.setenv("MOECACHE_VALIDATE", "0")
    out = run_triton(x, slots_gu, slots_d, w, ids, expert_map=expert_map)
    expected = fused_moe_reference(x, slots_gu, slots_d, w, ids, expert_map=clamped)
    assert_close(out, expected, torch.float32)
    # The torch backend clamps the same way.
    assert torch.equal(ops.fused_moe(x, slots_gu, slots_d, w, ids, expert_map=expert_map, backend="torch"), expected)


@pytest.mark.parametrize("T", [3, 21], ids=["decode", "grouped"])
def test_non_contiguous_routing_tensors(T):
    """Regression: column slices of wider top-k tensors were read as if contiguous (error ~100%)."""
    x, wgu, wd, _, _ = random_layer(T, 40, 24, 8, 2, torch.float32)
    w4, ids4 = route_reference(torch.randn(T, 8, device=DEVICE), 4)
    w, ids = w4[:, :2], ids4[:, :2]
    assert not ids.is_contiguous() and not w.is_contiguous()
    assert_close(run_triton(x, wgu, wd, w, ids), fused_moe_reference(x, wgu, wd, w, ids), torch.float32)


@pytest.mark.parametrize("skip", ["environment", "argument"])
@pytest.mark.parametrize("T", [3, 21], ids=["decode", "grouped"])
def test_ids_out_of_range_are_clamped_and_every_row_is_written(T, skip, monkeypatch):
    """Regression: in the grouped path an id outside [0, E) was skipped, its token's combine never
    completed and the output row kept the buffer's garbage. Now clamped, as in the decode path. The
    checks are skipped by MOECACHE_VALIDATE=0 or by the call's validate=False, without reading the device."""
    E = 6
    x, wgu, wd, w, ids = random_layer(T, 40, 24, E, 2, torch.float32)
    ids[0, 0] = E + 3
    ids[1, 1] = -4
    if skip == "environment":
        monkeypatch.setenv("MOECACHE_VALIDATE", "0")
    kwargs = {"validate": False} if skip == "argument" else {}
    from moecache.ops.api import _check_fused_moe_args

    reads = count_host_reads(monkeypatch)
    _check_fused_moe_args(x, wgu, wd, w, ids, "silu", None, None, None, None, None, **kwargs)
    assert reads == []
    out = run_triton(x, wgu, wd, w, ids, **kwargs)
    clamped = ids.clamp(0, E - 1)
    expected = fused_moe_reference(x, wgu, wd, w, clamped)
    assert_close(out, expected, torch.float32)
    # The torch backend clamps the same way.
    assert torch.equal(ops.fused_moe(x, wgu, wd, w, ids, backend="torch", **kwargs), expected)


@pytest.mark.parametrize("weights_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [3, 21], ids=["decode", "grouped"])
def test_a_models_routing_dtypes_are_read_as_given(T, weights_dtype, monkeypatch):
    """int64 ids and weights in a model's dtype (its own top-k) reach the kernels without a conversion
    copy and give the same bits as the converted int32 / fp32 inputs."""
    x, wgu, wd, w, ids = random_layer(T, 40, 24, 8, 2, torch.float16)
    w16, ids64 = w.to(weights_dtype), ids.long()
    expected = run_triton(x, wgu, wd, w16.float(), ids64.int())
    from moecache.ops import api

    seen = []
    real = api._fused_moe_kernels

    def spy(*args):
        seen.append((args[3].data_ptr(), args[4].data_ptr()))
        return real(*args)
    monkeypatch.setattr(api, "_fused_moe_kernels", spy)
    assert torch.equal(run_triton(x, wgu, wd, w16, ids64), expected)
    assert seen == [(w16.data_ptr(), ids64.data_ptr())]


def test_the_custom_ops_launch_interpreted_kernels_where_wrap_triton_refuses_them(monkeypatch):
    """Regression (torch 2.11, the GPU image's, on a CPU): torch < 2.13's wrap_triton refuses the
    interpreter's kernels, so every call through the custom ops (autograd on route and mla_decode, the
    backward's) raised "wrap_triton only works on functions annotated with triton.jit"."""
    from test_mla_decode import make_case, op_args

    from moecache.kernels import INTERPRETING

    if not INTERPRETING:
        pytest.skip("compiled kernels: wrap_triton takes them")

    def refuse(kernel):
        raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")

    monkeypatch.setattr(torch.library, "wrap_triton", refuse)
    logits = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    weights, ids = ops.route(logits, 2, backend="triton")
    want_weights, want_ids = route_reference(logits.detach(), 2)
    assert torch.equal(ids, want_ids)
    assert_close(weights, want_weights, torch.float32)
    case = make_case([5, 20], 4, block_size=16)
    args = op_args(case)
    args["q_latent"].requires_grad_(True)
    out = ops.mla_decode(**args, backend="triton")
    assert_close(out, ops.mla_decode(**op_args(case), backend="torch"), torch.float32)
    (weights.sum() + out.sum()).backward()
    assert logits.grad is not None and args["q_latent"].grad is not None


def test_eager_inference_launches_without_the_dispatcher(monkeypatch):
    """Eager calls with nothing to record for autograd launch the kernels directly (the dispatcher's Python
    layers cost more than the launches); the custom ops still run where autograd (route, mla_decode; fused_moe
    records through its own autograd Function, whose forward launches directly), a dispatch mode or
    torch.compile needs them. Both paths give the same bits, and a profile still names the op."""
    from test_mla_decode import make_case, op_args

    x, wgu, wd, w, ids = random_layer(5, 40, 24, 8, 2, torch.float32)
    logits = torch.randn(5, 8, device=x.device)
    case = make_case([5, 20], 4, block_size=16)
    calls = {
        "fused_moe": lambda: ops.fused_moe(x, wgu, wd, w, ids, backend="triton"),
        "route": lambda: ops.route(logits, 2, backend="triton"),
        "mla_decode": lambda: ops.mla_decode(**op_args(case), backend="triton"),
    }
    seen = []
    for name in calls:
        real = getattr(torch.ops.moecache, name)
        monkeypatch.setattr(torch.ops.moecache, name, lambda *a, _real=real, _name=name: (seen.append(_name), _real(*a))[1])
    direct = {name: call() for name, call in calls.items()}
    assert seen == []
    wgu.requires_grad_(True)
    logits.requires_grad_(True)
    case["q_latent"].requires_grad_(True)
    through_op = {name: call() for name, call in calls.items()}
    assert seen == ["route", "mla_decode"] and through_op["fused_moe"].grad_fn is not None
    assert torch.equal(through_op["fused_moe"], direct["fused_moe"])
    assert all(torch.equal(a, b) for a, b in zip(through_op["route"], direct["route"]))
    assert torch.equal(through_op["mla_decode"], direct["mla_decode"])
    seen.clear()
    with torch.no_grad():  # a model's parameters need grad, but nothing is recorded here
        assert torch.equal(calls["fused_moe"](), direct["fused_moe"]) and seen == []

    monkeypatch.undo()  # the op itself again: a dispatch mode redispatches through it
    from moecache.ops import api

    direct_launch = []
    real = api._fused_moe_kernels
    monkeypatch.setattr(api, "_fused_moe_kernels", lambda *a: (direct_launch.append(a[-1] is None), real(*a))[1])

    class Passthrough(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    wgu.requires_grad_(False)
    with Passthrough():
        assert torch.equal(calls["fused_moe"](), direct["fused_moe"])

    class Subclass(torch.Tensor):
        pass
    ops.fused_moe(x.as_subclass(Subclass), wgu, wd, w, ids, backend="triton")
    ops.fused_moe(x, wgu, wd, w, ids, backend="triton")
    assert direct_launch == [False, False, True]  # a dispatch mode and a subclass see the op; plain eager not

    out = torch.zeros_like(x)
    version = out._version
    ops.fused_moe(x, wgu, wd, w, ids, backend="triton", out=out)
    assert out._version > version  # autograd sees the write, as with the op
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        calls["fused_moe"]()
    assert "moecache::fused_moe" in {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("T", [3, 21], ids=["decode", "grouped"])
def test_nan_routing_weight_gives_nan_for_that_token_only(T):
    x, wgu, wd, w, ids = random_layer(T, 40, 24, 8, 2, torch.float32)
    w[1, 0] = float("nan")
    out = run_triton(x, wgu, wd, w, ids)
    ref = fused_moe_reference(x, wgu, wd, w, ids)
    assert torch.isnan(out[1]).all() and torch.isnan(ref[1]).all()
    keep = torch.ones(T, dtype=torch.bool)
    keep[1] = False
    assert_close(out[keep], ref[keep], torch.float32)


@pytest.mark.parametrize("H,I", [(16, 0), (0, 8)], ids=["I0", "H0"])
def test_degenerate_widths(H, I):
    """Zero-width experts give zeros (as the reference); zero hidden units give an empty output."""
    T, E, K = 5, 4, 2
    x = torch.randn(T, H, device=DEVICE)
    wgu, wd = torch.randn(E, 2 * I, H, device=DEVICE), torch.randn(E, H, I, device=DEVICE)
    w, ids = route_reference(torch.randn(T, E, device=DEVICE), K)
    out = run_triton(x, wgu, wd, w, ids)
    assert out.shape == (T, H) and torch.equal(out, fused_moe_reference(x, wgu, wd, w, ids))
    if I == 0:
        # Regression: zero-width experts with a down bias gave zeros; each expert's output is its bias.
        b_gate_up, b_down = torch.randn(E, 0, device=DEVICE), torch.randn(E, H, device=DEVICE)
        expected = (w.unsqueeze(-1) * b_down[ids.long()]).sum(1)
        for backend in ("triton", "torch"):
            got = ops.fused_moe(x, wgu, wd, w, ids, b_gate_up=b_gate_up, b_down=b_down, backend=backend)
            assert_close(got, expected, torch.float32)


def test_bad_config_tables_name_the_file(tmp_path, monkeypatch):
    from moecache.ops import api

    x, wgu, wd, w, ids = random_layer(20, 16, 8, 4, 2, torch.float32)
    key = "H16-I8-E4-K2"
    cases = {"notjson.json": "{not json", "noconfigs.json": '{"device_slug": "x"}',
             "badpath.json": '{"configs": {"%s": {"32": {"path": "fast"}}}}' % key,
             "zero.json": '{"configs": {"%s": {"32": {"path": "grouped", "BLOCK_M": 0, "BLOCK_N": 16, '
                          '"BLOCK_K": 16, "num_warps": 4, "num_stages": 1}}}}' % key,
             "combine.json": '{"configs": {"%s": {"32": {"path": "grouped", "BLOCK_M": 16, "BLOCK_N": 16, '
                             '"BLOCK_K": 16, "num_warps": 4, "num_stages": 1, "COMBINE": "atomic"}}}}' % key,
             "decodecombine.json": '{"configs": {"%s": {"32": {"path": "decode", "BLOCK_N": 16, "BLOCK_K": 16, '
                                   '"num_warps": 4, "num_stages": 1, "COMBINE": "separate"}}}}' % key,
             # regression: the launcher's optional keys were not checked (GROUP_M 0 divided by zero in the
             # tile order and left the output unwritten; BLOCK_N_DOWN 48 failed in the compiler)
             "groupm.json": '{"configs": {"%s": {"32": {"path": "grouped", "BLOCK_M": 16, "BLOCK_N": 16, '
                            '"BLOCK_K": 16, "num_warps": 4, "num_stages": 1, "GROUP_M": 0}}}}' % key,
             "bndown.json": '{"configs": {"%s": {"1": {"path": "decode", "BLOCK_N": 16, "BLOCK_K": 16, '
                            '"num_warps": 4, "num_stages": 1, "BLOCK_N_DOWN": 48}}}}' % key}
    messages = {"groupm.json": "GROUP_M must be a positive integer, got 0",
                "bndown.json": "BLOCK_N_DOWN must be a positive integer power of two, got 48"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        monkeypatch.setenv("MOECACHE_MOE_CONFIG", str(path))
        api._TUNED_CACHE.clear()
        with pytest.raises(ValueError, match=name + ".*" + messages.get(name, "")):
            api.tuned_configs(torch.device("cuda" if DEVICE == "cuda" else "cpu"))
    api._TUNED_CACHE.clear()


# ------------------------------------------------------------------ non-gated experts (Phi-2 / Switch / NLLB)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "relu2", "silu"])
@pytest.mark.parametrize("T", [3, 21], ids=["decode", "grouped"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_non_gated_experts(activation, T, bias, dtype):
    E, H, I, K = 5, 40, 24, 2
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).to(DEVICE, dtype)
    fc1 = (torch.randn(E, I, H, generator=g) / H**0.5).to(DEVICE, dtype)
    fc2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(DEVICE, dtype)
    w, ids = route_reference(torch.randn(T, E, generator=g), K)
    w, ids = w.to(DEVICE), ids.to(DEVICE)
    kw = dict(activation=activation, gated=False)
    if bias:
        kw.update(b_gate_up=(torch.randn(E, I, generator=g) * 0.1).to(DEVICE, dtype),
                  b_down=(torch.randn(E, H, generator=g) * 0.1).to(DEVICE, dtype))
    ref = fused_moe_reference(x, fc1, fc2, w, ids, **kw)
    assert_close(run_triton(x, fc1, fc2, w, ids, **kw), ref, dtype)
    if not bias:  # the same expert written out: act(fc1 x) then fc2, weighted
        act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu,
               "relu2": lambda h: torch.relu(h) ** 2, "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh")}[activation]
        t, k = 1, 0
        e = int(ids[t, k])
        direct = act(x[t].double() @ fc1[e].double().t()) @ fc2[e].double().t() * w[t, k].double()
        partial = fused_moe_reference(x[t:t + 1], fc1, fc2, w[t:t + 1, k:k + 1], ids[t:t + 1, k:k + 1], **kw)
        assert_close(partial[0], direct, dtype)


@pytest.mark.parametrize("T", [2, 20], ids=["decode", "grouped"])
def test_non_gated_experts_from_host_through_a_map(T):
    E, S, H, I, K = 6, 3, 32, 16, 2
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, H, generator=g, device=DEVICE)
    fc1 = torch.randn(E, I, H, generator=g).to(DEVICE) / H**0.5
    fc2 = torch.randn(E, H, I, generator=g).to(DEVICE) / I**0.5
    w, ids = route_reference(torch.randn(T, E, generator=g), K)
    w, ids = w.to(DEVICE), ids.to(DEVICE)
    expert_map = torch.tensor([2, -1, 0, -1, 1, -1], dtype=torch.int32, device=DEVICE)
    slots = torch.stack([fc1[2], fc1[4], fc1[0]]), torch.stack([fc2[2], fc2[4], fc2[0]])
    assert slots[0].shape[0] == S
    out = run_triton(x, *slots, w, ids, expert_map=expert_map, host_w_gate_up=fc1.cpu(), host_w_down=fc2.cpu(),
                     activation="relu", gated=False)
    assert_close(out, fused_moe_reference(x, fc1, fc2, w, ids, activation="relu", gated=False), torch.float32)


def test_non_gated_argument_errors():
    x = torch.randn(4, 16)
    fc1, fc2 = torch.randn(3, 8, 16), torch.randn(3, 16, 8)
    w, ids = route_reference(torch.randn(4, 3), 2)
    with pytest.raises(ValueError, match="non-gated"):
        ops.fused_moe(x, fc1, fc2, w, ids, gated=False, activation="swiglu_oai")
    with pytest.raises(ValueError, match="w_down must be"):
        ops.fused_moe(x, fc1, torch.randn(3, 16, 5), w, ids, gated=False)
    with pytest.raises(ValueError, match="gate_up_interleaved needs gated"):
        ops.fused_moe(x, fc1, fc2, w, ids, gated=False, gate_up_interleaved=True)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "relu2", "silu"])
@pytest.mark.parametrize("T", [1, 16, 640])
def test_gpu_non_gated_bf16_with_biases_matches_reference(activation, T):
    """MoE-LLaVA-Phi2-like experts (4, top-2, fc1/fc2 with biases), narrowed to keep the test quick."""
    E, H, I, K = 4, 512, 2048, 2
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    fc1 = (torch.randn(E, I, H, device="cuda", generator=g) / H**0.5).bfloat16()
    fc2 = (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).bfloat16()
    b1, b2 = (torch.randn(E, I, device="cuda", generator=g) * 0.1).bfloat16(), (torch.randn(E, H, device="cuda", generator=g) * 0.1).bfloat16()
    w, ids = route_reference(torch.randn(T, E, device="cuda", generator=g), K)
    kw = dict(activation=activation, gated=False, b_gate_up=b1, b_down=b2)
    assert_close(run_triton(x, fc1, fc2, w, ids, **kw), fused_moe_reference(x, fc1, fc2, w, ids, **kw), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("activation,limit,after,alpha", CLAMPS,
                         ids=["clamp-before", "clamp-after", "gelu-clamp", "swiglu-oai-own-constants"])
@pytest.mark.parametrize("T", [1, 16, 640])
def test_gpu_clamped_gated_activations_bf16(activation, limit, after, alpha, T):
    """DeepSeek-V4-like experts (top-6, narrowed), limits the bf16 products cross."""
    E, H, I, K = 16, 1024, 512, 6
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    wgu = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).bfloat16()
    wd = (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).bfloat16()
    w, ids = route_reference(torch.randn(T, E, device="cuda", generator=g), K)
    kw = dict(activation=activation, activation_limit=limit, limit_after_activation=after, swiglu_alpha=alpha)
    assert_close(run_triton(x, wgu, wd, w, ids, **kw), fused_moe_reference(x, wgu, wd, w, ids, **kw), torch.bfloat16)


@pytest.mark.compile
@pytest.mark.gpu
def test_gpu_non_gated_layer_captures_and_compiles():
    E, H, I, K, T = 4, 256, 1024, 2, 8
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    fc1 = torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    fc2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    w, ids = route_reference(torch.randn(T, E, device="cuda"), K)
    ref = fused_moe_reference(x, fc1, fc2, w, ids, activation="gelu_tanh", gated=False)
    out = poisoned(x.shape, x.dtype, "cuda")

    def layer():
        ops.fused_moe(x, fc1, fc2, w, ids, activation="gelu_tanh", gated=False, out=out)

    layer()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, ref, torch.bfloat16)
    compiled = torch.compile(lambda h: ops.fused_moe(h, fc1, fc2, w, ids, activation="gelu_tanh", gated=False),
                             fullgraph=True)
    assert_close(compiled(x), ref, torch.bfloat16)


# ------------------------------------------------------------------ autograd
def _moe_token_by_token(x, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up, b_down, interleaved, gated):
    """The layer one routed row at a time, in plain autograd-tracked ops: the gradients' yardstick."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            h = w_gate_up[e] @ x[t] + b_gate_up[e]
            if gated:
                gate, up = (h[0::2], h[1::2]) if interleaved else h.chunk(2)
                a = torch.nn.functional.silu(gate) * up
            else:
                a = torch.nn.functional.gelu(h, approximate="tanh")
            acc = acc + topk_weights[t, k] * (w_down[e] @ a + b_down[e])
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("layout", ["gated", "interleaved", "not-gated"])
@pytest.mark.parametrize("T", [1, 6], ids=["one-token", "grouped"])
def test_backward_reaches_the_hidden_states_router_weights_and_biases(T, layout):
    """Training through the kernels: the forward is the kernels' (the same bits as without autograd), and
    every input that needs a gradient gets the one the row-by-row layer gives (the router's through the
    top-k weights). Before, the Triton path returned an output detached from the graph: no error, and
    the MoE's share of every gradient silently missing."""
    E, H, I, K = 5, 24, 16, 2
    gated, interleaved = layout != "not-gated", layout == "interleaved"
    x, w_gate_up, w_down, _, _ = random_layer(T, H, I, E, K, torch.float32)
    if not gated:
        w_gate_up = w_gate_up[:, :I].contiguous()
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(T, E, generator=g).to(DEVICE)
    b_gate_up = (torch.randn(E, w_gate_up.shape[1], generator=g) / 4).to(DEVICE)
    b_down = (torch.randn(E, H, generator=g) / 4).to(DEVICE)
    grad_out = torch.randn(T, H, generator=g).to(DEVICE)
    options = dict(activation="silu" if gated else "gelu_tanh", gate_up_interleaved=interleaved, gated=gated)

    def run(layer, **kw):
        leaves = [t.clone().requires_grad_(True) for t in (x, w_gate_up, w_down, logits, b_gate_up, b_down)]
        weights, ids = torch.topk(leaves[3].softmax(-1), K)
        out = layer(leaves[0], leaves[1], leaves[2], weights, ids, leaves[4], leaves[5], **kw)
        (out * grad_out).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    with torch.no_grad():
        weights, ids = torch.topk(logits.softmax(-1), K)
        plain = ops.fused_moe(x, w_gate_up, w_down, weights, ids, b_gate_up=b_gate_up, b_down=b_down,
                              backend="triton", **options)
    out, grads = run(lambda x, wgu, wd, w, i, bgu, bd: ops.fused_moe(x, wgu, wd, w, i, b_gate_up=bgu, b_down=bd,
                                                                    backend="triton", **options))
    _, expected = run(_moe_token_by_token, interleaved=interleaved, gated=gated)
    assert torch.equal(out, plain)
    for name, got, want in zip(("x", "w_gate_up", "w_down", "router logits", "b_gate_up", "b_down"), grads, expected):
        assert got is not None, f"no gradient for {name}"
        assert_close(got, want, torch.float32, name=f"grad {name}")


def test_backward_into_an_out_buffer():
    x, w_gate_up, w_down, weights, ids = random_layer(4, 24, 16, 5, 2, torch.float32)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    leaves = [t.clone().requires_grad_(True) for t in (x, w_down)]
    out = poisoned(x.shape, x.dtype, x.device)
    result = ops.fused_moe(leaves[0], w_gate_up, leaves[1], weights, ids, out=out, backend="triton")
    assert result is out and out.grad_fn is not None
    (out * grad_out).sum().backward()
    expected = [t.clone().requires_grad_(True) for t in (x, w_down)]
    (_moe_token_by_token(expected[0], w_gate_up, expected[1], weights, ids, torch.zeros(5, 32, device=DEVICE),
                         torch.zeros(5, 24, device=DEVICE), False, True) * grad_out).sum().backward()
    for name, got, want in zip(("x", "w_down"), leaves, expected):
        assert_close(got.grad, want.grad, torch.float32, name=f"grad {name}")


def test_fused_moe_second_derivatives_and_torch_func_grad_are_the_references():
    """Regression: fused_moe through the kernels refused create_graph=True, and torch.func.grad failed
    (an autograd.Function without setup_context). Its backward now records the reference's recompute:
    a Hessian-vector product and torch.func.grad match the torch backend's plain autograd."""
    x, w_gate_up, w_down, weights, ids = random_layer(4, 24, 16, 5, 2, torch.float32)
    b_gate_up, b_down = torch.randn(5, 32, device=DEVICE), torch.randn(5, 24, device=DEVICE)
    direction = torch.randn_like(x)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (x, w_gate_up, weights, b_down)]
        out = ops.fused_moe(leaves[0], leaves[1], w_down, leaves[2], ids, b_gate_up=b_gate_up, b_down=leaves[3],
                            backend=backend)
        first = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
        second = torch.autograd.grad((first[0] * direction).sum(), leaves, allow_unused=True)

        def loss(w):
            return ops.fused_moe(x, w, w_down, weights, ids, b_gate_up=b_gate_up, b_down=b_down,
                                 backend=backend).pow(2).sum()
        results[backend] = (*first, *second, torch.func.grad(loss)(w_gate_up))
    names = ["x", "w_gate_up", "weights", "b_down"]
    for name, got, want in zip([f"grad {n}" for n in names] + [f"hvp {n}" for n in names] + ["func.grad"],
                               results["triton"], results["torch"]):
        if want is None:
            assert got is None or not got.any(), name
        else:
            assert_close(got, want, torch.float32, name=name)
    assert results["torch"][4].abs().sum() > 0  # a second derivative that is not zero


def test_second_derivatives_are_refused_clearly():
    """route's and mla_decode's backwards are not recorded: create_graph=True through them raises,
    rather than giving their gradients as constants."""
    from test_mla_decode import make_case, op_args

    logits = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="route: no second derivatives"):
        torch.autograd.grad(ops.route(logits, 2, backend="triton")[0].sum(), logits, create_graph=True)
    args = op_args(make_case([5, 20], 4, block_size=16))
    args["q_latent"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="mla_decode: no second derivatives"):
        torch.autograd.grad(ops.mla_decode(**args, backend="triton").sum(), args["q_latent"], create_graph=True)


def test_backward_through_an_expert_map_is_refused_clearly():
    """Slots of an expert cache can be refilled between the forward and the backward (copies autograd
    does not see): the backward raises instead of differentiating through whatever they then hold. The
    forward under autograd still runs, as it does for a model called without torch.no_grad()."""
    E, S, H, I, K = 6, 4, 24, 16, 2
    x, w_gate_up, w_down, weights, ids = random_layer(5, H, I, E, K, torch.float32)
    expert_map = torch.tensor([0, 1, 2, 3, -1, -1], dtype=torch.int32, device=DEVICE)
    host = dict(host_w_gate_up=w_gate_up.cpu(), host_w_down=w_down.cpu())
    for backend in ("triton", "torch"):
        leaf = x.clone().requires_grad_(True)
        out = ops.fused_moe(leaf, w_gate_up[:S], w_down[:S], weights, ids, expert_map=expert_map, backend=backend,
                            **host)
        assert_close(out.detach(), fused_moe_reference(x, w_gate_up, w_down, weights, ids), torch.float32)
        with pytest.raises(RuntimeError, match="no gradients through an expert_map"):
            out.sum().backward()
