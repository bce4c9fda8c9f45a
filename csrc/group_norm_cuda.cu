// CUDA launcher of the fused GroupNorm (+scale/shift)(+SiLU); element math in group_norm.h.
//
// Work is cut into tiles that never depend on the batch size: NCHW tiles are runs of one
// group's contiguous values, channels-last tiles are runs of whole pixel rows (all C channels)
// of one sample. A "unit" is the set of tiles whose statistics must be merged: one (n, g) for
// NCHW, one sample n (all G groups at once: they interleave in memory) for channels-last. Each
// thread holds kUnroll 128-bit vectors of its tile in registers.
//
// Fused mode (one cooperative launch, x read from DRAM once): blocks take tiles in order from
// an atomic ticket, publish the tile's partial moments, and the unit's last arriving tile merges
// them into (mean, rstd); every tile of the unit waits for that, then normalises the values it
// still holds in registers. Ticket order makes this deadlock-free whenever the co-resident grid
// holds at least one unit's tiles (k <= grid): the only unit still being handed out is waited on
// by at most k - 1 blocks, the others' tiles have all arrived. Cooperative launch guarantees the
// residency; the counters are returned to zero by the kernel itself (no memset per call).
//
// Two-pass mode (units larger than the resident grid, e.g. a channels-last VAE sample): a stats
// kernel reduces slabs of tiles to partials (last arriver merges), then an apply kernel re-reads
// x in reverse tile order, so the values read last by the stats kernel are still in L2.
//
// Error codes (negative; positive values are cudaError_t): see kErr* below.
#include <cuda_runtime.h>

#include <algorithm>

#include "fastdiff/group_norm.h"
#include "fastdiff/device.h"
#include "group_norm_kernels.cuh"

