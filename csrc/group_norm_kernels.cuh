// Device side of the fused GroupNorm (+scale/shift)(+SiLU): tile geometry types, the
// reductions and the kernels (see group_norm_cuda.cu for the design and the launcher).
// Included by group_norm_cuda.cu only.
#pragma once

#include <cuda_runtime.h>

#include "fastdiff/group_norm.h"

namespace fastdiff {
namespace {

constexpr int kUnroll = 4;        // vectors per thread held in registers
constexpr int kMaxThreads = 256;  // block size cap (registers, shared memory)
constexpr int kMaxRows = 32;      // channels-last: thread rows per block
constexpr int64_t kCounterAlign = 256;
constexpr int kErrArgs = -1, kErrDtype = -2, kErrNoFused = -3, kErrWorkspace = -4,
              kErrLayout = -5;
enum Phase : int { kFused = 0, kStats = 1, kApply = 2 };

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Geometry of a launch (host-computed, passed by value).
struct Plan {
  int threads;     // block size
  int rows, cols;  // channels-last: threads as rows x cols, cols = C / VEC
  int64_t tile;    // NCHW: values per tile; channels-last: pixel rows per tile
  int64_t k;       // tiles per unit
  int64_t units;   // NCHW: N * G; channels-last: N
  int64_t gu;      // groups per unit: 1 (NCHW) or G (channels-last)
  int64_t total;   // units * k
  int64_t slabs;   // partials per unit (fused: k; two-pass: tiles are merged into slabs)
  int64_t tps;     // tiles per slab
  int64_t cg;      // channels per group
  int64_t m;       // values per group and sample: cg * HW
};

template <typename A>
struct Workspace {
  int* counters;         // [units] arrivals, then ticket, then exits; zero between launches
  Moments<A>* partials;  // [units, slabs, gu]
  A* stats;              // [units, gu, 2]: mean, rstd
};


// ---------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

template <typename A>
__device__ __forceinline__ Moments<A> load_moments(const Moments<A>* p) {
  // .cg: written by other blocks during this launch, so bypass the (incoherent) L1.
  return Moments<A>{__ldcg(&p->n), __ldcg(&p->mean), __ldcg(&p->m2)};
}

template <typename A>
__device__ __forceinline__ Moments<A> shfl_xor(const Moments<A>& m, int lane_mask) {
  return Moments<A>{__shfl_xor_sync(0xffffffffu, m.n, lane_mask),
                    __shfl_xor_sync(0xffffffffu, m.mean, lane_mask),
                    __shfl_xor_sync(0xffffffffu, m.m2, lane_mask)};
}

// Merges every thread's moments; the result is valid in thread 0. blockDim.x % 32 == 0.
template <typename A>
__device__ Moments<A> block_merge(Moments<A> m, Moments<A>* s_red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = merge_moments(m, shfl_xor(m, o));
  if (lane == 0) s_red[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < warps ? s_red[lane] : Moments<A>{0, 0, 0};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = merge_moments(m, shfl_xor(m, o));
  }
  __syncthreads();
  return m;
}

// Two-pass moments of the values a thread holds (count `valid` vectors x VEC lanes; valid[j]
// implies valid[0]). Sums are taken relative to the first value, so that they stay small for
// data with a large mean (x = 1000 + noise).
template <typename A, typename T, int VEC>
__device__ __forceinline__ Moments<A> thread_moments(const Vec<T, VEC> (&v)[kUnroll],
                                                     const bool (&valid)[kUnroll]) {
  const A shift = valid[0] ? A(to_float(v[0].v[0])) : A(0);
  A n = 0, sum = 0;
#pragma unroll
  for (int j = 0; j < kUnroll; ++j)
    if (valid[j]) {
      n += A(VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += A(to_float(v[j].v[e])) - shift;
    }
  const A mean = n > A(0) ? shift + sum / n : A(0);
  A m2 = 0;
#pragma unroll
  for (int j = 0; j < kUnroll; ++j)
    if (valid[j]) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A d = A(to_float(v[j].v[e])) - mean;
        m2 += d * d;
      }
    }
  return Moments<A>{n, mean, m2};
}

// Channels-last: two-pass moments per lane (= per channel) over the thread's valid rows
// (shifted as in thread_moments).
template <typename A, typename T, int VEC>
__device__ __forceinline__ void lane_moments(const Vec<T, VEC> (&v)[kUnroll],
                                             const bool (&valid)[kUnroll],
                                             Moments<A> (&m)[VEC]) {
  A n = 0;
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) n += valid[j] ? A(1) : A(0);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const A shift = valid[0] ? A(to_float(v[0].v[e])) : A(0);
    A sum = 0;
#pragma unroll
    for (int j = 0; j < kUnroll; ++j)
      if (valid[j]) sum += A(to_float(v[j].v[e])) - shift;
    const A mean = n > A(0) ? shift + sum / n : A(0);
    A m2 = 0;
#pragma unroll
    for (int j = 0; j < kUnroll; ++j)
      if (valid[j]) {
        const A d = A(to_float(v[j].v[e])) - mean;
        m2 += d * d;
      }
    m[e] = Moments<A>{n, mean, m2};
  }
}

