// Dynamic thresholding's per-sample statistic (Saharia et al. 2022, "Photorealistic
// Text-to-Image Diffusion Models with Deep Language Understanding", Sec. 2.3; diffusers'
// `_threshold_sample`):
//
//     w   = sum_k coef[row, out_rows - 1, k] * in_k      (k < num_in: the pre-clip row)
//     s_n = clamp(quantile(|w_n|, ratio), 1, max_value)  (over sample n's elements)
//     out = [[s_n, s_n]]                                 (a lincomb clip table: clamp(w,-s,s)/s)
//
// The quantile is exact: torch.quantile's 'linear' interpolation between two order statistics,
// found by selection (std::nth_element on the CPU, a radix select on the key bits of |w| on the
// GPU: non-negative IEEE floats order like their bit patterns as unsigned integers). Nothing
// returns to the host, so the op can be captured in a CUDA graph.
#pragma once

#include <cmath>

#include "fastdiff/common.h"
#include "fastdiff/lincomb.h"

namespace fastdiff {

template <typename T>
struct ThresholdArgs {
  const T* in[kLincombMaxIn];            // num_in pointers, each [batch * sample_numel]
  int num_in;
  const typename Acc<T>::type* coef;     // [rows, out_rows, width], contiguous
  const int64_t* row_ptr;                // optional device scalar holding the row (null: `row`)
  int64_t row;
  int64_t rows;
  int64_t out_rows;                      // coef.shape[1]: the pre-clip row is the last
  int64_t width;                         // coef.shape[2] >= num_in
  int64_t batch;
  int64_t sample_numel;                  // elements per sample (batch dim outermost), >= 1
  int64_t lo, hi;                        // the two ranks and the weight of hi (quantile_rank)
  typename Acc<T>::type weight;
  double max_value;                      // upper clamp of s
  typename Acc<T>::type* out;            // [batch, 2]
};

// The pre-clip row's coefficients (NaN for an out-of-range device row, as lincomb does).
template <typename T>
FD_HD void threshold_load_coef(const ThresholdArgs<T>& a,
                               typename Acc<T>::type (&cw)[kLincombMaxIn]) {
  using A = typename Acc<T>::type;
  const int64_t r = a.row_ptr ? *a.row_ptr : a.row;
  const bool valid = r >= 0 && r < a.rows;
  const A* src = a.coef + ((valid ? r : 0) * a.out_rows + a.out_rows - 1) * a.width;
#pragma unroll
  for (int k = 0; k < kLincombMaxIn; ++k)
    cw[k] = k < a.num_in ? (valid ? src[k] : A(NAN)) : A(0);
}

// w at flat index i, in the accumulator precision (the same sum lincomb's clipping forms).
template <typename T>
FD_HD typename Acc<T>::type threshold_w(const ThresholdArgs<T>& a,
                                        const typename Acc<T>::type (&cw)[kLincombMaxIn],
                                        int64_t i) {
  using A = typename Acc<T>::type;
  A x[kLincombSlots];
#pragma unroll
  for (int k = 0; k < kLincombSlots; ++k)
    x[k] = k < a.num_in ? A(to_float(a.in[k][i])) : A(0);
  return lincomb_preclip(cw, x, a.num_in);
}

// torch.quantile's 'linear' rule (aten/src/ATen/native/Sorting.cpp, quantile_compute): rank
// = q * (n - 1) evaluated in the data's dtype, the values at floor and ceil of it, weighted by
// its fraction. Reproduced in the accumulator dtype, on the host: a GPU compiler would fuse
// the product into the subtraction (an FMA), which changes the weight.
template <typename A>
struct QuantileRank {
  int64_t lo;
  int64_t hi;
  A weight;
};

template <typename A>
inline QuantileRank<A> quantile_rank(int64_t n, double ratio) {
  const A pos = A(ratio) * A(n - 1);
  QuantileRank<A> r;
  r.lo = static_cast<int64_t>(pos);  // pos >= 0: truncation is floor
  r.hi = r.lo + (pos > A(r.lo) ? 1 : 0);
  r.weight = pos - A(r.lo);
  // Beyond 2^24 elements fp32 may round n - 1 up (torch.quantile refuses such sizes): stay
  // inside the sample.
  r.lo = r.lo < n - 1 ? r.lo : n - 1;
  r.hi = r.hi < n - 1 ? r.hi : n - 1;
  return r;
}

// torch.lerp's formula (aten/src/ATen/native/Lerp.h): exact at both ends.
template <typename A>
FD_HD A torch_lerp(A lo, A hi, A weight) {
  return (weight < A(0.5) && weight > A(-0.5)) ? lo + weight * (hi - lo)
                                               : hi - (hi - lo) * (A(1) - weight);
}

// clamp(s, 1, max_value) as torch.clamp: NaN stays NaN; max_value < 1 yields max_value.
template <typename A>
FD_HD A threshold_clamp(A s, A max_value) {
  s = s < A(1) ? A(1) : s;
  return s > max_value ? max_value : s;
}

// Launchers (csrc/threshold_cpu.cpp, csrc/threshold_cuda.cu): 0 on success, else an error code
// (for CUDA: the cudaError_t, or -1 for invalid sizes, -2 for an unsupported dtype).
int dynamic_threshold_cpu(DType dtype, const void* const* in, int num_in, const void* coef,
                          const int64_t* row_ptr, int64_t row, int64_t rows, int64_t out_rows,
                          int64_t width, int64_t batch, int64_t sample_numel, double ratio,
                          double max_value, void* out);
int dynamic_threshold_cuda(DType dtype, const void* const* in, int num_in, const void* coef,
                           const int64_t* row_ptr, int64_t row, int64_t rows, int64_t out_rows,
                           int64_t width, int64_t batch, int64_t sample_numel, double ratio,
                           double max_value, void* out, int device, void* stream);

template <typename T>
ThresholdArgs<T> make_threshold_args(const void* const* in, int num_in, const void* coef,
                                     const int64_t* row_ptr, int64_t row, int64_t rows,
                                     int64_t out_rows, int64_t width, int64_t batch,
                                     int64_t sample_numel, double ratio, double max_value,
                                     void* out) {
  ThresholdArgs<T> a{};
  for (int k = 0; k < num_in; ++k) a.in[k] = static_cast<const T*>(in[k]);
  a.num_in = num_in;
  a.coef = static_cast<const typename Acc<T>::type*>(coef);
  a.row_ptr = row_ptr;
  a.row = row;
  a.rows = rows;
  a.out_rows = out_rows;
  a.width = width;
  a.batch = batch;
  a.sample_numel = sample_numel;
  const auto rank = quantile_rank<typename Acc<T>::type>(sample_numel, ratio);
  a.lo = rank.lo;
  a.hi = rank.hi;
  a.weight = rank.weight;
  a.max_value = max_value;
  a.out = static_cast<typename Acc<T>::type*>(out);
  return a;
}

// Sizes every launcher accepts.
inline bool threshold_sizes_ok(int num_in, int64_t out_rows, int64_t width, int64_t batch,
                               int64_t sample_numel) {
  return num_in >= 1 && num_in <= kLincombMaxIn && out_rows >= 1 && width >= num_in &&
         batch >= 0 && sample_numel >= 1;
}

}  // namespace fastdiff
