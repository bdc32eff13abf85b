"""Experts kept as lists of MLPs (DeepSpeed-MoE layers, Switch Transformers, DeepSeek's own blocks): what
patch takes, what it leaves alone and why, and that patched layers stay the model's exactly."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moecache
from moecache.models import deepspeed_moe
from moecache.testing import assert_close, assert_model_restored, model_snapshot

import builders

transformers = pytest.importorskip("transformers")


class Fc(nn.Module):
    """A Phi-2-style expert: fc2(act(fc1(x)))."""

    def __init__(self, hidden=16, ffn=24, bias=True, act=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, ffn, bias=bias), nn.Linear(ffn, hidden, bias=bias)
        self.activation_fn = act if act is not None else nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class FcNorm(Fc):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(super().forward(x))


class ShiftedLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 0.5


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


class Adapted(nn.Module):
    """A linear layer with a low-rank update beside it, held as PEFT's LoRA layers hold theirs."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.5)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def moe_layer(expert=None, seed=0):
    torch.manual_seed(seed)
    return deepspeed_moe.MoE(16, expert if expert is not None else Fc(), num_experts=4, k=2, min_capacity=64).eval()


def run(module, x):
    torch.manual_seed(1)  # top-2's second-expert sample
    with torch.no_grad():
        return module(x)[0]


def experts_of(layer):
    return layer.deepspeed_moe.experts.deepspeed_experts


X = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))


def test_patching_list_experts_twice_changes_nothing_and_unpatch_restores():
    """Regression: a second patch stacked and hooked the layer again (stats listed it twice) and unpatch
    then failed with a KeyError, for good."""
    layer = moe_layer()
    ref, before = run(layer, X), model_snapshot(layer)
    moecache.patch(layer)
    moecache.patch(layer)
    assert len(moecache.stats(layer)["layers"]) == 1
    assert_close(run(layer, X), ref, torch.float32)
    moecache.unpatch(layer)
    assert_model_restored(layer, before)
    assert torch.equal(run(layer, X), ref)


def _swap(index, expert):
    return lambda layer: experts_of(layer).__setitem__(index, expert)


class FcWideDown(Fc):
    """fc2 kept in a wider dtype, the input cast for it (T5-style wo)."""

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)).to(self.fc2.weight.dtype)).to(x.dtype)


def _mixed_dtype(layer):
    torch.manual_seed(5)
    expert = FcWideDown()
    expert.fc2.double()
    experts_of(layer)[2] = expert


def _wrap_forward(module):
    """As accelerate's device hooks do: forward replaced on the instance."""
    plain = module.forward
    module.forward = lambda x: plain(x) * 0.5


