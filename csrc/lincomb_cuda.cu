// CUDA launcher of the fused linear combination (element math in lincomb.h).
//
// Memory-bound: each element is read once per input and written once per output, so the
// kernel moves (num_in + num_out) * n * sizeof(T) bytes, the minimum possible (clipping adds
// none: the pre-clip value combines the inputs already in registers). 128-bit vector
// loads/stores when every pointer is 16-byte aligned; a grid-stride loop sized to the SM count.
#include <cuda_runtime.h>

#include <algorithm>

#include "fastdiff/lincomb.h"
#include "fastdiff/device.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// The clipped term's contribution to element i: y_j += cy[j] * clamp(w, -b_n, b_n) / d_n.
template <typename T, int NO>
__device__ __forceinline__ void add_clipped(const LincombArgs<T>& a, const typename Acc<T>::type (&cw)[kLincombMaxIn],
                                            const typename Acc<T>::type (&cy)[NO],
                                            int64_t sample, const typename Acc<T>::type (&x)[kLincombSlots],
                                            typename Acc<T>::type (&y)[NO]) {
  using A = typename Acc<T>::type;
  const A clipped = lincomb_clip_value(lincomb_preclip(cw, x, a.num_in), a.clip[2 * sample],
                                       a.clip[2 * sample + 1]);
#pragma unroll
  for (int j = 0; j < NO; ++j) y[j] = lincomb_add_clipped(y[j], cy[j], clipped);
}

// Lowers the non-finite flag to this launch's stage if any thread of the warp stored one: one
// atomic per warp, and only when something went wrong (all threads of a warp reach it).
__device__ __forceinline__ void report_nonfinite(int32_t* flag, int32_t stage, bool bad) {
  const unsigned any = __ballot_sync(0xffffffffu, bad);
  if (any != 0u && (threadIdx.x & 31u) == 0u) atomicMin(flag, stage);
}

// NO: output capacity. Launches of 1 or 2 outputs use NO = 2, the same SASS as the kernel had
// before 3 outputs existed (sm_90a: same registers, same instructions); 3 outputs use NO = 3,
// so their extra registers never cost the common 1- and 2-output steps occupancy.
template <typename T, int VEC, bool CLIP, int NO>
__global__ void __launch_bounds__(kThreads) lincomb_kernel(const LincombArgs<T> a) {
  using A = typename Acc<T>::type;
  A c[NO][kLincombSlots];
  lincomb_load_coef(a, c);
  A cw[kLincombMaxIn], cy[NO];
  if (CLIP) lincomb_load_clip_coef(a, cw, cy);

  const int64_t nvec = a.n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  bool bad = false;  // a non-finite output stored by this thread (checked when a.flag is set)
  for (int64_t v = tid; v < nvec; v += stride) {
    Vec<T, VEC> xin[kLincombMaxIn];
#pragma unroll
    for (int k = 0; k < kLincombMaxIn; ++k)
      if (k < a.num_in) xin[k] = reinterpret_cast<const Vec<T, VEC>*>(a.in[k])[v];
    Vec<T, VEC> yout[NO];
    // One division per vector: later elements step into the next sample at most once each.
    int64_t sample = CLIP ? v * VEC / a.sample_numel : 0;
    int64_t next = CLIP ? (sample + 1) * a.sample_numel : 0;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      A x[kLincombSlots];
      A y[NO];
#pragma unroll
      for (int k = 0; k < kLincombMaxIn; ++k) x[k] = k < a.num_in ? A(to_float(xin[k].v[e])) : A(0);
      lincomb_noise(a, v * VEC + e, x);
      lincomb_element(c, x, a.num_in, a.num_out, a.num_noise, y);
      if (CLIP) {
        if (v * VEC + e >= next) {
          ++sample;
          next += a.sample_numel;
        }
        add_clipped(a, cw, cy, sample, x, y);
      }
#pragma unroll
      for (int j = 0; j < NO; ++j) {
        yout[j].v[e] = store_as<T>(y[j]);
        bad |= j < a.num_out && nonfinite(yout[j].v[e]);
      }
    }
#pragma unroll
    for (int j = 0; j < NO; ++j)
      if (j < a.num_out) reinterpret_cast<Vec<T, VEC>*>(a.out[j])[v] = yout[j];
  }
  // Tail (n % VEC elements), one element per thread of the first block.
  const int64_t i = nvec * VEC + tid;
  if (i < a.n) {
    A x[kLincombSlots];
    A y[NO];
#pragma unroll
    for (int k = 0; k < kLincombMaxIn; ++k) x[k] = k < a.num_in ? A(to_float(a.in[k][i])) : A(0);
    lincomb_noise(a, i, x);
    lincomb_element(c, x, a.num_in, a.num_out, a.num_noise, y);
    if (CLIP) add_clipped(a, cw, cy, i / a.sample_numel, x, y);
#pragma unroll
    for (int j = 0; j < NO; ++j)
      if (j < a.num_out) {
        const T stored = store_as<T>(y[j]);
        a.out[j][i] = stored;
        bad |= nonfinite(stored);
      }
  }
  if (a.flag) report_nonfinite(a.flag, a.stage, bad);
}

