// A pool of device slots, each holding one expert of any layer, filled from the host store.
//
// One global pool with layer-aware accounting: every layer's experts have the same byte size, so a
// slot can hold any (layer, expert); layers that route to more distinct experts get more slots, and
// the priority policy can favour the layers about to run. Per-layer counters keep the accounting.
#pragma once
#include <cstddef>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "copy_engine.h"
#include "host_store.h"

namespace moecache {

enum class Policy { LRU = 0, LFU = 1, Priority = 2 };

struct CacheStats {
  std::uint64_t requests = 0;       // experts asked for by ensure() / record_use()
  std::uint64_t hits = 0;           // ... already resident (or on their way) when asked for
  std::uint64_t misses = 0;         // ... not resident: copied on demand, or read in place
  std::uint64_t prefetch_hits = 0;  // hits on an expert a prefetch brought in, first use
  std::uint64_t prefetches = 0;     // experts copied by prefetch()
  std::uint64_t wasted_prefetches = 0;  // prefetched, then evicted before any use
  std::uint64_t evictions = 0;
  std::uint64_t in_place_reads = 0;  // misses served from the host store by the kernel (record_use)
  std::uint64_t transfers = 0;       // copies issued after packing adjacent experts
  std::uint64_t bytes_copied = 0;
  std::uint64_t waits = 0;           // times the compute side had to wait for a copy
  double copy_ms = 0.0;
  double stall_ms = 0.0;             // time the compute side actually waited (exposed stall)
  std::vector<std::uint64_t> layer_hits, layer_misses;
};

class CacheCore {
 public:
  // slot_pool: num_slots * record_bytes of device memory (host memory on the host backend);
  // expert_map: num_layers * num_experts int32 in the same memory, read by the expert kernels.
  CacheCore(std::shared_ptr<HostStore> store, int num_layers, int num_experts, std::size_t record_bytes,
              int num_slots, std::uintptr_t slot_pool, std::uintptr_t expert_map, Backend backend, Policy policy,
              int device);
  ~CacheCore();

  // Starts copies of the listed experts that are not resident, highest priority first; returns at once.
  // Returns how many copies it started (it stops early when no slot may be evicted). With the priority
  // policy a prefetch evicts only experts scored strictly below the one it brings in; never a leased
  // slot (the running layer's experts), a kept-resident one, or one this call assigned.
  int prefetch(int layer, const std::vector<int>& experts, std::uintptr_t compute_stream);
  // Makes the listed experts resident for work enqueued next on compute_stream, which waits only on
  // the copies it needs. Returns a lease and each expert's slot, or -1 where the pool had no evictable
  // slot left (the caller works in rounds). The slots stay protected until release(lease): leases,
  // not layers, so threads running the same layer never release each other's slots. count = false: the
  // experts were already counted as requests (a later round of the same layer call), so the statistics
  // and the usage counts the policies read stay one per expert and call.
  std::pair<std::uint64_t, std::vector<int>> ensure(int layer, const std::vector<int>& experts,
                                                    std::uintptr_t compute_stream, bool count = true);
  void release(std::uint64_t lease);
  std::size_t leases_held();
  // Releases so far of leases that protected at least one slot: read it before ensure(), then pass it to
  // wait_for_release, so a release that lands in between is not missed.
  std::uint64_t releases();
  // Waits until the release count passes `since` (at once if it already has), or timeout_ms passes;
  // true if it did, false on timeout or when no lease is held (nothing could be released).
  bool wait_for_release(double timeout_ms, std::uint64_t since);
  // Accounting for experts the kernel uses through the map without ensure() (misses read in place).
  void record_use(int layer, const std::vector<int>& experts);
  // record_use, and a lease on the listed experts that are resident with their copy landed: until it is
  // released, no prefetch evicts what the kernel is about to read from the slots. Misses that a slot can
  // take are copied into it (compute_stream waits for those copies; the same PCIe bytes as an in-place
  // read, and later calls hit): an empty slot, so a pool fills on demand, and with `evict` the policy's
  // victim too; without it a full pool is not changed. The rest are read in place. Returns the lease and
  // each listed expert's slot, -1 for those to read from the host store (a map snapshot for callers that
  // cannot order against later map writes, such as the host backend).
  std::pair<std::uint64_t, std::vector<int>> use_in_place(int layer, const std::vector<int>& experts,
                                                          std::uintptr_t compute_stream, bool evict = false);

