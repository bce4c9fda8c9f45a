// fastdiff native core: definitions shared by the CPU and CUDA launchers.
//
// This header is torch-free and pybind-free on purpose (see DESIGN.md, layer 1): kernels take
// raw pointers, sizes, a dtype code and a stream, so one build serves every torch version.
// Element math is written once as FD_HD functions and compiled for the host and the device.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdiff {

// Bumped whenever a binding's signature or meaning changes; Python refuses a mismatching _C.
constexpr int kAbiVersion = 4;

// CPU launchers go multi-threaded (OpenMP) only from this many elements. Below it one thread
// runs near memory bandwidth and a parallel region's fork/join costs more than it saves. In a
// process with torch, _C shares torch's libgomp (same soname, loaded first), so our regions
// use torch's thread pool. Measured on 2 cores: a 2x4x128x128 Euler step takes 27 us with two
// threads, 49 us with one; at 2x4x64x64 (32k elements) one thread is as fast.
constexpr int64_t kCpuParallelThreshold = int64_t(1) << 16;

// Dtype codes shared with Python (fastdiff/_native.py: DTYPE_CODES).
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// 16-bit storage types. The math never happens in 16 bits: values are widened to float on load
// and rounded (to nearest even, as torch does) on store.
struct alignas(2) f16 { uint16_t bits; };
struct alignas(2) bf16 { uint16_t bits; };

FD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// IEEE half <-> float. On the device the hardware conversions are used; the host versions are
// exact software equivalents (round to nearest even, subnormals, inf and NaN preserved).
FD_HD float to_float(f16 h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);  // signed zero
    // Subnormal half: normalise the mantissa.
    int e = -1;
    do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
    return bits_to_float(sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3ffu) << 13));
  }
  return bits_to_float(sign | (exp + 112) << 23 | man << 13);
#endif
}

FD_HD f16 from_float_f16(float f) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u)  // inf or NaN (keep NaN quiet)
    return f16{static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
  if (abs >= 0x477ff000u) return f16{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {  // below 2^-14: the result is subnormal, m = round(f * 2^24)
    const uint32_t shift = 126u - (abs >> 23);
    if (shift > 24) return f16{sign};
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return f16{static_cast<uint16_t>(sign | r)};
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return f16{static_cast<uint16_t>(sign | r)};
#endif
}

FD_HD float to_float(bf16 h) { return bits_to_float(static_cast<uint32_t>(h.bits) << 16); }

FD_HD bf16 from_float_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u)  // NaN stays a quiet NaN
    return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{static_cast<uint16_t>((u + rounding) >> 16)};
}

FD_HD float to_float(float v) { return v; }
FD_HD double to_float(double v) { return v; }

// Storage <-> accumulator traits: fp16/bf16/fp32 accumulate in fp32, fp64 in fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> FD_HD T store_as(typename Acc<T>::type v);
template <> FD_HD float store_as<float>(float v) { return v; }
template <> FD_HD double store_as<double>(double v) { return v; }
template <> FD_HD f16 store_as<f16>(float v) { return from_float_f16(v); }
template <> FD_HD bf16 store_as<bf16>(float v) { return from_float_bf16(v); }

}  // namespace fastdiff
