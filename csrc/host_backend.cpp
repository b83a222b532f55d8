#include "host_backend.hpp"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>

#include "errors.hpp"

namespace kvcached {
namespace {

[[noreturn]] void throw_errno(const std::string& call, int err) {
  throw VmmError(call + " failed: " + std::strerror(err));
}

std::string read_boot_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (in) std::getline(in, id);
  return id.empty() ? std::string("unknown") : id;
}

}  // namespace

HostBackend::HostBackend(std::size_t cap_bytes, std::size_t granularity)
    : cap_bytes_(cap_bytes), granularity_(granularity) {
  const auto os_page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  if (granularity == 0 || granularity % os_page != 0) {
    throw std::invalid_argument("granularity must be a positive multiple of the OS page size (" +
                                std::to_string(os_page) + " bytes), got " + std::to_string(granularity));
  }
  if (cap_bytes == 0) throw std::invalid_argument("cap_bytes must be > 0");
  fd_ = memfd_create("kvcached-host", MFD_CLOEXEC);
  if (fd_ < 0) throw_errno("memfd_create", errno);
}

HostBackend::~HostBackend() {
  if (fd_ >= 0) close(fd_);
}

std::string HostBackend::uuid() const { return "host-" + read_boot_id(); }

std::pair<std::size_t, std::size_t> HostBackend::mem_info() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {cap_bytes_ - created_bytes_, cap_bytes_};
}

std::size_t HostBackend::created_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return created_bytes_;
}

void HostBackend::check_aligned(const char* what, std::size_t value) const {
  if (value % granularity_ != 0) {
    throw std::invalid_argument(std::string(what) + " must be a multiple of the granularity (" +
                                std::to_string(granularity_) + " bytes), got " + std::to_string(value));
  }
}

std::uintptr_t HostBackend::reserve(std::size_t size, std::size_t alignment) {
  if (size == 0) throw std::invalid_argument("size must be > 0");
  check_aligned("size", size);
  if (alignment == 0) alignment = granularity_;
  if (alignment % granularity_ != 0 || (alignment & (alignment - 1)) != 0) {
    throw std::invalid_argument("alignment must be a power-of-two multiple of the granularity, got " +
                                std::to_string(alignment));
  }
  // Over-reserve by the alignment so the range can be aligned, then trim.
  const std::size_t span = size + alignment;
  void* raw = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) throw_errno("mmap(PROT_NONE reserve)", errno);
  const auto start = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t aligned = (start + alignment - 1) / alignment * alignment;
  if (aligned > start) munmap(raw, aligned - start);
  const std::uintptr_t end = start + span;
  if (end > aligned + size) munmap(reinterpret_cast<void*>(aligned + size), end - (aligned + size));
  return aligned;
}

void HostBackend::free_reserved(std::uintptr_t addr, std::size_t size) {
  if (munmap(reinterpret_cast<void*>(addr), size) != 0) throw_errno("munmap(reservation)", errno);
}

Handle HostBackend::create(std::size_t size) {
  if (size == 0) throw std::invalid_argument("size must be > 0");
  check_aligned("size", size);
  std::lock_guard<std::mutex> lock(mutex_);
  if (created_bytes_ + size > cap_bytes_) {
    throw OutOfMemory("host backend cap reached: " + std::to_string(created_bytes_) + " of " +
                      std::to_string(cap_bytes_) + " bytes in use, " + std::to_string(size) + " more asked");
  }
  off_t offset;
  bool reused = false;
  auto it = free_extents_.find(size);
  if (it != free_extents_.end() && !it->second.empty()) {
    offset = it->second.back();
    it->second.pop_back();
    reused = true;
  } else {
    offset = file_end_;
    if (ftruncate(fd_, file_end_ + static_cast<off_t>(size)) != 0) throw_errno("ftruncate(memfd)", errno);
  }
  // Commit the pages now, as cuMemCreate does, so the cap is backed by memory.
  if (fallocate(fd_, 0, offset, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    if (reused) free_extents_[size].push_back(offset);
    if (err == ENOSPC || err == ENOMEM) throw OutOfMemory(std::string("fallocate(memfd) failed: ") + std::strerror(err));
    throw_errno("fallocate(memfd)", err);
  }
  if (!reused) file_end_ += static_cast<off_t>(size);
  const Handle handle = next_handle_++;
  extents_.emplace(handle, Extent{offset, size});
  created_bytes_ += size;
  return handle;
}

void HostBackend::release(Handle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = extents_.find(handle);
  if (it == extents_.end()) throw std::invalid_argument("unknown handle " + std::to_string(handle));
  const Extent extent = it->second;
  if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, extent.offset, static_cast<off_t>(extent.size)) != 0) {
    throw_errno("fallocate(PUNCH_HOLE)", errno);
  }
  extents_.erase(it);
  free_extents_[extent.size].push_back(extent.offset);
  created_bytes_ -= extent.size;
}

void HostBackend::map(std::uintptr_t addr, std::size_t size, Handle handle, std::size_t offset) {
  check_aligned("size", size);
  check_aligned("offset", offset);
  off_t file_offset;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = extents_.find(handle);
    if (it == extents_.end()) throw std::invalid_argument("unknown handle " + std::to_string(handle));
    if (offset + size > it->second.size) {
      throw std::invalid_argument("offset + size (" + std::to_string(offset + size) + ") exceeds the handle's " +
                                  std::to_string(it->second.size) + " bytes");
    }
    file_offset = it->second.offset + static_cast<off_t>(offset);
  }
  void* got = mmap(reinterpret_cast<void*>(addr), size, PROT_NONE, MAP_SHARED | MAP_FIXED, fd_, file_offset);
  if (got == MAP_FAILED) {
    const int err = errno;
    if (err == ENOMEM) throw OutOfMemory("mmap(MAP_FIXED memfd) failed: out of memory");
    throw_errno("mmap(MAP_FIXED memfd)", err);
  }
}

void HostBackend::set_access(std::uintptr_t addr, std::size_t size) {
  if (mprotect(reinterpret_cast<void*>(addr), size, PROT_READ | PROT_WRITE) != 0) throw_errno("mprotect", errno);
}

void HostBackend::unmap(std::uintptr_t addr, std::size_t size) {
  // Replacing the shared mapping with a fresh PROT_NONE one keeps the range
  // reserved and drops the memfd pages from this process (RSS falls).
  void* got = mmap(reinterpret_cast<void*>(addr), size, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  if (got == MAP_FAILED) throw_errno("mmap(PROT_NONE unmap)", errno);
}

}  // namespace kvcached