template <typename T, int NO>
void launch(const LincombArgs<T>& a, bool aligned, int blocks, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (a.clip) {
    if (aligned) lincomb_kernel<T, kVec, true, NO><<<blocks, kThreads, 0, stream>>>(a);
    else lincomb_kernel<T, 1, true, NO><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    if (aligned) lincomb_kernel<T, kVec, false, NO><<<blocks, kThreads, 0, stream>>>(a);
    else lincomb_kernel<T, 1, false, NO><<<blocks, kThreads, 0, stream>>>(a);
  }
}

template <typename T>
int run(const void* const* in, void* const* out, const void* coef, const int64_t* row_ptr,
        int64_t row, int64_t rows, int64_t n, int num_in, int num_out, const LincombPerSample& per_sample,
        int device, cudaStream_t stream) {
  const auto a = make_lincomb_args<T>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample);
  bool aligned = true;
  for (int k = 0; k < num_in; ++k) aligned &= reinterpret_cast<uintptr_t>(in[k]) % 16 == 0;
  for (int j = 0; j < num_out; ++j) aligned &= reinterpret_cast<uintptr_t>(out[j]) % 16 == 0;

  constexpr int kVec = 16 / sizeof(T);
  const int vec = aligned ? kVec : 1;
  const int64_t work = std::max<int64_t>(n / vec, 1);
  const int64_t max_blocks = static_cast<int64_t>(cuda_sm_count(device)) * 8;
  const int blocks = static_cast<int>(std::min((work + kThreads - 1) / kThreads, max_blocks));
  if (num_out <= 2) launch<T, 2>(a, aligned, blocks, stream);
  else launch<T, 3>(a, aligned, blocks, stream);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int lincomb_cuda(DType dtype, const void* const* in, void* const* out, const void* coef,
                 const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n, int num_in,
                 int num_out, const LincombPerSample& per_sample, int device, void* stream_handle) {
  if (num_in < 1 || num_in > kLincombMaxIn || num_out < 1 || num_out > kLincombMaxOut) return -1;
  if (per_sample.num_noise < 0 || per_sample.num_noise > kLincombMaxNoise) return -1;
  if (per_sample.clip && per_sample.sample_numel < 1) return -1;
  if (n == 0) return 0;
  const CudaDeviceGuard guard(device);  // the caller's device is restored on return
  if (guard.error()) return guard.error();
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case DType::kFloat16:
      return run<f16>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample, device,
                      stream);
    case DType::kBFloat16:
      return run<bf16>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample, device,
                      stream);
    case DType::kFloat32:
      return run<float>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample, device,
                      stream);
    case DType::kFloat64:
      return run<double>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample, device,
                      stream);
  }
  return -2;
}

}  // namespace fastdiff
