// Page-locked host memory holding every expert's master copy (immutable once filled).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime.h"

namespace moecache {

// How the arena is made page-locked: cudaHostAlloc, or an aligned allocation then cudaHostRegister.
// Pageable is the fallback (and what the host backend always uses).
enum class PinMode { Alloc = 0, Register = 1, Pageable = 2 };

class HostStore {
 public:
  // Throws std::runtime_error, with the numbers, when `bytes` exceeds the RAM available (plus
  // `reclaimable_bytes`: host memory the caller frees while it fills the store), or when pinning fails and
  // `allow_pageable` is false. With `allow_pageable`, a failed pin falls back to pageable memory and
  // warning() says why. With `pin_after_fill`, the arena starts pageable (its pages are committed as they
  // are written, so a caller that frees its sources while filling never holds two copies) and pin()
  // page-locks it in place once filled.
  HostStore(std::size_t bytes, Backend backend, PinMode mode, bool allow_pageable, bool pin_after_fill = false,
            std::size_t reclaimable_bytes = 0);
  ~HostStore();
  HostStore(const HostStore&) = delete;
  HostStore& operator=(const HostStore&) = delete;

  // Page-locks an arena made with pin_after_fill (cudaHostRegister in place: the mode becomes Register);
  // a no-op otherwise and on the host backend. A failed pin throws (the arena stays valid and pageable),
  // or with allow_pageable keeps it pageable and warning() says why.
  void pin();
  bool pin_pending() const { return pin_pending_; }
  void release();  // frees the arena (idempotent)
  bool released() const { return data_ == nullptr; }
  std::uintptr_t data() const { return reinterpret_cast<std::uintptr_t>(data_); }
  std::size_t bytes() const { return bytes_; }
  bool pinned() const { return mode_ != PinMode::Pageable; }
  PinMode mode() const { return mode_; }
  double pin_seconds() const { return pin_seconds_; }  // time to allocate and pin (or allocate)
  const std::string& warning() const { return warning_; }
  // The arena's address as kernels on the GPU see it (cudaHostGetDevicePointer), so a device-side view
  // of the pinned masters can be handed to code that only takes device memory (CUDA-graph capture).
  // 0 when the arena is not pinned or there is no CUDA.
  std::uintptr_t device_address() const;

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  Backend backend_;
  PinMode mode_;
  bool allow_pageable_;
  bool pin_pending_ = false;
  double pin_seconds_ = 0.0;
  std::string warning_;
};

// Bytes of RAM the kernel reports available (MemAvailable), or 0 when unknown.
std::size_t host_memory_available();

}  // namespace moecache
