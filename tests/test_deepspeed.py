"""Against the real deepspeed package (a single-process gloo group on the CPU), where it is installed
(CI installs it in its own venv: .ci/deepspeed): moecache's DeepSpeed-MoE stand-in routes and computes
as DeepSpeed does, and DeepSpeed's own MoE layers, patched in place, give the same logits and tokens."""
from __future__ import annotations

import os

import pytest
import torch

import moecache
from moecache.models import deepspeed_moe
from moecache.models.llava import SHAPES, build_language_model, scaled_down
from moecache.testing import assert_close, assert_model_restored, greedy, model_logits, model_snapshot

deepspeed = pytest.importorskip("deepspeed")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    import torch.distributed as dist

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo")
    yield


def seeded(fn, *args, **kwargs):
    torch.manual_seed(99)
    return fn(*args, **kwargs)


class _Fc(torch.nn.Module):
    """A Phi-2-style FFN: fc2(gelu_tanh(fc1(x))) with biases."""

    def __init__(self, hidden=32, ffn=48):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(hidden, ffn), torch.nn.Linear(ffn, hidden)
        self.activation_fn = torch.nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


@pytest.mark.parametrize("k,factor,min_capacity", [(2, 1.0, 4), (2, 0.3, 0), (1, 1.0, 4), (1, 0.4, 1)],
                         ids=["top2", "top2-drops", "top1", "top1-drops"])
@pytest.mark.parametrize("gated", [False, True], ids=["fc", "swiglu"])
def test_stand_in_matches_deepspeed(k, factor, min_capacity, gated):
    from deepspeed.moe.layer import MoE as RealMoE

    from moecache.models.llava import QwenMLP

    torch.manual_seed(0)
    expert = QwenMLP(32, 48) if gated else _Fc()
    kw = dict(num_experts=4, k=k, capacity_factor=1.5, eval_capacity_factor=factor, min_capacity=min_capacity)
    assert_stand_in_matches(RealMoE(32, expert, ep_size=1, **kw).eval(), deepspeed_moe.MoE(32, expert, **kw).eval())


def assert_stand_in_matches(real, ours):
    """Random weights in the real layer, loaded into the stand-in by name; the same output, l_aux and
    exp_counts under the same seed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in real.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    assert ours.load_state_dict(real.state_dict()) is not None  # the same parameter names
    x = torch.randn(3, 12, 32, generator=g)
    with torch.no_grad():
        out, l_aux, counts = seeded(real, x)
        out2, l_aux2, counts2 = seeded(ours, x)
    assert_close(out2, out, torch.float32)
    assert_close(l_aux2, l_aux, torch.float32)
    assert torch.equal(counts2, counts)


@pytest.mark.parametrize("family", ["moe-llava-phi2", "moe-llava-stablelm"])
@pytest.mark.parametrize("offload", [None, moecache.Offload(gpu_experts=0.5)], ids=["resident", "offload50"])
def test_deepspeed_moe_layers_patched_in_place(family, offload):
    from deepspeed.moe.layer import MoE as RealMoE

    model = build_language_model(scaled_down(SHAPES[family]), seed=4, moe_class=RealMoE)
    ids = torch.randint(3, 256, (2, 13), generator=torch.Generator().manual_seed(0))
    ref = seeded(model_logits, model, ids)
    ref_tokens = seeded(greedy, model, ids, n=6)
    before = model_snapshot(model)
    moecache.patch(model, offload=offload)
    adapters = [m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__]
    assert len(adapters) == 2 and all(a._sparse_routes for a in adapters)  # DeepSpeed's sparse routes
    assert_close(seeded(model_logits, model, ids), ref, torch.float32)
    assert torch.equal(seeded(greedy, model, ids, n=6), ref_tokens)
    for adapter in adapters:  # older DeepSpeed: the dense combine weights, converted
        adapter._sparse_routes = False
    assert_close(seeded(model_logits, model, ids), ref, torch.float32)
    moecache.unpatch(model)
    assert_model_restored(model, before)
    assert torch.equal(seeded(model_logits, model, ids), ref)


@pytest.mark.parametrize("policy", ["Jitter", "RSample"])
def test_stand_in_matches_deepspeeds_noisy_gates_in_training(policy):
    """Regression: the stand-in left out the "Jitter" policy's input noise in training."""
    from deepspeed.moe.layer import MoE as RealMoE

    torch.manual_seed(0)
    kw = dict(num_experts=4, k=1, capacity_factor=1.0, min_capacity=4, noisy_gate_policy=policy)
    assert_stand_in_matches(RealMoE(32, _Fc(), ep_size=1, **kw).train(), deepspeed_moe.MoE(32, _Fc(), **kw).train())
