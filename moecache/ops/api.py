"""Public MoE ops: argument checks, backend dispatch, torch custom-op registration.

The Triton paths are registered with torch.library.triton_op, so torch.compile sees the kernels
(no graph break) and CUDA graphs capture them (no host synchronisation inside). Eager inference calls
(no tensor needing grad, no compile, no dispatch mode, plain tensors) launch the same kernels without
going through the dispatcher, whose Python layers cost more per call than the launches themselves.
"""
from __future__ import annotations

import functools
import math

import torch

from .._env import backend_override, moe_config_path, triton_interpreting, validate_values
from .reference import (
    ACTIVATIONS,
    SWIGLU_OAI_ALPHA,
    SWIGLU_OAI_LIMIT,
    fused_moe_reference,
    route_reference,
    route_weights_reference,
)

NON_GATED_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2", "silu")

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(backend: str, device: torch.device, dot_dtype: torch.dtype | None = None) -> str:
    """"auto" -> MOECACHE_BACKEND if set, else triton for CUDA tensors and torch for CPU tensors.
    dot_dtype: the dtype the kernels' tl.dot would multiply in, refused where the interpreter gets it wrong."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = backend_override()
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and dot_dtype == torch.bfloat16 and device.type != "cuda" and triton_interpreting():
        # The interpreter's bf16 tl.dot returns garbage (finite, off by orders of magnitude).
        raise ValueError("backend='triton' on bfloat16 CPU tensors: the Triton interpreter computes bf16 matrix "
                         "products wrongly; use backend='torch' (the default on CPU), or float32 / float16")
    return backend


def eager_inference(*tensors) -> bool:
    """Whether a call can launch its kernels directly rather than through its torch custom op: not
    compiling or under a dispatch mode (fake tensors, functionalization), no autograd to record, and
    only plain tensors (a subclass may route ops elsewhere). The op stays the path for all of those."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in present)


def wrap_for_trace(kernel):
    """torch.library.wrap_triton(kernel), what a trace (torch.compile) of the custom ops needs. Under the
    Triton interpreter, torch before 2.13 refuses the interpreter's kernels (they are not JITFunctions);
    an eager call launches them as they are."""
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        if torch.compiler.is_compiling() or not triton_interpreting():
            raise
        return kernel


def run_direct(name: str, fn, *args):
    """fn(*args), named in a running profile the way the custom op would be."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(name):
            return fn(*args)
    return fn(*args)


def _value_checks_allowed() -> bool:
    """Checks that read tensor values need a host sync: skipped while compiling or capturing a graph,
    and when MOECACHE_VALIDATE=0 (eager decode without the sync)."""
    if not validate_values():
        return False
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


_TUNED_CACHE: dict = {}


def device_slug(device: torch.device) -> str:
    """File-name form of a CUDA device's name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def tuned_configs(device: torch.device) -> dict | None:
    """fused_moe block configurations tuned by bench/tune_moe.py for this device, if any.

    MOECACHE_MOE_CONFIG=path picks a table; otherwise the one shipped for this device's name in
    moecache/kernels/configs/, if there is one. Read and checked once per (path, device): a table that
    cannot be used raises a ValueError naming the file and the entry.
    """
    from pathlib import Path

    from moecache import kernels

    path = moe_config_path()
    slug = device_slug(device)
    key = (path, slug)
    if key not in _TUNED_CACHE:
        file = Path(path) if path else Path(kernels.__file__).parent / "configs" / f"fused_moe-{slug}.json"
        table = None
        if file.is_file():
            data = _read_table(file)
            if path or data.get("device_slug") == slug:
                table = data["configs"]
        elif path:
            raise ValueError(f"MOECACHE_MOE_CONFIG={path!r} is not a file")
        _TUNED_CACHE[key] = table
    return _TUNED_CACHE[key]


_CONFIG_KEYS = {"decode": ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"),
                "grouped": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}
_OPTIONAL_KEYS = ("BLOCK_N_DOWN", "GROUP_M")  # the launcher's defaults stand in where a table has none


