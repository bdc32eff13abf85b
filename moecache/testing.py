"""Helpers for tests and benchmarks: random inputs that are never zeros, NaN-poisoned outputs, tolerances."""
from __future__ import annotations

import torch

# Relative tolerances by dtype (DESIGN.md): fp32 ~1e-4, fp16 ~1e-2, bf16 ~2e-2.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer filled with NaN, so an element a kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, rtol=None, name="output") -> None:
    """Relative error against the reference's scale: max|a-e| <= rtol * max(|e|), plus no NaN/Inf."""
    dtype = dtype or actual.dtype
    rtol = TOLERANCES[dtype] if rtol is None else rtol
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
    scale = e.abs().max().clamp_min(1e-30)
    err = (a - e).abs().max()
    assert err <= rtol * scale, f"{name}: max abs err {err.item():.3e} > {rtol:.1e} x max|ref| {scale.item():.3e}"


# ------------------------------------------------------------------ whole models (patching tests)
def model_snapshot(model):
    """(state dict copy, module types by name): what unpatch must give back exactly."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def assert_model_restored(model, before) -> None:
    weights, types = before
    after_weights, after_types = model_snapshot(model)
    assert after_types == types
    assert after_weights.keys() == weights.keys()
    for k in weights:
        assert torch.equal(after_weights[k], weights[k]), k


def model_logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def parameter_grads(model, ids) -> dict[str, torch.Tensor]:
    """{name: gradient} of the language-model loss on `ids` (the next-token targets), every parameter that
    gets one; earlier gradients are cleared first."""
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, use_cache=False).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def greedy(model, ids, n=20, **kwargs) -> torch.Tensor:
    """n greedy tokens (never stopping early at EOS, so every run produces the same number)."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, **kwargs)
