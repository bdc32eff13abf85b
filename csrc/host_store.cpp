#include "host_store.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "runtime.h"

#ifdef MOECACHE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moecache {

namespace {
constexpr std::size_t kPage = 4096;

std::string gib(std::size_t bytes) {
  std::ostringstream s;
  s.precision(2);
  s << std::fixed << static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0) << " GiB";
  return s.str();
}

// Whole pages, at least one.
std::size_t page_rounded(std::size_t bytes) { return bytes == 0 ? kPage : (bytes + kPage - 1) / kPage * kPage; }

void* aligned_pageable(std::size_t bytes) {
  void* p = std::aligned_alloc(kPage, page_rounded(bytes));
  if (p == nullptr) throw std::runtime_error("host store: could not allocate " + gib(bytes));
  return p;
}

#ifdef MOECACHE_WITH_CUDA
constexpr const char* kPageableFallback = "; using pageable memory (copies ~3x slower, no in-place reads)";

// Page-locks an aligned arena in place (mapped, so it has a device address): "" on success, else why (the
// CUDA error cleared).
std::string register_in_place(void* data, std::size_t bytes) {
  cudaError_t st = cudaHostRegister(data, page_rounded(bytes), cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (st == cudaSuccess) return "";
  cudaGetLastError();
  return std::string("cudaHostRegister of ") + gib(bytes) + " failed (" + cudaGetErrorString(st) +
         "); check `ulimit -l` and free RAM";
}
#endif
}  // namespace

std::size_t host_memory_available() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::size_t value = 0;
  std::string unit;
  while (meminfo >> key >> value >> unit) {
    if (key == "MemAvailable:") return value * 1024;
  }
  return 0;
}

HostStore::HostStore(std::size_t bytes, Backend backend, PinMode mode, bool allow_pageable, bool pin_after_fill,
                     std::size_t reclaimable_bytes)
    : bytes_(bytes), backend_(backend), mode_(mode), allow_pageable_(allow_pageable) {
  const std::size_t available = host_memory_available();
  if (available != 0 && bytes > available && bytes - available > reclaimable_bytes) {
    throw std::runtime_error("host store needs " + gib(bytes) + " for the expert masters but only " +
                             gib(available) + " of RAM is available" +
                             (reclaimable_bytes ? " (and " + gib(reclaimable_bytes) + " freed while it fills)" : ""));
  }
  const auto t0 = std::chrono::steady_clock::now();
  if (backend == Backend::Host) mode_ = PinMode::Pageable;
  if (pin_after_fill && mode_ != PinMode::Pageable) {
    pin_pending_ = true;
    mode_ = PinMode::Pageable;
  }
#ifdef MOECACHE_WITH_CUDA
  if (mode_ == PinMode::Alloc) {
    cudaError_t st = cudaHostAlloc(&data_, bytes == 0 ? kPage : bytes, cudaHostAllocPortable | cudaHostAllocMapped);
    if (st != cudaSuccess) {
      data_ = nullptr;
      cudaGetLastError();
      warning_ = std::string("cudaHostAlloc of ") + gib(bytes) + " failed (" + cudaGetErrorString(st) +
                 "); check `ulimit -l` and free RAM";
    }
  } else if (mode_ == PinMode::Register) {
    data_ = aligned_pageable(bytes);
    warning_ = register_in_place(data_, bytes);
    if (!warning_.empty()) {
      std::free(data_);
      data_ = nullptr;
    }
  }
  if (data_ == nullptr && mode_ != PinMode::Pageable) {
    if (!allow_pageable) throw std::runtime_error("host store: " + warning_);
    warning_ += kPageableFallback;
    mode_ = PinMode::Pageable;
  }
#else
  mode_ = PinMode::Pageable;
#endif
  if (data_ == nullptr) data_ = aligned_pageable(bytes);
  pin_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

HostStore::~HostStore() { release(); }

void HostStore::pin() {
  if (!pin_pending_ || data_ == nullptr) return;
  pin_pending_ = false;
#ifdef MOECACHE_WITH_CUDA
  const auto t0 = std::chrono::steady_clock::now();
  warning_ = register_in_place(data_, bytes_);
  pin_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (warning_.empty()) {
    mode_ = PinMode::Register;
    return;
  }
  if (!allow_pageable_) throw std::runtime_error("host store: " + warning_);
  warning_ += kPageableFallback;
#endif
}

std::uintptr_t HostStore::device_address() const {
#ifdef MOECACHE_WITH_CUDA
  if (data_ == nullptr || mode_ == PinMode::Pageable) return 0;
  void* device_ptr = nullptr;
  cudaError_t st = cudaHostGetDevicePointer(&device_ptr, data_, 0);
  if (st != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return reinterpret_cast<std::uintptr_t>(device_ptr);
#else
  return 0;
#endif
}

void HostStore::release() {
  if (data_ == nullptr) return;
#ifdef MOECACHE_WITH_CUDA
  if (mode_ == PinMode::Alloc) {
    cudaFreeHost(data_);
    data_ = nullptr;
    return;
  }
  if (mode_ == PinMode::Register) cudaHostUnregister(data_);
#endif
  std::free(data_);
  data_ = nullptr;
}

}  // namespace moecache
