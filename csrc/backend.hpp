// One interface over two kinds of physical memory: a CUDA device (driver VMM)
// and the host (real OS virtual memory). The arena and everything above it is
// written against this interface only.
//
// Semantics follow the CUDA VMM calls: a reservation is address space with no
// memory; create() makes a physical handle; map() places (part of) a handle at
// an address inside a reservation with no access; set_access() makes a mapped
// range readable and writable; unmap() removes mappings; release() drops the
// handle (its memory returns once it is also unmapped everywhere).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace kvcached {

using Handle = std::uint64_t;

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const char* name() const = 0;
  virtual int device() const = 0;
  // Mapping granularity in bytes: sizes, offsets and addresses passed to the
  // calls below must be multiples of it.
  virtual std::size_t granularity() const = 0;
  // Stable identity of the physical device (GPU UUID, or host boot id).
  virtual std::string uuid() const = 0;
  // (free bytes, total bytes) of the device's physical memory.
  virtual std::pair<std::size_t, std::size_t> mem_info() const = 0;

  // Reserve `size` bytes of address space aligned to `alignment` (0: the
  // granularity; else a power-of-two multiple of it). Throws VmmError when the
  // address space cannot be reserved.
  virtual std::uintptr_t reserve(std::size_t size, std::size_t alignment = 0) = 0;
  // Return a reservation made by reserve(); every mapping in it must be gone.
  virtual void free_reserved(std::uintptr_t addr, std::size_t size) = 0;
  // Make `size` bytes of physical memory. Throws OutOfMemory when the device
  // (or the host cap) has no room, VmmError on any other failure.
  virtual Handle create(std::size_t size) = 0;
  // Drop a handle; memory returns once no mapping of it remains.
  virtual void release(Handle handle) = 0;
  // Map [offset, offset + size) of `handle` at `addr` (no access yet).
  virtual void map(std::uintptr_t addr, std::size_t size, Handle handle, std::size_t offset) = 0;
  // Grant read/write access to a mapped range (may span several mappings).
  virtual void set_access(std::uintptr_t addr, std::size_t size) = 0;
  // Remove the mapping(s) covering exactly [addr, addr + size).
  virtual void unmap(std::uintptr_t addr, std::size_t size) = 0;
};

}  // namespace kvcached