def _read_table(file) -> dict:
    import json

    from moecache.kernels.fused_moe import COMBINES

    where = f"fused_moe config table {str(file)!r}"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: not readable JSON ({err})") from None
    configs = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(configs, dict):
        raise ValueError(f"{where}: expected an object with a 'configs' mapping (bench/tune_moe.py writes one)")
    for shape, entries in configs.items():
        if not isinstance(entries, dict) or not entries:
            raise ValueError(f"{where}: {shape}: expected {{token count: config}}")
        for tokens, config in entries.items():
            name = f"{where}: {shape}, {tokens} tokens"
            if not str(tokens).isdigit():
                raise ValueError(f"{name}: the token count must be a positive integer")
            path = config.get("path") if isinstance(config, dict) else None
            if path not in _CONFIG_KEYS:
                raise ValueError(f"{name}: 'path' must be one of {sorted(_CONFIG_KEYS)}, got {path!r}")
            if "COMBINE" in config and (path != "grouped" or config["COMBINE"] not in COMBINES):
                raise ValueError(f"{name}: COMBINE (grouped path only) must be one of {list(COMBINES)}, "
                                 f"got {config['COMBINE']!r} on the {path} path")
            for k in (*_CONFIG_KEYS[path], *(k for k in _OPTIONAL_KEYS if k in config)):
                v = config.get(k)
                power_of_two = k.startswith("BLOCK") or k == "num_warps"
                if not (isinstance(v, int) and not isinstance(v, bool) and v > 0
                        and (not power_of_two or v & (v - 1) == 0)):
                    raise ValueError(f"{name}: {k} must be a positive integer{' power of two' if power_of_two else ''}, "
                                     f"got {v!r}")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ------------------------------------------------------------------ route
def route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
          bias: torch.Tensor | None = None, n_group: int | None = None, topk_group: int | None = None,
          scaling: float = 1.0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's top-k experts.

    Args:
        router_logits: [T, E] float logits.
        top_k: experts per token (1 <= top_k <= E, and <= topk_group * E / n_group when grouped).
        scoring: "softmax" (Mixtral, Qwen, OLMoE, DeepSeek-V2, VL2-Tiny/Small) or "sigmoid" (DeepSeek-V3, VL2-base).
        renormalize: divide the chosen weights by their sum.
        bias: [E] added to the scores for selection only (DeepSeek-V3 e_score_correction_bias).
        n_group, topk_group: group-limited selection; a group's score is its max, or the sum of its top 2
            when `bias` is given (DeepSeek-V3 noaux_tc).
        scaling: multiplies the final weights (routed_scaling_factor).
    Returns:
        (topk_weights fp32 [T, K], topk_ids int32 [T, K]), best first; ties go to the lower expert id.

    Example:
        >>> w, ids = route(torch.randn(4, 64), 6, n_group=8, topk_group=3, scaling=2.5)
    """
    _check(isinstance(router_logits, torch.Tensor) and router_logits.dim() == 2,
           f"router_logits must be a [T, E] tensor, got {getattr(router_logits, 'shape', type(router_logits))}")
    _check(router_logits.dtype in _FLOAT_DTYPES, f"router_logits must be fp16/bf16/fp32, got {router_logits.dtype}")
    T, E = router_logits.shape
    _check(_is_int(top_k) and 1 <= top_k <= E, f"top_k must be an int in [1, E={E}], got {top_k!r}")
    _check(scoring in ("softmax", "sigmoid"), f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    _check(isinstance(renormalize, bool), f"renormalize must be a bool, got {renormalize!r}")
    _check(_is_real(scaling) and math.isfinite(scaling), f"scaling must be a finite number, got {scaling!r}")
    for name, value in (("n_group", n_group), ("topk_group", topk_group)):
        _check(value is None or (_is_int(value) and value >= 1), f"{name} must be None or an int >= 1, got {value!r}")
    if bias is not None:
        _check(bias.shape == (E,), f"bias must have shape [E]=({E},), got {tuple(bias.shape)}")
        _check(bias.device == router_logits.device, f"bias is on {bias.device}, router_logits on {router_logits.device}")
        bias = bias.contiguous()  # E values; the kernel reads them as one row
    grouped = n_group is not None and n_group > 1
    if grouped:
        _check(E % n_group == 0, f"n_group={n_group} must divide the number of experts E={E}")
        _check(topk_group is not None and 1 <= topk_group <= n_group,
               f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
        _check(top_k <= topk_group * (E // n_group),
               f"top_k={top_k} exceeds the experts in topk_group={topk_group} groups of {E // n_group}")
        grouped = topk_group < n_group  # keeping every group is no restriction
        _check(not grouped or bias is None or E // n_group >= 2,
               f"n_group={n_group} leaves one expert per group, but with a bias (noaux_tc) a group scores by its "
               "top two experts: use n_group <= E / 2, or n_group=None")
    if resolve_backend(backend, router_logits.device) == "torch":
        return route_reference(router_logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias,
                               n_group=n_group, topk_group=topk_group, scaling=scaling)
    args = (router_logits, bias, top_k, scoring == "sigmoid", renormalize, n_group if grouped else 1,
            topk_group if grouped else 1, float(scaling))
    if eager_inference(router_logits, bias):
        return run_direct("moecache::route", _route_kernels, *args, None)
    return torch.ops.moecache.route(*args)


def _route_kernels(router_logits, bias, top_k, sigmoid, renormalize, n_group, topk_group, scaling, launcher):
    from moecache.kernels.moe_route import route_launch

    T = router_logits.shape[0]
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    route_launch(router_logits, bias, weights, ids, top_k, sigmoid=sigmoid, renormalize=renormalize,
                 n_group=n_group, topk_group=topk_group, scaling=scaling,
                 group_by_top2=bias is not None, launcher=launcher)
    return weights, ids


@torch.library.triton_op("moecache::route", mutates_args=())
def _route_op(router_logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, sigmoid: bool,
              renormalize: bool, n_group: int, topk_group: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _route_kernels(router_logits, bias, top_k, sigmoid, renormalize, n_group, topk_group, scaling,
                          wrap_for_trace)


def _route_setup_context(ctx, inputs, output):
    router_logits, _, _, sigmoid, renormalize, _, _, scaling = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.options = dict(scoring="sigmoid" if sigmoid else "softmax", renormalize=renormalize, scaling=scaling)


def refuse_double_backward(op: str) -> None:
    """Backwards of the custom ops are computed once, not recorded: a backward that builds a graph
    (create_graph=True) would get constants for the op's gradients."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: no second derivatives (its backward is not differentiable); "
                           "create_graph=True is not supported through it")


