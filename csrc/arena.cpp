#include "arena.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>

#include "errors.hpp"

namespace kvcached {
namespace {

std::string format_ids(const std::vector<std::int64_t>& ids) {
  std::string text = "[";
  const std::size_t shown = std::min<std::size_t>(ids.size(), 8);
  for (std::size_t i = 0; i < shown; ++i) {
    if (i) text += ", ";
    text += std::to_string(ids[i]);
  }
  if (ids.size() > shown) text += ", ... (" + std::to_string(ids.size()) + " in all)";
  return text + "]";
}

}  // namespace

// How far map_page got, so a failure can be undone exactly.
struct Arena::Progress {
  std::int64_t page = -1;
  std::size_t num_handles = 0;
  std::size_t num_ranges_mapped = 0;
};

Arena::Arena(Backend* backend, std::size_t num_ranges, std::size_t range_bytes, std::size_t page_bytes,
             HandleMode mode)
    : backend_(backend), num_ranges_(num_ranges), range_bytes_(range_bytes), page_bytes_(page_bytes), mode_(mode) {
  const std::size_t gran = backend->granularity();
  if (num_ranges == 0) throw std::invalid_argument("num_ranges must be > 0, got 0");
  if (page_bytes == 0 || page_bytes % gran != 0) {
    throw std::invalid_argument("page_bytes must be a positive multiple of the granularity (" + std::to_string(gran) +
                                " bytes), got " + std::to_string(page_bytes));
  }
  if (range_bytes == 0 || range_bytes % page_bytes != 0) {
    throw std::invalid_argument("range_bytes must be a positive multiple of page_bytes (" +
                                std::to_string(page_bytes) + "), got " + std::to_string(range_bytes));
  }
  if (mode == HandleMode::Group && num_ranges > 1 && std::string(backend->name()) == "cuda") {
    throw std::invalid_argument(
        "handle_mode 'group' needs map offsets into a handle, which CUDA does not support (cuMemMap takes "
        "offset 0 only); use 'per_range' or 'auto' with more than one range");
  }
  if (range_bytes > std::numeric_limits<std::size_t>::max() / num_ranges) {
    throw std::invalid_argument("num_ranges * range_bytes overflows");
  }
  num_pages_ = range_bytes / page_bytes;
  // Align the reservation to the largest power of two dividing the page size
  // (capped at 1 GiB): pages then start on boundaries the driver can back with
  // its largest page-table entries. Measured on an H100: 8 MiB pages at 2 MiB
  // alignment took 1.45x as long to map as at 8 MiB alignment.
  std::size_t alignment = page_bytes & (~page_bytes + 1);
  alignment = std::min<std::size_t>(std::max(alignment, gran), std::size_t(1) << 30);
  base_ = backend->reserve(num_ranges * range_bytes, alignment);
  handles_.assign(num_pages_ * handles_per_page(), 0);
  mapped_.assign(num_pages_, 0);
}

Arena::~Arena() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) return;
  unmap_all_locked();
  try {
    backend_->free_reserved(base_, num_ranges_ * range_bytes_);
  } catch (const std::exception&) {
    // A destructor cannot report; the address space is leaked, nothing else.
  }
  closed_ = true;
}

void Arena::check_open() const {
  if (closed_) throw VmmError("arena is closed");
}

std::uintptr_t Arena::range_addr(std::size_t range) const {
  if (range >= num_ranges_) {
    throw std::invalid_argument("range must be in [0, " + std::to_string(num_ranges_) + "), got " +
                                std::to_string(range));
  }
  return base_ + range * range_bytes_;
}

bool Arena::is_mapped(std::int64_t page_id) const {
  if (page_id < 0 || static_cast<std::size_t>(page_id) >= num_pages_) {
    throw std::invalid_argument("page id must be in [0, " + std::to_string(num_pages_) + "), got " +
                                std::to_string(page_id));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return mapped_[static_cast<std::size_t>(page_id)] != 0;
}

std::vector<std::int64_t> Arena::mapped_pages() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::int64_t> pages;
  pages.reserve(num_mapped_.load());
  for (std::size_t p = 0; p < num_pages_; ++p)
    if (mapped_[p]) pages.push_back(static_cast<std::int64_t>(p));
  return pages;
}

