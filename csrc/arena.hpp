// An arena: one reservation cut into `num_ranges` equal ranges, each cut into
// pages of `page_bytes`. Page id p names a *page group*: bytes
// [p * page_bytes, (p + 1) * page_bytes) of every range at once (for a KV
// cache: the same block range in every layer's K and V tensors).
//
// map()/unmap() take batches. map() is all-or-nothing: it validates every id,
// admits the bytes against the ledger, creates and maps every range of every
// page, grants access once per run of adjacent pages, and on any failure
// undoes what it did and rethrows. unmap() validates every id first; a driver
// failure part-way leaves no half-mapped page group (the page in progress is
// restored) and the pages already unmapped are accounted as such.
//
// Thread-safe: one mutex per arena serialises map/unmap/close; readers of the
// mapped count need no lock. The Python binding releases the GIL around the
// batched calls.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "backend.hpp"

namespace kvcached {

enum class HandleMode { Group, PerRange };

// Counters in the control segment, updated with atomics (0 = not attached).
struct Ledger {
  std::uint64_t* slot_mapped = nullptr;  // this engine's mapped bytes
  std::uint64_t* gpu_mapped = nullptr;   // all kvcached engines on the GPU
  std::uint64_t* gpu_budget = nullptr;   // UINT64_MAX: no budget
  std::size_t headroom_bytes = 0;        // device free memory kept for non-KV use
};

class Arena {
 public:
  // Preconditions (std::invalid_argument otherwise): num_ranges > 0;
  // page_bytes a positive multiple of the backend granularity; range_bytes a
  // positive multiple of page_bytes. The backend must outlive the arena.
  Arena(Backend* backend, std::size_t num_ranges, std::size_t range_bytes, std::size_t page_bytes, HandleMode mode);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Map every page group in `page_ids`. Throws std::invalid_argument for ids
  // out of range, repeated or already mapped (nothing changed); OutOfMemory
  // when the budget, the headroom or the device refuses (nothing changed);
  // VmmError for other failures (rolled back).
  void map(const std::vector<std::int64_t>& page_ids);
  // Unmap and release every page group in `page_ids`. Throws
  // std::invalid_argument for ids out of range, repeated or not mapped
  // (nothing changed); VmmError when the driver fails.
  void unmap(const std::vector<std::int64_t>& page_ids);
  // Unmap everything, release the reservation; later calls throw VmmError.
  void close();

  bool is_mapped(std::int64_t page_id) const;
  std::vector<std::int64_t> mapped_pages() const;
  std::size_t num_mapped_pages() const { return num_mapped_.load(std::memory_order_relaxed); }
  std::size_t mapped_bytes() const { return num_mapped_pages() * group_bytes(); }

  void set_ledger(const Ledger& ledger);
  void clear_ledger();

  std::uintptr_t base_addr() const { return base_; }
  std::uintptr_t range_addr(std::size_t range) const;
  std::size_t num_ranges() const { return num_ranges_; }
  std::size_t range_bytes() const { return range_bytes_; }
  std::size_t page_bytes() const { return page_bytes_; }
  std::size_t num_pages() const { return num_pages_; }
  std::size_t group_bytes() const { return num_ranges_ * page_bytes_; }
  HandleMode handle_mode() const { return mode_; }
  bool closed() const { return closed_; }
  Backend* backend() const { return backend_; }

 private:
  struct Progress;

  void check_open() const;
  // Sorted copy of `page_ids`; throws std::invalid_argument unless every id is
  // in range, unique and (un)mapped as `want_mapped` says.
  std::vector<std::int64_t> validate(const std::vector<std::int64_t>& page_ids, bool want_mapped) const;
  void admit(std::size_t bytes);
  void unadmit(std::size_t bytes);
  void map_page(std::int64_t page, Progress& progress);
  void rollback(std::vector<Progress>& done) noexcept;
  void unmap_page(std::int64_t page);
  void unmap_all_locked() noexcept;
  std::uintptr_t page_addr(std::size_t range, std::int64_t page) const {
    return base_ + range * range_bytes_ + static_cast<std::size_t>(page) * page_bytes_;
  }
  std::size_t handles_per_page() const { return mode_ == HandleMode::Group ? 1 : num_ranges_; }

  Backend* backend_;
  std::size_t num_ranges_, range_bytes_, page_bytes_, num_pages_;
  HandleMode mode_;
  std::uintptr_t base_ = 0;
  bool closed_ = false;
  mutable std::mutex mutex_;
  std::vector<Handle> handles_;      // num_pages * handles_per_page
  std::vector<std::uint8_t> mapped_;  // per page
  std::atomic<std::size_t> num_mapped_{0};
  Ledger ledger_;
};

}  // namespace kvcached
