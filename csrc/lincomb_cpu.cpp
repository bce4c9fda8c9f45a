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

template <typename T, int NIN, int NOUT, bool NOISE>
void lincomb_tile(const LincombArgs<T>& a, const typename Acc<T>::type (&c)[kLincombMaxOut][kLincombSlots],
                  int64_t begin, int64_t end) {
  using A = typename Acc<T>::type;
  A x[NIN][kTile];
  A y[NOUT][kTile];
  A z[kLincombMaxNoise][kTile];
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
  for (int64_t t = 0; t < len; ++t) {
    A e[kLincombSlots] = {};
    A out[kLincombMaxOut];
    for (int k = 0; k < NIN; ++k) e[k] = x[k][t];
    if (NOISE)
      for (int m = 0; m < kLincombMaxNoise; ++m) e[kLincombMaxIn + m] = z[m][t];
    lincomb_element(c, e, NIN, NOUT, NOISE ? a.num_noise : 0, out);
    for (int j = 0; j < NOUT; ++j) y[j][t] = out[j];
  }
  for (int j = 0; j < NOUT; ++j)
    for (int64_t t = 0; t < len; ++t) a.out[j][begin + t] = store_as<T>(y[j][t]);
}

template <typename T, int NIN, int NOUT>
void lincomb_cpu_impl(const LincombArgs<T>& a) {
  using A = typename Acc<T>::type;
  A c[kLincombMaxOut][kLincombSlots];
  lincomb_load_coef(a, c);
  const int64_t tiles = (a.n + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) if (a.n >= kCpuParallelThreshold)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t begin = tile * kTile;
    const int64_t end = std::min(a.n, begin + kTile);
    if (a.num_noise > 0) lincomb_tile<T, NIN, NOUT, true>(a, c, begin, end);
    else lincomb_tile<T, NIN, NOUT, false>(a, c, begin, end);
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
        int64_t row, int64_t rows, int64_t n, int num_in, int num_out, const LincombNoise& noise) {
  const auto a = make_lincomb_args<T>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, noise);
  if (num_out == 1) dispatch_num_in<T, 1>(a);
  else dispatch_num_in<T, 2>(a);
  return 0;
}

}  // namespace

int lincomb_cpu(DType dtype, const void* const* in, void* const* out, const void* coef,
                const int64_t* row_ptr, int64_t row, int64_t rows, int64_t n, int num_in,
                int num_out, const LincombNoise& noise) {
  if (num_in < 1 || num_in > kLincombMaxIn || num_out < 1 || num_out > kLincombMaxOut) return 1;
  if (noise.num_noise < 0 || noise.num_noise > kLincombMaxNoise) return 1;
  switch (dtype) {
    case DType::kFloat16:
      return run<f16>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, noise);
    case DType::kBFloat16:
      return run<bf16>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, noise);
    case DType::kFloat32:
      return run<float>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, noise);
    case DType::kFloat64:
      return run<double>(in, out, coef, row_ptr, row, rows, n, num_in, num_out, noise);
  }
  return 2;
}

}  // namespace fastdiff
