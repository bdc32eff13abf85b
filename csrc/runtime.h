// What this build is and whether a CUDA device can be used right now.
#pragma once
#include <string>

namespace moecache {

struct RuntimeInfo {
  bool built_with_cuda = false;
  bool cuda_available = false;
  int device_count = 0;
  int runtime_version = 0;  // CUDART_VERSION the module was built against (0 for host builds)
  int driver_version = 0;   // 0 when no driver is loaded
  std::string reason;       // why CUDA is not available; empty when it is
};

// Probed once; a missing driver or device selects the host backend instead of failing.
const RuntimeInfo& runtime_info();

enum class Backend { Host = 0, Cuda = 1 };

// Cuda when the module was built with CUDA and a device is usable, else Host.
Backend default_backend();

// Throws std::runtime_error with the CUDA error text when `status` is not success (no-op on host builds).
void check_cuda(int status, const char* what);

}  // namespace moecache
