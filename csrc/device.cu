// Thin wrappers over the CUDA runtime for the bindings and launchers (see device.h). cudart is linked
// statically, so the module needs only the driver at run time, and none to import.
#include <cuda_runtime.h>

#include "fastdiff/device.h"

namespace fastdiff {

const char* cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error
    return 0;
  }
  return n;
}

int cuda_device_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return major * 10 + minor;
}

int cuda_use_device(int device) {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current == device) return 0;
  return static_cast<int>(cudaSetDevice(device));
}

int cuda_current_device() {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return current;
}

CudaDeviceGuard::CudaDeviceGuard(int device) : previous_(cuda_current_device()) {
  if (previous_ != device) error_ = static_cast<int>(cudaSetDevice(device));
}

CudaDeviceGuard::~CudaDeviceGuard() {
  int current = cuda_current_device();
  if (previous_ >= 0 && current != previous_) cudaSetDevice(previous_);
}

int cuda_sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cached[device] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      sms = 132;
    }
    cached[device] = sms;
  }
  return cached[device];
}

int cuda_smem_optin(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 48 * 1024;
  if (cached[device] == 0) {
    int bytes = 0;
    if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
        cudaSuccess) {
      cudaGetLastError();
      bytes = 48 * 1024;
    }
    cached[device] = bytes;
  }
  return cached[device];
}

}  // namespace fastdiff
