// The only file that knows pybind11. Pointers, byte counts and stream handles cross as integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "copy.h"
#include "runtime.h"

namespace py = pybind11;
using namespace moecache;

#ifndef MOECACHE_CUDA_ARCHS
#define MOECACHE_CUDA_ARCHS ""
#endif

static Backend parse_backend(const std::string& name) {
  if (name == "host") return Backend::Host;
  if (name == "cuda") return Backend::Cuda;
  if (name == "auto") return default_backend();
  throw py::value_error("backend must be 'auto', 'host' or 'cuda', got '" + name + "'");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "moecache compiled core: expert store, slot pool, copy engine (no libtorch)";
  m.attr("__version__") = MOECACHE_VERSION;

  m.def("built_with_cuda", [] { return runtime_info().built_with_cuda; },
        "True when this module was compiled with the CUDA backend.");
  m.def("cuda_available", [] { return runtime_info().cuda_available; },
        "True when the CUDA backend can be used now (built with CUDA, driver loaded, a device visible).");
  m.def("cuda_unavailable_reason", [] { return runtime_info().reason; },
        "Why cuda_available() is False; empty when it is True.");
  m.def("default_backend", [] { return default_backend() == Backend::Cuda ? "cuda" : "host"; });
  m.def("build_info", [] {
    const auto& info = runtime_info();
    py::dict d;
    d["version"] = MOECACHE_VERSION;
    d["built_with_cuda"] = info.built_with_cuda;
    d["cuda_runtime_version"] = info.runtime_version;
    d["cuda_driver_version"] = info.driver_version;
    d["cuda_archs"] = std::string(MOECACHE_CUDA_ARCHS);
    d["device_count"] = info.device_count;
    d["build_type"] = MOECACHE_BUILD_TYPE;
    d["sanitizer"] = MOECACHE_SANITIZE_NAME;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    return d;
  });

  m.def(
      "copy_bytes",
      [](std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream,
         const std::string& backend) {
        Backend b = parse_backend(backend);
        py::gil_scoped_release release;
        copy_bytes(dst, src, nbytes, stream, b);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("stream") = 0,
      py::arg("backend") = "auto",
      "Copy nbytes from address src to address dst (host: memmove; cuda: cudaMemcpyAsync on stream).");
  m.def(
      "scatter_i32",
      [](std::uintptr_t table, std::int64_t table_len, std::uintptr_t index, std::uintptr_t values,
         std::int64_t n, std::uintptr_t stream, const std::string& backend) {
        Backend b = parse_backend(backend);
        py::gil_scoped_release release;
        scatter_i32(table, table_len, index, values, n, stream, b);
      },
      py::arg("table"), py::arg("table_len"), py::arg("index"), py::arg("values"), py::arg("n"),
      py::arg("stream") = 0, py::arg("backend") = "auto",
      "table[index[i]] = values[i] for int32 buffers; out-of-range indices are skipped.");
  m.def(
      "synchronize",
      [](std::uintptr_t stream, const std::string& backend) {
        Backend b = parse_backend(backend);
        py::gil_scoped_release release;
        synchronize_stream(stream, b);
      },
      py::arg("stream") = 0, py::arg("backend") = "auto");
}
