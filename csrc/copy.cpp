#include "copy.h"

#include <cstring>
#include <stdexcept>

#include "runtime.h"

#ifdef MOECACHE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moecache {

Backend default_backend() {
  return runtime_info().cuda_available ? Backend::Cuda : Backend::Host;
}

static void require_cuda(Backend backend) {
  if (backend == Backend::Cuda && !runtime_info().cuda_available) {
    throw std::runtime_error("the CUDA backend is not available: " + runtime_info().reason);
  }
}

void copy_bytes(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream,
                Backend backend) {
  if (nbytes == 0) return;
  if (dst == 0 || src == 0) throw std::invalid_argument("copy_bytes: null pointer");
  require_cuda(backend);
  if (backend == Backend::Host) {
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes);
    return;
  }
#ifdef MOECACHE_WITH_CUDA
  check_cuda(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes,
                             cudaMemcpyDefault, reinterpret_cast<cudaStream_t>(stream)),
             "cudaMemcpyAsync");
#else
  (void)stream;
#endif
}

void scatter_i32(std::uintptr_t table, std::int64_t table_len, std::uintptr_t index,
                 std::uintptr_t values, std::int64_t n, std::uintptr_t stream, Backend backend) {
  if (n <= 0) return;
  if (table == 0 || index == 0 || values == 0) throw std::invalid_argument("scatter_i32: null pointer");
  require_cuda(backend);
  auto* t = reinterpret_cast<std::int32_t*>(table);
  const auto* idx = reinterpret_cast<const std::int32_t*>(index);
  const auto* val = reinterpret_cast<const std::int32_t*>(values);
  if (backend == Backend::Host) {
    for (std::int64_t i = 0; i < n; ++i) {
      if (idx[i] >= 0 && idx[i] < table_len) t[idx[i]] = val[i];
    }
    return;
  }
#ifdef MOECACHE_WITH_CUDA
  check_cuda(launch_scatter_i32(t, table_len, idx, val, n, reinterpret_cast<void*>(stream)),
             "scatter_i32 kernel launch");
#else
  (void)stream;
#endif
}

void synchronize_stream(std::uintptr_t stream, Backend backend) {
  require_cuda(backend);
#ifdef MOECACHE_WITH_CUDA
  if (backend == Backend::Cuda) {
    check_cuda(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
  }
#else
  (void)stream;
#endif
}

}  // namespace moecache
