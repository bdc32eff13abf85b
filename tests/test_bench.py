import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
# The --quick runs are CPU smoke runs (tiny shapes, the Triton interpreter) even on a GPU machine.
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}


def quick_rows(script, tmp_path, out_flag="--json", *extra):
    """Run a bench script's --quick CPU smoke run; its JSON rows (it must exit 0)."""
    import json

    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", out_flag, str(out), *extra],
                          capture_output=True, text=True, env=CPU_ENV, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.skipif(not (BENCH / "bench_moe.py").is_file(), reason="needs the source tree")
def test_bench_moe_quick_runs_and_writes_rows(tmp_path):
    rows = quick_rows("bench_moe.py", tmp_path)
    assert {r["provider"] for r in rows} == {"hf_loop:eager", "moecache:eager", "moecache_checked:eager",
                                             "moecache_separate:eager"}
    assert [r["shape"]["T"] for r in rows if r["provider"] == "moecache_separate:eager"] == [8]
    assert all(r["ms"] > 0 and r["device"] and r["commit"] and r["torch"] for r in rows)
    import transformers
    import triton

    assert all(r["transformers"] == transformers.__version__ and r["triton"] == triton.__version__
               and r["cuda"] == torch.version.cuda and "source_digest" in r for r in rows)


@pytest.mark.skipif(not (BENCH / "gpu_smoke.py").is_file(), reason="needs the source tree")
def test_gpu_smoke_checks_every_section_at_tiny_shapes(tmp_path):
    """The GPU run's first script, on CPU (tiny shapes, the interpreter): every section runs and passes, so
    a GPU call is not spent on a script that breaks before its checks."""
    import json

    sys.path.insert(0, str(BENCH))
    try:
        from gpu_smoke import SECTIONS
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "smoke.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_smoke.py"), "--json", str(out)], capture_output=True,
                          text=True, env=CPU_ENV, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["check"].split(":")[0] for r in rows} == set(SECTIONS)
    assert all(r["ok"] for r in rows) and any(r["check"].startswith("non_gated:relu2") for r in rows)


@pytest.mark.skipif(not (BENCH / "bench_prefetch.py").is_file(), reason="needs the source tree")
def test_bench_prefetch_quick_runs_and_writes_rows(tmp_path):

    rows = quick_rows("bench_prefetch.py", tmp_path)
    assert {r["benchmark"] for r in rows} == {"bench_prefetch.pin", "bench_prefetch.h2d", "bench_prefetch.overlap",
                                              "bench_prefetch.misses"}
    assert all(r["ms"] > 0 for r in rows)
    overlap = next(r for r in rows if r["provider"] == "prefetcher:compute+copy")
    assert overlap["stall_ms"] >= 0