namespace fastdiff {
namespace {

int vec_width(DType dtype) {
  return dtype == DType::kFloat64 ? 2 : dtype == DType::kFloat32 ? 4 : 8;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile geometry: as large as the block cap allows, shrunk while the grid would not fill the GPU
// twice (batch 1, few groups), so small batches still spread over every SM.
bool make_plan(int vec, int64_t N, int64_t C, int64_t HW, int64_t G, bool cl, int sms, Plan* p) {
  const int64_t target = 2 * static_cast<int64_t>(sms);
  if (!cl) {
    const int64_t m = (C / G) * HW;
    if (m >= (int64_t(1) << 31)) return false;  // 32-bit offsets within a group
    p->units = N * G;
    p->gu = 1;
    p->rows = p->cols = 0;
    for (p->threads = kMaxThreads;; p->threads /= 2) {
      p->tile = static_cast<int64_t>(p->threads) * kUnroll * vec;
      p->k = ceil_div(m, p->tile);
      if (p->threads <= 64 || p->units * p->k >= target) break;
    }
  } else {
    if (C % vec != 0 || C / vec > kMaxThreads) return false;
    p->units = N;
    p->gu = G;
    p->cols = static_cast<int>(C / vec);
    for (p->rows = std::max(1, std::min(kMaxRows, kMaxThreads / p->cols));; p->rows /= 2) {
      p->tile = static_cast<int64_t>(p->rows) * kUnroll;
      p->k = ceil_div(HW, p->tile);
      if (p->rows <= 1 || p->units * p->k >= target) break;
    }
    p->threads = p->rows * p->cols;
  }
  p->total = p->units * p->k;
  p->slabs = p->k;
  p->tps = 1;
  p->cg = C / G;
  p->m = p->cg * HW;
  return true;
}

template <typename A>
size_t smem_bytes(const Plan& p, bool cl, int64_t C) {
  // NCHW: the unit's stats. Channels-last: per-row lane moments (the stats alias them once the
  // partials are published), row counts, channel moments.
  const int64_t n = cl ? 2 * p.rows * C + p.rows + 2 * C : 2;
  return static_cast<size_t>(n) * sizeof(A);
}

template <typename A>
int64_t workspace_bytes(const Plan& p) {
  const int64_t counters = ceil_div((p.units + 2) * 4, kCounterAlign) * kCounterAlign;
  const int64_t partials = ceil_div(p.units * p.k * p.gu * int64_t(sizeof(Moments<A>)), 16) * 16;
  return counters + partials + p.units * p.gu * 2 * int64_t(sizeof(A));
}

template <typename A>
Workspace<A> carve(void* base, const Plan& p) {
  char* b = static_cast<char*>(base);
  const int64_t counters = ceil_div((p.units + 2) * 4, kCounterAlign) * kCounterAlign;
  const int64_t partials = ceil_div(p.units * p.k * p.gu * int64_t(sizeof(Moments<A>)), 16) * 16;
  return Workspace<A>{reinterpret_cast<int*>(b), reinterpret_cast<Moments<A>*>(b + counters),
                      reinterpret_cast<A*>(b + counters + partials)};
}

// ---------------------------------------------------------------------------------------------
// Host side

bool cooperative_supported(int device) {
  static int cached[64] = {0};  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int v = 0;
    cached[device] =
        cudaDeviceGetAttribute(&v, cudaDevAttrCooperativeLaunch, device) == cudaSuccess && v ? 1 : 2;
  }
  return cached[device] == 1;
}

template <typename T, int VEC, bool CL>
int launch(const GroupNormArgs<T>& a, Plan p, void* workspace, int mode, int device,
           cudaStream_t stream) {
  using A = typename Acc<T>::type;
  auto kernel = group_norm_kernel<T, VEC, CL>;
  const size_t smem = smem_bytes<A>(p, CL, a.C);
  int per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, p.threads, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t resident = static_cast<int64_t>(per_sm) * cuda_sm_count(device);
  const Workspace<A> w = carve<A>(workspace, p);

  const bool fused = mode != 1 && p.k <= resident && cooperative_supported(device);
  if (mode == 2 && !fused) return kErrNoFused;
  if (fused) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(std::min(p.total, resident)));
    cfg.blockDim = dim3(p.threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    err = cudaLaunchKernelEx(&cfg, kernel, a, p, w, static_cast<int>(kFused));
    if (err == cudaSuccess || mode == 2) return static_cast<int>(err);
    cudaGetLastError();  // e.g. cooperative launch refused (MPS): clear it, run two passes
  }
  // Two passes. Slabs: about one per resident block, each a run of consecutive tiles of a unit.
  const int64_t per_unit = std::min(p.k, std::max<int64_t>(1, ceil_div(resident, p.units)));
  p.tps = ceil_div(p.k, per_unit);
  p.slabs = ceil_div(p.k, p.tps);
  const int64_t grid_stats = std::min(p.units * p.slabs, resident);
  kernel<<<static_cast<unsigned>(grid_stats), p.threads, smem, stream>>>(a, p, w, kStats);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  kernel<<<static_cast<unsigned>(std::min(p.total, resident)), p.threads, smem, stream>>>(
      a, p, w, kApply);
  return static_cast<int>(cudaGetLastError());
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The vector width the launch will use: 128-bit vectors when the layout and pointers allow.
int choose_vec(DType dtype, const void* x, const void* y, int64_t C, int64_t HW, bool cl) {
  const int v = vec_width(dtype);
  const bool fits = cl ? C % v == 0 : HW % v == 0;
  return fits && aligned16(x) && aligned16(y) ? v : 1;
}

template <typename T>
int run(const GroupNormArgs<T>& a, bool cl, int vec, const Plan& p, void* workspace, int mode,
        int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (cl) {
    return vec == 1 ? launch<T, 1, true>(a, p, workspace, mode, device, stream)
                    : launch<T, kVec, true>(a, p, workspace, mode, device, stream);
  }
  return vec == 1 ? launch<T, 1, false>(a, p, workspace, mode, device, stream)
                  : launch<T, kVec, false>(a, p, workspace, mode, device, stream);
}

int64_t workspace_for(DType dtype, const Plan& p) {
  return dtype == DType::kFloat64 ? workspace_bytes<double>(p) : workspace_bytes<float>(p);
}

}  // namespace

int64_t group_norm_cuda_workspace(DType dtype, const void* x, const void* y, int64_t N, int64_t C,
                                  int64_t HW, int64_t G, bool channels_last, int device) {
  if (N < 0 || C < 1 || HW < 0 || G < 1 || C % G != 0) return kErrArgs;
  Plan p;
  const int vec = choose_vec(dtype, x, y, C, HW, channels_last);
  if (!make_plan(vec, std::max<int64_t>(N, 1), C, std::max<int64_t>(HW, 1), G, channels_last,
                 cuda_sm_count(device), &p))
    return kErrLayout;
  return workspace_for(dtype, p);
}

int group_norm_cuda(DType dtype, const void* x, void* y, const void* weight, const void* bias,
                    const void* scale, const void* shift, int64_t N, int64_t C, int64_t HW,
                    int64_t G, double eps, bool silu, bool channels_last, void* workspace,
                    int64_t workspace_bytes_given, int mode, int device, void* stream_handle) {
  if (N < 0 || C < 1 || HW < 0 || G < 1 || C % G != 0 || mode < 0 || mode > 2) return kErrArgs;
  if (N == 0 || HW == 0) return 0;
  const CudaDeviceGuard guard(device);  // the caller's device is restored on return
  if (guard.error()) return guard.error();
  Plan p;
  const int vec = choose_vec(dtype, x, y, C, HW, channels_last);
  if (!make_plan(vec, N, C, HW, G, channels_last, cuda_sm_count(device), &p)) return kErrLayout;
  if (workspace == nullptr || workspace_bytes_given < workspace_for(dtype, p)) return kErrWorkspace;
  auto stream = static_cast<cudaStream_t>(stream_handle);
#define FD_GN_ARGS(T)                                                                         \
  GroupNormArgs<T>{static_cast<const T*>(x),      static_cast<T*>(y),                       \
                   static_cast<const T*>(weight), static_cast<const T*>(bias),              \
                   static_cast<const T*>(scale),  static_cast<const T*>(shift),             \
                   N, C, HW, G, static_cast<typename Acc<T>::type>(eps), silu}
  switch (dtype) {
    case DType::kFloat16:
      return run<f16>(FD_GN_ARGS(f16), channels_last, vec, p, workspace, mode, device, stream);
    case DType::kBFloat16:
      return run<bf16>(FD_GN_ARGS(bf16), channels_last, vec, p, workspace, mode, device, stream);
    case DType::kFloat32:
      return run<float>(FD_GN_ARGS(float), channels_last, vec, p, workspace, mode, device, stream);
    case DType::kFloat64:
      return run<double>(FD_GN_ARGS(double), channels_last, vec, p, workspace, mode, device,
                         stream);
  }
#undef FD_GN_ARGS
  return kErrDtype;
}

}  // namespace fastdiff
