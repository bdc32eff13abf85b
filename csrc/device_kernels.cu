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
  // cudaLaunchKernel reports this launch's own status; <<<>>> plus cudaGetLastError would also take
  // (and clear) an error some other library left behind.
  MapWriteArgs copy = args;
  void* params[] = {&map, &copy};
  return static_cast<int>(cudaLaunchKernel(reinterpret_cast<const void*>(&write_map_kernel), dim3(1), dim3(256),
                                           params, 0, static_cast<cudaStream_t>(stream)));
}

}  // namespace moecache