  void set_priorities(int layer, const std::vector<float>& scores);  // one score per expert
  void set_never_evict(int layer, const std::vector<int>& experts, bool never_evict);

  int slot_of(int layer, int expert);  // -1 when not resident; assigned slots count while their copy is in flight (ready())
  bool ready(int layer, int expert);   // resident and its copy complete
  std::vector<int> resident(int layer);
  CacheStats stats();
  void reset_stats();
  void synchronize();
  void close();
  bool closed();
  void inject_copy_failures(int count);  // tests: the next `count` copy batches fail midway

  int num_layers() const { return num_layers_; }
  int num_experts() const { return num_experts_; }
  int num_slots() const { return num_slots_; }
  std::size_t record_bytes() const { return record_bytes_; }
  Policy policy() const { return policy_; }

 private:
  struct Slot {
    int layer = -1, expert = -1;
    std::uint64_t ready_ticket = 0;
    int leases = 0;             // ensure() calls not yet released
    bool prefetched_unused = false;
    std::uint64_t claimed = 0;  // the call that assigned it (never its own victim twice)
  };
  struct Expert {
    int slot = -1;
    std::uint64_t last_use = 0, uses = 0;
    float priority = 0.f;
    bool never_evict = false;
  };
  struct Plan {
    std::vector<MapWrite> invalidate, validate;
    std::vector<CopyJob> copies;
    std::uint64_t after = 0;
  };

  void check_open() const;
  // Validates ids (before any state changes) and starts a new call and tick; mu_ held.
  void begin_call(int layer, const std::vector<int>& experts);
  void check_layer(int layer) const;
  void check_expert(int expert) const;
  Expert& state(int layer, int expert) { return experts_[static_cast<std::size_t>(layer) * num_experts_ + expert]; }
  // The slot to fill next, or -1. `min_priority`: with the priority policy, prefetches only evict
  // experts scored below the one they bring in.
  int choose_victim(bool for_prefetch, float min_priority);
  void assign(int slot, int layer, int expert, Plan& plan);
  // Records the account of every expert in `experts` used by `layer` (hits, misses); returns the
  // resident ones' slots. mu_ held.
  std::vector<int> account_uses(int layer, const std::vector<int>& experts, bool in_place);
  int empty_slot() const;  // the lowest-index slot that holds nothing, or -1
  std::uint64_t submit(Plan& plan, std::uintptr_t compute_stream);
  // submit, then the compute stream waits for it and for `needed` (copies this call reads that are still
  // in flight); on failure the call's lease is dropped (it holds nothing) and the error rethrown. mu_ held.
  void submit_for_call(Plan& plan, std::uintptr_t compute_stream, std::uint64_t needed);

  std::shared_ptr<HostStore> store_;
  int num_layers_, num_experts_, num_slots_;
  std::size_t record_bytes_;
  std::uintptr_t slot_pool_;
  std::int32_t* map_;
  Backend backend_;
  Policy policy_;
  std::unique_ptr<CopyEngine> engine_;
  std::vector<Slot> slots_;
  std::vector<Expert> experts_;
  std::unordered_map<std::uint64_t, std::vector<int>> leases_;  // lease -> slots it protects
  std::uint64_t clock_ = 0, call_ = 0, releases_ = 0;
  int filled_ = 0;  // slots that hold an expert (or its copy in flight)
  CacheStats stats_;
  std::mutex mu_;
  std::condition_variable released_;
};

}  // namespace moecache
