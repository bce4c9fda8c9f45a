// Fused linear combination: out_j[i] = sum_k coef[row, j, k] * in_k[i]
//                                     + sum_m coef[row, j, num_in + m] * z_m[i].
//
// Every fixed-step diffusion solver update, prediction-type conversion and guidance combination
// is such a combination with schedule-dependent coefficients (DESIGN.md). The coefficients sit in
// a device table [rows, num_out, num_in] and the row is an integer or is read from device memory,
// so one launch serves every step and can be captured in a CUDA graph. The optional noise terms
// z_m are generated in-kernel (philox.h), so noise costs no memory traffic.
#pragma once

#include <cmath>

#include "fastdiff/common.h"
#include "fastdiff/philox.h"

namespace fastdiff {

constexpr int kLincombMaxIn = 6;
constexpr int kLincombMaxOut = 2;
constexpr int kLincombMaxNoise = 2;
// Register slots: inputs at [0, num_in), noise at [kLincombMaxIn, kLincombMaxIn + num_noise):
// fixed positions, so the GPU never indexes a register array dynamically.
constexpr int kLincombSlots = kLincombMaxIn + kLincombMaxNoise;

// Arguments of one launch. All tensors share one dense layout, so they are flat arrays of n
// elements (the Python layer guarantees it and copies inputs that do not match).
template <typename T>
struct LincombArgs {
  const T* in[kLincombMaxIn];  // num_in pointers, each [n]
  T* out[kLincombMaxOut];      // num_out pointers, each [n]; may alias an input exactly
  const typename Acc<T>::type* coef;  // [rows, num_out, num_in + num_noise], contiguous
  const int64_t* row_ptr;      // optional device scalar holding the row (null: use `row`)
  int64_t row;                 // row used when row_ptr is null
  int64_t rows;                // number of rows in coef (bounds check for row_ptr)
  int64_t n;                   // elements per tensor
  int num_in;
  int num_out;
  int num_noise;               // in-kernel noise terms (0..2)
  const int64_t* seeds;        // [batch] per-sample Philox seeds (when num_noise > 0)
  int64_t sample_numel;        // elements per sample: the batch dim is outermost in memory
  uint32_t counters[kLincombMaxNoise];  // Philox counter of each noise term
};

// Resolves the coefficient row. A device-resident row cannot be checked on the host without a
// sync, so an out-of-range row yields NaN coefficients: loud, never an out-of-bounds read.
template <typename T>
FD_HD const typename Acc<T>::type* lincomb_row(const LincombArgs<T>& a, bool* valid) {
  const int64_t r = a.row_ptr ? *a.row_ptr : a.row;
  *valid = r >= 0 && r < a.rows;
  return a.coef + (*valid ? r : 0) * a.num_out * (a.num_in + a.num_noise);
}

// The element math, shared verbatim by the CPU and CUDA launchers. `c` is the coefficient row
// already in registers; `x` are the widened inputs and noise values (slots as above).
template <typename A>
FD_HD void lincomb_element(const A (&c)[kLincombMaxOut][kLincombSlots], const A (&x)[kLincombSlots],
                           int num_in, int num_out, int num_noise, A (&y)[kLincombMaxOut]) {
#pragma unroll
  for (int j = 0; j < kLincombMaxOut; ++j) {
    // Starting from the first term (not from +0) keeps the sign of a zero result, as the
    // plain expression c0 * x0 + c1 * x1 + ... does.
    A acc = c[j][0] * x[0];
#pragma unroll
    for (int k = 1; k < kLincombMaxIn; ++k)
      if (k < num_in) acc += c[j][k] * x[k];
#pragma unroll
    for (int m = 0; m < kLincombMaxNoise; ++m)
      if (m < num_noise) acc += c[j][kLincombMaxIn + m] * x[kLincombMaxIn + m];
    y[j] = j < num_out ? acc : A(0);
  }
}

// Loads the coefficient row into the register slots (NaN if the row is invalid).
template <typename T>
FD_HD void lincomb_load_coef(const LincombArgs<T>& a,
                             typename Acc<T>::type (&c)[kLincombMaxOut][kLincombSlots]) {
  using A = typename Acc<T>::type;
  bool valid;
  const A* src = lincomb_row(a, &valid);
  const int width = a.num_in + a.num_noise;
  const A nan = A(NAN);
#pragma unroll
  for (int j = 0; j < kLincombMaxOut; ++j)
#pragma unroll
    for (int k = 0; k < kLincombSlots; ++k) {
      const int col = k < kLincombMaxIn ? k : a.num_in + (k - kLincombMaxIn);
      const bool used = j < a.num_out && (k < kLincombMaxIn ? k < a.num_in
                                                            : k - kLincombMaxIn < a.num_noise);
      c[j][k] = used ? (valid ? src[j * width + col] : nan) : A(0);
    }
}

// The noise values of element i (flat index in the shared dense layout) into their slots.
template <typename T>
FD_HD void lincomb_noise(const LincombArgs<T>& a, int64_t i,
                         typename Acc<T>::type (&x)[kLincombSlots]) {
  using A = typename Acc<T>::type;
  if (a.num_noise == 0) return;
  const int64_t b = i / a.sample_numel;
  const uint64_t seed = static_cast<uint64_t>(a.seeds[b]);
  const uint64_t element = static_cast<uint64_t>(i - b * a.sample_numel);
#pragma unroll
  for (int m = 0; m < kLincombMaxNoise; ++m)
    if (m < a.num_noise) x[kLincombMaxIn + m] = A(philox_normal(seed, a.counters[m], element));
}

// Launchers (csrc/lincomb_cpu.cpp, csrc/lincomb_cuda.cu). Return 0 on success or an error code
// (for CUDA: the cudaError_t of the launch).
struct LincombNoise {
  int num_noise = 0;
  const int64_t* seeds = nullptr;
  int64_t sample_numel = 1;
  uint32_t counters[kLincombMaxNoise] = {0, 0};
};

int lincomb_cpu(DType dtype, const void* const* in, void* const* out, const void* coef,
                const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n, int num_in,
                int num_out, const LincombNoise& noise);
int lincomb_cuda(DType dtype, const void* const* in, void* const* out, const void* coef,
                 const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n, int num_in,
                 int num_out, const LincombNoise& noise, int device, void* stream);

// Fills the shared fields of LincombArgs (both launchers).
template <typename T>
LincombArgs<T> make_lincomb_args(const void* const* in, void* const* out, const void* coef,
                                 const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n,
                                 int num_in, int num_out, const LincombNoise& noise) {
  LincombArgs<T> a{};
  for (int k = 0; k < num_in; ++k) a.in[k] = static_cast<const T*>(in[k]);
  for (int j = 0; j < num_out; ++j) a.out[j] = static_cast<T*>(out[j]);
  a.coef = static_cast<const typename Acc<T>::type*>(coef);
  a.row_ptr = row_ptr;
  a.row = row;
  a.rows = rows;
  a.n = n;
  a.num_in = num_in;
  a.num_out = num_out;
  a.num_noise = noise.num_noise;
  a.seeds = noise.seeds;
  a.sample_numel = noise.sample_numel;
  for (int m = 0; m < kLincombMaxNoise; ++m) a.counters[m] = noise.counters[m];
  return a;
}

}  // namespace fastdiff
