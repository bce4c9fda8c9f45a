// Fused linear combination: out_j[i] = sum_k coef[row, j, k] * in_k[i]
//                                     + sum_m coef[row, j, num_in + m] * z_m[i].
//
// Every fixed-step diffusion solver update, prediction-type conversion and guidance combination
// is such a combination with schedule-dependent coefficients (DESIGN.md). The coefficients sit in
// a device table [rows, num_out, num_in] and the row is an integer or is read from device memory,
// so one launch serves every step and can be captured in a CUDA graph. The optional noise terms
// z_m are generated in-kernel (philox.h), so noise costs no memory traffic.
//
// Optional x0 clipping (diffusers' clip_sample, or dynamic thresholding: Saharia et al. 2022,
// "Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding", Sec. 2.3).
// The predicted x0 is itself a combination of the inputs, and once clipped it enters the update
// linearly, so with a clip table [B, 2] of per-sample (bound b_n, divisor d_n) and a coefficient
// table [rows, num_out + 1, num_in + num_noise + 1]:
//     w     = sum_k coef[row, num_out, k] * in_k                (the pre-clip row)
//     y     = clamp(w, -b_n, b_n) / d_n                          (n: the element's sample)
//     out_j = (the sum above) + coef[row, j, num_in + num_noise] * y
// all in the accumulator precision: y is never rounded to the storage dtype.
//
// Non-finite guard (optional `flag`, DESIGN.md Numerics): a launch whose stored output holds an
// inf or NaN lowers flag[0] to its `stage` (an atomic min), so after a run the flag names the
// first bad stage; nothing is read back inside the loop.
#pragma once

#include <cmath>

#include "fastdiff/common.h"
#include "fastdiff/philox.h"

namespace fastdiff {

constexpr int kLincombMaxIn = 6;
// Three outputs make the widest solver step one launch: a UniPC step (Zhao et al. 2023,
// arXiv:2302.04867) writes the corrected sample, the new model-output history entry and the
// predictor's next sample.
constexpr int kLincombMaxOut = 3;
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
  const typename Acc<T>::type* coef;  // [rows, num_out (+ 1: pre-clip row), width], contiguous
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
  const typename Acc<T>::type* clip;    // [batch, 2] per-sample (bound, divisor), or null
  int32_t* flag;               // optional [1] device int: atomic min of `stage` over launches
                               // whose output held a non-finite value (null: not checked)
  int32_t stage;               // the value this launch lowers the flag to
};

// Coefficients per output row: inputs, noise terms, and the clipped term when clipping.
template <typename T>
FD_HD int lincomb_width(const LincombArgs<T>& a) {
  return a.num_in + a.num_noise + (a.clip ? 1 : 0);
}

// Resolves the coefficient row. A device-resident row cannot be checked on the host without a
// sync, so an out-of-range row yields NaN coefficients: loud, never an out-of-bounds read.
template <typename T>
FD_HD const typename Acc<T>::type* lincomb_row(const LincombArgs<T>& a, bool* valid) {
  const int64_t r = a.row_ptr ? *a.row_ptr : a.row;
  *valid = r >= 0 && r < a.rows;
  return a.coef + (*valid ? r : 0) * (a.num_out + (a.clip ? 1 : 0)) * lincomb_width(a);
}

// The element math, shared verbatim by the CPU and CUDA launchers. `c` is the coefficient row
// already in registers; `x` are the widened inputs and noise values (slots as above). NO is the
// launcher's output capacity (num_out <= NO <= kLincombMaxOut): sizing the register arrays by
// it, not by kLincombMaxOut, keeps launches with fewer outputs from paying for the widest one.
template <typename A, int NO>
FD_HD void lincomb_element(const A (&c)[NO][kLincombSlots], const A (&x)[kLincombSlots],
                           int num_in, int num_out, int num_noise, A (&y)[NO]) {
  static_assert(NO >= 1 && NO <= kLincombMaxOut, "output capacity out of range");
#pragma unroll
  for (int j = 0; j < NO; ++j) {
    // Starting from the first term (not from +0) keeps the sign of a zero result, as the
    // plain expression c0 * x0 + c1 * x1 + ... does. Every product and sum rounded on its
    // own (fd_mul/fd_add: never an FMA), as the reference computes it.
    A acc = fd_mul(c[j][0], x[0]);
#pragma unroll
    for (int k = 1; k < kLincombMaxIn; ++k)
      if (k < num_in) acc = fd_add(acc, fd_mul(c[j][k], x[k]));
#pragma unroll
    for (int m = 0; m < kLincombMaxNoise; ++m)
      if (m < num_noise) acc = fd_add(acc, fd_mul(c[j][kLincombMaxIn + m], x[kLincombMaxIn + m]));
    y[j] = j < num_out ? acc : A(0);
  }
}

