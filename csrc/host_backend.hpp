// The host backend: CUDA VMM semantics on the CPU with real OS virtual memory.
//
// A reservation is a PROT_NONE, MAP_NORESERVE anonymous mapping. Physical
// memory lives in one memfd per backend: create() cuts a granule-aligned
// extent out of it and commits the pages (fallocate), release() punches the
// extent out again so the memory really goes back to the kernel. map() places
// the extent over part of a reservation with MAP_FIXED and no access;
// set_access() opens it read/write; unmap() puts PROT_NONE anonymous memory
// back, so resident memory (RSS) falls.
//
// A physical cap (bytes that may be created at once) makes "out of memory"
// happen for real in tests and demos. Thread-safe: one mutex guards the extent
// bookkeeping; mmap/mprotect calls themselves need no lock.
#pragma once

#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "backend.hpp"

namespace kvcached {

class HostBackend final : public Backend {
 public:
  // Preconditions: granularity is a positive multiple of the OS page size;
  // cap_bytes > 0. Throws std::invalid_argument otherwise, VmmError when no
  // memfd can be made.
  HostBackend(std::size_t cap_bytes, std::size_t granularity);
  ~HostBackend() override;

  const char* name() const override { return "host"; }
  int device() const override { return 0; }
  std::size_t granularity() const override { return granularity_; }
  std::string uuid() const override;
  std::pair<std::size_t, std::size_t> mem_info() const override;

  std::uintptr_t reserve(std::size_t size, std::size_t alignment = 0) override;
  void free_reserved(std::uintptr_t addr, std::size_t size) override;
  Handle create(std::size_t size) override;
  void release(Handle handle) override;
  void map(std::uintptr_t addr, std::size_t size, Handle handle, std::size_t offset) override;
  void set_access(std::uintptr_t addr, std::size_t size) override;
  void unmap(std::uintptr_t addr, std::size_t size) override;

  std::size_t cap_bytes() const { return cap_bytes_; }
  std::size_t created_bytes() const;

 private:
  struct Extent {
    off_t offset;
    std::size_t size;
  };

  void check_aligned(const char* what, std::size_t value) const;

  const std::size_t cap_bytes_;
  const std::size_t granularity_;
  int fd_ = -1;
  mutable std::mutex mutex_;
  std::size_t created_bytes_ = 0;
  off_t file_end_ = 0;
  Handle next_handle_ = 1;
  std::unordered_map<Handle, Extent> extents_;
  // Released extents by size, reused before the file grows.
  std::map<std::size_t, std::vector<off_t>> free_extents_;
};

}  // namespace kvcached
