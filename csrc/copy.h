// Byte copies and small table updates on either backend. Pointers and streams are integers
// so the module never needs torch; the caller owns every buffer.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moecache {

enum class Backend { Host = 0, Cuda = 1 };

// Cuda when the module was built with CUDA and a device is usable, else Host.
Backend default_backend();

// Host: memcpy, synchronous. Cuda: cudaMemcpyAsync(cudaMemcpyDefault) on `stream` (0 = legacy default).
void copy_bytes(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream,
                Backend backend);

// table[index[i]] = values[i] for i < n; indices outside [0, table_len) are skipped (the device
// cannot raise; callers validate). Cuda: one kernel on `stream`, no host synchronisation.
void scatter_i32(std::uintptr_t table, std::int64_t table_len, std::uintptr_t index,
                 std::uintptr_t values, std::int64_t n, std::uintptr_t stream, Backend backend);

void synchronize_stream(std::uintptr_t stream, Backend backend);

#ifdef MOECACHE_WITH_CUDA
// Defined in device_kernels.cu.
int launch_scatter_i32(std::int32_t* table, std::int64_t table_len, const std::int32_t* index,
                       const std::int32_t* values, std::int64_t n, void* stream);
#endif

}  // namespace moecache
