// CUDA launcher of dynamic thresholding's per-sample quantile (threshold.h).
//
// One block per sample runs an exact radix select (MSB first, 8 bits a pass) on the keys of
// |w|: the bit patterns of non-negative IEEE floats order like the floats. Each pass counts,
// among the keys matching the digits chosen so far, how many fall in each of 256 bins; the bin
// holding the wanted rank fixes the next digit. After 4 passes (8 for fp64) the key of rank lo
// is known exactly, and with it how many keys equal it, which decides whether rank hi = lo + 1
// holds the same key or the smallest larger one (one more pass, a min-reduction). When a
// sample's keys fit in shared memory the first pass caches them there; otherwise each pass
// recomputes w from the inputs (L2-resident for latent-sized samples).
#include <cuda_runtime.h>

#include <cstdint>

#include "fastdiff/device.h"
#include "fastdiff/threshold.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 1024;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kBinsPerLane = kBins / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename A>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
  static constexpr uint32_t kInf = 0x7f800000u;  // keys above it are NaN
};
template <>
struct KeyOf<double> {
  using type = unsigned long long;
  static constexpr unsigned long long kInf = 0x7ff0000000000000ull;
};

__device__ __forceinline__ uint32_t abs_key(float w) { return __float_as_uint(fabsf(w)); }
__device__ __forceinline__ unsigned long long abs_key(double w) {
  return static_cast<unsigned long long>(__double_as_longlong(fabs(w)));
}
__device__ __forceinline__ float key_value(uint32_t key) { return __uint_as_float(key); }
__device__ __forceinline__ double key_value(unsigned long long key) {
  return __longlong_as_double(static_cast<long long>(key));
}