// The unit's last arriving block merges its slabs x gu partials into (mean, rstd) per group.
// Threads split as gu groups x S slices (S a power of two), then a tree over the slices.
template <typename A>
__device__ void finalize_unit(const Plan& p, int64_t u, const Workspace<A>& w, A eps,
                              Moments<A>* s_red) {
  const int tid = threadIdx.x;
  int S = 1;
  while (S * 2 <= kMaxThreads && S * 2 * p.gu <= blockDim.x) S *= 2;
  const int per_round = blockDim.x / S;
  const int s = tid % S;
  for (int64_t g0 = 0; g0 < p.gu; g0 += per_round) {
    const int64_t g = g0 + tid / S;
    const bool active = tid < per_round * S && g < p.gu;
    Moments<A> m{0, 0, 0};
    if (active)
      for (int64_t j = s; j < p.slabs; j += S)
        m = merge_moments(m, load_moments(w.partials + (u * p.slabs + j) * p.gu + g));
    if (tid < per_round * S) s_red[tid] = m;
    __syncthreads();
    for (int half = S / 2; half > 0; half /= 2) {
      if (active && s < half) s_red[tid] = merge_moments(s_red[tid], s_red[tid + half]);
      __syncthreads();
    }
    if (active && s == 0) {
      w.stats[2 * (u * p.gu + g)] = s_red[tid].mean;
      w.stats[2 * (u * p.gu + g) + 1] = inverse_std(s_red[tid], eps);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel: one function for the three phases (a uniform runtime switch).

template <typename T, int VEC, bool CL>
struct GroupNormKernel {
  using A = typename Acc<T>::type;
  using V = Vec<T, VEC>;

  const GroupNormArgs<T>& a;  // the kernel's parameters
  const Plan& p;
  const Workspace<A>& w;
  Moments<A>* s_red;  // [kMaxThreads]
  A* s_dyn;           // dynamic shared memory, see smem_bytes
  int r, col;         // channels-last thread coordinates

  // Offset of register vector j of tile (u, kk); `valid` says whether it is in range.
  __device__ __forceinline__ int64_t offset(int64_t u, int64_t kk, int j, bool* valid) const {
    if (!CL) {
      const int64_t off = kk * p.tile + (static_cast<int64_t>(j) * blockDim.x + threadIdx.x) * VEC;
      *valid = off < p.m;
      return u * p.m + off;
    }
    const int64_t px = kk * p.tile + static_cast<int64_t>(j) * p.rows + r;
    *valid = px < a.HW;
    return (u * a.HW + px) * a.C + static_cast<int64_t>(col) * VEC;
  }

  __device__ __forceinline__ void load(int64_t u, int64_t kk, V (&v)[kUnroll],
                                       bool (&valid)[kUnroll]) const {
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t off = offset(u, kk, j, &valid[j]);
      if (valid[j]) v[j] = *reinterpret_cast<const V*>(a.x + off);
    }
  }

  // Publishes a slab's partial moments (thread moments `m` for NCHW, lane moments `lm` for
  // channels-last) as partial `slab` of unit u; returns true in the unit's last arriving block,
  // after it has merged the unit's statistics into w.stats.
  __device__ bool publish(int64_t u, int64_t slab, const Moments<A>& m,
                          const Moments<A> (&lm)[VEC]) const {
    Moments<A>* dst = w.partials + (u * p.slabs + slab) * p.gu;
    if (!CL) {
      const Moments<A> total = block_merge(m, s_red);
      if (threadIdx.x == 0) *dst = total;
    } else {
      A* row_mom = s_dyn;                        // [rows, C, 2]
      A* row_cnt = s_dyn + 2 * p.rows * a.C;     // [rows]
      A* chan = row_cnt + p.rows;                // [C, 2]
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t c = static_cast<int64_t>(col) * VEC + e;
        row_mom[2 * (r * a.C + c)] = lm[e].mean;
        row_mom[2 * (r * a.C + c) + 1] = lm[e].m2;
      }
      if (col == 0) row_cnt[r] = lm[0].n;
      __syncthreads();
      A n = 0;  // values per channel in this slab (the same for every channel)
      for (int i = 0; i < p.rows; ++i) n += row_cnt[i];
      // Rows -> channels -> groups with the parallel formula (no division in the loops).
      // Weighted means are taken relative to the first one (large-mean data stays exact).
      for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x) {
        const A ref = row_mom[2 * c];
        A s = 0;
        for (int i = 0; i < p.rows; ++i) s += row_cnt[i] * (row_mom[2 * (i * a.C + c)] - ref);
        const A mean = ref + s / n;
        A m2 = 0;
        for (int i = 0; i < p.rows; ++i) {
          const A d = row_mom[2 * (i * a.C + c)] - mean;
          m2 += row_mom[2 * (i * a.C + c) + 1] + row_cnt[i] * d * d;
        }
        chan[2 * c] = mean;
        chan[2 * c + 1] = m2;
      }
      __syncthreads();
      const int64_t cg = p.cg;
      for (int64_t g = threadIdx.x; g < a.G; g += blockDim.x) {
        const A ref = chan[2 * g * cg];
        A s = 0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += chan[2 * c] - ref;
        const A mean = ref + s / A(cg);
        A m2 = 0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          const A d = chan[2 * c] - mean;
          m2 += chan[2 * c + 1] + n * d * d;
        }
        dst[g] = Moments<A>{n * A(cg), mean, m2};
      }
    }
    // Release the partials, then count this slab in.
    __threadfence();
    __syncthreads();
    __shared__ int s_last;
    if (threadIdx.x == 0) s_last = atomicAdd(w.counters + u, 1) == p.slabs - 1;
    __syncthreads();
    if (!s_last) return false;
    __threadfence();  // acquire the other blocks' partials
    finalize_unit(p, u, w, a.eps, s_red);
    __threadfence();
    __syncthreads();
    return true;
  }

  // Copies the unit's (mean, rstd) pairs into shared memory.
  __device__ void load_stats(int64_t u) const {
    for (int64_t i = threadIdx.x; i < 2 * p.gu; i += blockDim.x)
      s_dyn[i] = __ldcg(w.stats + 2 * u * p.gu + i);
    __syncthreads();
  }

  // Normalises the held values of tile (u, kk) with the stats in shared memory and stores them.
  __device__ void apply(int64_t u, int64_t kk, const V (&v)[kUnroll],
                        const bool (&valid)[kUnroll]) const {
    if (!CL) {
      const int64_t n = u / a.G, c0 = (u % a.G) * p.cg;
      const A mean = s_dyn[0], rstd = s_dyn[1];
      const uint32_t hw = static_cast<uint32_t>(a.HW);
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        bool ok;
        const int64_t off = offset(u, kk, j, &ok);
        if (!valid[j]) continue;
        // A vector never crosses a channel (VEC divides HW), so one map serves it.
        const int64_t c = c0 + static_cast<uint32_t>(off - u * p.m) / hw;
        const ChannelMap<A> map = channel_map<A>(
            mean, rstd, param_or(a.weight, c, A(1)), param_or(a.bias, c, A(0)),
            param_or(a.scale, n * a.C + c, A(0)), param_or(a.shift, n * a.C + c, A(0)));
        V out;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          out.v[e] = store_as<T>(group_norm_element(A(to_float(v[j].v[e])), map, a.silu));
        *reinterpret_cast<V*>(a.y + off) = out;
      }
    } else {
      ChannelMap<A> map[VEC];
      // Lane e holds channel c0 + e; its group advances every cg channels (one division).
      const int c0 = col * VEC, cg = static_cast<int>(p.cg);
      int g = c0 / cg, rem = c0 - g * cg;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t c = c0 + e;
        if (e > 0 && ++rem == cg) rem = 0, ++g;
        map[e] = channel_map<A>(
            s_dyn[2 * g], s_dyn[2 * g + 1], param_or(a.weight, c, A(1)),
            param_or(a.bias, c, A(0)), param_or(a.scale, u * a.C + c, A(0)),
            param_or(a.shift, u * a.C + c, A(0)));
      }
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        bool ok;
        const int64_t off = offset(u, kk, j, &ok);
        if (!valid[j]) continue;
        V out;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          out.v[e] = store_as<T>(group_norm_element(A(to_float(v[j].v[e])), map[e], a.silu));
        *reinterpret_cast<V*>(a.y + off) = out;
      }
    }
  }

  // Moments of the held values: per thread (NCHW) or per lane (channels-last), merged into
  // the running accumulators.
  __device__ __forceinline__ void accumulate(const V (&v)[kUnroll], const bool (&valid)[kUnroll],
                                             Moments<A>& m, Moments<A> (&lm)[VEC]) const {
    if (!CL) {
      m = merge_moments(m, thread_moments<A>(v, valid));
    } else {
      Moments<A> t[VEC];
      lane_moments<A>(v, valid, t);
#pragma unroll
      for (int e = 0; e < VEC; ++e) lm[e] = merge_moments(lm[e], t[e]);
    }
  }

  __device__ void fused() const {
    __shared__ int64_t s_ticket;
    auto* ticket = reinterpret_cast<unsigned int*>(w.counters + p.units);
    if (threadIdx.x == 0) s_ticket = atomicAdd(ticket, 1u);
    for (;;) {
      __syncthreads();
      const int64_t t = s_ticket;
      __syncthreads();
      if (t >= p.total) break;
      const int64_t u = t / p.k, kk = t % p.k;
      V v[kUnroll];
      bool valid[kUnroll];
      load(u, kk, v, valid);
      Moments<A> m{0, 0, 0};
      Moments<A> lm[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) lm[e] = Moments<A>{0, 0, 0};
      accumulate(v, valid, m, lm);
      const bool last = publish(u, kk, m, lm);
      if (threadIdx.x == 0) {
        if (last) atomicAdd(w.counters + u, 1);  // k + 1: the stats are ready
        while (load_acquire(w.counters + u) <= p.k) __nanosleep(64);
      }
      __syncthreads();
      load_stats(u);
      if (threadIdx.x == 0) {
        // Leave: the k-th leaver returns the unit's counter (now 2k + 1) to zero.
        if (atomicAdd(w.counters + u, 1) == 2 * p.k) atomicExch(w.counters + u, 0);
        // Take the next ticket now, its latency hidden behind apply(). Never earlier: a block
        // must not hold an unpublished tile while it waits (that tile could be of its own unit).
        s_ticket = atomicAdd(ticket, 1u);
      }
      apply(u, kk, v, valid);
      __syncthreads();  // s_dyn is reused by the next tile
    }
    // The last block to leave resets the ticket and the exit count for the next launch.
    if (threadIdx.x == 0 &&
        atomicAdd(w.counters + p.units + 1, 1) == static_cast<int>(gridDim.x) - 1) {
      atomicExch(ticket, 0u);
      atomicExch(w.counters + p.units + 1, 0);
    }
  }

  __device__ void stats() const {
    for (int64_t item = blockIdx.x; item < p.units * p.slabs; item += gridDim.x) {
      const int64_t u = item / p.slabs, slab = item % p.slabs;
      Moments<A> m{0, 0, 0};
      Moments<A> lm[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) lm[e] = Moments<A>{0, 0, 0};
      const int64_t end = std::min(p.k, (slab + 1) * p.tps);
      for (int64_t kk = slab * p.tps; kk < end; ++kk) {
        V v[kUnroll];
        bool valid[kUnroll];
        load(u, kk, v, valid);
        accumulate(v, valid, m, lm);
      }
      if (publish(u, slab, m, lm) && threadIdx.x == 0) atomicExch(w.counters + u, 0);
      __syncthreads();
    }
  }

  __device__ void apply_all() const {
    // Reverse tile order: the stats kernel read these tiles last, they are likely still in L2.
    for (int64_t item = blockIdx.x; item < p.total; item += gridDim.x) {
      const int64_t t = p.total - 1 - item, u = t / p.k, kk = t % p.k;
      V v[kUnroll];
      bool valid[kUnroll];
      load(u, kk, v, valid);
      load_stats(u);
      apply(u, kk, v, valid);
      __syncthreads();
    }
  }
};

