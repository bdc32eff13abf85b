"""The GPU run scripts' control flow on CPU: the plan (DRY_RUN), stage limits cut to the budget left,
timeouts and failures recorded in the summary, SKIP/ONLY; and the traffic analysis of the kernels."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
needs_source = pytest.mark.skipif(not (BENCH / "gpu_lib.sh").is_file(), reason="needs the source tree")


def _bash(script: str, out: Path, **env):
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(out), **env}, cwd=BENCH.parent)


@needs_source
@pytest.mark.parametrize("script", ["gpu_smoke.sh", "gpu_bench.sh", "gpu_study.sh 1", "gpu_run.sh"])
def test_dry_run_plans_every_stage_in_order(script, tmp_path):
    proc = _bash(f"bash bench/{script}", tmp_path, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "run.log").read_text()
    planned = [line.split("timeout ")[1].split()[0] for line in log.splitlines() if line.startswith("DRY_RUN:")]
    assert planned and all(int(limit) > 0 for limit in planned)
    summary = (tmp_path / "summary.txt").read_text()
    if script == "gpu_run.sh":  # both, the bench within what the smoke run left of the total
        assert "compile-tests: ok" in summary and "tune: ok" in summary
        assert summary.index("compile-tests") < summary.index("bench_moe")
    elif script == "gpu_smoke.sh":
        order = ["kernels-bf16", "gpu-tests", "sanitizer", "compile-tests"]
        assert [s for s in order if f"{s}: ok" in summary] == order
        assert log.index("gpu_smoke.py") < log.index("-m gpu and not compile") < log.index("compute-sanitizer")
    elif script == "gpu_bench.sh":
        for name in ("bench_moe", "e2e-graph", "e2e-eager", "bench_mla", "kernel_times", "bench_prefetch", "host_memory",
                     "tune"):
            assert f"{name}" in summary
        # the targets' stages first: the layer, the whole model's graph decode, MLA, the prefetcher's overlap
        first = ["bench_moe --shapes deepseek-v2-lite", "e2e-graph", "bench_mla", "bench_prefetch --parts overlap"]
        assert [summary.index(name) for name in first] == sorted(summary.index(name) for name in first)
        assert summary.index(first[-1]) < summary.index("e2e-eager") < summary.index("kernel_times")
    else:
        assert "study-slice-1: ok" in summary and "--slice 1" in log and "--deadline" in log


@needs_source
def test_study_slices_and_the_bench_point_name_known_configurations():
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("bench_e2e_module", BENCH / "bench_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for grid in module.GPU_SLICES.values():
        module.check_grid(grid["models"], grid["routing"], grid["policies"], grid["modes"], grid["providers"])
    assert set(module.GPU_SLICES[1]["models"].split(",")) >= {"moe-llava-phi2", "vl2-small", "llava-1.5-7b",
                                                              "llava-1.5-13b"}
    point = (BENCH / "gpu_bench.sh").read_text()
    common = dict(re.findall(r"--(models|routing) (\S+)", point))
    stages = re.findall(r"^e2e (e2e-\w+) .*$", point, re.M)
    assert stages == ["e2e-graph", "e2e-eager"]
    for line in re.findall(r"^e2e e2e-\w+ .*$", point, re.M):
        args = dict(re.findall(r"--(policies|modes|providers|graph-providers) (\S+?)}?(?:\s|$)", line))
        module.check_grid(common["models"], common["routing"], args.get("policies", "predictive"), args["modes"],
                          args["providers"], args.get("graph-providers"))
    with pytest.raises(SystemExit, match="--policies predictiv unknown"):
        module.check_grid("vl2-small", "replayed", "predictiv", None, "moecache")
    with pytest.raises(SystemExit, match="--graph-providers hf:compiled unknown"):
        module.check_grid("vl2-small", "replayed", "predictive", None, "moecache", "hf:compiled")


@needs_source
def test_stage_limits_follow_the_budget_and_timeouts_are_recorded(tmp_path):
    script = ("source bench/gpu_lib.sh; : > \"$SUMMARY\"; "
              "stage quick 30 true; stage slow 30 sleep 30; stage late 30 true; stage fails 30 false")
    proc = _bash(script, tmp_path, BUDGET="20")
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "quick: ok" in summary
    assert "slow: timeout" in summary  # cut from 30 s to the 15 s left of the budget, then killed
    assert "late: skipped (no time left)" in summary and "fails: skipped (no time left)" in summary
    log = (tmp_path / "run.log").read_text()
    assert "slow (limit 1" in log  # the limit printed is the budget left, not the 30 s asked for


@needs_source
def test_failures_skip_and_only(tmp_path):
    script = ("source bench/gpu_lib.sh; : > \"$SUMMARY\"; "
              "stage fails 30 false; stage skipped 30 true; stage kept 30 true")
    proc = _bash(script, tmp_path, SKIP="skipped")
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0 and "fails: rc=1" in summary and "kept: ok" in summary and "skipped:" not in summary
    proc = _bash(script, tmp_path / "only", ONLY="kept")
    summary = (tmp_path / "only" / "summary.txt").read_text()
    assert re.fullmatch(r"kept: ok \(\d+s\)", summary.strip()), summary  # seconds: a loaded machine takes 1


@needs_source
def test_rows_are_packed_after_every_stage_and_out_stays_small(tmp_path):
    """$OUT stays small: rows collect outside it and are packed into rows.tgz after each stage, so a stage
    killed at its limit keeps what the earlier ones wrote; APPEND=1 (the second script of gpu_run.sh)
    adds to the rows of the first."""
    import tarfile

    rows = tmp_path / "rows"
    first = ('source bench/gpu_lib.sh; : > "$SUMMARY"; stage one 30 bash -c "echo 1 >> $ROWS/a.jsonl"; '
             'stage two 10 bash -c "echo 2 >> $ROWS/b.jsonl; sleep 30"')
    proc = _bash(first, tmp_path / "out", ROWS=str(rows))
    assert proc.returncode == 0, proc.stderr
    second = 'source bench/gpu_lib.sh; stage three 30 bash -c "echo 3 >> $ROWS/a.jsonl"'
    proc = _bash(second, tmp_path / "out", ROWS=str(rows), APPEND="1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rows.tgz", "run.log", "summary.txt"]
    assert "two: timeout" in (tmp_path / "out" / "summary.txt").read_text()
    with tarfile.open(tmp_path / "out" / "rows.tgz") as tar:
        assert tar.extractfile("./a.jsonl").read() == b"1\n3\n" and tar.extractfile("./b.jsonl").read() == b"2\n"
    proc = _bash('source bench/gpu_lib.sh; ls -A "$ROWS"', tmp_path / "out", ROWS=str(rows))
    assert proc.stdout == ""  # a script run on its own starts with no rows


@needs_source
def test_kernel_traffic_table():
    proc = subprocess.run([sys.executable, str(BENCH / "kernel_traffic.py"), "--markdown", "--tokens", "1,4096"],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| mixtral")]
    t1 = lines[0].split("|")
    assert t1[2].strip() == "1" and t1[5].strip() == "1.0x"  # one token: every path reads each expert once


@needs_source
def test_the_bench_points_deadline_follows_its_stage_limit(tmp_path):
    """bench_e2e stops starting configurations at its deadline: 20 s inside the stage's limit, which is cut
    to the budget left (regression: a fixed 130 s deadline under a cut limit got the run killed mid-way)."""
    import re

    proc = _bash("bash bench/gpu_bench.sh", tmp_path, DRY_RUN="1", BUDGET="100", ONLY="e2e-graph e2e-eager")
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "run.log").read_text()
    found = re.findall(r"DRY_RUN: timeout (\d+) .*bench_e2e\.py.*--deadline (\d+)", log)
    assert len(found) == 2
    for limit, deadline in found:
        assert int(limit) <= 95 and int(deadline) == int(limit) - 20
