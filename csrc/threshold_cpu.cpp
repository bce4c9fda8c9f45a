// CPU launcher of dynamic thresholding's per-sample quantile (threshold.h): per sample, |w|
// into a buffer, then two order statistics by std::nth_element (expected linear time) and a
// minimum over the upper part. Samples run on OpenMP threads when the batch is large.
#include "fastdiff/threshold.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastdiff {
namespace {

template <typename T>
void threshold_sample(const ThresholdArgs<T>& a, const typename Acc<T>::type (&cw)[kLincombMaxIn],
                      int64_t b, std::vector<typename Acc<T>::type>& buf) {
  using A = typename Acc<T>::type;
  const int64_t n = a.sample_numel;
  buf.resize(static_cast<size_t>(n));
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const A v = std::fabs(threshold_w(a, cw, b * n + i));
    nan |= v != v;
    buf[i] = v;
  }
  A s;
  if (nan) {
    // torch.quantile returns NaN for a sample holding NaN (and nth_element needs a strict
    // weak order, which NaN breaks).
    s = A(NAN);
  } else {
    std::nth_element(buf.begin(), buf.begin() + a.lo, buf.end());
    const A lo = buf[a.lo];
    // After nth_element everything past a.lo is >= lo: the next order statistic is its minimum.
    const A hi = a.hi == a.lo ? lo : *std::min_element(buf.begin() + a.lo + 1, buf.end());
    s = torch_lerp(lo, hi, a.weight);
  }
  s = threshold_clamp(s, A(a.max_value));
  a.out[2 * b] = s;
  a.out[2 * b + 1] = s;
}

template <typename T>
int run(const ThresholdArgs<T>& a) {
  using A = typename Acc<T>::type;
  A cw[kLincombMaxIn];
  threshold_load_coef(a, cw);
#pragma omp parallel if (a.batch > 1 && a.batch * a.sample_numel >= kCpuParallelThreshold)
  {
    std::vector<A> buf;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.batch; ++b) threshold_sample(a, cw, b, buf);
  }
  return 0;
}

}  // namespace

int dynamic_threshold_cpu(DType dtype, const void* const* in, int num_in, const void* coef,
                          const int64_t* row_ptr, int64_t row, int64_t rows, int64_t out_rows,
                          int64_t width, int64_t batch, int64_t sample_numel, double ratio,
                          double max_value, void* out) {
  if (!threshold_sizes_ok(num_in, out_rows, width, batch, sample_numel)) return 1;
  switch (dtype) {
    case DType::kFloat16:
      return run(make_threshold_args<f16>(in, num_in, coef, row_ptr, row, rows, out_rows, width,
                                          batch, sample_numel, ratio, max_value, out));
    case DType::kBFloat16:
      return run(make_threshold_args<bf16>(in, num_in, coef, row_ptr, row, rows, out_rows, width,
                                           batch, sample_numel, ratio, max_value, out));
    case DType::kFloat32:
      return run(make_threshold_args<float>(in, num_in, coef, row_ptr, row, rows, out_rows,
                                            width, batch, sample_numel, ratio, max_value, out));
    case DType::kFloat64:
      return run(make_threshold_args<double>(in, num_in, coef, row_ptr, row, rows, out_rows,
                                             width, batch, sample_numel, ratio, max_value, out));
  }
  return 2;
}

}  // namespace fastdiff