CHANGES = {
    "unknown-activation": (lambda layer: [setattr(e, "activation_fn", nn.Tanh()) for e in experts_of(layer)],
                           "activation the kernels lack (Tanh)"),
    "one-other-activation": (lambda layer: setattr(experts_of(layer)[2], "activation_fn", nn.ReLU()), "differ"),
    "biases-on-some": (_swap(3, Fc(bias=False)), "differ"),
    "other-width": (_swap(1, Fc(ffn=32)), "differ"),
    "a-norm-inside": (_swap(0, FcNorm()), "parts besides the expert weights (expert 0: norm)"),
    "one-expert-twice": (lambda layer: experts_of(layer).__setitem__(1, experts_of(layer)[0]), "shared"),
    "two-dtypes-in-one": (_mixed_dtype, "several dtypes"),
    # the kernels call neither the MLPs nor the module holding them: these hooks would stop firing
    "a-hook-on-one-expert": (lambda layer: experts_of(layer)[2].register_forward_hook(lambda m, args, out: out * 2),
                             "code around parts the kernels do not call (deepspeed_experts.2: hooks)"),
    "a-hook-on-the-experts-holder": (lambda layer: layer.deepspeed_moe.experts.register_forward_pre_hook(
        lambda m, args: (args[0] * 0.5,)), "code around parts the kernels do not call (Experts: hooks)"),
    # nor do they call the linear layers, whose weights they read
    "a-linear-with-a-forward-of-its-own": (lambda layer: setattr(experts_of(layer)[1].fc1, "__class__", ShiftedLinear),
                                           "has code of its own (expert 1.fc1: a forward of its own (ShiftedLinear))"),
    "a-parametrized-linear": (lambda layer: torch.nn.utils.parametrize.register_parametrization(
        experts_of(layer)[3].fc2, "weight", Doubled()), "(deepspeed_experts.3.fc2: parametrized weights)"),
    "a-forward-set-on-a-linear": (lambda layer: _wrap_forward(experts_of(layer)[0].fc2),
                                  "(deepspeed_experts.0.fc2: a forward set on the module itself"),
    # adapters put on before patch (PEFT's LoRA layers are not nn.Linear): the layer was not found at all
    "adapters-on-every-expert": (lambda layer: [setattr(e, "fc1", Adapted(e.fc1)) for e in experts_of(layer)],
                                 "expert linear layers that are not nn.Linear (expert 0.fc1: "),
    "an-adapter-on-one-expert": (lambda layer: setattr(experts_of(layer)[2], "fc2", Adapted(experts_of(layer)[2].fc2)),
                                 "not nn.Linear (expert 2.fc2:"),
    "one-expert-biased-in-part": (lambda layer: setattr(experts_of(layer)[1].fc1, "bias", None),
                                  "expert linear layers with and without biases (expert 1)"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_list_experts_the_kernels_cannot_compute_alike_are_left_alone(change):
    """Regression: only expert 0 was looked at, so another activation, biases on some experts, a norm
    inside an expert or a shared expert ran wrongly with no warning, and other widths or missing biases
    raised internal errors."""
    edit, reason = CHANGES[change]
    layer = moe_layer()
    edit(layer)
    ref, before = run(layer, X), model_snapshot(layer)
    moecache.patch(layer)
    left = moecache.stats(layer)["left_alone"]
    assert len(left) == 1 and reason in left[0]["reason"], left
    assert not moecache.stats(layer)["patched"]
    assert torch.equal(run(layer, X), ref)
    assert_model_restored(layer, before)


@pytest.mark.parametrize("offload", [None, moecache.Offload(gpu_experts=0.5)], ids=["resident", "offload50"])
@pytest.mark.parametrize("part", ["fc1", "fc2"])
def test_adapters_put_on_expert_linears_after_patch_are_refused(part, offload):
    """Regression: LoRA adapters put on the experts' linear layers after patch (PEFT's get_peft_model on
    the patched model) were skipped: the kernels computed from the weights stacked at patch (0.77
    relative off). The forward now refuses; unpatch gives the adapted model back."""
    layer = moe_layer()
    builders.randomize(layer)
    twin = copy.deepcopy(layer)
    moecache.patch(layer, offload=offload)
    for m in (layer, twin):
        torch.manual_seed(3)
        for expert in experts_of(m):
            setattr(expert, part, Adapted(getattr(expert, part)))
    with pytest.raises(ValueError, match="replaced or changed after moecache.patch"):
        run(layer, X)
    moecache.unpatch(layer)
    assert torch.equal(run(layer, X), run(twin, X))


def test_functional_call_computes_with_the_weights_it_is_given():
    """Regression: torch.func.functional_call with new expert weights ran the stacks made at patch (0.75
    relative off) while the gradients went to the tensors passed in."""
    from torch.func import functional_call

    layer = moe_layer()
    builders.randomize(layer)
    twin = copy.deepcopy(layer)
    moecache.patch(layer)
    given = {name: (p.detach() * 1.5 if "experts" in name else p.detach()) for name, p in twin.named_parameters()}
    outputs, grads = [], []
    for m in (twin, layer):
        params = {name: t.clone().requires_grad_() for name, t in given.items()}
        torch.manual_seed(1)
        out = functional_call(m, params, (X,))[0]
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        grads.append({name: t.grad for name, t in params.items()})
    assert_close(outputs[1], outputs[0], torch.float32)
    assert not torch.allclose(run(layer, X), outputs[1])  # the layer's own weights were not used
    for name, want in grads[0].items():
        assert_close(grads[1][name], want, torch.float32, name=name)
    assert_close(run(layer, X), run(twin, X), torch.float32)  # its own weights back after the call
    moecache.unpatch(layer)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = moe_layer(seed=0), moe_layer(seed=1)
        experts_of(self.b)[2].fc2 = experts_of(self.a)[2].fc2  # one Linear in two layers

    def forward(self, x):
        return (self.b(self.a(x)[0])[0],)


@pytest.mark.parametrize("offload", [None, moecache.Offload(gpu_experts=0.5)], ids=["resident", "offload50"])
def test_layers_sharing_an_expert_linear_are_left_alone(offload):
    """Regression: each layer's stack took a copy of the shared weight and the parameter viewed only the
    last one, so an in-place update (an optimizer step) reached one layer only; offloading the first layer
    freed the weight the second still ran on; and a second patch stacked the layer the first left alone."""
    model, reference = TwoLayers(), TwoLayers()
    moecache.patch(model)
    moecache.patch(model)
    left = moecache.stats(model)["left_alone"]
    assert [(item["name"], item["reason"]) for item in left] == [
        ("a.deepspeed_moe.experts", "expert weights shared with b.deepspeed_moe.experts"),
        ("b.deepspeed_moe.experts", "expert weights shared with a.deepspeed_moe.experts")]
    if offload is not None:
        moecache.unpatch(model)
        with pytest.raises(ValueError, match="no experts module could be patched"):
            moecache.patch(model, offload=offload)
    for m in (model, reference):
        with torch.no_grad():
            experts_of(m.a)[2].fc2.bias.add_(1.0)
    assert_close(run(model, X), run(reference, X), torch.float32)


def test_offloading_more_layers_into_a_patched_model_is_refused():
    """Regression: a second patch with offload that found a layer the first had left alone built a second
    cache numbering it layer 0, and unpatch then gave the first layer the second's weights."""
    model = TwoLayers()
    experts_of(model.b)[2].fc2 = Fc().fc2  # no sharing: both can be patched
    experts_of(model.b)[1].activation_fn = nn.ReLU()  # b differs: left alone by the first patch
    before = model_snapshot(model)
    offload = moecache.Offload(gpu_experts=0.5)
    moecache.patch(model, offload=offload)
    experts_of(model.b)[1].activation_fn = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="already patched, and b.deepspeed_moe.experts is not"):
        moecache.patch(model, offload=offload)
    moecache.unpatch(model)
    experts_of(model.b)[1].activation_fn = nn.ReLU()
    assert_model_restored(model, before)


@pytest.mark.parametrize("budget", ["1KiB", "many", 1.5])
def test_a_bad_offload_budget_leaves_list_experts_untouched(budget):
    """Regression: the budget was checked after the MLPs were stacked, so a refused offload still gave
    every expert parameter new storage."""
    layer = moe_layer()
    before = model_snapshot(layer)
    storage = [p.data_ptr() for p in layer.parameters()]
    with pytest.raises(ValueError, match="gpu_experts"):
        moecache.patch(layer, offload=moecache.Offload(gpu_experts=budget))
    assert [p.data_ptr() for p in layer.parameters()] == storage
    assert not moecache.stats(layer)["patched"]
    assert_model_restored(layer, before)


def test_offloaded_expert_mlps_called_directly_say_why():
    """DeepSeek's own blocks run their MLPs themselves in training: offloaded, their weights are gone, so
    the call says so instead of failing on an empty matrix."""
    torch.manual_seed(0)
    block = DeepseekMoEBlock()
    moecache.patch(block, offload=moecache.Offload(gpu_experts=0.5))
    with pytest.raises(RuntimeError, match="call model.eval"):
        block.experts[0](torch.randn(3, 32))
    moecache.unpatch(block)
    block.experts[0](torch.randn(3, 32))
    layer = moe_layer()
    moecache.patch(layer, offload=moecache.Offload(gpu_experts=0.5))
    moecache.unpatch(layer)
    for expert, fresh in zip(experts_of(layer), experts_of(moe_layer())):  # every bias its own storage again
        assert expert.fc1.bias.untyped_storage().nbytes() == expert.fc1.bias.numel() * 4
        assert torch.equal(expert.fc1.bias, fresh.fc1.bias)


def test_offloaded_list_experts_give_their_weights_to_a_state_dict_at_any_level_and_refuse_loads():
    """Regression: state_dict() of one expert MLP, or of one of its linear layers, held the freed (0,)
    weights (the layer above held the real ones); a load into a linear layer failed on a size mismatch."""
    layer = moe_layer()
    builders.randomize(layer)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    moecache.patch(layer, offload=moecache.Offload(gpu_experts=0.5))
    assert layer.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    prefix = "deepspeed_moe.experts.deepspeed_experts.2."
    for module, at in ((experts_of(layer)[2], prefix), (experts_of(layer)[2].fc2, prefix + "fc2.")):
        state = module.state_dict()
        assert state.keys() == {k[len(at):] for k in before if k.startswith(at)}
        assert all(torch.equal(v, before[at + k]) for k, v in state.items())
        with pytest.raises(RuntimeError, match="nothing was loaded"):
            module.load_state_dict({k: v + 1 for k, v in state.items()})
    moecache.unpatch(layer)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("into", ["model", "experts-holder", "one-expert", "one-linear"])
def test_load_state_dict_with_assign_into_any_expert_restacks(into):
    """Regression: only expert 0's first weight was looked at, so loading another expert's weights with
    assign=True left the kernels on the old ones until unpatch; a load into a module inside the model
    (the experts' holder, one expert, one expert's linear layer) ran no restack at all (1.08 relative off)."""
    prefix = {"model": "", "experts-holder": "deepspeed_moe.experts.deepspeed_experts.",
              "one-expert": "deepspeed_moe.experts.deepspeed_experts.2.",
              "one-linear": "deepspeed_moe.experts.deepspeed_experts.2.fc1."}[into]
    full = "deepspeed_moe.experts.deepspeed_experts.2.fc1.weight"
    new = {full[len(prefix):]: torch.randn(24, 16)}
    layer, reference = moe_layer(), moe_layer()
    reference.load_state_dict({full: new[full[len(prefix):]]}, strict=False, assign=True)
    moecache.patch(layer)
    layer.get_submodule(prefix.rstrip(".")).load_state_dict(new, strict=False, assign=True)
    assert_close(run(layer, X), run(reference, X), torch.float32)
    moecache.unpatch(layer)


def test_hooks_registered_after_patch_on_parts_the_kernels_skip_are_refused():
    """Regression: a hook put on an expert MLP or one of its linear layers after patch (an ablation, say)
    never ran (0.27 relative off). The forward now refuses while such a hook is there."""
    layer = moe_layer()
    builders.randomize(layer)
    twin = copy.deepcopy(layer)
    moecache.patch(layer)
    for part in (experts_of(layer)[1], experts_of(layer)[2].fc2):
        handle = part.register_forward_hook(lambda module, args, out: out * 0)
        with pytest.raises(ValueError, match="hook was registered after moecache.patch"):
            run(layer, X)
        handle.remove()
        assert_close(run(layer, X), run(twin, X), torch.float32)
    experts_of(layer)[3].register_forward_pre_hook(lambda module, args: (args[0] * 0,))
    experts_of(twin)[3].register_forward_pre_hook(lambda module, args: (args[0] * 0,))
    moecache.unpatch(layer)  # the hook stays, and now runs
    assert torch.equal(run(layer, X), run(twin, X))


def test_a_forward_set_on_the_layer_patch_would_override_is_left_alone():
    """Regression: DeepSpeed's MOELayer (and Switch's experts) with a forward set on the instance
    (accelerate's device hooks) were patched over it, and unpatch deleted it."""
    layer = moe_layer()
    moe = layer.deepspeed_moe
    plain = moe.forward
    moe.forward = lambda *args, **kwargs: plain(*args, **kwargs) * 0.5
    ref = run(layer, X)
    moecache.patch(layer)
    (left,) = moecache.stats(layer)["left_alone"]
    assert "MOELayer: a forward set on the module itself" in left["reason"]
    assert torch.equal(run(layer, X), ref)
    moecache.unpatch(layer)
    assert "forward" in moe.__dict__ and torch.equal(run(layer, X), ref)


def test_quantizing_expert_linears_after_patch_is_refused_and_unpatch_still_works():
    """Regression: after torch.ao's quantize_dynamic on a patched model, unpatch raised (it read the
    quantized layers' weight methods as tensors) on every try, leaving the model refusing every forward."""
    layer = moe_layer()
    builders.randomize(layer)
    twin = copy.deepcopy(layer)
    moecache.patch(layer)
    for m in (layer, twin):  # the experts only (the stand-in's gate reads its weight as a tensor)
        torch.ao.quantization.quantize_dynamic(m, {"deepspeed_moe.experts": torch.ao.quantization.default_dynamic_qconfig},
                                               dtype=torch.qint8, inplace=True)
    with pytest.raises(ValueError, match="replaced or changed after moecache.patch"):
        run(layer, X)
    moecache.unpatch(layer)
    assert not moecache.stats(layer)["patched"] and "forward" not in layer.deepspeed_moe.__dict__
    assert torch.equal(run(layer, X), run(twin, X))


def test_a_layer_copied_from_a_patched_one_is_restored_by_unpatch():
    """Regression: a copy of a patched block put into the model (copy.deepcopy of a layer) stayed patched
    after unpatch, and a later offload left it resident."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([moe_layer(seed=s) for s in range(2)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)[0]
            return (x,)

    model = Stack()
    before = model_snapshot(model)
    moecache.patch(model)
    model.layers.append(copy.deepcopy(model.layers[0]))
    moecache.unpatch(model)
    assert "forward" not in model.layers[2].deepspeed_moe.__dict__
    model.layers = model.layers[:2]
    assert_model_restored(model, before)


def _switch_sparse_mlp(dropout_rate):
    config = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=4, num_experts=4,
        expert_capacity=64, dropout_rate=dropout_rate, router_jitter_noise=0.0)
    torch.manual_seed(0)
    from transformers.models.switch_transformers import modeling_switch_transformers as switch

    return switch.SwitchTransformersSparseMLP(config)


def test_switch_experts_with_dropout_train_as_the_model_does():
    """Regression: the kernels apply no dropout, so a training-mode forward of a patched Switch layer
    skipped the experts' dropout; in training the MLPs now run as the model runs them, in eval the kernels."""
    mlp, reference = _switch_sparse_mlp(0.5), _switch_sparse_mlp(0.5)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
    moecache.patch(mlp)
    for mode in ("train", "eval"):
        getattr(mlp, mode)(), getattr(reference, mode)()
        torch.manual_seed(1)
        want = reference(x)[0]
        torch.manual_seed(1)
        got = mlp(x)[0]
        assert_close(got, want, torch.float32)
    assert moecache.stats(mlp)["calls"] == 1  # the eval forward only
    moecache.unpatch(mlp)
    moecache.patch(mlp.train(), offload=moecache.Offload(gpu_experts=0.5))  # offloaded: nothing left to run
    with pytest.raises(RuntimeError, match="call model.eval"):
        mlp(x)
    moecache.unpatch(mlp)


class DeepseekMoEBlock(nn.Module):
    """DeepSeek-MoE (deepseek-moe-16b's own code): moe_infer takes the routes flattened token by token."""

    class MLP(nn.Module):
        def __init__(self, hidden=32, inter=24):
            super().__init__()
            self.gate_proj = nn.Linear(hidden, inter, bias=False)
            self.up_proj = nn.Linear(hidden, inter, bias=False)
            self.down_proj = nn.Linear(inter, hidden, bias=False)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def __init__(self, experts=4, k=2):
        super().__init__()
        self.k = k
        self.experts = nn.ModuleList(self.MLP() for _ in range(experts))
        self.gate = nn.Linear(32, experts, bias=False)

    def forward(self, hidden):
        flat = hidden.view(-1, 32)
        weights, ids = F.linear(flat, self.gate.weight).softmax(-1).topk(self.k)
        return self.moe_infer(flat, ids.view(-1), weights.view(-1, 1)).view(hidden.shape)

    def moe_infer(self, x, flat_expert_indices, flat_expert_weights):
        out = torch.zeros_like(x)
        tokens = torch.arange(x.shape[0]).repeat_interleave(self.k)
        for i, expert in enumerate(self.experts):
            chosen = flat_expert_indices == i
            out.index_add_(0, tokens[chosen], expert(x[tokens[chosen]]) * flat_expert_weights[chosen])
        return out


def test_deepseek_moe_blocks_with_flattened_routes():
    """Regression: DeepSeek-MoE's moe_infer passes [T*K] ids and [T*K, 1] weights; the patched block failed
    on every forward."""
    torch.manual_seed(0)
    block = DeepseekMoEBlock().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = block(x)
        moecache.patch(block)
        assert_close(block(x), ref, torch.float32)
        assert block(x[:, :0]).shape == (2, 0, 32)  # no tokens: no routes to unflatten
    assert moecache.stats(block)["calls"] == 2
    moecache.unpatch(block)


def test_the_stand_ins_jitter_noise_is_drawn_in_training_only():
    """DeepSpeed's "Jitter" gate policy scales the gate's input by uniform noise in training."""
    def layer(policy):
        torch.manual_seed(0)
        return deepspeed_moe.MoE(16, Fc(), num_experts=4, k=1, min_capacity=0, noisy_gate_policy=policy)

    jitter, plain = layer("Jitter"), layer(None)
    x = torch.randn(4, 16)
    assert torch.equal(run(jitter.eval(), x), run(plain.eval(), x))
    torch.manual_seed(1)
    noise = deepspeed_moe.multiplicative_jitter(x.float())
    assert 0 < (noise / x).sub(1).abs().max() <= 1e-2 + 1e-6
    assert not torch.equal(run(jitter.train(), x), run(plain.train(), x))


@pytest.mark.parametrize("family", ["deepseek-block", "switch"])
def test_list_experts_with_adapters_put_on_before_patch_are_named_as_left_alone(family):
    """Regression: a LoRA on the expert linears before patch (PEFT's layers are not nn.Linear) hid the
    layer from patch altogether: not patched, and not listed in stats' left_alone either."""
    if family == "switch":
        block = _switch_sparse_mlp(0.0).eval()
        experts, name, part = block.experts, "experts", "wi"
        mlps = list(experts.values())
    else:
        torch.manual_seed(0)
        block = DeepseekMoEBlock().eval()
        experts, name, part = block.experts, "experts", "up_proj"
        mlps = list(experts)
    setattr(mlps[1], part, Adapted(getattr(mlps[1], part)))
    x = torch.randn(2, 5, block.gate.in_features if family != "switch" else 16)
    ref, before = run(block, x), model_snapshot(block)
    moecache.patch(block)
    assert moecache.stats(block)["left_alone"] == [
        {"name": name, "kind": "experts", "type": type(experts).__name__,
         "reason": f"expert linear layers that are not nn.Linear (expert 1.{part}: {Adapted.__module__}.Adapted)"}]
    assert torch.equal(run(block, x), ref)
    with pytest.raises(ValueError, match=f"moecache.patch: {name} .*not nn.Linear"):
        moecache.patch(block, strict=True)
    assert_model_restored(block, before)
