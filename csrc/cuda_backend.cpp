#include "cuda_backend.hpp"

#include <cstdio>

#include "cuda_driver.hpp"
#include "errors.hpp"

#if KVCACHED_WITH_CUDA

namespace kvcached {
namespace {

std::string format_uuid(const CUuuid& uuid) {
  const auto* b = reinterpret_cast<const unsigned char*>(uuid.bytes);
  char text[64];
  std::snprintf(text, sizeof(text), "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
  return text;
}

}  // namespace

CudaBackend::CudaBackend(int device) : ordinal_(device) {
  const CudaDriver& d = cuda_driver();
  int count = 0;
  check_cuda("cuDeviceGetCount", d.DeviceGetCount(&count));
  if (device < 0 || device >= count) {
    throw std::invalid_argument("device must be in [0, " + std::to_string(count) + "), got " + std::to_string(device));
  }
  check_cuda("cuDeviceGet", d.DeviceGet(&device_, device));
  int vmm = 0;
  check_cuda("cuDeviceGetAttribute",
             d.DeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device_));
  if (!vmm) throw VmmError("GPU " + std::to_string(device) + " does not support virtual memory management");
  check_cuda("cuDevicePrimaryCtxRetain", d.DevicePrimaryCtxRetain(&context_, device_));

  CUuuid uuid;
  check_cuda("cuDeviceGetUuid", d.DeviceGetUuid(&uuid, device_));
  uuid_ = format_uuid(uuid);
  char name[256] = {0};
  check_cuda("cuDeviceGetName", d.DeviceGetName(name, sizeof(name) - 1, device_));
  device_name_ = name;

  prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop_.location.id = device_;
  prop_.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  access_.location = prop_.location;
  access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  check_cuda("cuMemGetAllocationGranularity",
             d.MemGetAllocationGranularity(&granularity_, &prop_, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
}

CudaBackend::~CudaBackend() {
  if (context_ != nullptr) cuda_driver().DevicePrimaryCtxRelease(device_);
}

int CudaBackend::driver_version() const { return cuda_driver().driver_version; }

void CudaBackend::make_current() const {
  const CudaDriver& d = cuda_driver();
  CUcontext current = nullptr;
  d.CtxGetCurrent(&current);
  if (current != context_) check_cuda("cuCtxSetCurrent", d.CtxSetCurrent(context_));
}

std::pair<std::size_t, std::size_t> CudaBackend::mem_info() const {
  make_current();
  std::size_t free_bytes = 0, total_bytes = 0;
  check_cuda("cuMemGetInfo", cuda_driver().MemGetInfo(&free_bytes, &total_bytes));
  return {free_bytes, total_bytes};
}

std::uintptr_t CudaBackend::reserve(std::size_t size, std::size_t alignment) {
  if (size == 0 || size % granularity_ != 0) {
    throw std::invalid_argument("size must be a positive multiple of the granularity (" +
                                std::to_string(granularity_) + " bytes), got " + std::to_string(size));
  }
  if (alignment == 0) alignment = granularity_;
  if (alignment % granularity_ != 0 || (alignment & (alignment - 1)) != 0) {
    throw std::invalid_argument("alignment must be a power-of-two multiple of the granularity, got " +
                                std::to_string(alignment));
  }
  make_current();
  CUdeviceptr ptr = 0;
  check_cuda("cuMemAddressReserve", cuda_driver().MemAddressReserve(&ptr, size, alignment, 0, 0));
  return static_cast<std::uintptr_t>(ptr);
}

void CudaBackend::free_reserved(std::uintptr_t addr, std::size_t size) {
  make_current();
  check_cuda("cuMemAddressFree", cuda_driver().MemAddressFree(static_cast<CUdeviceptr>(addr), size));
}

Handle CudaBackend::create(std::size_t size) {
  if (size == 0 || size % granularity_ != 0) {
    throw std::invalid_argument("size must be a positive multiple of the granularity (" +
                                std::to_string(granularity_) + " bytes), got " + std::to_string(size));
  }
  make_current();
  CUmemGenericAllocationHandle handle = 0;
  check_cuda("cuMemCreate", cuda_driver().MemCreate(&handle, size, &prop_, 0));
  return static_cast<Handle>(handle);
}

void CudaBackend::release(Handle handle) {
  make_current();
  check_cuda("cuMemRelease", cuda_driver().MemRelease(static_cast<CUmemGenericAllocationHandle>(handle)));
}

void CudaBackend::map(std::uintptr_t addr, std::size_t size, Handle handle, std::size_t offset) {
  make_current();
  check_cuda("cuMemMap", cuda_driver().MemMap(static_cast<CUdeviceptr>(addr), size, offset,
                                              static_cast<CUmemGenericAllocationHandle>(handle), 0));
}

void CudaBackend::set_access(std::uintptr_t addr, std::size_t size) {
  make_current();
  check_cuda("cuMemSetAccess", cuda_driver().MemSetAccess(static_cast<CUdeviceptr>(addr), size, &access_, 1));
}

void CudaBackend::unmap(std::uintptr_t addr, std::size_t size) {
  make_current();
  check_cuda("cuMemUnmap", cuda_driver().MemUnmap(static_cast<CUdeviceptr>(addr), size));
}

}  // namespace kvcached

#else

namespace kvcached {
CudaBackend::CudaBackend(int) { throw VmmError(cuda_status()); }
}  // namespace kvcached

#endif
