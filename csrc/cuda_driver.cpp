#include "cuda_driver.hpp"

#include "errors.hpp"

#if KVCACHED_WITH_CUDA
#include <dlfcn.h>

#include <mutex>

namespace kvcached {
namespace {

// cuGetProcAddress as drivers before CUDA 12 export it (no query result).
using GetProcAddressV1 = CUresult (*)(const char*, void**, int, cuuint64_t);
using GetProcAddressV2 = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);

struct Loader {
  void* lib = nullptr;
  GetProcAddressV1 v1 = nullptr;
  GetProcAddressV2 v2 = nullptr;

  template <typename Fn>
  void resolve(Fn& slot, const char* symbol, int version) {
    void* fn = nullptr;
    CUresult result;
    if (v2 != nullptr) {
      CUdriverProcAddressQueryResult found;
      result = v2(symbol, &fn, version, CU_GET_PROC_ADDRESS_DEFAULT, &found);
    } else {
      result = v1(symbol, &fn, version, CU_GET_PROC_ADDRESS_DEFAULT);
    }
    if (result != CUDA_SUCCESS || fn == nullptr) {
      throw VmmError(std::string("the CUDA driver has no ") + symbol + " (API " + std::to_string(version) +
                     "); a driver with CUDA 11.3 or newer is needed");
    }
    slot = reinterpret_cast<Fn>(fn);
  }
};

CudaDriver load() {
  Loader loader;
  loader.lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (loader.lib == nullptr) {
    const char* why = dlerror();
    throw VmmError(std::string("cannot load libcuda.so.1 (no NVIDIA driver?): ") + (why ? why : "unknown error"));
  }
  loader.v2 = reinterpret_cast<GetProcAddressV2>(dlsym(loader.lib, "cuGetProcAddress_v2"));
  if (loader.v2 == nullptr) loader.v1 = reinterpret_cast<GetProcAddressV1>(dlsym(loader.lib, "cuGetProcAddress"));
  if (loader.v2 == nullptr && loader.v1 == nullptr) {
    throw VmmError("libcuda.so.1 has no cuGetProcAddress: a driver with CUDA 11.3 or newer is needed");
  }
  CudaDriver d;
  // Versions: the oldest API whose signature matches what cuda.h declares.
  loader.resolve(d.Init, "cuInit", 2000);
  loader.resolve(d.DriverGetVersion, "cuDriverGetVersion", 2020);
  loader.resolve(d.DeviceGetCount, "cuDeviceGetCount", 2000);
  loader.resolve(d.DeviceGet, "cuDeviceGet", 2000);
  loader.resolve(d.DeviceGetAttribute, "cuDeviceGetAttribute", 2000);
  loader.resolve(d.DeviceGetName, "cuDeviceGetName", 2000);
  loader.resolve(d.DeviceGetUuid, "cuDeviceGetUuid", 11040);
  loader.resolve(d.DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", 7000);
  loader.resolve(d.DevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease", 11000);
  loader.resolve(d.CtxGetCurrent, "cuCtxGetCurrent", 4000);
  loader.resolve(d.CtxSetCurrent, "cuCtxSetCurrent", 4000);
  loader.resolve(d.MemGetInfo, "cuMemGetInfo", 3020);
  loader.resolve(d.MemGetAllocationGranularity, "cuMemGetAllocationGranularity", 10020);
  loader.resolve(d.MemAddressReserve, "cuMemAddressReserve", 10020);
  loader.resolve(d.MemAddressFree, "cuMemAddressFree", 10020);
  loader.resolve(d.MemCreate, "cuMemCreate", 10020);
  loader.resolve(d.MemRelease, "cuMemRelease", 10020);
  loader.resolve(d.MemMap, "cuMemMap", 10020);
  loader.resolve(d.MemUnmap, "cuMemUnmap", 10020);
  loader.resolve(d.MemSetAccess, "cuMemSetAccess", 10020);
  loader.resolve(d.GetErrorName, "cuGetErrorName", 6000);
  loader.resolve(d.GetErrorString, "cuGetErrorString", 6000);
  CUresult result = d.Init(0);
  if (result != CUDA_SUCCESS) throw VmmError(cuda_error_text("cuInit", result));
  d.DriverGetVersion(&d.driver_version);
  return d;
}

}  // namespace

const CudaDriver& cuda_driver() {
  // Loaded once; a failure is remembered and re-thrown with the same text.
  static std::once_flag once;
  static CudaDriver driver;
  static std::string failure;
  std::call_once(once, [] {
    try {
      driver = load();
    } catch (const VmmError& e) {
      failure = e.what();
    }
  });
  if (!failure.empty()) throw VmmError(failure);
  return driver;
}

std::string cuda_error_text(const char* call, CUresult result) {
  const char* name = nullptr;
  const char* text = nullptr;
  try {
    const CudaDriver& d = cuda_driver();
    d.GetErrorName(result, &name);
    d.GetErrorString(result, &text);
  } catch (const VmmError&) {
  }
  return std::string(call) + " failed: " + (name ? name : "CUresult " + std::to_string(static_cast<int>(result))) +
         " (" + (text ? text : "no description") + ")";
}

void check_cuda(const char* call, CUresult result) {
  if (result == CUDA_SUCCESS) return;
  if (result == CUDA_ERROR_OUT_OF_MEMORY) throw OutOfMemory(cuda_error_text(call, result));
  throw VmmError(cuda_error_text(call, result));
}

std::string cuda_status() {
  try {
    const CudaDriver& d = cuda_driver();
    int count = 0;
    CUresult result = d.DeviceGetCount(&count);
    if (result != CUDA_SUCCESS) return cuda_error_text("cuDeviceGetCount", result);
    if (count == 0) return "the CUDA driver sees no GPU";
    CUdevice dev;
    d.DeviceGet(&dev, 0);
    int vmm = 0;
    d.DeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev);
    if (!vmm) return "GPU 0 does not support virtual memory management";
    return "ok";
  } catch (const VmmError& e) {
    return e.what();
  }
}

}  // namespace kvcached

#else

namespace kvcached {
std::string cuda_status() { return "this build of kvcached has no CUDA backend (cuda.h was not found at build time)"; }
}  // namespace kvcached

#endif