std::vector<std::int64_t> Arena::validate(const std::vector<std::int64_t>& page_ids, bool want_mapped) const {
  std::vector<std::int64_t> bad;
  for (std::int64_t id : page_ids)
    if (id < 0 || static_cast<std::size_t>(id) >= num_pages_) bad.push_back(id);
  if (!bad.empty()) {
    throw std::invalid_argument("page_ids out of range: " + format_ids(bad) + " (allowed 0.." +
                                std::to_string(num_pages_ - 1) + ")");
  }
  std::vector<std::int64_t> sorted(page_ids);
  std::sort(sorted.begin(), sorted.end());
  for (std::size_t i = 1; i < sorted.size(); ++i)
    if (sorted[i] == sorted[i - 1]) bad.push_back(sorted[i]);
  if (!bad.empty()) throw std::invalid_argument("page_ids repeated in one call: " + format_ids(bad));
  for (std::int64_t id : sorted)
    if ((mapped_[static_cast<std::size_t>(id)] != 0) != want_mapped) bad.push_back(id);
  if (!bad.empty()) {
    throw std::invalid_argument(std::string("page_ids ") + (want_mapped ? "not mapped" : "already mapped") + ": " +
                                format_ids(bad) + (want_mapped ? " (only mapped pages can be unmapped)"
                                                               : " (only unmapped pages can be mapped)"));
  }
  return sorted;
}

// Ledger order: charge the slot word before the GPU word and release the GPU
// word before the slot word. A process killed between the two then leaves its
// slot holding at least its share of the GPU sum, and the reclaimer (which
// subtracts the slot from the GPU sum) never leaks budget for good.
void Arena::admit(std::size_t bytes) {
  if (ledger_.slot_mapped != nullptr) __atomic_fetch_add(ledger_.slot_mapped, bytes, __ATOMIC_SEQ_CST);
  if (ledger_.gpu_mapped != nullptr) {
    const std::uint64_t before = __atomic_fetch_add(ledger_.gpu_mapped, bytes, __ATOMIC_SEQ_CST);
    const std::uint64_t budget =
        ledger_.gpu_budget ? __atomic_load_n(ledger_.gpu_budget, __ATOMIC_ACQUIRE) : UINT64_MAX;
    if (budget != UINT64_MAX && before + bytes > budget) {
      unadmit(bytes);
      throw OutOfMemory("GPU budget for kvcached engines reached: " + std::to_string(before) + " of " +
                        std::to_string(budget) + " bytes mapped, " + std::to_string(bytes) + " more asked");
    }
  }
  if (ledger_.headroom_bytes > 0) {
    const auto info = backend_->mem_info();
    if (info.first < bytes + ledger_.headroom_bytes) {
      unadmit(bytes);
      throw OutOfMemory("device headroom reached: " + std::to_string(info.first) + " bytes free, " +
                        std::to_string(bytes) + " asked while keeping " + std::to_string(ledger_.headroom_bytes) +
                        " free for other uses");
    }
  }
}

void Arena::unadmit(std::size_t bytes) {
  if (ledger_.gpu_mapped != nullptr) __atomic_fetch_sub(ledger_.gpu_mapped, bytes, __ATOMIC_SEQ_CST);
  if (ledger_.slot_mapped != nullptr) __atomic_fetch_sub(ledger_.slot_mapped, bytes, __ATOMIC_SEQ_CST);
}

void Arena::map_page(std::int64_t page, Progress& progress) {
  progress.page = page;
  Handle* slots = &handles_[static_cast<std::size_t>(page) * handles_per_page()];
  if (mode_ == HandleMode::Group) {
    slots[0] = backend_->create(group_bytes());
    progress.num_handles = 1;
    for (std::size_t r = 0; r < num_ranges_; ++r) {
      backend_->map(page_addr(r, page), page_bytes_, slots[0], r * page_bytes_);
      progress.num_ranges_mapped = r + 1;
    }
  } else {
    for (std::size_t r = 0; r < num_ranges_; ++r) {
      slots[r] = backend_->create(page_bytes_);
      progress.num_handles = r + 1;
      backend_->map(page_addr(r, page), page_bytes_, slots[r], 0);
      progress.num_ranges_mapped = r + 1;
    }
  }
}

void Arena::rollback(std::vector<Progress>& done) noexcept {
  for (auto it = done.rbegin(); it != done.rend(); ++it) {
    Handle* slots = &handles_[static_cast<std::size_t>(it->page) * handles_per_page()];
    for (std::size_t r = 0; r < it->num_ranges_mapped; ++r) {
      try {
        backend_->unmap(page_addr(r, it->page), page_bytes_);
      } catch (const std::exception&) {
        // Undo is best effort; the original error is what the caller sees.
      }
    }
    for (std::size_t h = 0; h < it->num_handles; ++h) {
      try {
        backend_->release(slots[h]);
      } catch (const std::exception&) {
      }
      slots[h] = 0;
    }
  }
  done.clear();
}

