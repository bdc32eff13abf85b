"""Kernels compiled for sm_90 without a GPU (tests/aot_compile.py in a subprocess: the interpreter must be
off there, and it is on in this process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "aot_compile.py"


def run_aot(*args, timeout=900):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd="/")  # off the repository root: import the installed package
    return proc


@pytest.mark.slow
def test_float_arguments_typed_fp64_as_torch_compile_passes_them():
    """Regression: inductor types a Python float kernel argument fp64; MLA's scale then promoted the
    scores and the accumulator update to fp64 and the compile failed on the GPU (tl.dot dtype)."""
    proc = run_aot("--groups", "route,mla", "--float-type", "fp64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PROBLEM" not in proc.stdout