def grads_by_recompute(compute, tensors, needs_input_grad, grad_outputs, num_inputs: int) -> tuple:
    """An op's backward through its PyTorch reference: `compute(*tensors)` again with autograd, and the
    gradients of the floating-point tensors whose needs_input_grad is set, placed among `num_inputs`
    (None elsewhere). grad_outputs pair with compute's outputs; None ones (unused outputs) are skipped."""
    wanted = [i for i, t in enumerate(tensors) if needs_input_grad[i] and t is not None and t.is_floating_point()]
    # A backward that records (create_graph=True, torch.func.grad) differentiates the saved tensors
    # themselves, so its gradients stay functions of them: second derivatives come out of the reference.
    recording = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = list(tensors) if recording else [
            t.detach().requires_grad_(i in wanted) if i in wanted else t for i, t in enumerate(tensors)]
        outputs = compute(*inputs)
        pairs = [(o, g) for o, g in zip(outputs if isinstance(outputs, tuple) else (outputs,), grad_outputs)
                 if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                    allow_unused=True, create_graph=recording) if wanted else ()
    result = [None] * num_inputs
    for i, g in zip(wanted, grads):
        result[i] = g
    return tuple(result)


def _route_backward(ctx, grad_weights, _grad_ids):
    """The chosen experts' weights as functions of the logits (the choice itself has no gradient),
    differentiated through route_weights_reference."""
    refuse_double_backward("route")
    router_logits, ids = ctx.saved_tensors
    return grads_by_recompute(lambda logits: route_weights_reference(logits, ids, **ctx.options), (router_logits,),
                              ctx.needs_input_grad, (grad_weights,), 8)


torch.library.register_autograd("moecache::route", _route_backward, setup_context=_route_setup_context)


# ------------------------------------------------------------------ fused_moe
def _check_out(out, hidden_states, read_after_writing) -> None:
    """out takes one row per token, and aliases nothing the kernels read after they start writing it
    (hidden_states they have read by then: out=hidden_states works in place)."""
    _check(isinstance(out, torch.Tensor), f"out must be a torch.Tensor or None, got {type(out).__name__}")
    _check(out.shape == hidden_states.shape and out.dtype == hidden_states.dtype and out.device == hidden_states.device,
           f"out must be {hidden_states.dtype} {tuple(hidden_states.shape)} on {hidden_states.device}")
    _check(out.stride(-1) == 1, "out must have a unit stride in its last dimension")
    T, H = out.shape
    _check(T <= 1 or H == 0 or out.stride(0) >= H, f"out's rows overlap (strides {out.stride()}): pass a buffer "
           "with a row of its own for each token")
    if torch.compiler.is_compiling() or out.numel() == 0 or out.data_ptr() == 0:  # no memory (meta, fake): no alias
        return
    for name, t in read_after_writing:
        if t is not None and _share_memory(out, t):
            raise ValueError(f"out overlaps {name}, which the kernels read while they write out")


