#include "copy_engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "runtime.h"

#ifdef MOECACHE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moecache {

std::vector<CopyJob> pack_copies(std::vector<CopyJob> jobs) {
  std::sort(jobs.begin(), jobs.end(), [](const CopyJob& a, const CopyJob& b) { return a.src < b.src; });
  std::vector<CopyJob> packed;
  for (const CopyJob& job : jobs) {
    if (!packed.empty() && packed.back().src + packed.back().bytes == job.src &&
        packed.back().dst + packed.back().bytes == job.dst) {
      packed.back().bytes += job.bytes;
    } else {
      packed.push_back(job);
    }
  }
  return packed;
}

namespace {

void store_map(std::int32_t* map, const MapWrite& w) { __atomic_store_n(map + w.index, w.value, __ATOMIC_RELEASE); }

// ------------------------------------------------------------------ host backend
class HostEngine final : public CopyEngine {
 public:
  explicit HostEngine(std::int32_t* map) : map_(map), worker_([this] { run(); }) {}

  ~HostEngine() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    worker_.join();
  }

  std::uint64_t submit(const std::vector<MapWrite>& invalidate, const std::vector<CopyJob>& copies,
                       const std::vector<MapWrite>& validate, std::uintptr_t, std::uint64_t after) override {
    if (after != 0) wait_until(after, /*count_stall=*/false);
    // The caller is the compute stream here: it runs nothing while it is in this call, and every other
    // caller reads a slot only under a lease, so the old contents are free once the map stops pointing
    // at them.
    for (const MapWrite& w : invalidate) store_map(map_, w);
    if (take_injected_failure()) {
      if (!copies.empty()) {  // a partial batch: the first copy lands, the rest never starts
        const CopyJob& job = copies.front();
        std::memcpy(reinterpret_cast<void*>(job.dst), reinterpret_cast<const void*>(job.src), job.bytes / 2);
      }
      throw std::runtime_error("copy engine: injected failure (tests)");
    }
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(Batch{++submitted_, copies, validate});
    work_cv_.notify_one();
    return submitted_;
  }

  void note_stream(std::uintptr_t) override {}
  void check_not_capturing(std::uintptr_t) override {}

  void clear_map(const std::vector<std::int32_t>& indices) override {
    for (std::int32_t i : indices) store_map(map_, MapWrite{i, -1});
  }

  bool done(std::uint64_t ticket) override {
    std::lock_guard<std::mutex> lock(mu_);
    return completed_ >= ticket;
  }

  std::uint64_t completed() override {
    std::lock_guard<std::mutex> lock(mu_);
    return completed_;
  }

  void wait(std::uint64_t ticket, std::uintptr_t) override { wait_until(ticket, /*count_stall=*/true); }

  void synchronize() override {
    std::uint64_t last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last = submitted_;
    }
    wait_until(last, false);
  }

  EngineTimes times() override {
    std::lock_guard<std::mutex> lock(mu_);
    return times_;
  }

  void reset_times() override {
    std::lock_guard<std::mutex> lock(mu_);
    times_ = EngineTimes{};
  }

 private:
  struct Batch {
    std::uint64_t ticket;
    std::vector<CopyJob> copies;
    std::vector<MapWrite> validate;
  };

  void wait_until(std::uint64_t ticket, bool count_stall) {
    std::unique_lock<std::mutex> lock(mu_);
    if (completed_ >= ticket) return;
    const auto t0 = std::chrono::steady_clock::now();
    done_cv_.wait(lock, [&] { return completed_ >= ticket; });
    if (count_stall) {
      times_.stall_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      times_.waits += 1;
    }
  }

  void run() {
    for (;;) {
      Batch batch;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and nothing left to copy
        batch = std::move(queue_.front());
        queue_.pop_front();
      }
      const auto t0 = std::chrono::steady_clock::now();
      for (const CopyJob& job : batch.copies) {
        std::memcpy(reinterpret_cast<void*>(job.dst), reinterpret_cast<const void*>(job.src), job.bytes);
      }
      for (const MapWrite& w : batch.validate) store_map(map_, w);
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      {
        std::lock_guard<std::mutex> lock(mu_);
        completed_ = batch.ticket;
        times_.copy_ms += ms;
      }
      done_cv_.notify_all();
    }
  }

  std::int32_t* map_;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::deque<Batch> queue_;
  std::uint64_t submitted_ = 0, completed_ = 0;
  bool stop_ = false;
  EngineTimes times_;
  std::thread worker_;  // last: started once everything above exists
};

#ifdef MOECACHE_WITH_CUDA
// ------------------------------------------------------------------ CUDA backend
// Makes the engine's device current for one call and gives the caller's thread its own device back
// (torch keeps its current device per thread; events and streams belong to the device current when made).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    switched_ = previous_ != device;
    if (switched_) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

