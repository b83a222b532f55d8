// The CUDA backend: driver VMM calls on one device, in its primary context
// (the one PyTorch uses), made current on whichever thread calls.
#pragma once

#include "backend.hpp"

#if KVCACHED_WITH_CUDA
#include <cuda.h>

namespace kvcached {

class CudaBackend final : public Backend {
 public:
  // `device` is the ordinal as this process sees it (CUDA_VISIBLE_DEVICES).
  // Throws VmmError when the driver is missing, the device does not exist or
  // does not support VMM.
  explicit CudaBackend(int device);
  ~CudaBackend() override;

  const char* name() const override { return "cuda"; }
  int device() const override { return ordinal_; }
  std::size_t granularity() const override { return granularity_; }
  std::string uuid() const override { return uuid_; }
  std::pair<std::size_t, std::size_t> mem_info() const override;

  std::uintptr_t reserve(std::size_t size, std::size_t alignment = 0) override;
  void free_reserved(std::uintptr_t addr, std::size_t size) override;
  Handle create(std::size_t size) override;
  void release(Handle handle) override;
  void map(std::uintptr_t addr, std::size_t size, Handle handle, std::size_t offset) override;
  void set_access(std::uintptr_t addr, std::size_t size) override;
  void unmap(std::uintptr_t addr, std::size_t size) override;

  std::string device_name() const { return device_name_; }
  int driver_version() const;

 private:
  void make_current() const;

  int ordinal_;
  CUdevice device_ = 0;
  CUcontext context_ = nullptr;
  std::size_t granularity_ = 0;
  std::string uuid_;
  std::string device_name_;
  CUmemAllocationProp prop_{};
  CUmemAccessDesc access_{};
};

}  // namespace kvcached

#else

#include <stdexcept>

namespace kvcached {
// Present so the binding compiles; constructing it says why it is unusable.
class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  const char* name() const override { return "cuda"; }
  int device() const override { return 0; }
  std::size_t granularity() const override { return 0; }
  std::string uuid() const override { return ""; }
  std::pair<std::size_t, std::size_t> mem_info() const override { return {0, 0}; }
  std::uintptr_t reserve(std::size_t, std::size_t = 0) override { return 0; }
  void free_reserved(std::uintptr_t, std::size_t) override {}
  Handle create(std::size_t) override { return 0; }
  void release(Handle) override {}
  void map(std::uintptr_t, std::size_t, Handle, std::size_t) override {}
  void set_access(std::uintptr_t, std::size_t) override {}
  void unmap(std::uintptr_t, std::size_t) override {}
  std::string device_name() const { return ""; }
  int driver_version() const { return 0; }
};
}  // namespace kvcached

#endif
