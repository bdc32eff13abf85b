// Small device kernels the cache needs (the expert GEMMs themselves are Triton).
#include <cstdint>

#include <cuda_runtime.h>

namespace moecache {

namespace {
__global__ void scatter_i32_kernel(std::int32_t* __restrict__ table, std::int64_t table_len,
                                   const std::int32_t* __restrict__ index,
                                   const std::int32_t* __restrict__ values, std::int64_t n) {
  std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    std::int32_t j = index[i];
    if (j >= 0 && j < table_len) table[j] = values[i];
  }
}
}  // namespace

int launch_scatter_i32(std::int32_t* table, std::int64_t table_len, const std::int32_t* index,
                       const std::int32_t* values, std::int64_t n, void* stream) {
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  scatter_i32_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(table, table_len, index,
                                                                                 values, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moecache

#include "copy_engine.h"

namespace moecache {

namespace {
__global__ void write_map_kernel(std::int32_t* __restrict__ map, MapWriteArgs args) {
  const int i = threadIdx.x;
  if (i < args.n) map[args.index[i]] = args.value[i];
}
}  // namespace

int launch_write_map(std::int32_t* map, const MapWriteArgs& args, void* stream) {
  if (args.n <= 0) return 0;
  write_map_kernel<<<1, 256, 0, static_cast<cudaStream_t>(stream)>>>(map, args);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moecache