class CudaEngine final : public CopyEngine {
 public:
  CudaEngine(std::int32_t* map, int device) : map_(map), device_(device) {
    DeviceGuard guard(device_);
    int least = 0, greatest = 0;
    check_cuda(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange");
    check_cuda(cudaStreamCreateWithPriority(&copy_stream_, cudaStreamNonBlocking, greatest), "cudaStreamCreateWithPriority");
    check_cuda(cudaEventCreateWithFlags(&fence_, cudaEventDisableTiming), "cudaEventCreate");
    check_cuda(cudaEventCreateWithFlags(&other_fence_, cudaEventDisableTiming), "cudaEventCreate");
  }

  ~CudaEngine() override {
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(device_);
    cudaStreamSynchronize(copy_stream_);
    for (auto& b : inflight_) release_events(b.begin, b.done);
    for (auto& s : stalls_) release_events(s.begin, s.end);
    for (cudaEvent_t e : pool_) cudaEventDestroy(e);
    cudaEventDestroy(fence_);
    cudaEventDestroy(other_fence_);
    cudaStreamDestroy(copy_stream_);
    cudaSetDevice(previous);
  }

  std::uint64_t submit(const std::vector<MapWrite>& invalidate, const std::vector<CopyJob>& copies,
                       const std::vector<MapWrite>& validate, std::uintptr_t compute_stream,
                       std::uint64_t after) override {
    DeviceGuard guard(device_);
    check_not_capturing(compute_stream);
    note_stream(compute_stream);
    auto compute = reinterpret_cast<cudaStream_t>(compute_stream);
    Batch b{submitted_ + 1, take_event(), take_event()};
    try {
      if (!invalidate.empty()) {
        if (after != 0) wait(after, compute_stream, /*count_stall=*/false);
        write_map(invalidate, compute);
        // The copies start after every kernel enqueued so far on the compute stream (which also wrote
        // the invalidations) ...
        check_cuda(cudaEventRecord(fence_, compute), "cudaEventRecord");
        check_cuda(cudaStreamWaitEvent(copy_stream_, fence_, 0), "cudaStreamWaitEvent");
        // ... and on every other stream that reads the map: their later work sees the invalidations,
        // their earlier work finishes with the old slot contents first.
        for (cudaStream_t other : streams_) {
          if (other == compute || capturing(other)) continue;
          check_cuda(cudaStreamWaitEvent(other, fence_, 0), "cudaStreamWaitEvent");
          check_cuda(cudaEventRecord(other_fence_, other), "cudaEventRecord");
          check_cuda(cudaStreamWaitEvent(copy_stream_, other_fence_, 0), "cudaStreamWaitEvent");
        }
      }
      check_cuda(cudaEventRecord(b.begin, copy_stream_), "cudaEventRecord");
      const bool fail = take_injected_failure();
      for (const CopyJob& job : copies) {
        check_cuda(cudaMemcpyAsync(reinterpret_cast<void*>(job.dst), reinterpret_cast<const void*>(job.src),
                                   fail ? job.bytes / 2 : job.bytes, cudaMemcpyHostToDevice, copy_stream_),
                   "cudaMemcpyAsync (expert prefetch)");
        if (fail) throw std::runtime_error("copy engine: injected failure (tests)");
      }
      if (fail) throw std::runtime_error("copy engine: injected failure (tests)");
      write_map(validate, copy_stream_);
      check_cuda(cudaEventRecord(b.done, copy_stream_), "cudaEventRecord");
    } catch (...) {
      // Nothing of this batch may stay pending: drain the copy stream, give the events back, keep the
      // ticket counter where it was. The caller clears the batch's map entries.
      cudaStreamSynchronize(copy_stream_);
      release_events(b.begin, b.done);
      throw;
    }
    submitted_ = b.ticket;
    inflight_.push_back(b);
    return b.ticket;
  }

  void note_stream(std::uintptr_t compute_stream) override {
    auto s = reinterpret_cast<cudaStream_t>(compute_stream);
    if (std::find(streams_.begin(), streams_.end(), s) == streams_.end()) streams_.push_back(s);
  }

  void check_not_capturing(std::uintptr_t compute_stream) override {
    if (capturing(reinterpret_cast<cudaStream_t>(compute_stream))) {
      throw std::runtime_error(
          "expert cache: a stream is being captured into a CUDA graph; copies and events cannot be captured. "
          "Compiled (CUDA-graph) decode reads misses in place through the map and must not call the cache");
    }
  }

  void clear_map(const std::vector<std::int32_t>& indices) override {
    DeviceGuard guard(device_);
    std::vector<MapWrite> writes;
    for (std::int32_t i : indices) writes.push_back({i, -1});
    write_map(writes, copy_stream_);
    check_cuda(cudaStreamSynchronize(copy_stream_), "cudaStreamSynchronize (map recovery)");
  }

  bool done(std::uint64_t ticket) override {
    poll();
    return completed_ >= ticket;
  }

  std::uint64_t completed() override {
    poll();
    return completed_;
  }

  void wait(std::uint64_t ticket, std::uintptr_t compute_stream) override {
    DeviceGuard guard(device_);
    wait(ticket, compute_stream, true);
  }

  void synchronize() override {
    DeviceGuard guard(device_);
    check_cuda(cudaStreamSynchronize(copy_stream_), "cudaStreamSynchronize (copy stream)");
    poll();
  }

  EngineTimes times() override {
    poll();
    return times_;
  }

  void reset_times() override {
    poll();
    times_ = EngineTimes{};
  }

 private:
  struct Batch {
    std::uint64_t ticket;
    cudaEvent_t begin, done;
  };
  struct Stall {
    cudaEvent_t begin, end;
  };

  void wait(std::uint64_t ticket, std::uintptr_t compute_stream, bool count_stall) {
    poll();
    if (completed_ >= ticket) return;
    auto compute = reinterpret_cast<cudaStream_t>(compute_stream);
    auto it = std::find_if(inflight_.begin(), inflight_.end(), [&](const Batch& b) { return b.ticket == ticket; });
    if (it == inflight_.end()) throw std::logic_error("copy engine: waiting on an unknown ticket");
    Stall s{count_stall ? take_event() : nullptr, count_stall ? take_event() : nullptr};
    if (count_stall) check_cuda(cudaEventRecord(s.begin, compute), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(compute, it->done, 0), "cudaStreamWaitEvent");
    if (count_stall) {
      check_cuda(cudaEventRecord(s.end, compute), "cudaEventRecord");
      stalls_.push_back(s);
    }
  }

  void write_map(const std::vector<MapWrite>& writes, cudaStream_t stream) {
    for (std::size_t i = 0; i < writes.size(); i += kMaxMapWritesPerLaunch) {
      MapWriteArgs args{};
      args.n = static_cast<std::int32_t>(std::min<std::size_t>(kMaxMapWritesPerLaunch, writes.size() - i));
      for (int j = 0; j < args.n; ++j) {
        args.index[j] = writes[i + j].index;
        args.value[j] = writes[i + j].value;
      }
      check_cuda(launch_write_map(map_, args, stream), "expert map update launch");
    }
  }

  // Retires completed batches and stalls in order, adding up their times; never blocks.
  void poll() {
    while (!inflight_.empty()) {
      cudaError_t st = cudaEventQuery(inflight_.front().done);
      if (st == cudaErrorNotReady) break;
      check_cuda(st, "cudaEventQuery (copy batch)");
      Batch b = inflight_.front();
      inflight_.pop_front();
      float ms = 0.f;
      check_cuda(cudaEventElapsedTime(&ms, b.begin, b.done), "cudaEventElapsedTime");
      times_.copy_ms += ms;
      completed_ = b.ticket;
      release_events(b.begin, b.done);
    }
    while (!stalls_.empty()) {
      cudaError_t st = cudaEventQuery(stalls_.front().end);
      if (st == cudaErrorNotReady) break;
      check_cuda(st, "cudaEventQuery (stall)");
      Stall s = stalls_.front();
      stalls_.pop_front();
      float ms = 0.f;
      check_cuda(cudaEventElapsedTime(&ms, s.begin, s.end), "cudaEventElapsedTime");
      times_.stall_ms += ms;
      times_.waits += 1;
      release_events(s.begin, s.end);
    }
  }

  static bool capturing(cudaStream_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    check_cuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
    return status != cudaStreamCaptureStatusNone;
  }

  cudaEvent_t take_event() {
    if (!pool_.empty()) {
      cudaEvent_t e = pool_.back();
      pool_.pop_back();
      return e;
    }
    cudaEvent_t e;
    check_cuda(cudaEventCreate(&e), "cudaEventCreate");
    return e;
  }

  void release_events(cudaEvent_t a, cudaEvent_t b) {
    if (a) pool_.push_back(a);
    if (b) pool_.push_back(b);
  }

  std::int32_t* map_;
  int device_;
  cudaStream_t copy_stream_ = nullptr;
  cudaEvent_t fence_ = nullptr, other_fence_ = nullptr;
  std::vector<cudaStream_t> streams_;  // every compute stream seen: evictions order against all of them
  std::deque<Batch> inflight_;
  std::deque<Stall> stalls_;
  std::vector<cudaEvent_t> pool_;
  std::uint64_t submitted_ = 0, completed_ = 0;
  EngineTimes times_;
};
#endif

}  // namespace

std::unique_ptr<CopyEngine> make_host_engine(std::int32_t* map) { return std::make_unique<HostEngine>(map); }

std::unique_ptr<CopyEngine> make_cuda_engine(std::int32_t* map, int device) {
#ifdef MOECACHE_WITH_CUDA
  if (!runtime_info().cuda_available) throw std::runtime_error("the CUDA backend is not available: " + runtime_info().reason);
  return std::make_unique<CudaEngine>(map, device);
#else
  (void)map;
  (void)device;
  throw std::runtime_error("moecache._C was built without CUDA");
#endif
}

}  // namespace moecache
