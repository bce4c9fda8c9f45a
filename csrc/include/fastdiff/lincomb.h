// Fused linear combination: out_j[i] = sum_k coef[row, j, k] * in_k[i].
//
// Every fixed-step diffusion solver update, prediction-type conversion and guidance combination
// is such a combination with schedule-dependent coefficients (DESIGN.md). The coefficients sit in
// a device table [rows, num_out, num_in] and the row is an integer or is read from device memory,
// so one launch serves every step and can be captured in a CUDA graph.
#pragma once

#include <cmath>

#include "fastdiff/common.h"

namespace fastdiff {

constexpr int kLincombMaxIn = 6;
constexpr int kLincombMaxOut = 2;

// Arguments of one launch. All tensors share one dense layout, so they are flat arrays of n
// elements (the Python layer guarantees it and copies inputs that do not match).
template <typename T>
struct LincombArgs {
  const T* in[kLincombMaxIn];  // num_in pointers, each [n]
  T* out[kLincombMaxOut];      // num_out pointers, each [n]; may alias an input exactly
  const typename Acc<T>::type* coef;  // [rows, num_out, num_in], contiguous
  const int64_t* row_ptr;      // optional device scalar holding the row (null: use `row`)
  int64_t row;                 // row used when row_ptr is null
  int64_t rows;                // number of rows in coef (bounds check for row_ptr)
  int64_t n;                   // elements per tensor
  int num_in;
  int num_out;
};

// Resolves the coefficient row. A device-resident row cannot be checked on the host without a
// sync, so an out-of-range row yields NaN coefficients: loud, never an out-of-bounds read.
template <typename T>
FD_HD const typename Acc<T>::type* lincomb_row(const LincombArgs<T>& a, bool* valid) {
  const int64_t r = a.row_ptr ? *a.row_ptr : a.row;
  *valid = r >= 0 && r < a.rows;
  return a.coef + (*valid ? r : 0) * a.num_out * a.num_in;
}

// The element math, shared verbatim by the CPU and CUDA launchers. `c` is the coefficient row
// already in registers; `x` are the widened inputs.
template <typename A>
FD_HD void lincomb_element(const A (&c)[kLincombMaxOut][kLincombMaxIn], const A (&x)[kLincombMaxIn],
                           int num_in, int num_out, A (&y)[kLincombMaxOut]) {
#pragma unroll
  for (int j = 0; j < kLincombMaxOut; ++j) {
    // Starting from the first term (not from +0) keeps the sign of a zero result, as the
    // plain expression c0 * x0 + c1 * x1 + ... does.
    A acc = c[j][0] * x[0];
#pragma unroll
    for (int k = 1; k < kLincombMaxIn; ++k)
      if (k < num_in) acc += c[j][k] * x[k];
    y[j] = j < num_out ? acc : A(0);
  }
}

// Loads the coefficient row into a fixed-size register array (NaN if the row is invalid).
template <typename T>
FD_HD void lincomb_load_coef(const LincombArgs<T>& a,
                             typename Acc<T>::type (&c)[kLincombMaxOut][kLincombMaxIn]) {
  using A = typename Acc<T>::type;
  bool valid;
  const A* src = lincomb_row(a, &valid);
  const A nan = A(NAN);
#pragma unroll
  for (int j = 0; j < kLincombMaxOut; ++j)
#pragma unroll
    for (int k = 0; k < kLincombMaxIn; ++k)
      c[j][k] = (j < a.num_out && k < a.num_in) ? (valid ? src[j * a.num_in + k] : nan) : A(0);
}

// Launchers (csrc/lincomb_cpu.cpp, csrc/lincomb_cuda.cu). Return 0 on success or an error code
// (for CUDA: the cudaError_t of the launch).
int lincomb_cpu(DType dtype, const void* const* in, void* const* out, const void* coef,
                const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n, int num_in,
                int num_out);
int lincomb_cuda(DType dtype, const void* const* in, void* const* out, const void* coef,
                 const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n, int num_in,
                 int num_out, int device, void* stream);

}  // namespace fastdiff
