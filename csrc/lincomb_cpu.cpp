// CPU launcher of the fused linear combination: the element math of lincomb.h, run over
// OpenMP threads. num_in/num_out are template constants here so the compiler can fold the
// fixed-size loops and vectorise; the arithmetic is the same function the GPU runs.
#include "fastdiff/lincomb.h"

#include <algorithm>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastdiff {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelThreshold = 1 << 15;
constexpr int64_t kChunk = 1 << 12;

template <typename T, int NIN, int NOUT>
void lincomb_cpu_impl(const LincombArgs<T>& a) {
  using A = typename Acc<T>::type;
  A c[kLincombMaxOut][kLincombSlots];
  lincomb_load_coef(a, c);
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (a.n >= kParallelThreshold)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kChunk;
    const int64_t end = std::min(a.n, begin + kChunk);
    for (int64_t i = begin; i < end; ++i) {
      A x[kLincombSlots] = {};
      A y[kLincombMaxOut];
      for (int k = 0; k < NIN; ++k) x[k] = A(to_float(a.in[k][i]));
      lincomb_noise(a, i, x);
      lincomb_element(c, x, NIN, NOUT, a.num_noise, y);
      for (int j = 0; j < NOUT; ++j) a.out[j][i] = store_as<T>(y[j]);
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
