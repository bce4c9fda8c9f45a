// Device queries the bindings expose, so Python can report each backend's availability
// (`fastdiff info`) without the native code ever touching torch.
#pragma once

namespace fastdiff {

const char* cuda_error_string(int code);
int cuda_runtime_version();  // e.g. 13000; 0 if unknown
int cuda_driver_version();   // 0 when no driver is installed
int cuda_device_count();     // 0 when no device (or no driver)
// Compute capability of `device` as major*10 + minor, or -1 on error.
int cuda_device_capability(int device);
// Streaming multiprocessors of `device` (cached; 132, an H100's count, if the query fails):
// launchers size their grids with it.
int cuda_sm_count(int device);
// Makes `device` current for the calling host thread (launchers run on torch's stream of that
// device, which need not be the current one). 0 on success, else the CUDA error code. Launchers
// use CudaDeviceGuard, which puts the previous device back.
int cuda_use_device(int device);
int cuda_current_device();  // -1 on error

// `device` current while the guard lives; the caller's device restored when it goes. The static
// cudart of _C and torch's share the driver's current context, so a launch on tensors of
// cuda:1 must not leave cuda:1 current for torch (torch.cuda.current_device() would change).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;
  int error() const { return error_; }  // 0, or the CUDA error of making `device` current

 private:
  int previous_ = -1;
  int error_ = 0;
};
// Shared memory one block of `device` may opt in to, in bytes (cached; 48 KiB, what every GPU
// grants without opting in, if the query fails).
int cuda_smem_optin(int device);

}  // namespace fastdiff
