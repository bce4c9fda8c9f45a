// Fused GroupNorm (+ per-sample scale/shift) (+ SiLU), forward only.
//
//   y = GN(x) * gamma + beta                     (Wu & He 2018, GroupNorm, eq. 1-2)
//   y = y * (1 + scale[n, c]) + shift[n, c]      (scale-shift norm: Dhariwal & Nichol 2021, ADM)
//   y = y * sigmoid(y)                           (SiLU, optional)
//
// written per element as y = (x - mean) * a[n, c] + b[n, c]: subtracting the group mean first
// keeps the result exact for inputs with a large mean (x = 1000 + noise), where the folded form
// x * a + (b - mean * a) cancels catastrophically.
//
// Statistics are moments (count, mean, M2) in fp32 (fp64 for fp64 data): every chunk of values
// is reduced two-pass (in registers on the GPU, from a buffer on the CPU) with sums relative to
// one of its values, and chunks are combined with the parallel formula of Chan, Golub & LeVeque
// (1979). No sum-of-squares cancellation anywhere.
// This header holds the element math shared by the CPU (OpenMP) and CUDA launchers.
#pragma once

#include <cmath>

#include "fastdiff/common.h"

namespace fastdiff {

// Moments of a set of values: count n, mean, and M2 = sum (x - mean)^2.
template <typename A>
struct Moments {
  A n, mean, m2;
};

// Chan et al. (1979), eq. 2.1b: moments of the union of two disjoint sets. Either may be empty.
template <typename A>
FD_HD Moments<A> merge_moments(const Moments<A>& a, const Moments<A>& b) {
  const A n = a.n + b.n;
  const A f = n > A(0) ? b.n / n : A(0);
  const A delta = b.mean - a.mean;
  return Moments<A>{n, a.mean + delta * f, a.m2 + b.m2 + delta * delta * a.n * f};
}

FD_HD float fd_sqrt(float v) {
#if defined(__CUDA_ARCH__)
  return sqrtf(v);
#else
  return std::sqrt(v);
#endif
}
FD_HD double fd_sqrt(double v) {
#if defined(__CUDA_ARCH__)
  return sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// exp(v) in float for silu: the hardware approximation on the device; on the host the Cephes
// expf polynomial (about 1 ulp; branch-free, so the CPU loops vectorise, which std::exp does
// not). v is clamped to [-87.3, 88.3] (the result saturates at normal floats, which changes
// silu(y) = y / (1 + exp(-y)) by less than 1e-36; NaN becomes a limit, silu's numerator keeps
// it). The clamp works on the bits: float compare-and-select blocks GCC's vectoriser.
FD_HD float fast_exp(float v) {
#if defined(__CUDA_ARCH__)
  return __expf(v);
#else
  uint32_t u = float_to_bits(v);
  const uint32_t limit = (u >> 31) ? 0x42ae999au : 0x42b0999au;  // 87.3f, 88.3f
  u = (u & 0x7fffffffu) > limit ? (u & 0x80000000u) | limit : u;
  v = bits_to_float(u);
  // n = round(v / ln 2) by the 1.5 * 2^23 trick (plain adds, no rounding intrinsics).
  const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;  // v - n ln 2, ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  return e * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
#endif
}
FD_HD double fast_exp(double v) {
#if defined(__CUDA_ARCH__)
  return exp(v);
#else
  return std::exp(v);
#endif
}

FD_HD float fast_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);  // 2 ulp; b = inf (v << 0) gives -0, the limit of silu
#else
  return a / b;
#endif
}
FD_HD double fast_div(double a, double b) { return a / b; }

// Biased variance (as torch's group_norm) -> 1 / sqrt(var + eps). IEEE sqrt and division: it
// runs once per group.
template <typename A>
FD_HD A inverse_std(const Moments<A>& m, A eps) {
  const A var = m.n > A(0) ? m.m2 / m.n : A(0);
  return A(1) / fd_sqrt(var + eps);
}

template <typename A>
FD_HD A silu(A v) {
  return fast_div(v, A(1) + fast_exp(-v));
}

// The per-(sample, channel) affine map applied after centring: y = (x - mean) * a + b.
template <typename A>
struct ChannelMap {
  A mean, a, b;
};

// gamma/beta: GroupNorm's affine parameters (1 and 0 when absent); scale/shift: the time
// embedding's (0 when absent). `rstd` and `mean` are the statistics of the channel's group.
template <typename A>
FD_HD ChannelMap<A> channel_map(A mean, A rstd, A gamma, A beta, A scale, A shift) {
  const A s1 = A(1) + scale;
  return ChannelMap<A>{mean, rstd * gamma * s1, beta * s1 + shift};
}

template <typename A>
FD_HD A group_norm_element(A x, const ChannelMap<A>& m, bool apply_silu) {
  // Rounded op by op (no FMA, as on the host): CPU and GPU agree given the same statistics.
  const A y = fd_add(fd_mul(fd_sub(x, m.mean), m.a), m.b);
  return apply_silu ? silu(y) : y;
}

// Reads element i of an optional parameter array (absent -> `absent`).
template <typename T>
FD_HD typename Acc<T>::type param_or(const T* p, int64_t i, typename Acc<T>::type absent) {
  return p ? typename Acc<T>::type(to_float(p[i])) : absent;
}

// Arguments of one launch. x and y share one dense layout: NCHW (x[n, c, p] at (n*C + c)*HW + p)
// or channels-last (x[n, c, p] at (n*HW + p)*C + c), `HW` being the product of the spatial dims.
template <typename T>
struct GroupNormArgs {
  const T* x;
  T* y;
  const T* weight;  // [C] or null
  const T* bias;    // [C] or null
  const T* scale;   // [N, C] contiguous or null
  const T* shift;   // [N, C] contiguous or null
  int64_t N, C, HW, G;
  typename Acc<T>::type eps;
  bool silu;
};

// Launchers (csrc/group_norm_cpu.cpp, csrc/group_norm_cuda.cu). Return 0 on success, else an
// error code (for CUDA: a cudaError_t, or a negative code described in group_norm_cuda.cu).
int group_norm_cpu(DType dtype, const void* x, void* y, const void* weight, const void* bias,
                   const void* scale, const void* shift, int64_t N, int64_t C, int64_t HW,
                   int64_t G, double eps, bool silu, bool channels_last);

// Workspace bytes the CUDA launcher needs for this call (counters, partial moments, stats),
// or -5 when the channels-last kernel does not support this channel count (C / vector width
// above 256): the caller then runs the NCHW kernel on a contiguous copy.
int64_t group_norm_cuda_workspace(DType dtype, const void* x, const void* y, int64_t N, int64_t C,
                                  int64_t HW, int64_t G, bool channels_last, int device);

// `workspace` must be zero-filled the first time it is used; the kernels return its counters
// to zero (so one buffer serves every later call in the same stream order). mode: 0 auto,
// 1 two-pass, 2 fused (see group_norm_cuda.cu).
int group_norm_cuda(DType dtype, const void* x, void* y, const void* weight, const void* bias,
                    const void* scale, const void* shift, int64_t N, int64_t C, int64_t HW,
                    int64_t G, double eps, bool silu, bool channels_last, void* workspace,
                    int64_t workspace_bytes, int mode, int device, void* stream);

}  // namespace fastdiff
