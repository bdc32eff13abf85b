"""Build moecache: setuptools drives CMake (Ninja, pybind11's CMake config) to build moecache._C.

MOECACHE_BUILD_CUDA=auto|0|1 chooses the CUDA build (auto: when nvcc is found).
kernels/ ships as moecache.kernels, never as a top-level `kernels` package.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "moecache" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def _find_nvcc():
    # An explicit CUDA_HOME/CUDA_PATH is the user's choice: look nowhere else.
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            return str(nvcc) if nvcc.is_file() else None
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _cuda_mode():
    mode = os.environ.get("MOECACHE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MOECACHE_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    nvcc = _find_nvcc()
    if mode == "1" and nvcc is None:
        raise SystemExit(
            "MOECACHE_BUILD_CUDA=1 but nvcc was not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, "
            "PATH and /usr/local/cuda/bin). Install the CUDA toolkit or build with MOECACHE_BUILD_CUDA=0."
        )
    use = nvcc is not None if mode == "auto" else mode == "1"
    return use, nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = ""):
        super().__init__(name, sources=[])
        self.sourcedir = str(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit("cmake was not found: `pip install cmake` (>= 3.26), or use pip's isolated build")
        try:
            import pybind11
        except ImportError:
            raise SystemExit("pybind11 is not installed: `pip install pybind11`, or use pip's isolated build")
        use_cuda, nvcc = _cuda_mode()

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        cfg = "Debug" if self.debug or os.environ.get("MOECACHE_DEBUG") == "1" else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DMOECACHE_VERSION={_version()}",
            f"-DMOECACHE_WITH_CUDA={'ON' if use_cuda else 'OFF'}",
        ]
        if use_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if os.environ.get("MOECACHE_SANITIZE"):
            args.append(f"-DMOECACHE_SANITIZE={os.environ['MOECACHE_SANITIZE']}")
        if shutil.which("ninja") or _has_ninja_module():
            args.append("-GNinja")
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401  (the pip package puts the binary on PATH inside build envs)
        return True
    except ImportError:
        return False


setup(
    version=_version(),
    packages=find_packages(include=["moecache", "moecache.*"]) + ["moecache.kernels"],
    package_dir={"moecache": "moecache", "moecache.kernels": "kernels"},
    package_data={"moecache.kernels": ["configs/*.json"], "moecache.data": ["tiny_moe/*"]},
    ext_modules=[CMakeExtension("moecache._C", sourcedir=str(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
