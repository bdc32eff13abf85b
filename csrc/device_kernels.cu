// Small device kernels the cache needs (the expert GEMMs themselves are Triton).
#include <cstdint>

#include <cuda_runtime.h>

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