void Arena::map(const std::vector<std::int64_t>& page_ids) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const std::vector<std::int64_t> pages = validate(page_ids, false);
  if (pages.empty()) return;
  const std::size_t bytes = pages.size() * group_bytes();
  admit(bytes);
  std::vector<Progress> done;
  done.reserve(pages.size());
  try {
    for (std::int64_t page : pages) {
      done.emplace_back();
      map_page(page, done.back());
    }
    // One set-access per run of adjacent pages per range: the call costs the
    // same for one mapping or many.
    for (std::size_t r = 0; r < num_ranges_; ++r) {
      std::size_t start = 0;
      for (std::size_t i = 1; i <= pages.size(); ++i) {
        if (i == pages.size() || pages[i] != pages[i - 1] + 1) {
          backend_->set_access(page_addr(r, pages[start]), (i - start) * page_bytes_);
          start = i;
        }
      }
    }
  } catch (...) {
    rollback(done);
    unadmit(bytes);
    throw;
  }
  for (std::int64_t page : pages) mapped_[static_cast<std::size_t>(page)] = 1;
  num_mapped_.fetch_add(pages.size(), std::memory_order_relaxed);
}

void Arena::unmap_page(std::int64_t page) {
  Handle* slots = &handles_[static_cast<std::size_t>(page) * handles_per_page()];
  for (std::size_t r = 0; r < num_ranges_; ++r) {
    try {
      backend_->unmap(page_addr(r, page), page_bytes_);
    } catch (...) {
      // Put back the ranges already unmapped so the page group stays whole.
      for (std::size_t back = 0; back < r; ++back) {
        try {
          const Handle h = mode_ == HandleMode::Group ? slots[0] : slots[back];
          const std::size_t offset = mode_ == HandleMode::Group ? back * page_bytes_ : 0;
          backend_->map(page_addr(back, page), page_bytes_, h, offset);
          backend_->set_access(page_addr(back, page), page_bytes_);
        } catch (const std::exception&) {
        }
      }
      throw;
    }
  }
  for (std::size_t h = 0; h < handles_per_page(); ++h) {
    backend_->release(slots[h]);
    slots[h] = 0;
  }
}

void Arena::unmap(const std::vector<std::int64_t>& page_ids) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const std::vector<std::int64_t> pages = validate(page_ids, true);
  std::size_t num_done = 0;
  try {
    for (std::int64_t page : pages) {
      unmap_page(page);
      mapped_[static_cast<std::size_t>(page)] = 0;
      ++num_done;
    }
  } catch (...) {
    num_mapped_.fetch_sub(num_done, std::memory_order_relaxed);
    unadmit(num_done * group_bytes());
    throw;
  }
  num_mapped_.fetch_sub(num_done, std::memory_order_relaxed);
  unadmit(num_done * group_bytes());
}

void Arena::unmap_all_locked() noexcept {
  std::size_t num_done = 0;
  for (std::size_t p = 0; p < num_pages_; ++p) {
    if (!mapped_[p]) continue;
    try {
      unmap_page(static_cast<std::int64_t>(p));
      mapped_[p] = 0;
      ++num_done;
    } catch (const std::exception&) {
      // Keep going: close() must give back everything it can.
    }
  }
  num_mapped_.fetch_sub(num_done, std::memory_order_relaxed);
  unadmit(num_done * group_bytes());
}

void Arena::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) return;
  unmap_all_locked();
  if (num_mapped_.load() != 0) throw VmmError("arena close: some pages could not be unmapped");
  backend_->free_reserved(base_, num_ranges_ * range_bytes_);
  closed_ = true;
}

void Arena::set_ledger(const Ledger& ledger) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::uint64_t* word : {ledger.slot_mapped, ledger.gpu_mapped, ledger.gpu_budget}) {
    if (reinterpret_cast<std::uintptr_t>(word) % alignof(std::uint64_t) != 0) {
      throw std::invalid_argument("ledger addresses must be 8-byte aligned");
    }
  }
  // Bytes already mapped move into the new ledger so its sums stay exact.
  // No budget check here: these bytes are mapped already.
  const std::size_t bytes = mapped_bytes();
  unadmit(bytes);
  ledger_ = ledger;
  if (ledger_.slot_mapped != nullptr) __atomic_fetch_add(ledger_.slot_mapped, bytes, __ATOMIC_SEQ_CST);
  if (ledger_.gpu_mapped != nullptr) __atomic_fetch_add(ledger_.gpu_mapped, bytes, __ATOMIC_SEQ_CST);
}

void Arena::clear_ledger() { set_ledger(Ledger{}); }

}  // namespace kvcached