// Minimum resident blocks of 256 threads per SM asked of the register allocator (a tuning
// knob: 4 would cap NCHW at 64 registers, at the price of spilling the held tile around the
// statistics wait). fp64 NCHW gets 2 (128 registers): at 3 (80 registers) ptxas spilled 44 B
// per thread in the VEC = 2 kernel (benchmarks/results/ptxas-sm90.txt, tests/test_ptxas.py).
template <typename T, bool CL>
constexpr int min_blocks() {
  return CL ? 2 : (sizeof(T) == 8 ? 2 : 3);
}

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads, min_blocks<T, CL>())
    group_norm_kernel(const GroupNormArgs<T> a, const Plan p,
                      const Workspace<typename Acc<T>::type> w, int phase) {
  using A = typename Acc<T>::type;
  __shared__ Moments<A> s_red[kMaxThreads];
  extern __shared__ __align__(16) unsigned char s_raw[];
  const int r = CL ? static_cast<int>(threadIdx.x) / p.cols : 0;
  const int col = CL ? static_cast<int>(threadIdx.x) % p.cols : 0;
  const GroupNormKernel<T, VEC, CL> k{a, p, w, s_red, reinterpret_cast<A*>(s_raw), r, col};
  if (phase == kFused) k.fused();
  else if (phase == kStats) k.stats();
  else k.apply_all();
}

}  // namespace
}  // namespace fastdiff
