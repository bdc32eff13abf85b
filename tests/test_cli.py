import os
import subprocess
import sys
import tempfile

import pytest


def _run(*args, env=None):
    # Run outside the source tree so the installed package (with _C) is the one imported.
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "moecache", *args], capture_output=True, text=True,
                              timeout=600, cwd=cwd, env={**os.environ, **(env or {})})


def test_info_reports_build_and_triton_mode():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for key in ("moecache", "moecache._C", "torch", "triton", "_C built with CUDA", "_C CUDA available", "Triton mode"):
        assert key in proc.stdout


def test_demo_generates_unpatched_patched_and_offloaded_with_identical_tokens():
    proc = _run("demo", "--new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for label in ("unpatched (transformers)", "moecache, experts resident", "moecache, offload 0.25", "expert hit rate"):
        assert label in out, out
    assert out.count("tokens/s") == 3
    for line in out.splitlines():
        if "tokens identical" in line:
            assert line.strip().endswith("100.0%"), line


@pytest.mark.parametrize("args", [["--policy", "budgeted"], ["--policy", "budgeted", "--prefetch-limit", "0.5"],
                                  ["--policy", "budgeted", "--family", "trained"]])
def test_demo_runs_the_budgeted_policy(args):
    proc = _run("demo", "--new-tokens", "6", *args)
    assert proc.returncode == 0, proc.stderr
    assert "moecache, offload 0.25" in proc.stdout and proc.stdout.count("tokens/s") == 3
    identical = [line for line in proc.stdout.splitlines() if "tokens identical" in line]
    assert len(identical) == 2 and all(line.strip().endswith("100.0%") for line in identical), proc.stdout


@pytest.mark.parametrize("family", ["moe-llava-phi2", "moe-llava-stablelm", "moe-llava-qwen"])
def test_demo_runs_moe_llava_language_models(family):
    proc = _run("demo", "--family", family, "--new-tokens", "6", "--prompt", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tokens/s") == 3
    identical = [line for line in proc.stdout.splitlines() if "tokens identical" in line]
    assert len(identical) == 2 and all(line.strip().endswith("100.0%") for line in identical), proc.stdout


@pytest.mark.parametrize("level", ["garbage", "5"])
def test_bad_loglevel_warns_and_keeps_the_default(level):
    env = {**os.environ, "MOECACHE_LOGLEVEL": level}
    proc = subprocess.run([sys.executable, "-c", "import logging, moecache; "
                           "print(logging.getLogger('moecache').level)"],
                          capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"  # NOTSET: the default
    assert "MOECACHE_LOGLEVEL" in proc.stderr and "not a logging level" in proc.stderr


@pytest.mark.parametrize("configured", [None, "logging.basicConfig()",
                                        "logging.basicConfig(); logging.getLogger().handlers[0].setLevel('WARNING')"],
                         ids=["no-logging-setup", "basicConfig", "a-warnings-only-handler"])
def test_loglevel_info_shows_what_patch_replaced_once(configured):
    """Regression: MOECACHE_LOGLEVEL=INFO set the level, but a script that configured no logging saw
    nothing (the library's only handler was a NullHandler)."""
    env = {**os.environ, "MOECACHE_LOGLEVEL": "INFO", "MOECACHE_BACKEND": "torch"}
    script = ("import logging, sys, torch, transformers, moecache\n"
              + (configured + "\n" if configured else "")
              + "config = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, "
                "moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, "
                "num_experts=4, num_experts_per_tok=2, head_dim=8)\n"
                "moecache.patch(transformers.Qwen3MoeForCausalLM(config))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("MoecacheExperts") == 1, proc.stderr


@pytest.mark.parametrize("args", [["--layers", "0"], ["--batch", "0"], ["--prompt", "0"], ["--device", "tpu"],
                                  ["--layers", "-1"], ["--budget", "1.5"], ["--family", "llama"],
                                  ["--prefetch-limit", "-1", "--policy", "budgeted"], ["--prefetch-limit", "nan"],
                                  ["--prefetch-limit", "2", "--policy", "lru"], ["--family", "trained", "--layers", "2"]])
def test_demo_rejects_bad_arguments_with_a_message(args):
    proc = _run("demo", *args)
    assert proc.returncode == 2 and "error: argument" in proc.stderr and "Traceback" not in proc.stderr


def test_an_empty_triton_interpret_counts_as_unset():
    """Regression: TRITON_INTERPRET="" (the README: an empty switch counts as unset) kept the interpreter
    off on a machine without a GPU, so every Triton call failed ("0 active drivers")."""
    import torch

    env = {**os.environ, "TRITON_INTERPRET": ""}
    proc = subprocess.run([sys.executable, "-c", "import os, moecache.kernels as k; "
                           "print(repr(os.environ['TRITON_INTERPRET']), k.INTERPRETING)"],
                          capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == (["''", "False"] if torch.cuda.is_available() else ["'1'", "True"])


def test_info_says_when_compiled_kernels_cannot_run():
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-m", "moecache", "info"], capture_output=True, text=True,
                              env={**os.environ, "TRITON_INTERPRET": "0"}, cwd=cwd, timeout=300)
    assert proc.returncode == 0
    import torch

    if not torch.cuda.is_available():
        assert "cannot run" in proc.stdout


def test_demo_without_an_moe_layer_says_so():
    """DeepSeek-V2's first layer is dense: one layer leaves nothing to patch (regression: a traceback)."""
    proc = _run("demo", "--family", "deepseek_v2", "--layers", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--layers 1 leaves deepseek_v2 without an MoE layer" in proc.stderr


def test_demo_with_one_moe_layer_has_no_next_layer_to_predict():
    """Regression: the recall of predictions never made printed as 0.0%."""
    proc = _run("demo", "--family", "mixtral", "--layers", "1", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "next-layer recall    n/a" in proc.stdout


@pytest.mark.parametrize("name,value", [("MOECACHE_BACKEND", "bogus"), ("MOECACHE_KV_BLOCK_SIZE", "0")])
def test_demo_checks_the_environment_before_running(name, value):
    """Regression: a bad switch failed with a traceback after the unpatched run had already taken its time."""
    proc = _run("demo", "--family", "mixtral", "--new-tokens", "1", env={name: value})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert f"{name} must be" in proc.stderr


def test_switches_set_but_empty_count_as_unset(monkeypatch):
    from moecache import _env

    for name in ("MOECACHE_BACKEND", "MOECACHE_KV_BLOCK_SIZE", "MOECACHE_MOE_CONFIG", "MOECACHE_VALIDATE"):
        monkeypatch.setenv(name, "")
    assert (_env.backend_override(), _env.kv_block_size(), _env.moe_config_path(), _env.validate_values()) == (
        "auto", 64, None, True)


def test_demo_trained_says_how_many_prompts_the_held_out_text_holds():
    """Regression: a batch past the held-out text crashed in torch.stack."""
    proc = _run("demo", "--family", "trained", "--batch", "1000", "--prompt", "4", "--new-tokens", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--prompt 4 allows --batch" in proc.stderr


def _save_config(tmp_path, family):
    """A tiny model of a patch-test family: its config.json in tmp_path, and the model with random weights."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_patch import build

    model = build(family)
    model.config.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_plan_reads_a_config_folder_and_says_what_patch_and_offload_do(tmp_path, family):
    """`moecache plan DIR --gpu-experts 0.5` builds the model from config.json on the meta device and
    reports what patch then does to the model with real weights: the same experts and MLA modules, the
    expert cache's slot size and count, and the device's parameter bytes after offload."""
    import json

    import torch

    import moecache

    model = _save_config(tmp_path, family)
    proc = _run("plan", str(tmp_path), "--gpu-experts", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    planned = json.loads(proc.stdout)
    moecache.patch(model, offload=moecache.Offload(gpu_experts=0.5))
    stats, cache = moecache.stats(model), moecache.expert_cache(model)
    assert [layer["name"] for layer in planned["experts"]] == [layer["name"] for layer in stats["layers"]]
    assert len(planned["attention"]) == len(stats["attention"]) == (3 if family == "deepseek_v3" else 0)
    assert planned["left_alone"] == stats["left_alone"] == []
    assert {layer["expert_bytes"] for layer in planned["experts"]} == {cache.record_bytes}
    offload = planned["offload"]
    assert offload["slots"] == cache.num_slots and offload["slot_bytes"] == cache.num_slots * cache.record_bytes
    assert offload["host_bytes"] == len(stats["layers"]) * cache.num_experts * cache.record_bytes
    on_device = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    assert offload["device_weight_bytes"] == sum(t.numel() * t.element_size() for t in on_device) + offload["slot_bytes"]
    moecache.unpatch(model)
    assert planned["parameter_bytes"] == sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert all(layer["dtype"] == str(torch.float32) for layer in planned["experts"])


def test_plan_in_words_and_its_errors(tmp_path):
    import torch
    import transformers

    import moecache

    _save_config(tmp_path, "gpt_oss")
    proc = _run("plan", str(tmp_path), "--gpu-experts", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("GptOssForCausalLM (model_type 'gpt_oss'), float32: ")
    assert "experts: 3 layers of 8 GptOssExperts (swiglu_oai, gated;" in proc.stdout
    assert "MLA attention: none" in proc.stdout
    assert "offload gpu_experts=2, policy lru: 6 device slots (2.0 per layer" in proc.stdout
    proc = _run("plan", str(tmp_path), "--gpu-experts", "2", "--policy", "predictive")
    assert proc.returncode == 0 and "policy predictive: 6 device slots" in proc.stdout, proc.stderr
    proc = _run("plan", str(tmp_path), "--policy", "predictive")
    assert proc.returncode == 2 and "argument --policy: applies with --gpu-experts" in proc.stderr
    proc = _run("plan", str(tmp_path), "--gpu-experts", "9")
    assert proc.returncode == 2 and "gpu_experts=9: a per-layer count must lie in [1, 8]" in proc.stderr
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    for module in meta.modules():  # a model whose routers patch cannot find: predictive offload is refused
        if type(module).__name__ == "GptOssTopKRouter":
            module.weight = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
    assert moecache.plan(meta, offload=moecache.Offload(gpu_experts=0.5))["offload"]["slots"] == 12
    with pytest.raises(ValueError, match="offload policy 'predictive' needs each MoE block's router"):
        moecache.plan(meta, offload=moecache.Offload(gpu_experts=0.5, policy="predictive"))
    proc = _run("plan", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.startswith("moecache plan: ") and "Traceback" not in proc.stderr


def test_plan_builds_a_multimodal_config_with_its_vision_tower(tmp_path):
    """A config with a vision part is planned as the whole multimodal model (transformers' causal-LM class
    for it would build the text model alone, and leave the vision tower's bytes out)."""
    import json

    import transformers

    sys.path.insert(0, os.path.dirname(__file__))
    from test_patch import llama4_multimodal_config

    config = llama4_multimodal_config()
    config.save_pretrained(tmp_path)
    proc = _run("plan", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    planned = json.loads(proc.stdout)
    model = transformers.Llama4ForConditionalGeneration(config)
    assert [layer["name"] for layer in planned["experts"]] == [
        f"language_model.model.layers.{i}.feed_forward.experts" for i in range(3)]
    assert planned["parameter_bytes"] == sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_plan_changes_nothing():
    """moecache.plan on a loaded model leaves it as it was: unpatched, its weights and modules unchanged."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_patch import build

    import moecache
    from moecache.testing import assert_model_restored, model_snapshot

    model = build("qwen3_moe")
    before = model_snapshot(model)
    planned = moecache.plan(model, offload=moecache.Offload(gpu_experts="64KiB"))
    assert planned["offload"]["slots"] == 64 * 1024 // planned["experts"][0]["expert_bytes"] >= 1
    with pytest.raises(ValueError, match="smaller than one expert"):  # as patch refuses it
        moecache.plan(model, offload=moecache.Offload(gpu_experts="1KiB"))
    with pytest.raises(ValueError, match="policy 'budgeted' needs prefetch_limit"):
        moecache.plan(model, offload=moecache.Offload(gpu_experts=0.5, policy="budgeted"))
    assert not moecache.stats(model)["patched"]
    assert_model_restored(model, before)
