// The only file that knows pybind11. Pointers, byte counts and stream handles cross as integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "runtime.h"
#include "copy_engine.h"
#include "cache_core.h"
#include "host_store.h"
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

static PinMode parse_pin_mode(const std::string& name) {
  if (name == "alloc") return PinMode::Alloc;
  if (name == "register") return PinMode::Register;
  if (name == "pageable") return PinMode::Pageable;
  throw py::value_error("pin must be 'alloc', 'register' or 'pageable', got '" + name + "'");
}

static const char* pin_mode_name(PinMode mode) {
  switch (mode) {
    case PinMode::Alloc: return "alloc";
    case PinMode::Register: return "register";
    default: return "pageable";
  }
}

static Policy parse_policy(const std::string& name) {
  if (name == "lru") return Policy::LRU;
  if (name == "lfu") return Policy::LFU;
  if (name == "priority") return Policy::Priority;
  throw py::value_error("policy must be 'lru', 'lfu' or 'priority', got '" + name + "'");
}

static const char* policy_name(Policy policy) {
  switch (policy) {
    case Policy::LRU: return "lru";
    case Policy::LFU: return "lfu";
    default: return "priority";
  }
}

static py::dict stats_dict(const CacheStats& s) {
  py::dict d;
  d["requests"] = s.requests;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["prefetch_hits"] = s.prefetch_hits;
  d["prefetches"] = s.prefetches;
  d["wasted_prefetches"] = s.wasted_prefetches;
  d["evictions"] = s.evictions;
  d["in_place_reads"] = s.in_place_reads;
  d["transfers"] = s.transfers;
  d["bytes_copied"] = s.bytes_copied;
  d["waits"] = s.waits;
  d["copy_ms"] = s.copy_ms;
  d["stall_ms"] = s.stall_ms;
  d["layer_hits"] = s.layer_hits;
  d["layer_misses"] = s.layer_misses;
  return d;
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

  py::class_<HostStore, std::shared_ptr<HostStore>>(m, "HostStore", py::buffer_protocol(),
                                                    "Page-locked host arena for expert master copies.")
      .def(py::init([](std::size_t nbytes, const std::string& backend, const std::string& pin, bool allow_pageable,
                       bool pin_after_fill, std::size_t reclaimable_bytes) {
             Backend b = parse_backend(backend);
             PinMode mode = parse_pin_mode(pin);
             py::gil_scoped_release release;
             return std::make_shared<HostStore>(nbytes, b, mode, allow_pageable, pin_after_fill, reclaimable_bytes);
           }),
           py::arg("nbytes"), py::arg("backend") = "auto", py::arg("pin") = "alloc", py::arg("allow_pageable") = false,
           py::arg("pin_after_fill") = false, py::arg("reclaimable_bytes") = 0)
      .def("pin", &HostStore::pin, py::call_guard<py::gil_scoped_release>(),
           "page-lock an arena made with pin_after_fill, in place (a no-op otherwise)")
      .def_property_readonly("pin_pending", &HostStore::pin_pending)
      .def("release", &HostStore::release, "free the arena now (no view of it may be used afterwards)")
      .def_property_readonly("data_ptr", &HostStore::data)
      .def_property_readonly("device_ptr", &HostStore::device_address,
                             "the pinned arena's address on the GPU (0 when pageable or without CUDA)")
      .def_property_readonly("nbytes", &HostStore::bytes)
      .def_property_readonly("pinned", &HostStore::pinned)
      .def_property_readonly("pin_mode", [](const HostStore& s) { return pin_mode_name(s.mode()); })
      .def_property_readonly("pin_seconds", &HostStore::pin_seconds)
      .def_property_readonly("warning", &HostStore::warning)
      .def_property_readonly("released", &HostStore::released)
      .def_buffer([](HostStore& s) -> py::buffer_info {
        if (s.released()) throw std::runtime_error("HostStore is released");
        return py::buffer_info(reinterpret_cast<void*>(s.data()), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(s.bytes())}, {1}, /*readonly=*/false);
      });

  py::class_<CacheCore>(m, "CacheCore", "Device slot pool, expert map, copy engine and eviction policy.")
      .def(py::init([](std::shared_ptr<HostStore> store, int num_layers, int num_experts, std::size_t record_bytes,
                       int num_slots, std::uintptr_t slot_pool, std::uintptr_t expert_map, const std::string& backend,
                       const std::string& policy, int device) {
             Backend b = parse_backend(backend);
             Policy p = parse_policy(policy);
             py::gil_scoped_release release;
             return std::make_unique<CacheCore>(std::move(store), num_layers, num_experts, record_bytes, num_slots,
                                                  slot_pool, expert_map, b, p, device);
           }),
           py::arg("store"), py::arg("num_layers"), py::arg("num_experts"), py::arg("record_bytes"),
           py::arg("num_slots"), py::arg("slot_pool"), py::arg("expert_map"), py::arg("backend") = "auto",
           py::arg("policy") = "lru", py::arg("device") = 0)
      .def("prefetch", &CacheCore::prefetch, py::arg("layer"), py::arg("experts"), py::arg("stream") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("ensure", &CacheCore::ensure, py::arg("layer"), py::arg("experts"), py::arg("stream") = 0,
           py::arg("count") = true, py::call_guard<py::gil_scoped_release>())
      .def("release", &CacheCore::release, py::arg("lease"), py::call_guard<py::gil_scoped_release>())
      .def("leases_held", &CacheCore::leases_held)
      .def("record_use", &CacheCore::record_use, py::arg("layer"), py::arg("experts"),
           py::call_guard<py::gil_scoped_release>())
      .def("use_in_place", &CacheCore::use_in_place, py::arg("layer"), py::arg("experts"), py::arg("stream") = 0,
           py::arg("evict") = false, py::call_guard<py::gil_scoped_release>())
      .def("releases", &CacheCore::releases, py::call_guard<py::gil_scoped_release>())
      .def("wait_for_release", &CacheCore::wait_for_release, py::arg("timeout_ms"), py::arg("since"),
           py::call_guard<py::gil_scoped_release>())
      .def("_inject_copy_failures", &CacheCore::inject_copy_failures, py::arg("count"),
           "Tests: the next `count` copy batches fail midway (the cache must stay consistent).")
      .def("set_priorities", &CacheCore::set_priorities, py::arg("layer"), py::arg("scores"),
           py::call_guard<py::gil_scoped_release>())
      .def("set_never_evict", &CacheCore::set_never_evict, py::arg("layer"), py::arg("experts"),
           py::arg("never_evict") = true, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("policy", [](CacheCore& c) { return policy_name(c.policy()); })
      .def("slot_of", &CacheCore::slot_of, py::arg("layer"), py::arg("expert"),
           py::call_guard<py::gil_scoped_release>())
      .def("ready", &CacheCore::ready, py::arg("layer"), py::arg("expert"), py::call_guard<py::gil_scoped_release>())
      .def("resident", &CacheCore::resident, py::arg("layer"), py::call_guard<py::gil_scoped_release>())
      .def("stats", [](CacheCore& c) {
        CacheStats s;
        {
          py::gil_scoped_release release;
          s = c.stats();
        }
        return stats_dict(s);
      })
      .def("reset_stats", &CacheCore::reset_stats, py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &CacheCore::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("close", &CacheCore::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", [](CacheCore& core) {
        py::gil_scoped_release released;  // the core's lock may be held across a copy or a synchronize
        return core.closed();
      })
      .def_property_readonly("num_layers", &CacheCore::num_layers)
      .def_property_readonly("num_experts", &CacheCore::num_experts)
      .def_property_readonly("num_slots", &CacheCore::num_slots)
      .def_property_readonly("record_bytes", &CacheCore::record_bytes);

  m.def("pack_copies",
        [](const std::vector<std::tuple<std::uintptr_t, std::uintptr_t, std::size_t>>& jobs) {
          std::vector<CopyJob> in;
          for (const auto& [dst, src, n] : jobs) in.push_back({dst, src, n});
          std::vector<std::tuple<std::uintptr_t, std::uintptr_t, std::size_t>> out;
          for (const CopyJob& j : pack_copies(in)) out.emplace_back(j.dst, j.src, j.bytes);
          return out;
        },
        py::arg("jobs"), "(dst, src, bytes) copies with adjacent source and destination merged (exposed for tests).");
}