// Loads the coefficient row into the register slots (NaN if the row is invalid).
template <typename T, int NO>
FD_HD void lincomb_load_coef(const LincombArgs<T>& a, typename Acc<T>::type (&c)[NO][kLincombSlots]) {
  using A = typename Acc<T>::type;
  bool valid;
  const A* src = lincomb_row(a, &valid);
  const int width = lincomb_width(a);
  const A nan = A(NAN);
#pragma unroll
  for (int j = 0; j < NO; ++j)
#pragma unroll
    for (int k = 0; k < kLincombSlots; ++k) {
      const int col = k < kLincombMaxIn ? k : a.num_in + (k - kLincombMaxIn);
      const bool used = j < a.num_out && (k < kLincombMaxIn ? k < a.num_in
                                                            : k - kLincombMaxIn < a.num_noise);
      c[j][k] = used ? (valid ? src[j * width + col] : nan) : A(0);
    }
}

// Clipping's coefficients: the pre-clip row (cw, over the inputs) and each output's factor of
// the clipped value (cy). NaN if the row is invalid, as above.
template <typename T, int NO>
FD_HD void lincomb_load_clip_coef(const LincombArgs<T>& a, typename Acc<T>::type (&cw)[kLincombMaxIn],
                                  typename Acc<T>::type (&cy)[NO]) {
  using A = typename Acc<T>::type;
  bool valid;
  const A* src = lincomb_row(a, &valid);
  const int width = lincomb_width(a);
  const A nan = A(NAN);
#pragma unroll
  for (int k = 0; k < kLincombMaxIn; ++k)
    cw[k] = k < a.num_in ? (valid ? src[a.num_out * width + k] : nan) : A(0);
#pragma unroll
  for (int j = 0; j < NO; ++j)
    cy[j] = j < a.num_out ? (valid ? src[j * width + width - 1] : nan) : A(0);
}

// The pre-clip value w = sum_k cw[k] * x[k], from the first term as lincomb_element.
template <typename A>
FD_HD A lincomb_preclip(const A (&cw)[kLincombMaxIn], const A (&x)[kLincombSlots], int num_in) {
  A w = fd_mul(cw[0], x[0]);
#pragma unroll
  for (int k = 1; k < kLincombMaxIn; ++k)
    if (k < num_in) w = fd_add(w, fd_mul(cw[k], x[k]));
  return w;
}

// y = clamp(w, -bound, bound) / divisor with torch.clamp's semantics: NaN in w or in the bound
// stays NaN (fmin/fmax would return the bound), and a negative bound yields the bound.
template <typename A>
FD_HD A lincomb_clip_value(A w, A bound, A divisor) {
  A y = w < -bound ? -bound : w;
  y = y > bound ? bound : y;
  y = bound != bound ? bound : y;
  return y / divisor;
}

// The clipped term's contribution: y_j + cy_j * clipped, rounded as the reference's sum.
template <typename A>
FD_HD A lincomb_add_clipped(A y, A cy, A clipped) { return fd_add(y, fd_mul(cy, clipped)); }

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
// Per-sample terms: in-kernel noise and clipping (both locate an element's sample n = i /
// sample_numel: the batch dim is outermost in memory).
struct LincombPerSample {
  int num_noise = 0;
  const int64_t* seeds = nullptr;
  int64_t sample_numel = 1;
  uint32_t counters[kLincombMaxNoise] = {0, 0};
  const void* clip = nullptr;  // [batch, 2] (bound, divisor) in the accumulator dtype, or null
  int32_t* flag = nullptr;     // non-finite guard (LincombArgs::flag), or null
  int32_t stage = 0;
};

int lincomb_cpu(DType dtype, const void* const* in, void* const* out, const void* coef,
                const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n, int num_in,
                int num_out, const LincombPerSample& per_sample);
int lincomb_cuda(DType dtype, const void* const* in, void* const* out, const void* coef,
                 const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n, int num_in,
                 int num_out, const LincombPerSample& per_sample, int device, void* stream);

// Fills the shared fields of LincombArgs (both launchers).
template <typename T>
LincombArgs<T> make_lincomb_args(const void* const* in, void* const* out, const void* coef,
                                 const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n,
                                 int num_in, int num_out, const LincombPerSample& per_sample) {
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
  a.num_noise = per_sample.num_noise;
  a.seeds = per_sample.seeds;
  a.sample_numel = per_sample.sample_numel;
  for (int m = 0; m < kLincombMaxNoise; ++m) a.counters[m] = per_sample.counters[m];
  a.clip = static_cast<const typename Acc<T>::type*>(per_sample.clip);
  a.flag = per_sample.flag;
  a.stage = per_sample.stage;
  return a;
}

}  // namespace fastdiff