@pytest.mark.skipif(not (BENCH / "tune_moe.py").is_file(), reason="needs the source tree")
def test_tune_moe_quick_writes_a_table_that_fused_moe_uses(tmp_path, monkeypatch):
    import json

    import torch

    from moecache import ops
    from moecache.kernels.fused_moe import select_config, shape_key
    from moecache.ops import api
    from moecache.ops.reference import fused_moe_reference, route_reference
    from moecache.testing import assert_close, poisoned

    table_path = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(BENCH / "tune_moe.py"), "--quick", "--out", str(table_path)],
                          capture_output=True, text=True, env=CPU_ENV, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(table_path.read_text())
    tuned = table["configs"][shape_key(64, 32, 8, 2)]
    assert set(tuned) == {"2", "24"} and tuned["2"]["path"] == "decode" and tuned["24"]["path"] == "grouped"

    # A hand-made table with a distinctive tile: fused_moe must pick it up through MOECACHE_MOE_CONFIG.
    tuned["24"].update(BLOCK_N=16, COMBINE="separate")
    table_path.write_text(json.dumps(table))
    picked = select_config(20, 2, 8, 64, 32, True, table=table["configs"])
    assert picked["BLOCK_N"] == 16 and picked["COMBINE"] == "separate"
    # above the largest tuned count the heuristic decides
    assert select_config(99, 2, 8, 64, 32, True, table=table["configs"]) == select_config(99, 2, 8, 64, 32, True)
    assert select_config(20, 2, 8, 64, 40, True, table=table["configs"]) == select_config(20, 2, 8, 64, 40, True)
    monkeypatch.setenv("MOECACHE_MOE_CONFIG", str(table_path))
    api._TUNED_CACHE.clear()
    assert api.tuned_configs(torch.device("cpu"))[shape_key(64, 32, 8, 2)]["24"]["BLOCK_N"] == 16
    x = torch.randn(20, 64)
    wgu, wd = torch.randn(8, 64, 64) / 8, torch.randn(8, 64, 32) / 6
    w, ids = route_reference(torch.randn(20, 8), 2)
    out = poisoned(x.shape, x.dtype, x.device)
    ops.fused_moe(x, wgu, wd, w, ids, backend="triton", out=out)
    assert_close(out, fused_moe_reference(x, wgu, wd, w, ids), torch.float32)
    monkeypatch.setenv("MOECACHE_MOE_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="MOECACHE_MOE_CONFIG"):
        api.tuned_configs(torch.device("cpu"))
    api._TUNED_CACHE.clear()


@pytest.mark.skipif(not (BENCH / "bench_mla.py").is_file(), reason="needs the source tree")
def test_bench_mla_quick_runs_and_writes_rows(tmp_path):

    rows = quick_rows("bench_mla.py", tmp_path, out_flag="--out")
    # 4 heads take a 16-row head block: 64-row blocks are timed beside it, 32-row ones are not (mma.sync either way).
    assert {r["method"] for r in rows} == {"moecache", "moecache_2stage", "moecache_64tok", "moecache_h64",
                                           "torch_absorbed", "transformers"}
    assert not [r for r in rows if "skipped" in r or "error" in r]
    assert all(r["us"] > 0 and r["ms"] > 0 and r["device"] and r["commit"] and r["torch"] and r["transformers"]
               for r in rows)
    points = {(r["Hq"], r["B"], r["S"]) for r in rows}
    assert len(points) == 2 and len(rows) == 6 * len(points)
    for r in rows:
        if r["method"] == "moecache":  # the Triton kernel (interpreter, fp32) against both references
            assert r["max_err_vs_torch_absorbed"] < 1e-4 and r["max_err_vs_fp32_ref"] < 1e-4
            assert r["speedup_vs_torch_absorbed"] > 0 and r["speedup_vs_transformers"] > 0
            assert all(r[f"speedup_vs_moecache_{v}"] > 0 for v in ("2stage", "64tok", "h64"))
            assert "speedup_vs_moecache_h32" not in r
        if r["method"].startswith("moecache_"):  # other configurations give the default's answer
            assert r["max_err_vs_moecache"] < 1e-5
        assert r["kv_bytes_per_token"] > 0 and r["latent_bytes"] == r["B"] * r["S"] * (r["shape"]["R"] + r["shape"]["P"]) * 4


@pytest.mark.skipif(not (BENCH / "bench_mla.py").is_file(), reason="needs the source tree")
def test_bench_mla_times_32_head_blocks_where_the_default_takes_64(tmp_path):
    rows = quick_rows("bench_mla.py", tmp_path, "--out", "--heads", "64", "--points", "1x40")
    methods = {r["method"] for r in rows}
    assert "moecache_h32" in methods and "moecache_h64" not in methods
    h32 = next(r for r in rows if r["method"] == "moecache_h32")
    assert h32["max_err_vs_moecache"] < 1e-5 and h32["us"] > 0


@pytest.mark.skipif(not (BENCH / "kernel_times.py").is_file(), reason="needs the source tree")
def test_kernel_times_quick_lists_each_op_of_a_call(tmp_path):

    rows = {r["case"]: r for r in quick_rows("kernel_times.py", tmp_path)}
    moe, mla = rows["moe tiny T=3"], rows["mla 4 heads B=2 S=40"]
    assert {k["name"] for k in moe["kernels"]} == {"moecache::route", "moecache::fused_moe"}
    assert [k["name"] for k in mla["kernels"]] == ["moecache::mla_decode"]
    for r in (moe, mla):
        assert all(k["us_per_call"] > 0 and k["launches_per_call"] == 1 for k in r["kernels"])
        assert r["kernel_us_sum"] == pytest.approx(sum(k["us_per_call"] for k in r["kernels"]))
        assert r["device"] and r["commit"]


@pytest.mark.skipif(not (BENCH / "host_overhead.py").is_file(), reason="needs the source tree")
def test_host_overhead_quick_times_every_path(tmp_path):
    rows = quick_rows("host_overhead.py", tmp_path)
    assert [(r["op"], r["variant"]) for r in rows] == [
        ("fused_moe", "direct"), ("fused_moe", "checked"), ("fused_moe", "dispatcher"),
        ("route", "direct"), ("route", "dispatcher"), ("mla_decode", "direct"), ("mla_decode", "dispatcher")]
    assert all(0 < r["host_us_per_call"] <= r["device_inclusive_us_per_call"] and r["commit"] for r in rows)


@pytest.mark.skipif(not (BENCH / "kernel_times.py").is_file(), reason="needs the source tree")
def test_kernel_groups_name_the_kernels_of_a_decode_step():
    """The groups a whole-model profile sums kernels into, from the kernel names CUDA and Triton give."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_times_groups", BENCH / "kernel_times.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    names = {
        "_grouped_gate_up_kernel": "moecache experts", "_align_kernel": "moecache experts",
        "_grouped_down_kernel": "moecache experts", "_sum_partials_kernel": "moecache experts",
        "_gate_up_gemv_kernel": "moecache experts", "_down_combine_gemv_kernel": "moecache experts",
        "_route_kernel": "moecache route", "_mla_decode_split_kernel": "moecache mla",
        "_mla_decode_combine_kernel": "moecache mla", "moecache::fused_moe": "moecache experts",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64": "matmul",
        "nvjet_tst_64x8_64x16_4x1_v_bz_TNN": "matmul", "aten::addmm": "matmul",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>": "matmul",
        "triton_poi_fused__to_copy_add_mul_0": "compiled fusions", "triton_red_fused_mean_pow_1": "compiled fusions",
        "Memcpy DtoD (Device -> Device)": "copy and fill", "Memset (Device)": "copy and fill",
        "aten::copy_": "copy and fill",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
        "aten::add": "other",
    }
    assert {name: module.kernel_group(name) for name in names} == names


@pytest.mark.skipif(not (BENCH / "bench_cache.py").is_file(), reason="needs the source tree")
def test_bench_cache_quick_runs_every_policy(tmp_path):

    rows = quick_rows("bench_cache.py", tmp_path)
    trace = [r for r in rows if r["benchmark"] == "bench_cache.trace"]
    providers = {r["provider"] for r in trace}
    assert providers >= {"on_demand", "lru", "lfu", "predictive-d1", "predictive-d2", "pred-d2+sched", "budgeted-d2",
                         "belady", "belady+sched"}
    if trace[0]["model"] == "trained-tiny-moe":  # the shipped learned predictor joins the comparison
        assert providers >= {"learned-d1", "learned-d2", "learned-d2+sched", "learned-budgeted-d2"}
    assert {r["budget"] for r in trace} == {0.125, 0.25, 0.5, 1.0}
    for r in trace:
        assert r["hits"] + r["misses"] == r["requests"] > 0
    for budget in {r["budget"] for r in trace}:
        by = {r["provider"]: r for r in trace if r["budget"] == budget}
        assert by["belady"]["loads"] <= min(by[p]["loads"] for p in ("lru", "lfu", "on_demand"))
        assert by["on_demand"]["hits"] == 0
        # the timing model (assumed PCIe rate and layer time) gives every policy a stall and bytes moved
        assert all(r["stall_ms"] >= 0 and r["bytes_moved"] == r["loads"] * r["expert_bytes"] for r in by.values())
        assert by["budgeted-d2"]["loads"] <= by["predictive-d2"]["loads"]
    for r in trace:  # per decoded token: every micro-batch's prompt step and its loads left out
        assert 0 < r["requests_after_warmup"] < r["requests"]
        assert r["decode_hit_rate"] == r["hits_after_warmup"] / r["requests_after_warmup"]
    per_load = {round(r["loads_per_token"] / r["loads_after_warmup"], 12) for r in trace if r["loads_after_warmup"]}
    assert len(per_load) == 1  # one denominator: the decoded tokens
    on_demand = [r for r in trace if r["provider"] == "on_demand"]
    assert all(r["loads_after_warmup"] == r["requests_after_warmup"] for r in on_demand)
    live = [r for r in rows if r["benchmark"] == "bench_cache.live"]
    assert all(0 <= r["decode_hit_rate"] <= 1 and r["decode_misses_per_token"] >= 0 for r in live)
    assert {r["provider"] for r in live} == {"resident", "lru", "predictive-d2", "budgeted-d2"}
    assert all(r["tokens_per_s"] > 0 for r in live)
    assert all(r["tokens_identical"] for r in live if r["provider"] != "resident")
    assert {r["depth"] for r in rows if r["benchmark"] == "bench_cache.recall"} == {1, 2}


@pytest.mark.skipif(not (BENCH / "bench_e2e.py").is_file(), reason="needs the source tree")
def test_bench_e2e_quick_exercises_every_axis_and_report(tmp_path):
    """The study's CPU smoke run, then its README section and plots generated from its rows."""
    import json

    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_e2e.py"), "--quick", "--profile-decode", "--json", str(out)],
                          capture_output=True, text=True, env=CPU_ENV, timeout=900, cwd=tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    skipped = [r for r in rows if r["benchmark"] == "bench_e2e.skipped"]
    assert proc.returncode == 0 and not skipped, proc.stderr[-2000:]
    study = [r for r in rows if r["benchmark"] == "bench_e2e.study"]
    assert {r["model"] for r in study} == {"moe-llava-phi2", "vl2-small", "llava-1.5-7b", "checkpoint:tiny_moe_llava"}
    assert {r["routing"] for r in study if r["model"] == "checkpoint:tiny_moe_llava"} == {"checkpoint"}
    assert {r["routing"] for r in study if r["model"] == "moe-llava-phi2"} == {"random-weights",
                                                                              "replayed:trained-tiny-moe-llava"}
    assert {r["mix"] for r in study} == {"mmmu", "mathvista"} and {r["new_tokens"] for r in study} == {4, 8}
    assert {r["batch"] for r in study} == {1, 4}
    assert {r["routing"] for r in study if r["model"] == "vl2-small"} == {"random-weights", "replayed:trained-tiny-moe"}
    providers = {r["provider"] for r in study if r["model"] == "vl2-small"}
    assert {"hf:eager", "hf:grouped_mm", "hf:cpu-offload", "moecache", "offload50:on-demand", "offload50:lru-prefetch",
            "offload50:predict-only", "offload50:predict-only-learned", "offload50:predictive", "offload50:budgeted",
            "offload50:in-order", "offload50:scheduled"} <= providers
    assert all(r["prefetch_limit"] > 0 for r in study if r["provider"].endswith("budgeted"))
    assert {r["provider"] for r in study if r["model"] == "llava-1.5-7b"} == {"hf:eager"}
    for r in study:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["e2e_tok_s_per_request"] > 0
        assert r["requests"] == max(r["batch"], 2) and len(r["prompt_tokens"]) == r["requests"]
        assert r["encode_ms"] > 0 and r["encoder_inputs"] >= r["requests"]  # every sampled prompt has an image
        assert max(r["prompt_tokens"]) + r["new_tokens"] <= 512 and r["truncated"] >= 0
        parts = r["breakdown_ms"]  # eager: measured spans of decode forwards only
        assert all(v >= 0 for v in parts.values()) and parts["attention"] > 0
        if r["provider"].startswith("offload"):
            assert r["prefill_counters"]["requests"] > 0 and r["decode_counters"]["requests"] > 0
            assert 0 <= r["decode_hit_rate"] <= 1 and r["experts_moved_per_token"] >= 0
            assert r["pcie_bound_decode_tok_s"] <= r["resident_decode_tok_s"]
        if r["provider"].endswith(("predict-only", "predict-only-learned")):
            assert parts["predictor_host"] > 0 and r["decode_counters"]["prefetches"] == 0
        if r["provider"].endswith("scheduled"):
            assert r["scheduler_ms"] > 0
            # The routing pass is the scheduler's: as many prefill forwards as in order (two micro-batches).
            in_order = next(o for o in study if o["provider"].endswith("in-order") and
                            all(o[k] == r[k] for k in ("model", "routing", "mix", "batch", "new_tokens")))
            assert r["forwards"] == in_order["forwards"] and r["forwards"]["prefill"] == 2 * r["requests"] // r["batch"]
        if r["provider"] == "hf:grouped_mm":
            assert r["hf_decode_experts"] == "grouped_mm"  # transformers swaps it for batched_mm on GPUs only
        profile = r["decode_profile"]  # batch 1, not scheduled: the decode steps' ops, grouped
        if r["batch"] > 1 or r["provider"].endswith(("in-order", "scheduled")):
            assert profile is None
        else:
            assert profile["groups"]["matmul"]["us_per_step"] > 0 and profile["launches_per_step"] > 0
            assert profile["kernel_us_per_step"] == pytest.approx(sum(g["us_per_step"] for g in profile["groups"].values()))
            assert profile["wall_us_per_step"] > 0
    readme = tmp_path / "R.md"
    readme.write_text("# r\n<!-- study:start -->\nold\n<!-- study:end -->\nend\n")
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(out), "--plots", str(tmp_path / "plots"),
                           "--readme", str(readme)], capture_output=True, text=True, env=CPU_ENV, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = readme.read_text()
    assert "old" not in text and text.endswith("end\n") and "answer nothing" in text
    row = next(r for r in study if r["provider"] == "offload50:predict-only" and r["routing"] == "random-weights")
    assert f"{row['breakdown_ms']['predictor_host']:.3f} ms" in text  # the sentences' numbers come from rows
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"study_breakdown.png", "study_e2e_mmmu.png"}


