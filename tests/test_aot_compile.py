"""Every kernel compiled for sm_90 and sm_80 without a GPU (tests/aot_compile.py, in subprocesses: the
interpreter must be off there, and it is on in this process): no compile error, no register spill, shared
memory within the target's limit, no fence in the alignment kernel's PTX, at the configurations the
heuristics pick for the real model shapes and for the shapes the tests run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "aot_compile.py"


def _start(*args):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    # Off the repository root: the installed package (with its kernels) is the one compiled.
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd="/")


def _finish(proc, timeout=1200):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80_without_spills(tmp_path):
    procs = {arch: _start("--arch", str(arch), "--json", str(tmp_path / f"sm{arch}.jsonl")) for arch in (90, 80)}
    for arch, proc in procs.items():  # the two architectures compile side by side (two cores)
        code, out, err = _finish(proc)
        assert code == 0, f"sm_{arch}:\n{out[-3000:]}\n{err[-3000:]}"
        rows = [json.loads(line) for line in (tmp_path / f"sm{arch}.jsonl").read_text().splitlines()]
        kernels = {r["kernel"] for r in rows}
        assert {"_grouped_gate_up_kernel", "_grouped_down_kernel", "_align_kernel", "_route_kernel", "_sum_partials_kernel",
                "_mla_decode_split_kernel", "_mla_decode_combine_kernel"} <= kernels
        assert all(not r.get("error") and r["spill_stores"] == 0 for r in rows)
        assert all(r["fences"] == 0 for r in rows if r["kernel"] == "_align_kernel")


@pytest.mark.slow
def test_float_arguments_typed_fp64_as_torch_compile_passes_them():
    """Regression: inductor types a Python float kernel argument fp64; MLA's scale then promoted the
    scores and the accumulator update to fp64 and the compile failed on the GPU (tl.dot dtype)."""
    code, out, err = _finish(_start("--groups", "route,mla", "--float-type", "fp64"))
    assert code == 0, out[-3000:] + err[-3000:]
    assert "PROBLEM" not in out
