"""Build moecache: setuptools drives CMake (Ninja, pybind11's CMake config) to build moecache._C.

MOECACHE_BUILD_CUDA=auto|0|1 chooses the CUDA build (auto: when nvcc is found).
kernels/ ships as moecache.kernels, never as a top-level `kernels` package.
"""
import hashlib
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
    mode = (os.environ.get("MOECACHE_BUILD_CUDA") or "auto").strip().lower()
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


CMAKE_MINIMUM = (3, 20)  # CMakeLists.txt's cmake_minimum_required


def _tool_version(path: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in match.groups() if g is not None) if match else None


def _candidates(name: str, module: str, bin_dir_attr: str):
    """(path, where) for a build tool: the building Python environment's own first (the pip packages
    `cmake`/`ninja` expose their binaries; a venv that is not activated is not on PATH), then PATH."""
    try:
        mod = __import__(module)
        bin_dir = getattr(mod, bin_dir_attr, None)
        if bin_dir:
            yield str(Path(bin_dir) / name), f"the {module} package of {sys.executable}"
    except ImportError:
        pass
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        yield str(beside), f"beside {sys.executable}"
    found = shutil.which(name)
    if found:
        yield found, "PATH"


def find_tool(name: str, module: str, bin_dir_attr: str, minimum: tuple[int, ...] | None = None) -> str | None:
    """The first usable `name` binary, printing which one and why others were passed over."""
    rejected = []
    for path, where in _candidates(name, module, bin_dir_attr):
        if not Path(path).is_file():
            continue
        version = _tool_version(path)
        if version is None:
            rejected.append(f"{path} ({where}): does not run")
            continue
        if minimum and version < minimum:
            rejected.append(f"{path} ({where}): version {'.'.join(map(str, version))} < "
                            f"{'.'.join(map(str, minimum))}")
            continue
        for line in rejected:
            print(f"moecache build: skipped {name} {line}", file=sys.stderr)
        print(f"moecache build: {name} {'.'.join(map(str, version))} at {path} ({where})", file=sys.stderr)
        return path
    if rejected:
        raise SystemExit(f"moecache build: no usable {name}: " + "; ".join(rejected)
                         + f" -- `pip install {module}` into the environment that builds")
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        cmake = find_tool("cmake", "cmake", "CMAKE_BIN_DIR", CMAKE_MINIMUM)
        if cmake is None:
            raise SystemExit("cmake was not found: `pip install cmake` (>= 3.20), or use pip's isolated build")
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
        ninja = find_tool("ninja", "ninja", "BIN_DIR")
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        # One CMake tree per Python environment: a tree configured by another environment's pybind11 and
        # tools (an earlier in-place build) fails to reconfigure.
        env_tag = hashlib.sha1(sys.executable.encode()).hexdigest()[:8]
        build_temp = Path(self.build_temp) / f"{ext.name}-{env_tag}"
        build_temp.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)



# setuptools runs this file as __main__; tests import it to check the tool search alone.
if __name__ == "__main__":
    setup(
        version=_version(),
        packages=find_packages(include=["moecache", "moecache.*"]) + ["moecache.kernels"],
        package_dir={"moecache": "moecache", "moecache.kernels": "kernels"},
        package_data={"moecache.kernels": ["configs/*.json"], "moecache.data": ["tiny_moe/*", "tiny_moe_llava/*"]},
        ext_modules=[CMakeExtension("moecache._C", sourcedir=str(ROOT))],
        cmdclass={"build_ext": CMakeBuild},
        zip_safe=False,
    )
