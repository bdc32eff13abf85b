import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moecache
from moecache import _C

REPO = Path(__file__).resolve().parents[1]


def test_versions_match():
    assert moecache.__version__ == _C.__version__ == _C.build_info()["version"]


def test_kernels_ship_inside_the_package():
    import moecache.kernels as k

    assert Path(k.__file__).resolve().parent.parent == Path(moecache.__file__).resolve().parent
    spec = importlib.util.find_spec("kernels")
    # A top-level `kernels` may exist (PyPI's); it must never be our kernels/ folder.
    assert spec is None or Path(spec.origin).resolve().parent != REPO / "kernels"


def test_build_flags_are_honest():
    info = _C.build_info()
    assert info["built_with_cuda"] == _C.built_with_cuda()
    if _C.built_with_cuda():
        assert info["cuda_runtime_version"] > 0 and "90" in info["cuda_archs"]
    else:
        assert info["cuda_runtime_version"] == 0 and not _C.cuda_available()
    # _C sees CUDA exactly when torch does (both need a driver and a device).
    if _C.built_with_cuda():
        assert _C.cuda_available() == torch.cuda.is_available()
    if _C.cuda_available():
        assert _C.cuda_unavailable_reason() == "" and _C.default_backend() == "cuda"
    else:
        assert _C.cuda_unavailable_reason() != "" and _C.default_backend() == "host"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="backend must be"):
        _C.HostStore(64, backend="tpu")
    with pytest.raises(ValueError, match="pin must be"):
        _C.HostStore(64, pin="glue")
    if not _C.cuda_available():
        with pytest.raises(RuntimeError, match="host store"):
            _C.HostStore(64, backend="cuda")
    import torch

    store = _C.HostStore(4096, backend="host", pin="pageable")
    pool, expert_map = torch.zeros(4096, dtype=torch.uint8), torch.full((2, 1), -1, dtype=torch.int32)
    # 2 x 1 x 2**63 bytes wraps to 0 in size_t: the check must not multiply (it accepted, then a copy crashed).
    with pytest.raises(ValueError, match="store holds 4096 bytes, fewer than 2 layers x 1 experts"):
        _C.CacheCore(store, 2, 1, 2**63, 1, pool.data_ptr(), expert_map.data_ptr(), backend="host")


def _setup_py_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "MOECACHE_"))}
    env.update(extra)
    return env


needs_source = pytest.mark.skipif(not (REPO / "setup.py").is_file(), reason="needs the source tree")


@needs_source
def test_build_cuda_1_without_nvcc_fails_clearly(tmp_path):
    env = _setup_py_env(MOECACHE_BUILD_CUDA="1", CUDA_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "b")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "MOECACHE_BUILD_CUDA=1 but nvcc was not found" in proc.stdout + proc.stderr


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("moecache_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no build
    return module


@needs_source
def test_build_tool_search_prefers_the_environment_and_rejects_old_versions(tmp_path, monkeypatch, capsys):
    setup = _setup_module()
    old, new = tmp_path / "old" / "cmake", tmp_path / "new" / "cmake"
    for path, version in ((old, "3.10.2"), (new, "3.31.0")):
        path.parent.mkdir()
        path.write_text(f"#!/bin/sh\necho 'cmake version {version}'\n")
        path.chmod(0o755)
    monkeypatch.setattr(setup, "_candidates", lambda *a: iter([(str(old), "the cmake package"), (str(new), "PATH")]))
    assert setup.find_tool("cmake", "cmake", "CMAKE_BIN_DIR", setup.CMAKE_MINIMUM) == str(new)
    err = capsys.readouterr().err
    assert "version 3.10.2 < 3.20" in err and f"cmake 3.31.0 at {new} (PATH)" in err
    monkeypatch.setattr(setup, "_candidates", lambda *a: iter([(str(old), "the cmake package")]))
    with pytest.raises(SystemExit, match="no usable cmake.*3.10.2 < 3.20"):
        setup.find_tool("cmake", "cmake", "CMAKE_BIN_DIR", setup.CMAKE_MINIMUM)
    monkeypatch.setattr(setup, "_candidates", lambda *a: iter([]))
    assert setup.find_tool("cmake", "cmake", "CMAKE_BIN_DIR", setup.CMAKE_MINIMUM) is None


@needs_source
def test_build_uses_the_environments_cmake_when_path_has_none(tmp_path):
    """A venv that is not activated: PATH lacks its bin folder, the cmake package still provides cmake."""
    pytest.importorskip("cmake")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env = _setup_py_env(PATH=str(bindir), MOECACHE_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "b")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert "moecache build: cmake" in proc.stderr and "cmake package" in proc.stderr, proc.stderr[-2000:]


@needs_source
def test_bad_build_cuda_value_is_rejected(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not on PATH")
    env = _setup_py_env(MOECACHE_BUILD_CUDA="maybe")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "b")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "MOECACHE_BUILD_CUDA must be auto, 0 or 1" in proc.stdout + proc.stderr
