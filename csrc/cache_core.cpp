#include "cache_core.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <stdexcept>
#include <string>
#include <tuple>

namespace moecache {

CacheCore::CacheCore(std::shared_ptr<HostStore> store, int num_layers, int num_experts, std::size_t record_bytes,
                         int num_slots, std::uintptr_t slot_pool, std::uintptr_t expert_map, Backend backend,
                         Policy policy, int device)
    : store_(std::move(store)),
      num_layers_(num_layers),
      num_experts_(num_experts),
      num_slots_(num_slots),
      record_bytes_(record_bytes),
      slot_pool_(slot_pool),
      map_(reinterpret_cast<std::int32_t*>(expert_map)),
      backend_(backend),
      policy_(policy) {
  if (!store_ || store_->released()) throw std::invalid_argument("store: the host store is released");
  if (num_layers <= 0) throw std::invalid_argument("num_layers must be positive, got " + std::to_string(num_layers));
  if (num_experts <= 0) throw std::invalid_argument("num_experts must be positive, got " + std::to_string(num_experts));
  if (num_slots <= 0) throw std::invalid_argument("num_slots must be positive, got " + std::to_string(num_slots));
  if (record_bytes == 0) throw std::invalid_argument("record_bytes must be positive");
  const std::size_t records = static_cast<std::size_t>(num_layers) * static_cast<std::size_t>(num_experts);
  if (record_bytes > store_->bytes() / records) {  // a division: the product may not fit in size_t
    throw std::invalid_argument("store holds " + std::to_string(store_->bytes()) + " bytes, fewer than " +
                                std::to_string(num_layers) + " layers x " + std::to_string(num_experts) +
                                " experts x " + std::to_string(record_bytes) + " bytes");
  }
  if (slot_pool == 0) throw std::invalid_argument("slot_pool is a null pointer");
  if (expert_map == 0) throw std::invalid_argument("expert_map is a null pointer");
  slots_.resize(num_slots);
  experts_.resize(static_cast<std::size_t>(num_layers) * num_experts);
  stats_.layer_hits.assign(num_layers, 0);
  stats_.layer_misses.assign(num_layers, 0);
  engine_ = backend == Backend::Cuda ? make_cuda_engine(map_, device) : make_host_engine(map_);
}

CacheCore::~CacheCore() {
  try {
    close();
  } catch (...) {
  }
}

void CacheCore::check_open() const {
  if (engine_ == nullptr) throw std::runtime_error("CacheCore is closed");
}

void CacheCore::check_layer(int layer) const {
  if (layer < 0 || layer >= num_layers_) {
    throw std::out_of_range("layer " + std::to_string(layer) + " is outside [0, " + std::to_string(num_layers_) + ")");
  }
}

void CacheCore::check_expert(int expert) const {
  if (expert < 0 || expert >= num_experts_) {
    throw std::out_of_range("expert " + std::to_string(expert) + " is outside [0, " + std::to_string(num_experts_) + ")");
  }
}

static std::vector<int> unique_sorted(std::vector<int> ids) {
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

int CacheCore::choose_victim(bool for_prefetch, float min_priority) {
  const std::uint64_t landed = engine_->completed();
  int best = -1;
  // Smaller is evicted first: the policy's order, and a slot still being filled only on a tie (evicting
  // it wastes its copy and orders the new copy after it).
  std::tuple<float, std::uint64_t, std::uint64_t, bool> best_key;
  for (int s = 0; s < num_slots_; ++s) {
    const Slot& slot = slots_[s];
    if (slot.claimed == call_ || slot.leases > 0) continue;
    if (slot.layer < 0) return s;  // empty: lowest index first, so a fresh pool fills in order
    const Expert& occupant = state(slot.layer, slot.expert);
    if (occupant.never_evict) continue;
    if (for_prefetch && policy_ == Policy::Priority && !(occupant.priority < min_priority)) continue;
    const bool in_flight = slot.ready_ticket > landed;
    std::tuple<float, std::uint64_t, std::uint64_t, bool> key;
    switch (policy_) {
      case Policy::LRU: key = {0.f, occupant.last_use, 0, in_flight}; break;
      case Policy::LFU: key = {0.f, occupant.uses, occupant.last_use, in_flight}; break;
      case Policy::Priority: key = {occupant.priority, occupant.last_use, 0, in_flight}; break;
    }
    if (best < 0 || key < best_key) {
      best = s;
      best_key = key;
    }
  }
  return best;
}

int CacheCore::empty_slot() const {
  if (filled_ >= num_slots_) return -1;
  for (int s = 0; s < num_slots_; ++s) {
    if (slots_[s].layer < 0 && slots_[s].leases == 0) return s;
  }
  return -1;
}

void CacheCore::assign(int s, int layer, int expert, Plan& plan) {
  Slot& slot = slots_[s];
  if (slot.layer < 0) filled_ += 1;
  if (slot.layer >= 0) {
    Expert& old = state(slot.layer, slot.expert);
    old.slot = -1;
    plan.invalidate.push_back({slot.layer * num_experts_ + slot.expert, -1});
    plan.after = std::max(plan.after, slot.ready_ticket);
    stats_.evictions += 1;
    if (slot.prefetched_unused) stats_.wasted_prefetches += 1;
  }
  slot.layer = layer;
  slot.expert = expert;
  slot.claimed = call_;
  slot.prefetched_unused = false;
  state(layer, expert).slot = s;
  const std::size_t record = static_cast<std::size_t>(layer) * num_experts_ + expert;
  plan.copies.push_back({slot_pool_ + static_cast<std::size_t>(s) * record_bytes_,
                         store_->data() + record * record_bytes_, record_bytes_});
  plan.validate.push_back({static_cast<std::int32_t>(record), s});
}

std::uint64_t CacheCore::submit(Plan& plan, std::uintptr_t compute_stream) {
  if (plan.copies.empty()) return 0;
  // `after` matters only if a victim's own copy may not have landed yet.
  if (plan.after != 0 && engine_->done(plan.after)) plan.after = 0;
  std::vector<CopyJob> packed = pack_copies(plan.copies);
  std::uint64_t ticket = 0;
  try {
    ticket = engine_->submit(plan.invalidate, packed, plan.validate, compute_stream, plan.after);
  } catch (...) {
    // The batch may have written some invalidations and part of some copies: the slots it filled hold
    // nothing usable, and neither their old nor their new experts may be read from them. Empty them and
    // point every map entry the batch touched at the host copy.
    std::vector<std::int32_t> entries;
    for (const MapWrite& w : plan.invalidate) entries.push_back(w.index);
    for (const MapWrite& w : plan.validate) {
      entries.push_back(w.index);
      Slot& slot = slots_[w.value];
      state(slot.layer, slot.expert).slot = -1;
      slot.layer = slot.expert = -1;
      filled_ -= 1;
      slot.ready_ticket = 0;
      slot.prefetched_unused = false;
    }
    engine_->clear_map(entries);
    throw;
  }
  for (const CopyJob& job : packed) stats_.bytes_copied += job.bytes;
  stats_.transfers += packed.size();
  for (const MapWrite& w : plan.validate) slots_[w.value].ready_ticket = ticket;
  return ticket;
}

void CacheCore::submit_for_call(Plan& plan, std::uintptr_t compute_stream, std::uint64_t needed) {
  try {
    needed = std::max(needed, submit(plan, compute_stream));
    if (needed != 0 && !engine_->done(needed)) engine_->wait(needed, compute_stream);
  } catch (...) {
    for (int s : leases_[call_]) slots_[s].leases -= 1;  // the call failed: it holds nothing
    leases_.erase(call_);
    released_.notify_all();
    throw;
  }
}

void CacheCore::begin_call(int layer, const std::vector<int>& experts) {
  check_open();
  check_layer(layer);
  for (int e : experts) check_expert(e);
  call_ += 1;
  clock_ += 1;
}

int CacheCore::prefetch(int layer, const std::vector<int>& experts, std::uintptr_t compute_stream) {
  std::lock_guard<std::mutex> lock(mu_);
  begin_call(layer, experts);
  engine_->check_not_capturing(compute_stream);
  engine_->note_stream(compute_stream);
  Plan plan;
  int issued = 0;
  // Highest priority first (ties by id): a victim a prefetch may take is one any lower-priority prefetch
  // could take too, so stopping at the first expert without a victim skips only less wanted ones.
  std::vector<int> order = unique_sorted(experts);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return state(layer, a).priority > state(layer, b).priority; });
  for (int e : order) {
    Expert& ex = state(layer, e);
    if (ex.slot >= 0) continue;
    const int s = choose_victim(/*for_prefetch=*/true, ex.priority);
    if (s < 0) break;
    assign(s, layer, e, plan);
    slots_[s].prefetched_unused = true;
    ex.last_use = clock_;  // so the next victim search does not take it straight back
    issued += 1;
  }
  submit(plan, compute_stream);
  stats_.prefetches += issued;  // once the batch is submitted: a failed one copied nothing
  return issued;
}