template <typename T, bool CACHE>
__global__ void __launch_bounds__(kThreads) threshold_kernel(const ThresholdArgs<T> a) {
  using A = typename Acc<T>::type;
  using K = typename KeyOf<A>::type;
  constexpr int kKeyBits = 8 * sizeof(K);
  extern __shared__ __align__(16) unsigned char cache_bytes[];  // [sample_numel] keys (CACHE)
  K* cache = reinterpret_cast<K*>(cache_bytes);
  __shared__ unsigned int hist[kBins];
  __shared__ unsigned int s_digit, s_below, s_equal;
  __shared__ K s_min;

  const int64_t n = a.sample_numel;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  const int lane = threadIdx.x % 32;
  A cw[kLincombMaxIn];
  threshold_load_coef(a, cw);

  K prefix = 0;          // digits chosen so far
  K chosen = 0;          // mask of the bits they cover
  int64_t k = a.lo;      // the wanted rank among the keys matching prefix
  unsigned int equal = 0;
  bool nan = false;
  for (int shift = kKeyBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    const bool first = shift == kKeyBits - kRadixBits;
    for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0;
    __syncthreads();
    // A block-uniform trip count keeps each warp converged, so lanes with the same digit add
    // once (warp-aggregated atomics: Gaussian-like |w| fills few exponent bins in pass one).
    for (int64_t i0 = 0; i0 < n; i0 += kThreads) {
      const int64_t i = i0 + threadIdx.x;
      unsigned int digit = kBins;  // no count
      if (i < n) {
        K key;
        if (first || !CACHE) key = abs_key(threshold_w(a, cw, base + i));
        else key = cache[i];
        if (first) {
          if (CACHE) cache[i] = key;
          nan |= key > KeyOf<A>::kInf;
        }
        if ((key & chosen) == prefix) digit = static_cast<unsigned int>(key >> shift) & (kBins - 1);
      }
      const unsigned int peers = __match_any_sync(kFullMask, digit);
      if (digit < kBins && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Each lane owns kBinsPerLane consecutive bins; an inclusive warp scan of their sums
      // finds the lane, then the bin, holding rank k.
      unsigned int local = 0;
      for (int j = 0; j < kBinsPerLane; ++j) local += hist[lane * kBinsPerLane + j];
      unsigned int inclusive = local;
      for (int d = 1; d < 32; d <<= 1) {
        const unsigned int v = __shfl_up_sync(kFullMask, inclusive, d);
        if (lane >= d) inclusive += v;
      }
      unsigned int below = inclusive - local;
      if (below <= k && k < inclusive) {
        for (int j = 0; j < kBinsPerLane; ++j) {
          const unsigned int count = hist[lane * kBinsPerLane + j];
          if (k < below + count) {
            s_digit = lane * kBinsPerLane + j;
            s_below = below;
            s_equal = count;
            break;
          }
          below += count;
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<K>(s_digit) << shift;
    chosen |= static_cast<K>(kBins - 1) << shift;
    k -= s_below;
    equal = s_equal;  // after the last pass: the number of keys equal to prefix
  }
  nan = __syncthreads_or(nan);

  // Rank hi: the same key while rank lo + 1 stays among the keys equal to it, else the
  // smallest key above it (block-uniform condition; such a key exists since hi < n).
  K key_hi = prefix;
  if (a.hi != a.lo && k + 1 >= equal) {
    if (threadIdx.x == 0) s_min = ~K(0);
    __syncthreads();
    K least = ~K(0);
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const K key = CACHE ? cache[i] : abs_key(threshold_w(a, cw, base + i));
      if (key > prefix && key < least) least = key;
    }
    for (int d = 16; d > 0; d >>= 1) {
      const K other = __shfl_xor_sync(kFullMask, least, d);
      least = other < least ? other : least;
    }
    if (lane == 0) atomicMin(&s_min, least);
    __syncthreads();
    key_hi = s_min;
  }
  if (threadIdx.x == 0) {
    A s = nan ? A(NAN) : torch_lerp(key_value(prefix), key_value(key_hi), a.weight);
    s = threshold_clamp(s, A(a.max_value));
    a.out[2 * blockIdx.x] = s;
    a.out[2 * blockIdx.x + 1] = s;
  }
}

// Above 48 KiB of dynamic shared memory a kernel must opt in; done once per device, for all
// the room there is, so that calls inside a CUDA-graph capture need no attribute change.
template <typename T>
cudaError_t allow_cache(int device, int bytes) {
  static int allowed[64] = {0};
  const bool cached = device >= 0 && device < 64;
  if (cached && allowed[device] >= bytes) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(
      threshold_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && cached) allowed[device] = bytes;
  return err;
}

template <typename T>
int run(const ThresholdArgs<T>& a, int device, cudaStream_t stream) {
  using K = typename KeyOf<typename Acc<T>::type>::type;
  const int64_t cache_bytes = a.sample_numel * static_cast<int64_t>(sizeof(K));
  // Leave room for the static shared memory (histogram and a few scalars).
  const int64_t room = static_cast<int64_t>(cuda_smem_optin(device)) - 2048;
  const auto blocks = static_cast<unsigned int>(a.batch);
  if (cache_bytes <= room) {
    if (cache_bytes > 48 * 1024) {
      const cudaError_t err = allow_cache<T>(device, static_cast<int>(room));
      if (err != cudaSuccess) return static_cast<int>(err);
    }
    threshold_kernel<T, true><<<blocks, kThreads, static_cast<size_t>(cache_bytes), stream>>>(a);
  } else {
    threshold_kernel<T, false><<<blocks, kThreads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int dynamic_threshold_cuda(DType dtype, const void* const* in, int num_in, const void* coef,
                           const int64_t* row_ptr, int64_t row, int64_t rows, int64_t out_rows,
                           int64_t width, int64_t batch, int64_t sample_numel, double ratio,
                           double max_value, void* out, int device, void* stream_handle) {
  // Bin counts are 32-bit and the grid's x dimension holds the batch.
  if (!threshold_sizes_ok(num_in, out_rows, width, batch, sample_numel) ||
      sample_numel >= (int64_t(1) << 31) || batch >= (int64_t(1) << 31))
    return -1;
  if (batch == 0) return 0;
  const CudaDeviceGuard guard(device);  // the caller's device is restored on return
  if (guard.error()) return guard.error();
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case DType::kFloat16:
      return run(make_threshold_args<f16>(in, num_in, coef, row_ptr, row, rows, out_rows, width,
                                          batch, sample_numel, ratio, max_value, out),
                 device, stream);
    case DType::kBFloat16:
      return run(make_threshold_args<bf16>(in, num_in, coef, row_ptr, row, rows, out_rows, width,
                                           batch, sample_numel, ratio, max_value, out),
                 device, stream);
    case DType::kFloat32:
      return run(make_threshold_args<float>(in, num_in, coef, row_ptr, row, rows, out_rows,
                                            width, batch, sample_numel, ratio, max_value, out),
                 device, stream);
    case DType::kFloat64:
      return run(make_threshold_args<double>(in, num_in, coef, row_ptr, row, rows, out_rows,
                                             width, batch, sample_numel, ratio, max_value, out),
                 device, stream);
  }
  return -2;
}

}  // namespace fastdiff
