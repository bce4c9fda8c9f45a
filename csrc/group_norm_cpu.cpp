// CPU launcher of the fused GroupNorm (element math in group_norm.h), over OpenMP threads.
//
// Pass 1: moments of every (sample, group). Values are widened chunk by chunk into a buffer of
// the accumulator type and reduced two-pass (sums relative to a value of the chunk, so data
// with a large mean stays exact); NCHW chunks are runs of one group, channels-last chunks are
// runs of pixel rows reduced per channel (contiguous, so the loops vectorise). Chunk moments
// are merged with the parallel formula of Chan, Golub & LeVeque (1979).
// Pass 2: per-(sample, channel) maps y = (x - mean) * a + b, then one sweep in memory order.
#include <algorithm>
#include <vector>

#include "fastdiff/group_norm.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastdiff {
namespace {

// Values per chunk: the widened chunk stays in L1/L2 between the two passes.
constexpr int64_t kChunk = 4096;

template <typename T, typename A>
inline void widen(const T* x, int64_t n, A* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = A(to_float(x[i]));
}

// Two-pass moments of n > 0 buffered values.
template <typename A>
Moments<A> buffer_moments(const A* buf, int64_t n) {
  const A ref = buf[0];
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += buf[i] - ref;
  const A mean = ref + s / A(n);
  A m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < n; ++i) m2 += (buf[i] - mean) * (buf[i] - mean);
  return Moments<A>{A(n), mean, m2};
}

// NCHW: group (n, g) is one contiguous run of Cg * HW values.
template <typename T, typename A>
void stats_nchw(const GroupNormArgs<T>& a, bool parallel, Moments<A>* stats) {
  const int64_t m = a.C / a.G * a.HW;
#pragma omp parallel if (parallel)
  {
    std::vector<A> buf(kChunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < a.N * a.G; ++u) {
      Moments<A> acc{0, 0, 0};
      for (int64_t begin = 0; begin < m; begin += kChunk) {
        const int64_t count = std::min(kChunk, m - begin);
        widen(a.x + u * m + begin, count, buf.data());
        acc = merge_moments(acc, buffer_moments(buf.data(), count));
      }
      stats[u] = acc;
    }
  }
}

// Channels-last: per-channel moments of row chunks [N, chunks, C] (each chunk `rows` pixel rows,
// the last one shorter), then per group over chunks x channels with the parallel formula.
template <typename T, typename A>
void stats_channels_last(const GroupNormArgs<T>& a, bool parallel, Moments<A>* stats) {
  const int64_t C = a.C, HW = a.HW, Cg = C / a.G;
  const int64_t rows = std::max<int64_t>(1, 4 * kChunk / C);
  const int64_t chunks = (HW + rows - 1) / rows;
  std::vector<A> mean(a.N * chunks * C), m2(a.N * chunks * C);
#pragma omp parallel if (parallel)
  {
    std::vector<A> buf(rows * C), s(C);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.N * chunks; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * rows, nr = std::min(rows, HW - p0);
      widen(a.x + (n * HW + p0) * C, nr * C, buf.data());
      A* mu = mean.data() + t * C;
      A* sq = m2.data() + t * C;
      std::fill(s.begin(), s.end(), A(0));
      for (int64_t p = 1; p < nr; ++p) {  // sums relative to the first row
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) s[c] += buf[p * C + c] - buf[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        mu[c] = buf[c] + s[c] / A(nr);
        sq[c] = 0;
      }
      for (int64_t p = 0; p < nr; ++p) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sq[c] += (buf[p * C + c] - mu[c]) * (buf[p * C + c] - mu[c]);
      }
    }
#pragma omp for schedule(static)
    for (int64_t u = 0; u < a.N * a.G; ++u) {
      const int64_t n = u / a.G, c0 = (u % a.G) * Cg;
      const A ref = mean[n * chunks * C + c0];
      A count = 0, sum = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        const A nk = A(std::min(rows, HW - k * rows));
        const A* mu = mean.data() + (n * chunks + k) * C + c0;
        count += nk * A(Cg);
        for (int64_t j = 0; j < Cg; ++j) sum += nk * (mu[j] - ref);
      }
      const A mu_g = ref + sum / count;
      A acc = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        const A nk = A(std::min(rows, HW - k * rows));
        const int64_t base = (n * chunks + k) * C + c0;
        for (int64_t j = 0; j < Cg; ++j) {
          const A d = mean[base + j] - mu_g;
          acc += m2[base + j] + nk * d * d;
        }
      }
      stats[u] = Moments<A>{count, mu_g, acc};
    }
  }
}