std::pair<std::uint64_t, std::vector<int>> CacheCore::ensure(int layer, const std::vector<int>& experts,
                                                               std::uintptr_t compute_stream, bool count) {
  std::lock_guard<std::mutex> lock(mu_);
  begin_call(layer, experts);
  engine_->check_not_capturing(compute_stream);
  engine_->note_stream(compute_stream);
  std::vector<int>& protected_slots = leases_[call_];
  std::uint64_t needed = 0;
  std::vector<int> missing;
  const std::vector<int> wanted = unique_sorted(experts);
  for (int e : wanted) {
    Expert& ex = state(layer, e);
    ex.last_use = clock_;
    if (count) {
      stats_.requests += 1;
      ex.uses += 1;
    }
    if (ex.slot < 0) {
      missing.push_back(e);
      continue;
    }
    Slot& slot = slots_[ex.slot];
    if (count) {
      stats_.hits += 1;
      stats_.layer_hits[layer] += 1;
      if (slot.prefetched_unused) stats_.prefetch_hits += 1;
    }
    slot.prefetched_unused = false;
    slot.leases += 1;
    slot.claimed = call_;
    protected_slots.push_back(ex.slot);
    needed = std::max(needed, slot.ready_ticket);
  }
  Plan plan;
  for (int e : missing) {
    if (count) {
      stats_.misses += 1;
      stats_.layer_misses[layer] += 1;
    }
    const int s = choose_victim(/*for_prefetch=*/false, 0.f);
    if (s < 0) continue;  // pool exhausted by protected slots: the caller runs this expert in a later round
    assign(s, layer, e, plan);
    slots_[s].leases += 1;
    protected_slots.push_back(s);
  }
  submit_for_call(plan, compute_stream, needed);
  std::vector<int> result;
  result.reserve(experts.size());
  for (int e : experts) result.push_back(state(layer, e).slot);
  return {call_, result};
}

