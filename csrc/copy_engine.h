// Moves expert bytes from the host store into device slots, ordered against a compute stream.
//
// One batch = (1) map invalidations, ordered on the compute stream so kernels enqueued after them read
// the host copy; (2) copies into the slots, started only once every compute kernel enqueued before the
// batch has finished with the old contents; (3) map validations, written once the copies have landed.
// Batches complete in submission order (one copy stream, one worker), so a ticket number says it all.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "runtime.h"

namespace moecache {

struct CopyJob {
  std::uintptr_t dst = 0;
  std::uintptr_t src = 0;
  std::size_t bytes = 0;
};

struct MapWrite {
  std::int32_t index = 0;  // flat index into the [layers, experts] map
  std::int32_t value = 0;  // slot, or -1
};

// Adjacent jobs whose source and destination both continue each other become one transfer (small
// experts lose bandwidth per transfer: 31 GB/s at 1 MB vs 55 GB/s at 64 MB, measured on an H100).
std::vector<CopyJob> pack_copies(std::vector<CopyJob> jobs);

struct EngineTimes {
  double copy_ms = 0.0;   // time the copies of completed batches took
  double stall_ms = 0.0;  // time the compute stream (or the caller, on the host backend) waited
  std::uint64_t waits = 0;
};

class CopyEngine {
 public:
  virtual ~CopyEngine() = default;
  // One batch. `after` (0 = none): a ticket whose validations must land before this batch's
  // invalidations. The copies start once every kernel enqueued so far on compute_stream, and on every
  // other stream this engine has seen, has finished; those streams' later work sees the invalidations.
  // On failure nothing of the batch stays pending: the copy stream is drained, the ticket counter is
  // unchanged, and the caller must treat the batch's map entries as unknown (see clear_map).
  virtual std::uint64_t submit(const std::vector<MapWrite>& invalidate, const std::vector<CopyJob>& copies,
                               const std::vector<MapWrite>& validate, std::uintptr_t compute_stream,
                               std::uint64_t after) = 0;
  virtual bool done(std::uint64_t ticket) = 0;  // never blocks
  virtual std::uint64_t completed() = 0;        // newest ticket known complete; never blocks
  // Work on compute_stream enqueued from now on starts after `ticket` (host: blocks the caller).
  virtual void wait(std::uint64_t ticket, std::uintptr_t compute_stream) = 0;
  // A stream that will read the map or the slots (so later evictions order against it). Streams must
  // outlive the engine.
  virtual void note_stream(std::uintptr_t compute_stream) = 0;
  // Throws when compute_stream is being captured into a CUDA graph: copies and events cannot be.
  virtual void check_not_capturing(std::uintptr_t compute_stream) = 0;
  // Sets these map entries to -1 and waits until they are written (recovery after a failed submit).
  virtual void clear_map(const std::vector<std::int32_t>& indices) = 0;
  virtual void synchronize() = 0;  // every submitted batch complete
  virtual EngineTimes times() = 0;
  virtual void reset_times() = 0;
  // Tests: the next `count` submits fail after writing their invalidations and starting their copies.
  void inject_failures(int count) { inject_failures_ = count; }

 protected:
  bool take_injected_failure() {
    if (inject_failures_ <= 0) return false;
    inject_failures_ -= 1;
    return true;
  }

 private:
  int inject_failures_ = 0;
};

// "Device" slots in ordinary memory; a worker thread does the copies and validations.
std::unique_ptr<CopyEngine> make_host_engine(std::int32_t* map);
// A high-priority copy stream with events on `device`; the map is device memory.
std::unique_ptr<CopyEngine> make_cuda_engine(std::int32_t* map, int device);

#ifdef MOECACHE_WITH_CUDA
// Map writes travel as kernel arguments, so no host buffer must outlive the launch.
constexpr int kMaxMapWritesPerLaunch = 240;
struct MapWriteArgs {
  std::int32_t n;
  std::int32_t index[kMaxMapWritesPerLaunch];
  std::int32_t value[kMaxMapWritesPerLaunch];
};
int launch_write_map(std::int32_t* map, const MapWriteArgs& args, void* stream);  // device_kernels.cu
#endif

}  // namespace moecache