template <typename T, bool SILU>
void apply(const GroupNormArgs<T>& a, bool channels_last, bool parallel,
           const std::vector<typename Acc<T>::type>& mean,
           const std::vector<typename Acc<T>::type>& mul,
           const std::vector<typename Acc<T>::type>& add) {
  using A = typename Acc<T>::type;
  const int64_t C = a.C, HW = a.HW;
  if (!channels_last) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t plane = 0; plane < a.N * C; ++plane) {
      const ChannelMap<A> m{mean[plane], mul[plane], add[plane]};
      const T* x = a.x + plane * HW;
      T* y = a.y + plane * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i)
        y[i] = store_as<T>(group_norm_element(A(to_float(x[i])), m, SILU));
    }
  } else {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t row = 0; row < a.N * HW; ++row) {
      const int64_t base = (row / HW) * C;
      const A* mu = mean.data() + base;
      const A* ml = mul.data() + base;
      const A* ad = add.data() + base;
      const T* x = a.x + row * C;
      T* y = a.y + row * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        y[c] = store_as<T>(group_norm_element(A(to_float(x[c])), ChannelMap<A>{mu[c], ml[c], ad[c]},
                                              SILU));
    }
  }
}

template <typename T>
void run(const GroupNormArgs<T>& a, bool channels_last) {
  using A = typename Acc<T>::type;
  const int64_t N = a.N, C = a.C, G = a.G, Cg = C / G;
  const bool parallel = N * C * a.HW >= kCpuParallelThreshold;

  std::vector<Moments<A>> stats(N * G);
  if (channels_last) stats_channels_last(a, parallel, stats.data());
  else stats_nchw(a, parallel, stats.data());

  // Per-(n, c) maps, as structure of arrays for the vectorised sweep.
  std::vector<A> mean(N * C), mul(N * C), add(N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const Moments<A>& m = stats[n * G + c / Cg];
      const ChannelMap<A> map = channel_map<A>(
          m.mean, inverse_std(m, a.eps), param_or(a.weight, c, A(1)), param_or(a.bias, c, A(0)),
          param_or(a.scale, n * C + c, A(0)), param_or(a.shift, n * C + c, A(0)));
      mean[n * C + c] = map.mean;
      mul[n * C + c] = map.a;
      add[n * C + c] = map.b;
    }
  }
  if (a.silu) apply<T, true>(a, channels_last, parallel, mean, mul, add);
  else apply<T, false>(a, channels_last, parallel, mean, mul, add);
}

template <typename T>
int run_typed(const void* x, void* y, const void* weight, const void* bias, const void* scale,
              const void* shift, int64_t N, int64_t C, int64_t HW, int64_t G, double eps,
              bool silu, bool channels_last) {
  GroupNormArgs<T> a{static_cast<const T*>(x),      static_cast<T*>(y),
                     static_cast<const T*>(weight), static_cast<const T*>(bias),
                     static_cast<const T*>(scale),  static_cast<const T*>(shift),
                     N, C, HW, G, static_cast<typename Acc<T>::type>(eps), silu};
  run(a, channels_last);
  return 0;
}

}  // namespace

int group_norm_cpu(DType dtype, const void* x, void* y, const void* weight, const void* bias,
                   const void* scale, const void* shift, int64_t N, int64_t C, int64_t HW,
                   int64_t G, double eps, bool silu, bool channels_last) {
  if (N < 0 || C < 1 || HW < 0 || G < 1 || C % G != 0) return 1;
  if (N == 0 || HW == 0) return 0;
  switch (dtype) {
    case DType::kFloat16:
      return run_typed<f16>(x, y, weight, bias, scale, shift, N, C, HW, G, eps, silu,
                            channels_last);
    case DType::kBFloat16:
      return run_typed<bf16>(x, y, weight, bias, scale, shift, N, C, HW, G, eps, silu,
                             channels_last);
    case DType::kFloat32:
      return run_typed<float>(x, y, weight, bias, scale, shift, N, C, HW, G, eps, silu,
                              channels_last);
    case DType::kFloat64:
      return run_typed<double>(x, y, weight, bias, scale, shift, N, C, HW, G, eps, silu,
                               channels_last);
  }
  return 2;
}

}  // namespace fastdiff