void CacheCore::release(std::uint64_t lease) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  auto it = leases_.find(lease);
  if (it == leases_.end()) throw std::invalid_argument("lease " + std::to_string(lease) + " is not held");
  for (int s : it->second) slots_[s].leases -= 1;
  if (!it->second.empty()) releases_ += 1;  // a lease that protected nothing frees nothing to wait for
  leases_.erase(it);
  released_.notify_all();
}

std::uint64_t CacheCore::releases() {
  std::lock_guard<std::mutex> lock(mu_);
  return releases_;
}

bool CacheCore::wait_for_release(double timeout_ms, std::uint64_t since) {
  std::unique_lock<std::mutex> lock(mu_);
  check_open();
  if (releases_ > since) return true;
  // nothing held (a lease protecting no slot frees nothing when released): nothing will be released
  if (std::none_of(leases_.begin(), leases_.end(), [](const auto& lease) { return !lease.second.empty(); })) {
    return false;
  }
  // A day at most: longer (or infinite) durations overflow the clock's arithmetic; NaN waits not at all.
  const double ms = timeout_ms >= 0 ? std::min(timeout_ms, 86400e3) : 0.0;
  return released_.wait_for(lock, std::chrono::duration<double, std::milli>(ms),
                            [&] { return engine_ == nullptr || releases_ > since; });
}

bool CacheCore::closed() {
  std::lock_guard<std::mutex> lock(mu_);
  return engine_ == nullptr;
}

std::size_t CacheCore::leases_held() {
  std::lock_guard<std::mutex> lock(mu_);
  return leases_.size();
}

std::vector<int> CacheCore::account_uses(int layer, const std::vector<int>& experts, bool in_place) {
  clock_ += 1;
  const std::uint64_t landed = engine_->completed();
  std::vector<int> resident;
  for (int e : unique_sorted(experts)) {
    Expert& ex = state(layer, e);
    stats_.requests += 1;
    ex.last_use = clock_;
    ex.uses += 1;
    if (ex.slot >= 0) resident.push_back(ex.slot);
    if (ex.slot >= 0 && slots_[ex.slot].ready_ticket <= landed) {
      stats_.hits += 1;
      stats_.layer_hits[layer] += 1;
      if (slots_[ex.slot].prefetched_unused) {
        stats_.prefetch_hits += 1;
        slots_[ex.slot].prefetched_unused = false;
      }
    } else {
      stats_.misses += 1;
      stats_.layer_misses[layer] += 1;
      if (in_place) stats_.in_place_reads += 1;
    }
  }
  return resident;
}

void CacheCore::record_use(int layer, const std::vector<int>& experts) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_layer(layer);
  for (int e : experts) check_expert(e);
  account_uses(layer, experts, /*in_place=*/true);
}