def _share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges the two tensors span intersect (same device)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0 or b.data_ptr() == 0:
        return False

    def span(t):
        start = t.data_ptr()
        return start, start + (sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _check_fused_moe_args(x, w_gate_up, w_down, topk_weights, topk_ids, activation, expert_map,
                          host_w_gate_up, host_w_down, b_gate_up, b_down, gated=True, gate_up_interleaved=False,
                          validate=True):
    _check(isinstance(x, torch.Tensor) and x.dim() == 2, f"hidden_states must be [T, H], got {getattr(x, 'shape', type(x))}")
    _check(x.dtype in _FLOAT_DTYPES, f"hidden_states must be fp16/bf16/fp32, got {x.dtype}")
    for name, t, required in (("w_gate_up", w_gate_up, True), ("w_down", w_down, True),
                              ("topk_weights", topk_weights, True), ("topk_ids", topk_ids, True),
                              ("expert_map", expert_map, False), ("host_w_gate_up", host_w_gate_up, False),
                              ("host_w_down", host_w_down, False), ("b_gate_up", b_gate_up, False),
                              ("b_down", b_down, False)):
        _check(isinstance(t, torch.Tensor) or (t is None and not required),
               f"{name} must be a torch.Tensor{'' if required else ' or None'}, got {type(t).__name__}")
    _check(isinstance(gated, bool), f"gated must be a bool, got {gated!r}")
    _check(isinstance(gate_up_interleaved, bool), f"gate_up_interleaved must be a bool, got {gate_up_interleaved!r}")
    T, H = x.shape
    if gated:
        _check(w_gate_up.dim() == 3 and w_gate_up.shape[2] == H and w_gate_up.shape[1] % 2 == 0,
               f"w_gate_up must be [E, 2I, H={H}], got {tuple(w_gate_up.shape)}")
    else:
        _check(w_gate_up.dim() == 3 and w_gate_up.shape[2] == H,
               f"with gated=False w_gate_up is fc1 [E, I, H={H}], got {tuple(w_gate_up.shape)}")
        _check(activation in NON_GATED_ACTIVATIONS,
               f"activation must be one of {NON_GATED_ACTIVATIONS} for non-gated experts, got {activation!r}")
        _check(not gate_up_interleaved, "gate_up_interleaved needs gated experts")
    S, two_i, _ = w_gate_up.shape
    I = two_i // 2 if gated else two_i
    _check(w_down.shape == (S, H, I), f"w_down must be [E={S}, H={H}, I={I}], got {tuple(w_down.shape)}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        _check(t.dtype == x.dtype, f"{name} dtype {t.dtype} differs from hidden_states' {x.dtype}")
        _check(t.device == x.device, f"{name} is on {t.device}, hidden_states on {x.device}")
        _check(all(s > 0 for s in t.stride()) or t.numel() == 0,
               f"{name} has a zero or negative stride {t.stride()} the kernel cannot take; pass .contiguous()")
    E = expert_map.numel() if expert_map is not None else S
    _check(topk_ids.dim() == 2 and topk_ids.shape[0] == T, f"topk_ids must be [T={T}, K], got {tuple(topk_ids.shape)}")
    K = topk_ids.shape[1]
    _check(1 <= K <= E, f"topk_ids has K={K} columns; K must be in [1, E={E}]")
    _check(topk_ids.dtype in (torch.int32, torch.int64), f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    _check(topk_weights.shape == (T, K), f"topk_weights must be [T={T}, K={K}], got {tuple(topk_weights.shape)}")
    _check(topk_weights.dtype in (*_FLOAT_DTYPES, torch.float64),
           f"topk_weights must be fp16/bf16/fp32/fp64, got {topk_weights.dtype}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        _check(t.device == x.device, f"{name} is on {t.device}, hidden_states on {x.device}")
    if expert_map is not None:
        _check(expert_map.dim() == 1 and expert_map.dtype == torch.int32,
               f"expert_map must be a 1-D int32 tensor [E], got {expert_map.dtype} {tuple(expert_map.shape)}")
        _check(expert_map.device == x.device, f"expert_map is on {expert_map.device}, hidden_states on {x.device}")
    for name, host, dev, shape in (("host_w_gate_up", host_w_gate_up, w_gate_up, (E, two_i, H)),
                                    ("host_w_down", host_w_down, w_down, (E, H, I))):
        if host is None:
            continue
        _check(expert_map is not None, f"{name} is only used with an expert_map")
        _check(tuple(host.shape) == shape, f"{name} must be {list(shape)}, got {tuple(host.shape)}")
        _check(host.dtype == dev.dtype, f"{name} dtype {host.dtype} differs from the device weights' {dev.dtype}")
        _check(host.stride() == dev.stride(),
               f"{name} strides {host.stride()} must equal the device weights' {dev.stride()}")
        if x.device.type == "cuda":
            _check(host.device.type == "cuda" or host.is_pinned(),
                   f"{name} must be in pinned host memory (or on the GPU) for the kernel to read it in place")
        else:
            _check(host.device == x.device, f"{name} is on {host.device}, hidden_states on {x.device}")
    _check((host_w_gate_up is None) == (host_w_down is None), "pass both host_w_gate_up and host_w_down, or neither")
    for name, b, shape in (("b_gate_up", b_gate_up, (E, two_i)), ("b_down", b_down, (E, H))):
        if b is not None:
            _check(tuple(b.shape) == shape, f"{name} must be {list(shape)}, got {tuple(b.shape)}")
            _check(b.dtype in (*_FLOAT_DTYPES, torch.float64), f"{name} must be fp16/bf16/fp32/fp64, got {b.dtype}")
            _check(b.device == x.device, f"{name} is on {b.device}, hidden_states on {x.device}")
    _check((b_gate_up is None) == (b_down is None), "pass both b_gate_up and b_down, or neither")
    _check(isinstance(validate, bool), f"validate must be a bool, got {validate!r}")
    if validate and _value_checks_allowed() and T > 0:
        _check_fused_moe_values(topk_ids, expert_map, host_w_gate_up, E, S)
    return T, H, I, E, K


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """fused_moe's value checks on routes alone (one host sync): ids in [0, num_experts), no expert twice in
    a token's row. For callers that pass the kernels routes of their own making (ExpertCache's)."""
    if _value_checks_allowed() and topk_ids.numel():
        _check_fused_moe_values(topk_ids, None, None, num_experts, 0)


def _check_fused_moe_values(topk_ids, expert_map, host_w_gate_up, E, S):
    """The checks that read routing values. Every one is reduced on the device and read back in one
    transfer: one host sync per call."""
    K = topk_ids.shape[1]
    ids = topk_ids.long()
    facts = list(torch.aminmax(ids))
    if K > 1:
        srt = ids.sort(dim=1).values
        facts.append((srt[:, 1:] == srt[:, :-1]).any())
    if expert_map is not None:
        used = expert_map[ids.clamp(0, E - 1).reshape(-1)]  # clamped: an id out of range is reported below
        facts += list(torch.aminmax(used))
    values = torch.stack([f.to(torch.int64) for f in facts]).tolist()
    lo, hi = values[0], values[1]
    _check(lo >= 0 and hi < E, f"topk_ids must lie in [0, E={E}), found values in [{lo}, {hi}]")
    if K > 1:
        _check(not values[2], "topk_ids repeats an expert within a token's row")
    if expert_map is not None:
        slot_lo, slot_hi = values[-2], values[-1]
        _check(slot_hi < S, f"expert_map points at slot {slot_hi} but the weights hold {S} slots")
        _check(slot_lo >= -1, f"expert_map has slot {slot_lo}; slots are >= 0, or -1 for host")
        if host_w_gate_up is None:
            _check(slot_lo >= 0, "expert_map marks a routed expert non-resident (-1) but no host weights were given")


def gated_activation(activation: str, activation_limit: float | None = None, limit_after_activation: bool = False,
                     swiglu_alpha: float | None = None, gated: bool = True) -> tuple[str, float | None, bool, float]:
    """(activation, limit, after, alpha) as the kernels take them, checked: swiglu_oai's defaults filled in
    (GPT-OSS's limit 7.0 and alpha 1.702); a clamp only for gated experts, a finite positive limit;
    swiglu_alpha only for swiglu_oai, which clamps its gate before the activation."""
    _check(isinstance(activation, str) and activation in ACTIVATIONS,
           f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check(isinstance(limit_after_activation, bool),
           f"limit_after_activation must be a bool, got {limit_after_activation!r}")
    for name, value in (("activation_limit", activation_limit), ("swiglu_alpha", swiglu_alpha)):
        _check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and math.isfinite(value) and value > 0),
               f"{name} must be a finite number > 0 or None, got {value!r}")
    if activation_limit is not None:
        _check(gated, "activation_limit clamps the gate and up projections of gated experts; these are not gated")
    else:
        _check(not limit_after_activation, "limit_after_activation needs an activation_limit")
    if activation == "swiglu_oai":
        _check(not limit_after_activation, "swiglu_oai clamps its gate before the activation: "
                                           "limit_after_activation must be False")
        return (activation, float(SWIGLU_OAI_LIMIT if activation_limit is None else activation_limit), False,
                float(SWIGLU_OAI_ALPHA if swiglu_alpha is None else swiglu_alpha))
    _check(swiglu_alpha is None, f"swiglu_alpha is swiglu_oai's; activation {activation!r} takes none")
    return (activation, None if activation_limit is None else float(activation_limit), limit_after_activation,
            SWIGLU_OAI_ALPHA)


def fused_moe(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: str = "silu",
              backend: str = "auto", expert_map: torch.Tensor | None = None,
              host_w_gate_up: torch.Tensor | None = None, host_w_down: torch.Tensor | None = None,
              b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
              gate_up_interleaved: bool = False, gated: bool = True,
              activation_limit: float | None = None, limit_after_activation: bool = False,
              swiglu_alpha: float | None = None,
              out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
    """The routed experts of one MoE layer: out[t] = sum_k w[t,k] * down_e(act(gate_e x_t) * up_e x_t), or
    with gated=False (Phi-2-style, Switch, NLLB experts) sum_k w[t,k] * down_e(act(fc1_e x_t)).

    Args:
        hidden_states: [T, H] fp16/bf16/fp32.
        w_gate_up: [E, 2I, H] (transformers 5.x layout): gate = rows [0, I), up = rows [I, 2I);
            with gate_up_interleaved, gate = even rows and up = odd rows (GPT-OSS). Any positive strides,
            so GPT-OSS's [E, H, 2I] parameter can be passed as .transpose(1, 2) without a copy.
            With gated=False: fc1 [E, I, H].
        w_down: [E, H, I].
        topk_weights: [T, K] float (fp32 from route; a model's bf16 or fp16 weights are read as they are
            and widened to fp32 in the kernel), topk_ids: [T, K] int32 or int64 (read as given).
        activation: "silu" (default), "gelu_tanh", "gelu" (erf), "relu", "relu2" (squared ReLU), or, gated
            only, "swiglu_oai" (GPT-OSS's (up + 1) * gate * sigmoid(swiglu_alpha * gate), clamped at 7.0
            unless activation_limit says otherwise; swiglu_alpha defaults to 1.702).
        activation_limit: gated experts only: clamp up to [-limit, limit] and the gate to at most limit
            before the activation (DeepSeek-V4, GLM-5, HunYuan-V4), or, with limit_after_activation,
            act(gate) to at most limit (Step 3.5/3.7, Ling). None: no clamp.
        expert_map: [E] int32, the slot of each expert in w_gate_up/w_down (whose first dim is then the
            slot count); -1 = not resident: the kernel reads expert e from host_w_gate_up[e] /
            host_w_down[e] (pinned host memory) in place.
        b_gate_up [E, 2I] ([E, I] non-gated), b_down [E, H]: optional biases, indexed by expert id.
        backend: "auto" | "torch" | "triton".
        out: optional [T, H] output buffer (written in place and returned), a row per token; it may be
            hidden_states itself, and must not overlap the weights, biases or routing tensors.
        validate: check the routing values (ids in [0, E), no expert twice in a row, map slots in range),
            one host sync per call (skipped anyway while compiling or capturing, and with
            MOECACHE_VALIDATE=0). False where the caller guarantees them, as a model's own top-k does:
            the kernels clamp ids and slots either way, so a wrong one gives a wrong row, never a read
            outside the weights.
    Returns:
        [T, H] in hidden_states' dtype. Differentiable in hidden_states, topk_weights, the weights and the
        biases (the backward recomputes the layer through fused_moe_reference), except through an
        expert_map, whose backward raises.

    Example:
        >>> w, ids = route(x @ router.T, 6)
        >>> y = fused_moe(x, w_gate_up, w_down, w, ids)
    """
    _check_fused_moe_args(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, activation, expert_map,
                          host_w_gate_up, host_w_down, b_gate_up, b_down, gated, gate_up_interleaved, validate)
    act = gated_activation(activation, activation_limit, limit_after_activation, swiglu_alpha, gated)
    if out is not None:
        _check_out(out, hidden_states, (("w_gate_up", w_gate_up), ("w_down", w_down), ("topk_weights", topk_weights),
                                        ("topk_ids", topk_ids), ("expert_map", expert_map), ("b_gate_up", b_gate_up),
                                        ("b_down", b_down), ("host_w_gate_up", host_w_gate_up),
                                        ("host_w_down", host_w_down)))
    differentiable = (hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
    if hidden_states.shape[1] == 0 or hidden_states.shape[0] == 0:
        # Nothing to compute: no tokens or no hidden units. The empty result still hangs off the inputs
        # that need grad, so their gradients are zeros (as a matmul's with no rows), not missing.
        result = torch.zeros_like(hidden_states, memory_format=torch.contiguous_format)
        if needs_grad:
            for t in differentiable:
                if t is not None and t.requires_grad:
                    result = result + t.reshape(-1)[:0].sum()  # 0, reading nothing
        return result if out is None else out.copy_(result)
    # Zero-width experts output their down bias (zeros without one): nothing for the kernels to do.
    use_torch = resolve_backend(backend, hidden_states.device, w_gate_up.dtype) == "torch" or w_down.shape[2] == 0
    if needs_grad and (expert_map is not None or not use_torch):
        result = _FusedMoeFunction.apply(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up, b_down,
                                         expert_map, host_w_gate_up, host_w_down,
                                         (act, gate_up_interleaved, gated, use_torch))
        return result if out is None else out.copy_(result)
    return _fused_moe_forward(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, act, expert_map,
                              host_w_gate_up, host_w_down, b_gate_up, b_down, gate_up_interleaved, gated, out,
                              use_torch)


def _reference_activation(act) -> dict:
    """fused_moe_reference's keyword arguments for a gated_activation tuple."""
    activation, limit, after, alpha = act
    return dict(activation=activation, activation_limit=limit, limit_after_activation=after,
                swiglu_alpha=alpha if activation == "swiglu_oai" else None)


def _fused_moe_forward(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, act, expert_map,
                       host_w_gate_up, host_w_down, b_gate_up, b_down, gate_up_interleaved, gated, out, use_torch):
    """The reference (torch backend) or the kernels, into `out` when given; act: gated_activation's tuple."""
    if use_torch:
        result = fused_moe_reference(hidden_states, w_gate_up, w_down, topk_weights, topk_ids,
                                     expert_map=expert_map, host_w_gate_up=host_w_gate_up, host_w_down=host_w_down,
                                     b_gate_up=b_gate_up, b_down=b_down, gate_up_interleaved=gate_up_interleaved,
                                     gated=gated, **_reference_activation(act))
        return result if out is None else out.copy_(result)
    return _fused_moe_triton(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, act, expert_map,
                             host_w_gate_up, host_w_down, b_gate_up, b_down, gate_up_interleaved, gated, out)


def _fused_moe_triton(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, act, expert_map,
                      host_w_gate_up, host_w_down, b_gate_up, b_down, gate_up_interleaved, gated, out):
    if out is None:
        out = torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
    # The kernels index [T, K] routing tensors as contiguous rows (slices of wider ones get copied) and
    # read them in their own dtypes (int32/int64 ids, any float weights, widened to fp32 as they are
    # loaded), so a model's int64 top-k and bf16 weights cost no conversion launches. The expert map
    # (E values) is read as one row too.
    args = (hidden_states.contiguous() if hidden_states.stride(-1) != 1 else hidden_states,
            w_gate_up, w_down, topk_weights.contiguous(), topk_ids.contiguous(), *act,
            expert_map.contiguous() if expert_map is not None else None, host_w_gate_up, host_w_down, b_gate_up,
            b_down, gate_up_interleaved, gated, out)
    if eager_inference(*(a for a in args if isinstance(a, torch.Tensor))):
        run_direct("moecache::fused_moe", _fused_moe_kernels, *args, None)
        # As the op would: autograd must see that out changed (a graph that saved it then refuses backward).
        torch.autograd.graph.increment_version(out)
    else:
        torch.ops.moecache.fused_moe(*args)
    return out


class _FusedMoeFunction(torch.autograd.Function):
    """fused_moe where autograd needs a backward: the forward runs the kernels (or, on the torch backend,
    the reference) as without autograd; the backward recomputes the layer through fused_moe_reference
    with autograd (PyTorch ops, one expert at a time: no Triton backward kernels), so gradients reach the
    hidden states, the top-k weights (the router), the expert weights and the biases that need them.
    A backward that is itself differentiated (create_graph=True, torch.func.grad) records that recompute,
    so second derivatives are the reference's.

    With an expert_map the weights are the slots of an expert cache, which later calls may refill
    before the backward runs (copies that autograd's version counters do not see), so the backward
    raises rather than differentiate through whatever the slots then hold.
    """

    @staticmethod
    def forward(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up, b_down, expert_map,
                host_w_gate_up, host_w_down, options):
        act, gate_up_interleaved, gated, use_torch = options
        return _fused_moe_forward(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, act, expert_map,
                                  host_w_gate_up, host_w_down, b_gate_up, b_down, gate_up_interleaved, gated, None,
                                  use_torch)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # Kept apart from forward so torch.func's grad can run the function (vmap, hence jacrev, cannot:
        # the kernels take no batched tensors).
        hidden_states, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up, b_down, expert_map, _, _, options = inputs
        ctx.options = options
        ctx.through_map = expert_map is not None
        if not ctx.through_map:
            ctx.save_for_backward(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up, b_down)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.through_map:
            raise RuntimeError("fused_moe has no gradients through an expert_map (experts served from an expert "
                               "cache's slots, which may have been refilled since the forward): run the forward "
                               "under torch.no_grad() or torch.inference_mode(), or keep the experts resident (no "
                               "offload) to train through them")
        act, gate_up_interleaved, gated, _ = ctx.options

        def layer(x, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up, b_down):
            return fused_moe_reference(x, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up=b_gate_up,
                                       b_down=b_down, gate_up_interleaved=gate_up_interleaved, gated=gated,
                                       **_reference_activation(act))
        return grads_by_recompute(layer, ctx.saved_tensors, ctx.needs_input_grad, (grad_out,), 11)


def _moe_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int,
                device: torch.device, itemsize: int) -> dict:
    from moecache import kernels
    from moecache.kernels.fused_moe import select_config

    table = tuned_configs(device) if device.type == "cuda" else None
    return select_config(num_tokens, top_k, num_experts, hidden, inter, kernels.INTERPRETING, table=table,
                         itemsize=itemsize, arch=device_arch(device))


def device_arch(device: torch.device) -> int:
    """Compute capability as 10 * major + minor (90 for sm_90); 90 off CUDA, where the interpreter runs
    the configuration the kernels are chosen for first."""
    return _cuda_properties(_cuda_index(device))[0] if device.type == "cuda" else 90


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (host metadata, no sync); a small number on CPU."""
    return _cuda_properties(_cuda_index(device))[1] if device.type == "cuda" else 4


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_properties(index: int) -> tuple[int, int]:
    """(arch, SM count) of a CUDA device: read once, since every kernel configuration asks for them."""
    props = torch.cuda.get_device_properties(index)
    return 10 * props.major + props.minor, props.multi_processor_count


def streams_each_expert_once(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int,
                             device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether fused_moe reads each routed expert's weights once per call at this size (the GEMV path for
    one token; the grouped path while an expert's rows, at most one per token, fit one row tile).
    Where it does, a non-resident expert costs the same PCIe bytes read in place as copied."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    config = _moe_config(num_tokens, top_k, num_experts, hidden, inter, torch.device(device), itemsize)
    if config["path"] == "decode":
        return num_tokens == 1
    return num_tokens <= config["BLOCK_M"]


@torch.library.triton_op("moecache::fused_moe", mutates_args=("out",))
def _fused_moe_op(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str,
                  activation_limit: float | None, limit_after_activation: bool, swiglu_alpha: float,
                  expert_map: torch.Tensor | None, host_w_gate_up: torch.Tensor | None,
                  host_w_down: torch.Tensor | None, b_gate_up: torch.Tensor | None, b_down: torch.Tensor | None,
                  gate_up_interleaved: bool, gated: bool, out: torch.Tensor) -> None:
    _fused_moe_kernels(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, activation, activation_limit,
                       limit_after_activation, swiglu_alpha, expert_map, host_w_gate_up, host_w_down, b_gate_up,
                       b_down, gate_up_interleaved, gated, out, wrap_for_trace)


def _fused_moe_kernels(hidden_states, w_gate_up, w_down, topk_weights, topk_ids, activation, activation_limit,
                       limit_after_activation, swiglu_alpha, expert_map, host_w_gate_up, host_w_down, b_gate_up,
                       b_down, gate_up_interleaved, gated, out, launcher):
    from moecache.kernels.fused_moe import fused_moe_launch

    x = hidden_states
    if x.shape[0] == 0:
        return
    E = expert_map.numel() if expert_map is not None else w_gate_up.shape[0]
    config = _moe_config(x.shape[0], topk_ids.shape[1], E, x.shape[1], w_down.shape[2], x.device, x.element_size())
    fused_moe_launch(x, w_gate_up, w_down, topk_weights, topk_ids, out, activation=activation,
                     activation_limit=activation_limit, limit_after_activation=limit_after_activation,
                     swiglu_alpha=swiglu_alpha, expert_map=expert_map,
                     host_w_gate_up=host_w_gate_up, host_w_down=host_w_down, b_gate_up=b_gate_up, b_down=b_down,
                     gate_up_interleaved=gate_up_interleaved, config=config, launcher=launcher,
                     gated=gated)
