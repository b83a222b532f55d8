// The CUDA driver, loaded at run time.
//
// Nothing links libcuda: the first use dlopens libcuda.so.1 and resolves each
// entry point through cuGetProcAddress at the oldest API version that has the
// signature cuda.h declares, so one build works from old drivers to new and
// the module imports on machines with no driver at all.
#pragma once

#include <string>

#if KVCACHED_WITH_CUDA
#include <cuda.h>

namespace kvcached {

struct CudaDriver {
  decltype(&::cuInit) Init = nullptr;
  decltype(&::cuDriverGetVersion) DriverGetVersion = nullptr;
  decltype(&::cuDeviceGetCount) DeviceGetCount = nullptr;
  decltype(&::cuDeviceGet) DeviceGet = nullptr;
  decltype(&::cuDeviceGetAttribute) DeviceGetAttribute = nullptr;
  decltype(&::cuDeviceGetName) DeviceGetName = nullptr;
  decltype(&::cuDeviceGetUuid) DeviceGetUuid = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) DevicePrimaryCtxRetain = nullptr;
  decltype(&::cuDevicePrimaryCtxRelease) DevicePrimaryCtxRelease = nullptr;
  decltype(&::cuCtxGetCurrent) CtxGetCurrent = nullptr;
  decltype(&::cuCtxSetCurrent) CtxSetCurrent = nullptr;
  decltype(&::cuMemGetInfo) MemGetInfo = nullptr;
  decltype(&::cuMemGetAllocationGranularity) MemGetAllocationGranularity = nullptr;
  decltype(&::cuMemAddressReserve) MemAddressReserve = nullptr;
  decltype(&::cuMemAddressFree) MemAddressFree = nullptr;
  decltype(&::cuMemCreate) MemCreate = nullptr;
  decltype(&::cuMemRelease) MemRelease = nullptr;
  decltype(&::cuMemMap) MemMap = nullptr;
  decltype(&::cuMemUnmap) MemUnmap = nullptr;
  decltype(&::cuMemSetAccess) MemSetAccess = nullptr;
  decltype(&::cuGetErrorName) GetErrorName = nullptr;
  decltype(&::cuGetErrorString) GetErrorString = nullptr;
  int driver_version = 0;
};

// The process-wide driver table, loaded and cuInit'ed on first call.
// Throws VmmError saying what is missing (no libcuda, too old, cuInit failed).
const CudaDriver& cuda_driver();

// "cuMemMap failed: CUDA_ERROR_INVALID_VALUE (invalid argument)".
std::string cuda_error_text(const char* call, CUresult result);

// Throws OutOfMemory for CUDA_ERROR_OUT_OF_MEMORY, VmmError otherwise.
void check_cuda(const char* call, CUresult result);

}  // namespace kvcached
#endif

namespace kvcached {
// "ok", or one line on why the CUDA backend cannot be used here.
std::string cuda_status();
}  // namespace kvcached
