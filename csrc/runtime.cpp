#include "runtime.h"

#include <mutex>
#include <stdexcept>

#ifdef MOECACHE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moecache {

const RuntimeInfo& runtime_info() {
  static RuntimeInfo info;
  static std::once_flag once;
  std::call_once(once, [] {
#ifdef MOECACHE_WITH_CUDA
    info.built_with_cuda = true;
    info.runtime_version = CUDART_VERSION;
    int driver = 0;
    if (cudaDriverGetVersion(&driver) == cudaSuccess) info.driver_version = driver;
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      info.reason = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")";
      cudaGetLastError();  // clear the sticky-free error so later probes start clean
    } else if (count == 0) {
      info.reason = "no CUDA device is visible";
    } else {
      info.device_count = count;
      info.cuda_available = true;
    }
#else
    info.reason = "moecache._C was built without CUDA (host-only build)";
#endif
  });
  return info;
}

void check_cuda(int status, const char* what) {
#ifdef MOECACHE_WITH_CUDA
  if (status != 0) {
    auto err = static_cast<cudaError_t>(status);
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
#else
  (void)status;
  (void)what;
#endif
}

Backend default_backend() {
  return runtime_info().cuda_available ? Backend::Cuda : Backend::Host;
}

}  // namespace moecache
