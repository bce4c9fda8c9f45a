// CPU launcher of the fused linear combination: the element math of lincomb.h, run over
// tiles (and OpenMP threads for large tensors). num_in/num_out are template constants here so
// the compiler can fold the fixed-size loops and vectorise; the arithmetic is the same function
// the GPU runs.
#include "fastdiff/lincomb.h"

#include <algorithm>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastdiff {
namespace {

// Elements per tile: inputs are widened into local arrays, which alias nothing, so the compiler
// vectorises the element math; every tile is loaded before it is stored, which keeps an output
// that is exactly an input (an in-place update) correct.
constexpr int64_t kTile = 256;

// Clipping's coefficients (lincomb_load_clip_coef), loaded once per launch.
template <typename A, int NOUT>
struct ClipCoef {
  A w[kLincombMaxIn];
  A y[NOUT];
};

// The non-finite guard over a stored tile: lowers *a.flag to a.stage (atomic min: tiles run on
// several threads) if any output element is inf or NaN.
template <typename T>
void report_nonfinite(const LincombArgs<T>& a, int64_t begin, int64_t len) {
  bool bad = false;
  for (int j = 0; j < a.num_out; ++j)
    for (int64_t t = 0; t < len; ++t) bad |= nonfinite(a.out[j][begin + t]);
  if (!bad) return;
  int32_t seen = __atomic_load_n(a.flag, __ATOMIC_RELAXED);
  while (a.stage < seen &&
         !__atomic_compare_exchange_n(a.flag, &seen, a.stage, true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
  }
}

template <typename T, int NIN, int NOUT, bool NOISE, bool CLIP>
void lincomb_tile(const LincombArgs<T>& a, const typename Acc<T>::type (&c)[NOUT][kLincombSlots],
                  const ClipCoef<typename Acc<T>::type, NOUT>& cc, int64_t begin, int64_t end) {
  using A = typename Acc<T>::type;
  A x[NIN][kTile];
  A y[NOUT][kTile];
  A z[kLincombMaxNoise][kTile];
  A clipped[CLIP ? kTile : 1];
  const int64_t len = end - begin;
  for (int k = 0; k < NIN; ++k)
    for (int64_t t = 0; t < len; ++t) x[k][t] = A(to_float(a.in[k][begin + t]));
  if (NOISE) {
    for (int64_t t = 0; t < len; ++t) {
      A slots[kLincombSlots] = {};
      lincomb_noise(a, begin + t, slots);
      for (int m = 0; m < kLincombMaxNoise; ++m) z[m][t] = slots[kLincombMaxIn + m];
    }
  }
  if (CLIP) {
    // A tile may straddle samples: walk it in runs of one sample (one bound and divisor each).
    for (int64_t t0 = 0; t0 < len;) {
      const int64_t sample = (begin + t0) / a.sample_numel;
      const int64_t t1 = std::min(len, (sample + 1) * a.sample_numel - begin);
      const A bound = a.clip[2 * sample], divisor = a.clip[2 * sample + 1];
      for (int64_t t = t0; t < t1; ++t) {
        A e[kLincombSlots] = {};
        for (int k = 0; k < NIN; ++k) e[k] = x[k][t];
        clipped[t] = lincomb_clip_value(lincomb_preclip(cc.w, e, NIN), bound, divisor);
      }
      t0 = t1;
    }
  }
  for (int64_t t = 0; t < len; ++t) {
    A e[kLincombSlots] = {};
    A out[NOUT];
    for (int k = 0; k < NIN; ++k) e[k] = x[k][t];
    if (NOISE)
      for (int m = 0; m < kLincombMaxNoise; ++m) e[kLincombMaxIn + m] = z[m][t];
    lincomb_element(c, e, NIN, NOUT, NOISE ? a.num_noise : 0, out);
    if (CLIP)
      for (int j = 0; j < NOUT; ++j) out[j] = lincomb_add_clipped(out[j], cc.y[j], clipped[t]);
    for (int j = 0; j < NOUT; ++j) y[j][t] = out[j];
  }
  for (int j = 0; j < NOUT; ++j)
    for (int64_t t = 0; t < len; ++t) a.out[j][begin + t] = store_as<T>(y[j][t]);
  if (a.flag) report_nonfinite(a, begin, len);
}

template <typename T, int NIN, int NOUT>
void lincomb_cpu_impl(const LincombArgs<T>& a) {
  using A = typename Acc<T>::type;
  A c[NOUT][kLincombSlots];
  lincomb_load_coef(a, c);
  ClipCoef<A, NOUT> cc{};
  if (a.clip) lincomb_load_clip_coef(a, cc.w, cc.y);
  const int64_t tiles = (a.n + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) if (a.n >= kCpuParallelThreshold)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t begin = tile * kTile;
    const int64_t end = std::min(a.n, begin + kTile);
    if (a.clip) {
      if (a.num_noise > 0) lincomb_tile<T, NIN, NOUT, true, true>(a, c, cc, begin, end);
      else lincomb_tile<T, NIN, NOUT, false, true>(a, c, cc, begin, end);
    } else {
      if (a.num_noise > 0) lincomb_tile<T, NIN, NOUT, true, false>(a, c, cc, begin, end);
      else lincomb_tile<T, NIN, NOUT, false, false>(a, c, cc, begin, end);
    }
  }
}

template <typename T, int NOUT>
void dispatch_num_in(const LincombArgs<T>& a) {
  switch (a.num_in) {
    case 1: return lincomb_cpu_impl<T, 1, NOUT>(a);
    case 2: return lincomb_cpu_impl<T, 2, NOUT>(a);
    case 3: return lincomb_cpu_impl<T, 3, NOUT>(a);
    case 4: return lincomb_cpu_impl<T, 4, NOUT>(a);
    case 5: return lincomb_cpu_impl<T, 5, NOUT>(a);
    default: return lincomb_cpu_impl<T, 6, NOUT>(a);
  }
}

template <typename T>
int run(const void* const* in, void* const* out, const void* coef, const int64_t* row_ptr,
        int64_t row, int64_t rows, int64_t n, int num_in, int num_out, const LincombPerSample& per_sample) {
  const auto a = make_lincomb_args<T>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample);
  if (num_out == 1) dispatch_num_in<T, 1>(a);
  else if (num_out == 2) dispatch_num_in<T, 2>(a);
  else dispatch_num_in<T, 3>(a);
  return 0;
}

}  // namespace

int lincomb_cpu(DType dtype, const void* const* in, void* const* out, const void* coef,
                const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n, int num_in,
                int num_out, const LincombPerSample& per_sample) {
  if (num_in < 1 || num_in > kLincombMaxIn || num_out < 1 || num_out > kLincombMaxOut) return 1;
  if (per_sample.num_noise < 0 || per_sample.num_noise > kLincombMaxNoise) return 1;
  if (per_sample.clip && per_sample.sample_numel < 1) return 1;
  switch (dtype) {
    case DType::kFloat16:
      return run<f16>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample);
    case DType::kBFloat16:
      return run<bf16>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample);
    case DType::kFloat32:
      return run<float>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample);
    case DType::kFloat64:
      return run<double>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, per_sample);
  }
  return 2;
}

}  // namespace fastdiff
