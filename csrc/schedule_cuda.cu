// CUDA launcher of the schedule tables (element math in schedule.h): one launch of one block.
//
// The betas, the zero-SNR factors, the training sigmas and the per-step columns are computed
// one entry per thread. The cumulative product of 1 - beta is a warp scan: each lane multiplies
// a contiguous chunk of ceil(T / 32) factors in order, an exclusive shuffle scan combines the
// lanes' products, and each lane then writes prefix * its running product. The first chunk is
// thus exactly the reference's sequential product: that is where sigma = sqrt((1 - abar) / abar)
// is ill-conditioned (1 - abar ~ t * beta_start, an ulp of abar there is ~5e-13 of sigma);
// further on, the few ulps a different order costs are harmless. The training table lives in
// the output buffer (train rows), read back after block barriers.
#include <cuda_runtime.h>

#include "fastdiff/device.h"
#include "fastdiff/schedule.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

// out[i] = f[0] * ... * f[i], i < T, by the first warp (see above); f and out may alias.
__device__ void warp_cumprod(const double* f, double* out, int64_t T) {
  const int lane = threadIdx.x;
  const int64_t chunk = (T + 31) / 32;
  const int64_t begin = min(T, lane * chunk), end = min(T, begin + chunk);
  double inclusive = 1;
  for (int64_t i = begin; i < end; ++i) inclusive *= f[i];
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const double before = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive = before * inclusive;
  }
  double prefix = __shfl_up_sync(kFullMask, inclusive, 1);
  if (lane == 0) prefix = 1;
  for (int64_t i = begin; i < end; ++i) out[i] = prefix *= f[i];
}

__global__ void __launch_bounds__(kThreads) schedule_kernel(const ScheduleSpec s, double* out) {
  const int64_t T = s.T, cols = s.n + 1;
  double* abar = out + kScheduleRows * cols;  // train row 0
  double* scratch = abar + T;                 // train row 1: the factors, then the sigmas

  for (int64_t i = threadIdx.x; i < T; i += blockDim.x) scratch[i] = 1 - schedule_beta(s, i);
  __syncthreads();
  if (threadIdx.x < 32) warp_cumprod(scratch, abar, T);
  __syncthreads();

  if (s.rescale_zero_snr) {
    const double first = sqrt(abar[0]), last = sqrt(abar[T - 1]);
    const double scale = first / (first - last);
    for (int64_t i = threadIdx.x; i < T; i += blockDim.x)
      scratch[i] = zero_snr_factor(i > 0 ? abar[i - 1] : abar[0], abar[i], i, last, scale);
    __syncthreads();  // every read of abar above happens before the scan rewrites it
    if (threadIdx.x < 32) warp_cumprod(scratch, abar, T);
    __syncthreads();
  }

  for (int64_t i = threadIdx.x; i < T; i += blockDim.x) scratch[i] = train_sigma(abar[i]);
  __syncthreads();
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    schedule_column(s, scratch, j, out + j, cols);
}

}  // namespace

int schedule_tables_cuda(const ScheduleSpec& spec, double* out, int device, void* stream) {
  if (spec.T < 2 || spec.n < 1 || spec.n > spec.T) return -1;
  const CudaDeviceGuard guard(device);  // the caller's device is restored on return
  if (guard.error()) return guard.error();
  schedule_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(spec, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fastdiff