def _bench_e2e_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH / "bench_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (BENCH / "bench_e2e.py").is_file(), reason="needs the source tree")
def test_bench_e2e_writes_each_row_when_measured_and_filters_providers(tmp_path, monkeypatch):
    """A run killed at its time limit keeps the rows measured so far; --providers picks the kinds of rows."""
    import json

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    module = _bench_e2e_module("bench_e2e_rows")
    calls = []

    def measure(model, facts, provider, policy, offload, mode, *args, profile=False):
        calls.append(provider)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the stage's timeout
        return {"benchmark": "bench_e2e.skipped", **args[-1], "reason": "stand-in"}

    monkeypatch.setattr(module, "measure_row", measure)
    monkeypatch.setattr(module, "record_sources", lambda *a: {})
    out = tmp_path / "rows.jsonl"
    with pytest.raises(KeyboardInterrupt):
        module.main(["--quick", "--routing", "random-weights", "--mixes", "mmmu", "--policies", "predictive",
                     "--providers", "moecache,offload", "--json", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["provider"] for r in rows] == calls[:2] == ["moecache", "offload50:predictive"]


@pytest.mark.skipif(not (BENCH / "bench_e2e.py").is_file(), reason="needs the source tree")
@pytest.mark.parametrize("name", ["vl2-small", "moe-llava-phi2", "llava-1.5-7b"])
def test_decode_weight_bytes_counts_top_k_experts_and_one_embedding_row(name):
    """The HBM floor's bytes, counted here from parameter names: routed experts (transformers' fused experts,
    DeepSpeed-MoE's expert lists) at top_k / E, the embedding table as one row, everything else whole."""
    module = _bench_e2e_module("bench_e2e_weights")
    model, facts = module.build(name, True, torch.device("cpu"), torch.float32)
    E, K = facts["num_experts"], facts["top_k"]
    routed = whole = 0
    for pname, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if ".experts." in pname:
            routed += nbytes
        elif pname != "model.embed_tokens.weight":
            whole += nbytes
    assert (routed > 0) == (facts["kind"] == "moe")
    row = model.get_input_embeddings().weight[0]
    expected = whole + (routed * K // E if E else 0) + row.numel() * row.element_size()
    assert facts["decode_weight_bytes"] == expected


@pytest.mark.skipif(not (BENCH / "bench_e2e.py").is_file(), reason="needs the source tree")
def test_hbm_floor_only_for_batch_one_with_every_weight_on_the_gpu():
    module = _bench_e2e_module("bench_e2e_floor")
    result = {"split": None, "prefill_graph_ms": 5.0, "wall_ms": 105.0, "scheduler_ms": 0.0, "batch_e2e_ms": [120.0]}

    def finished(**key):
        row = {"requests": 1, "new_tokens": 11, "prompt_tokens": [50], "batch": 1, "provider": "moecache",
               "budget": 1.0, "decode_weight_bytes": 4e9, "hbm_read_gbps": 4000.0, "result": result,
               "_resident": None, **key}
        module.finish_row(row)
        return row

    row = finished()
    assert row["decode_tok_s"] == pytest.approx(10 / 0.1)
    assert row["hbm_floor_tok_s"] == pytest.approx(1000.0)
    assert row["frac_hbm_floor"] == pytest.approx(0.1)
    for key in ({"batch": 2}, {"budget": 0.5, "provider": "offload50:predictive"}, {"provider": "hf:cpu-offload",
                "budget": None}, {"hbm_read_gbps": None}):
        assert "hbm_floor_tok_s" not in finished(**key), key


@pytest.mark.skipif(not (BENCH / "bench_e2e.py").is_file(), reason="needs the source tree")
def test_budgeted_allowance_reads_the_resident_decode_time_in_either_mode():
    """Regression: in graph mode the resident run has no per-forward split, and the budgeted policy's
    allowance raised there, so every budgeted graph row of slice 4 was skipped."""
    module = _bench_e2e_module("bench_e2e_budget")
    eager = {"split": {"forward_ms": {"prefill": 20.0}, "forwards": {"decode": 40}}, "wall_ms": 120.0,
             "scheduler_ms": 4.0}
    assert module.resident_layer_ms(eager, moe_layers=24, new_tokens=11) == pytest.approx(96.0 / 40 / 24)
    graph = {"split": None, "prefill_graph_ms": 5.0, "wall_ms": 105.0, "scheduler_ms": 0.0,
             "batch_e2e_ms": [60.0, 60.0]}  # two request batches of 10 decode steps each
    assert module.resident_layer_ms(graph, moe_layers=25, new_tokens=11) == pytest.approx(100.0 / 20 / 25)


@pytest.mark.skipif(not (BENCH / "bench_e2e.py").is_file(), reason="needs the source tree")
def test_bench_e2e_past_its_deadline_builds_nothing_and_lists_what_did_not_run(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    module = _bench_e2e_module("bench_e2e_deadline")

    def no_build(*args):
        raise AssertionError("a model was built after the deadline")

    monkeypatch.setattr(module, "build", no_build)
    monkeypatch.setattr(module, "record_sources", lambda *a: {})
    out = tmp_path / "rows.jsonl"
    assert module.main(["--quick", "--routing", "random-weights", "--deadline", "1e-9", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["benchmark"] for r in rows} == {"bench_e2e.not_run"}
    assert {r["model"] for r in rows} == {"moe-llava-phi2", "vl2-small", "llava-1.5-7b", "checkpoint"}


@pytest.mark.skipif(not (BENCH / "bench_e2e.py").is_file(), reason="needs the source tree")
def test_cpu_offload_baseline_gives_the_weights_back_when_it_cannot_start(monkeypatch):
    """If copying the experts out fails partway (pinned memory exhausted), the layers already emptied get
    their weights back, so later providers on the same model are not corrupted."""
    from builders import deepseek

    module = _bench_e2e_module("bench_e2e_offload")
    model = deepseek()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    copies = []
    real_clone = torch.Tensor.clone

    def failing_clone(self, *args, **kwargs):
        copies.append(1)
        if len(copies) == 3:
            raise RuntimeError("out of pinned memory")
        return real_clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", failing_clone)
    with pytest.raises(RuntimeError, match="pinned"):
        module.CpuOffloadHooks(model, torch.device("cpu"))
    monkeypatch.undo()
    assert len(copies) == 3
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_decode_experts_implementation_reads_transformers_own_swap(monkeypatch):
    """transformers' generate decodes with batched_mm when grouped_mm is selected on a GPU, and keeps
    grouped_mm on the CPU; the hf:grouped_mm rows record which one decoded."""
    import transformers

    from moecache.compat import decode_experts_implementation, set_experts_implementation

    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2)
    model = transformers.Qwen3MoeForCausalLM(config)
    set_experts_implementation(model, "grouped_mm")
    assert decode_experts_implementation(model) == "grouped_mm"
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert decode_experts_implementation(model) == "batched_mm"
    assert set(model.get_experts_implementation().values()) == {"grouped_mm"}  # the selection is kept
    set_experts_implementation(model, "eager")
    assert decode_experts_implementation(model) == "eager"


@pytest.mark.skipif(not (BENCH / "bench_e2e.py").is_file(), reason="needs the source tree")
def test_bench_e2e_skipped_configurations_fail_the_run_and_are_reported(tmp_path, monkeypatch):
    import importlib.util
    import json

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    spec = importlib.util.spec_from_file_location("bench_e2e_skips", BENCH / "bench_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def failing(model, facts, provider, policy, offload, mode, *args, profile=False):
        key = args[-1]
        return {"benchmark": "bench_e2e.skipped", **key, "reason": f"RuntimeError('out of memory in {provider}')"}

    monkeypatch.setattr(module, "measure_row", failing)
    monkeypatch.setattr(module, "record_sources", lambda *a: {})
    grid = ["--quick", "--routing", "random-weights", "--mixes", "mathvista", "--policies", "on-demand"]
    out = tmp_path / "rows.jsonl"
    assert module.main(grid + ["--json", str(out)]) == 1
    assert module.main(grid + ["--keep-going"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["benchmark"] == "bench_e2e.skipped" for r in rows)
    sys.path.insert(0, str(BENCH))
    import study_report

    text = study_report.markdown(rows)
    assert "Skipped configurations" in text and "out of memory in offload50:on-demand" in text


@pytest.mark.skipif(not (BENCH / "report.py").is_file(), reason="needs the source tree")
def test_report_without_matplotlib_still_writes_the_tables(tmp_path):
    """The GPU machine may lack matplotlib: the study's section still comes out, the plots are skipped."""
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['report.py', {str(tmp_path / 'none.jsonl')!r}, '--cache-rows', "
            f"{str(BENCH / 'results' / 'bench_cache-cpu.jsonl')!r}, '--plots', {str(tmp_path / 'plots')!r}]; "
            f"sys.path.insert(0, {str(BENCH)!r}); runpy.run_path({str(BENCH / 'report.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CPU_ENV, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "matplotlib is not installed" in proc.stderr
    assert "| experts moved per decoded token |" in proc.stdout and "| trained-tiny-moe |" in proc.stdout
    assert not (tmp_path / "plots").exists()


@pytest.mark.skipif(not (BENCH / "report.py").is_file(), reason="needs the source tree")
def test_report_regenerates_the_results_block_from_the_committed_rows(tmp_path):
    """The README's Results command: the committed rows hold a skipped configuration beside their results.
    Regression: that row made report.py take them for the study's and rewrite the study's block instead."""
    import shutil

    readme = tmp_path / "README.md"
    shutil.copy(BENCH.parent / "README.md", readme)
    before = readme.read_text()
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(BENCH / "results" / "bench_e2e.jsonl"),
                           "--readme", str(readme)], capture_output=True, text=True, env=CPU_ENV, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert readme.read_text() == before  # the committed Results block is what the rows give; the study's untouched


@pytest.mark.skipif(not (BENCH / "report.py").is_file(), reason="needs the source tree")
@pytest.mark.parametrize("rows,marker", [("bench_moe.jsonl", "moe-layer"), ("bench_mla.jsonl", "mla")])
def test_report_regenerates_the_kernel_tables_from_the_committed_rows(rows, marker, tmp_path):
    """The MoE layer and MLA decode tables come from their rows (they were written by hand): the committed
    rows give the committed tables, the newest row of each point where runs were appended."""
    import json
    import shutil

    readme = tmp_path / "README.md"
    shutil.copy(BENCH.parent / "README.md", readme)
    before = readme.read_text()
    assert f"<!-- {marker}:start -->" in before

    def report(path):
        return subprocess.run([sys.executable, str(BENCH / "report.py"), str(path), "--readme", str(readme)],
                              capture_output=True, text=True, env=CPU_ENV, timeout=300, cwd=tmp_path)

    proc = report(BENCH / "results" / rows)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert readme.read_text() == before
    # a newer run of one point replaces that point's figures only
    lines = (BENCH / "results" / rows).read_text().splitlines()
    newer = [json.loads(line) for line in lines]
    ours = next(r for r in reversed(newer) if r.get("method", r.get("provider", "")).startswith("moecache")
                and r.get("us", r.get("ms")) is not None)
    key = "us" if "us" in ours else "ms"
    appended = tmp_path / rows
    appended.write_text("\n".join(lines + [json.dumps({**ours, key: ours[key] * 2, "date": "2027-01-01"})]) + "\n")
    assert report(appended).returncode == 0
    after = readme.read_text()
    assert after != before and "2026-12-04, 2027-01-01" in after
    changed = [line for line in after.splitlines() if line not in before.splitlines()]
    assert len(changed) == 2  # the provenance line and the one point's row


@pytest.mark.skipif(not (BENCH / "kernel_report.py").is_file(), reason="needs the source tree")
def test_kernel_tables_never_pair_rows_of_different_runs():
    """Regression: the newest row of each provider counted, so a partial rerun appended to the file (here a
    new grouped_mm row only, or a new moecache row only) put one run's time beside another's in a ratio."""
    import json

    sys.path.insert(0, str(BENCH))
    try:
        import kernel_report
    finally:
        sys.path.remove(str(BENCH))
    rows = [json.loads(line) for line in (BENCH / "results" / "bench_moe.jsonl").read_text().splitlines()]
    point = next(r for r in rows if r["provider"] == "moecache:graph")
    same_point = [r for r in rows if r["shape"] == point["shape"]]
    committed = kernel_report.moe_markdown(rows)
    prefix = f"| {kernel_report.SHAPE_NAMES[point['shape']['name']]} | {point['shape']['T']} |"
    baseline_only = next(r for r in same_point if r["provider"] == "grouped_mm:graph")
    later = {**baseline_only, "ms": baseline_only["ms"] / 3, "run": "later", "date": "2027-01-01T00:00:00+00:00"}
    assert kernel_report.moe_markdown(rows + [later]) == committed  # no moecache row in that run: point unchanged
    ours_only = {**point, "ms": point["ms"] / 2, "run": "later", "date": "2027-01-01T00:00:00+00:00"}
    table = kernel_report.moe_markdown(rows + [ours_only])
    new_row = next(line for line in table.splitlines() if line.startswith(prefix))
    cells = [c.strip() for c in new_row.strip("|").split("|")]
    assert cells[3] == kernel_report._ms(point["ms"] / 2)
    assert cells[5] == cells[6] == cells[7] == cells[8] == cells[9] == cells[10] == ""  # nothing from the old run
    assert table.splitlines()[0].endswith("2026-12-04, 2027-01-01.")


@pytest.mark.skipif(not (BENCH / "common.py").is_file(), reason="needs the source tree")
def test_the_l2_flush_reads_its_buffer_and_the_mla_targets_judge_the_ratio_first():
    """Regression: the read-based flush called torch.sum with out= but no dim, which raises on every
    device: every GPU timing would have failed. Checked here on the CPU; and bench_mla's first target is
    the issue's ratio, judged on the committed H200 rows."""
    import json

    sys.path.insert(0, str(BENCH))
    try:
        import bench_mla
        import common
    finally:
        sys.path.remove(str(BENCH))
    total = common._flush_l2("cpu")
    assert int(total) == common._L2_FLUSH_BYTES // 4 and total.dtype == torch.int64
    rows = [json.loads(line) for line in (BENCH / "results" / "bench_mla.jsonl").read_text().splitlines()]
    name, status, detail = bench_mla.evaluate_targets(rows)[0]
    assert name.startswith(">= 80% of the measured HBM read rate") and (status, detail) == ("FAIL", "Hq16 B64 S4096: 34%")


@pytest.mark.skipif(not (BENCH / "host_memory.py").is_file(), reason="needs the source tree")
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs a resettable peak RSS (Linux)")
def test_host_memory_quick_measures_one_copy_of_the_experts_handed_over(tmp_path):
    """A cache built from the model's experts beside them raises the peak RSS by one copy of the experts; patch's
    offload, which hands each layer over as it fills, by about one layer's (1/2 of them with the quick run's two
    layers)."""
    rows = {r["case"]: r for r in quick_rows("host_memory.py", tmp_path)}
    assert set(rows) == {"list", "handed"}
    assert rows["list"]["rise_over_experts"] > 0.9
    assert rows["handed"]["rise_over_experts"] < 0.6
    assert all(r["expert_bytes"] > 2**27 and r["offload_device"] == "cpu" for r in rows.values())
