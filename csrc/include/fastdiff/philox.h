// Counter-based Gaussian noise: Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers:
// as easy as 1, 2, 3", SC'11) and the Box-Muller transform.
//
// A noise value is a pure function of (seed, counter, element): each sample has its own seed
// and the element index is taken within the sample, so a sample's noise is the same whatever
// the batch it is generated in, the backend, or the number of GPUs. Python (reference), Triton
// and this header implement the same function; Box-Muller runs in float64 so the backends'
// values agree after rounding to fp32 (libm differences sit far below fp32's resolution).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastdiff/common.h"

namespace fastdiff {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr uint32_t kNoiseSalt = 0x66646966u;  // "fdif": the fourth counter word

FD_HD void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds on counter c and key k (Random123's philox4x32_R, R = 10).
FD_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kPhiloxM0, c[0], &hi0, &lo0);
    mulhilo(kPhiloxM1, c[2], &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// Standard normal for (seed, counter, element): counter words (element lo, element hi,
// counter, salt), key (seed lo, seed hi); Box-Muller on the first two output words.
FD_HD double philox_normal(uint64_t seed, uint32_t counter, uint64_t element) {
  uint32_t c[4] = {static_cast<uint32_t>(element), static_cast<uint32_t>(element >> 32), counter,
                   kNoiseSalt};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const double u1 = (static_cast<double>(c[0]) + 1.0) * 2.3283064365386963e-10;  // (0, 1]
  const double u2 = static_cast<double>(c[1]) * 2.3283064365386963e-10;          // [0, 1)
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

}  // namespace fastdiff
