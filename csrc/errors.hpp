// Error types shared by the backends and the arena.
//
// OutOfMemory is an expected condition (physical memory, the GPU budget or the
// headroom refused a request) and becomes kvcached._vmm.OutOfMemoryError.
// VmmError is any other driver or OS failure; its text names the failing call.
// Bad arguments throw std::invalid_argument, which Python sees as ValueError.
#pragma once

#include <stdexcept>
#include <string>

namespace kvcached {

class OutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class VmmError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace kvcached
