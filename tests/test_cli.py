import subprocess
import sys


import tempfile


def _run(*args):
    # Run outside the source tree so the installed package (with _C) is the one imported.
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "moecache", *args], capture_output=True, text=True,
                              timeout=600, cwd=cwd)


def test_info_reports_build_and_triton_mode():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for key in ("moecache", "moecache._C", "torch", "triton", "_C built with CUDA", "_C CUDA available", "Triton mode"):
        assert key in proc.stdout


def test_demo_runs_both_backends_and_they_agree():
    proc = _run("demo", "--tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert "backend=torch" in proc.stdout and "backend=triton" in proc.stdout
    diff = float(proc.stdout.split("max |diff| vs torch = ")[1].split()[0])
    assert diff < 1e-3