std::pair<std::uint64_t, std::vector<int>> CacheCore::use_in_place(int layer, const std::vector<int>& experts,
                                                                    std::uintptr_t compute_stream, bool evict) {
  std::lock_guard<std::mutex> lock(mu_);
  begin_call(layer, experts);
  engine_->note_stream(compute_stream);
  const std::vector<int> wanted = unique_sorted(experts);
  const bool may_copy = evict || filled_ < num_slots_;
  if (may_copy && std::any_of(wanted.begin(), wanted.end(), [&](int e) { return state(layer, e).slot < 0; })) {
    engine_->check_not_capturing(compute_stream);
  }
  account_uses(layer, experts, /*in_place=*/false);
  const std::uint64_t landed = engine_->completed();
  std::vector<int>& protected_slots = leases_[call_];
  for (int e : wanted) {
    const int s = state(layer, e).slot;
    if (s < 0 || slots_[s].ready_ticket > landed) continue;
    slots_[s].leases += 1;
    slots_[s].claimed = call_;
    protected_slots.push_back(s);
  }
  // Misses a slot can take are copied into it (the same PCIe bytes as an in-place read, and later calls
  // hit): an empty one, or with `evict` the policy's victim (never a slot this call reads or leased).
  Plan plan;
  std::vector<int> copied;
  for (int e : wanted) {
    if (!may_copy || state(layer, e).slot >= 0) continue;
    const int s = evict ? choose_victim(/*for_prefetch=*/false, 0.f) : empty_slot();
    if (s < 0) break;  // every other slot is leased or claimed: the rest are read in place
    assign(s, layer, e, plan);
    slots_[s].leases += 1;
    protected_slots.push_back(s);
    copied.push_back(e);
  }
  submit_for_call(plan, compute_stream, 0);
  // A slot this call reads: its copy landed before the call, or the compute stream waits for it.
  auto usable_slot = [&](int e) {
    const int s = state(layer, e).slot;
    const bool usable = s >= 0 && (slots_[s].ready_ticket <= landed ||
                                   std::find(copied.begin(), copied.end(), e) != copied.end());
    return usable ? s : -1;
  };
  for (int e : wanted) {
    if (usable_slot(e) < 0) stats_.in_place_reads += 1;
  }
  std::vector<int> result;
  result.reserve(experts.size());
  for (int e : experts) result.push_back(usable_slot(e));
  return {call_, result};
}

void CacheCore::inject_copy_failures(int count) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  engine_->inject_failures(count);
}

void CacheCore::set_priorities(int layer, const std::vector<float>& scores) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_layer(layer);
  if (static_cast<int>(scores.size()) != num_experts_) {
    throw std::invalid_argument("scores must hold one value per expert (" + std::to_string(num_experts_) + "), got " +
                                std::to_string(scores.size()));
  }
  for (int e = 0; e < num_experts_; ++e) {
    if (!std::isfinite(scores[e])) {
      throw std::invalid_argument("scores must be finite, got " + std::to_string(scores[e]) + " for expert " +
                                  std::to_string(e));
    }
  }
  for (int e = 0; e < num_experts_; ++e) state(layer, e).priority = scores[e];
}

void CacheCore::set_never_evict(int layer, const std::vector<int>& experts, bool never_evict) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_layer(layer);
  for (int e : experts) check_expert(e);
  for (int e : experts) state(layer, e).never_evict = never_evict;
}

int CacheCore::slot_of(int layer, int expert) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_layer(layer);
  check_expert(expert);
  return state(layer, expert).slot;
}

bool CacheCore::ready(int layer, int expert) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_layer(layer);
  check_expert(expert);
  const int s = state(layer, expert).slot;
  return s >= 0 && engine_->done(slots_[s].ready_ticket);
}

std::vector<int> CacheCore::resident(int layer) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_layer(layer);
  std::vector<int> out;
  for (int e = 0; e < num_experts_; ++e) {
    if (state(layer, e).slot >= 0) out.push_back(e);
  }
  return out;
}

CacheStats CacheCore::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  CacheStats s = stats_;
  const EngineTimes t = engine_->times();
  s.copy_ms = t.copy_ms;
  s.stall_ms = t.stall_ms;
  s.waits = t.waits;
  return s;
}

void CacheCore::reset_stats() {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  stats_ = CacheStats{};
  for (Slot& slot : slots_) slot.prefetched_unused = false;  // a later hit is no prefetch hit of these stats
  stats_.layer_hits.assign(num_layers_, 0);
  stats_.layer_misses.assign(num_layers_, 0);
  engine_->reset_times();
}

void CacheCore::synchronize() {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  engine_->synchronize();
}

void CacheCore::close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (engine_ == nullptr) return;
  engine_->synchronize();
  engine_.reset();
  store_.reset();
  released_.notify_all();  // waiters see the cache closed
}

}  // namespace moecache
