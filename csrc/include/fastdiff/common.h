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
constexpr int kAbiVersion = 5;

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

// All-ones if c, else 0: a select the vectoriser keeps (a ?: whose arm holds float arithmetic
// becomes a branch, and a loop with a branch is not vectorised).
FD_HD uint32_t bits_if(bool c) { return 0u - static_cast<uint32_t>(c); }

// IEEE half <-> float. On the device the hardware conversions are used; the host versions are
// exact software equivalents (round to nearest even, subnormals, inf and NaN -> quiet NaN),
// written with masks instead of branches so the CPU loops vectorise (the branchy form ran fp16
// lincomb 20x slower than fp32). Checked equal to the reference branchy conversions on all 2^16 halves and
// all 2^32 floats (tests/test_lincomb.py checks them against torch's).
FD_HD float to_float(f16 h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t em = h.bits & 0x7fffu;  // exponent and mantissa
  uint32_t normal = (em << 13) + (112u << 23);  // rebias exponent 15 -> 127
  normal += (112u << 23) & bits_if(em >= 0x7c00u);  // inf / NaN: exponent 255
  // zero / subnormal: m * 2^-24 exactly (a normal float, so flush-to-zero modes cannot touch it)
  const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f;
  const uint32_t is_sub = bits_if(em < 0x0400u);
  return bits_to_float((float_to_bits(sub) & is_sub) | (normal & ~is_sub) | sign);
#endif
}

FD_HD f16 from_float_f16(float f) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(f))};
#else
  // F. Giesen's float_to_half_fast3_rtne: every case computed, one selected.
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  const uint32_t special = 0x7c00u | (0x200u & bits_if(abs > 0x7f800000u));  // inf, quiet NaN
  // Below 2^-14 (a subnormal half or zero): adding 0.5 aligns the 10 mantissa bits at the
  // bottom of the float, rounded to nearest even by the FP add itself.
  const uint32_t magic = 126u << 23;
  const uint32_t sub = float_to_bits(bits_to_float(abs) + bits_to_float(magic)) - magic;
  // Normal: rebias 127 -> 15, add half an ulp minus one plus the kept bit's parity (ties to
  // even), shift; a carry past 65504 lands exactly on inf.
  const uint32_t normal = (abs + 0xc8000fffu + ((abs >> 13) & 1u)) >> 13;
  const uint32_t is_special = bits_if(abs >= 0x47800000u), is_sub = bits_if(abs < 0x38800000u);
  const uint32_t r = (special & is_special) | (sub & is_sub & ~is_special) |
                     (normal & ~(is_sub | is_special));
  return f16{static_cast<uint16_t>(r | sign)};
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

// The step's element math, rounded op by op. nvcc contracts a * b + c into one FMA by default
// (--fmad=true) and GCC/Clang do with -ffp-contract=fast and an FMA-capable -march; either
// changes the bits against the reference, which rounds every product and sum (DESIGN.md,
// Numerics: no backend contracts). On the device the _rn intrinsics are never fused; on the
// host the build passes -ffp-contract=off (setup.py).
FD_HD float fd_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FD_HD float fd_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FD_HD double fd_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FD_HD double fd_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
FD_HD float fd_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FD_HD double fd_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// Non-finite (inf or NaN) test on the stored bits: all exponent bits set. Works on the storage
// type, so an fp16 overflow to inf counts, and no fast-math mode can fold it away.
FD_HD bool nonfinite(float v) { return (float_to_bits(v) & 0x7f800000u) == 0x7f800000u; }
FD_HD bool nonfinite(double v) {
#if defined(__CUDA_ARCH__)
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t u;
  std::memcpy(&u, &v, 8);
#endif
  return (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}
FD_HD bool nonfinite(f16 h) { return (h.bits & 0x7c00u) == 0x7c00u; }
FD_HD bool nonfinite(bf16 h) { return (h.bits & 0x7f80u) == 0x7f80u; }

// "No non-finite value seen" in the flag buffer the step kernels lower (atomic min) to the
// index of the first stage whose output held one (fastdiff/ops/lincomb.py: NO_NONFINITE).
constexpr int32_t kNoNonfinite = 0x7fffffff;

// Storage <-> accumulator traits: fp16/bf16/fp32 accumulate in fp32, fp64 in fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> FD_HD T store_as(typename Acc<T>::type v);
template <> FD_HD float store_as<float>(float v) { return v; }
template <> FD_HD double store_as<double>(double v) { return v; }
template <> FD_HD f16 store_as<f16>(float v) { return from_float_f16(v); }
template <> FD_HD bf16 store_as<bf16>(float v) { return from_float_bf16(v); }

}  // namespace fastdiff
