// Schedule arithmetic: a sampling run's tables from a discrete VP schedule's closed form.
//
// From a small spec (beta schedule, its range, zero-terminal-SNR rescale, timestep spacing,
// sigma grid, final sigma) one launch computes, in float64:
//
//   train [2, T]:   alphas_cumprod (Ho et al. 2020, Sec. 2) and the VE sigmas of the training
//                   table, sqrt((1 - abar) / abar), with abar = 0 read as 2^-24 (as diffusers);
//   table [5, N+1]: per step the model's timestep, sigma (last = the final sigma), alpha_t =
//                   1 / sqrt(1 + sigma^2), sigma_t = alpha_t * sigma, lambda = -log(sigma).
//
// The specification is fastdiff/reference/schedule.py (fastdiff.schedules and .spacings, checked
// against diffusers and k-diffusion); this header is its element math, shared verbatim by the
// CPU and CUDA launchers (fastdiff/kernels/schedule.py is the Triton transcription). Where the
// reference reproduces numpy (diffusers' timestep spacings, np.interp) the same operations are
// done in the same order, so integer timesteps and their rounding agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastdiff/common.h"

namespace fastdiff {

// Codes shared with fastdiff/ops/schedule.py (same order as its name tuples).
enum ScheduleBetas : int { kBetasLinear = 0, kBetasScaledLinear, kBetasCosine, kBetasSigmoid,
                           kBetasLaplace, kBetasExp };
enum ScheduleSpacing : int { kSpacingLinspace = 0, kSpacingLeading, kSpacingTrailing };
// Whose set_timesteps the timesteps follow: diffusers' Euler (fractional float32 'linspace'),
// DDIM (rounded) or DPM-Solver (n + 1 points, the last dropped; integer timesteps).
enum ScheduleFamily : int { kFamilyEuler = 0, kFamilyDdim, kFamilyDpmSolver };
enum ScheduleGrid : int { kGridDiscrete = 0, kGridKarras, kGridExponential, kGridPolyExponential };
enum ScheduleFinal : int { kFinalZero = 0, kFinalSigmaMin };

// One request, passed by value as kernel arguments (no host-device copy).
struct ScheduleSpec {
  int betas;               // ScheduleBetas
  int rescale_zero_snr;    // Lin et al. 2023 (arXiv:2305.08891), Alg. 1
  int spacing;             // ScheduleSpacing
  int family;              // ScheduleFamily
  int grid;                // ScheduleGrid
  int final_sigma;         // ScheduleFinal
  int round_karras;        // dpmsolver + karras: round t(sigma) before truncating (diffusers)
  int64_t T;               // num_train_timesteps (>= 2)
  int64_t n;               // num_inference_steps (1..T)
  int64_t steps_offset;    // added to 'leading' timesteps
  double beta_start, beta_end, rho;
};

constexpr double kZeroSnrAlphaBar = 5.9604644775390625e-08;  // 2^-24, diffusers' clamp
constexpr double kTinyDouble = 2.2250738585072014e-308;       // finfo(float64).tiny
constexpr int kScheduleRows = 5;

// Products and sums rounded separately (fd_mul/fd_add, common.h: no FMA contraction on the
// device), as numpy and torch compute the ramps and spacings: their rounding decides integer
// timesteps.

// ---------------------------------------------------------------------------------------------
// Betas (fastdiff.schedules.make_betas)
// ---------------------------------------------------------------------------------------------
// torch.linspace(start, end, n)[i]: from the start for the first half, from the end after.
FD_HD double torch_linspace(double start, double end, int64_t n, int64_t i) {
  if (n == 1) return start;
  const double step = (end - start) / static_cast<double>(n - 1);
  return i < n / 2 ? fd_add(start, fd_mul(step, static_cast<double>(i)))
                   : fd_add(end, -fd_mul(step, static_cast<double>(n - 1 - i)));
}

// alpha_bar(t) of the Laplace and exp transforms (the cosine one, Nichol & Dhariwal 2021,
// arXiv:2102.09672, eq. 17, is cos^2((t + 0.008) / 1.008 * pi / 2), used in its beta below).
// Hang et al. 2024 (arXiv:2407.03297) Laplace log-SNR, with diffusers' 1e-6 guard.
FD_HD double alpha_bar_laplace(double t) {
  const double sign = (0.5 - t) >= 0 ? 1.0 : -1.0;  // copysign(1, 0.5 - t); 0.5 - t is never -0
  const double lmb = -0.5 * sign * log(1 - 2 * fabs(0.5 - t) + 1e-6);
  const double snr = exp(lmb);
  return sqrt(snr / (1 + snr));
}

FD_HD double alpha_bar_exp(double t) { return exp(t * -12.0); }

// The cosine schedule's beta without cancellation (fastdiff.betas._cosine_beta, which
// explains it): sin(y - x) sin(y + x) / cos^2 x with every angle formed from integers. The
// direct 1 - cos^2 y / cos^2 x would turn an ulp of the device's cos into ~5e-12 of beta_0.
FD_HD double cosine_beta(int64_t i, int64_t T) {
  const double h = 3.141592653589793 / 2, n = static_cast<double>(T);
  const double c = sin(static_cast<double>(T - i) / n / 1.008 * h);
  const double s = (2 * i + 1) * 125 <= 124 * T  // y + x <= pi / 2
                       ? (static_cast<double>(2 * i + 1) / n + 0.016) / 1.008 * h
                       : static_cast<double>(2 * T - 2 * i - 1) / n / 1.008 * h;
  return sin(1 / n / 1.008 * h) * sin(s) / (c * c);
}

// beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999) (Nichol & Dhariwal 2021, Sec. 3.2).
FD_HD double beta_from_alpha_bar(int kind, int64_t i, int64_t T) {
  const double t0 = static_cast<double>(i) / static_cast<double>(T);
  const double t1 = static_cast<double>(i + 1) / static_cast<double>(T);
  double beta;
  if (kind == kBetasCosine) beta = cosine_beta(i, T);
  else if (kind == kBetasLaplace) beta = 1 - alpha_bar_laplace(t1) / alpha_bar_laplace(t0);
  else beta = 1 - alpha_bar_exp(t1) / alpha_bar_exp(t0);
  return beta < 0.999 ? beta : 0.999;
}

FD_HD double schedule_beta(const ScheduleSpec& s, int64_t i) {
  switch (s.betas) {
    case kBetasLinear: return torch_linspace(s.beta_start, s.beta_end, s.T, i);
    case kBetasScaledLinear: {  // linear in sqrt(beta) (Rombach et al. 2022)
      const double r = torch_linspace(sqrt(s.beta_start), sqrt(s.beta_end), s.T, i);
      return r * r;
    }
    case kBetasSigmoid: {  // GeoDiff (Xu et al. 2022, arXiv:2203.02923)
      const double x = torch_linspace(-6.0, 6.0, s.T, i);
      return 1 / (1 + exp(-x)) * (s.beta_end - s.beta_start) + s.beta_start;
    }
    default: return beta_from_alpha_bar(s.betas, i, s.T);
  }
}

// Zero terminal SNR (Lin et al. 2023, Alg. 1): sqrt(abar) shifted so its last value is 0 and
// scaled so its first is kept; `scale` = first / (first - last). Returns the new abar_i.
FD_HD double zero_snr_alpha_bar(double abar, double last, double scale) {
  const double x = (sqrt(abar) - last) * scale;
  return x * x;
}

// The factor 1 - beta_i of the rescaled schedule, computed as the reference does:
// beta = 1 - abar_i / abar_{i-1} (abar_0 for i = 0), then 1 - beta.
FD_HD double zero_snr_factor(double abar_prev, double abar, int64_t i, double last, double scale) {
  const double cur = zero_snr_alpha_bar(abar, last, scale);
  const double alpha = i == 0 ? cur : cur / zero_snr_alpha_bar(abar_prev, last, scale);
  return 1 - (1 - alpha);
}

// VE sigma of one training-table entry; abar = 0 (zero SNR) is read as 2^-24.
FD_HD double train_sigma(double abar) {
  const double a = abar == 0 ? kZeroSnrAlphaBar : abar;
  return sqrt((1 - a) / a);
}

// ---------------------------------------------------------------------------------------------
// Timesteps (fastdiff.spacings.diffusers_timesteps, numpy's arithmetic)
// ---------------------------------------------------------------------------------------------
// np.linspace(0, stop, num)[k] = k * (stop / (num - 1)), the last exactly stop; num = 1 gives 0.
FD_HD double np_linspace0(double stop, int64_t num, int64_t k) {
  if (num == 1) return 0.0;
  if (k == num - 1) return stop;
  return fd_mul(static_cast<double>(k), stop / static_cast<double>(num - 1));
}

// np.arange(start, 0, -start / n)[j]: numpy fills start + j * ((start + step) - start).
FD_HD double np_arange_down(double start, int64_t n, int64_t j) {
  const double step = -(start / static_cast<double>(n));
  const double delta = fd_add(start, step) - start;
  return fd_add(start, fd_mul(static_cast<double>(j), delta));
}

// Timestep of step j (0 <= j < n), descending. 'trailing' keeps exactly n values: numpy's
// arange sometimes yields an (n+1)-th one near -1 (e.g. T = 1000, n = 61), which diffusers
// then runs as an extra step; the first n agree with it.
FD_HD double spacing_timestep(const ScheduleSpec& s, int64_t j) {
  const int64_t n = s.n, T = s.T;
  const double big = static_cast<double>(T);
  if (s.spacing == kSpacingTrailing) return rint(np_arange_down(big, n, j)) - 1;
  if (s.family == kFamilyDpmSolver) {  // n + 1 points, descending, the last (0) dropped
    if (s.spacing == kSpacingLinspace) return rint(np_linspace0(big - 1, n + 1, n - j));
    return static_cast<double>((n - j) * (T / (n + 1)) + s.steps_offset);
  }
  if (s.spacing == kSpacingLinspace) {
    const double t = np_linspace0(big - 1, n, n - 1 - j);
    // Euler keeps diffusers' float32 values (fractional); DDIM rounds them
    return s.family == kFamilyEuler ? static_cast<double>(static_cast<float>(t)) : rint(t);
  }
  return static_cast<double>((n - 1 - j) * (T / n) + s.steps_offset);  // leading
}

// ---------------------------------------------------------------------------------------------
// Table lookups
// ---------------------------------------------------------------------------------------------
// np.interp(x, arange(T), table): linear in sigma between integer timesteps (diffusers).
FD_HD double interp_table(const double* table, int64_t T, double x) {
  if (x < 0) return table[0];
  if (x >= static_cast<double>(T - 1)) return table[T - 1];
  const int64_t j = static_cast<int64_t>(floor(x));
  const double xj = static_cast<double>(j);
  if (xj == x) return table[j];
  const double slope = (table[j + 1] - table[j]) / 1.0;
  return fd_add(fd_mul(slope, x - xj), table[j]);
}

// k-diffusion's DiscreteSchedule.sigma_to_t (fastdiff.schedules.discrete_sigma_to_t): linear in
// log sigma between the last entry whose log sigma is <= log(sigma) (0 if none, at most T - 2)
// and the next; the weight is clamped to [0, 1]. The table is non-decreasing except possibly
// its last entry (the 2^-24 clamp of a zero-SNR schedule), so a binary search over the first
// T - 1 entries and a look at the last one find that entry.
FD_HD double sigma_to_t(const double* table, int64_t T, double sigma) {
  const double ls = log(sigma > kTinyDouble ? sigma : kTinyDouble);
  int64_t low;
  if (log(table[T - 1]) <= ls) {
    low = T - 1;
  } else {
    int64_t lo = 0, hi = T - 1;  // first index in [0, T - 1) whose log sigma is > ls
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (log(table[mid]) <= ls) lo = mid + 1;
      else hi = mid;
    }
    low = lo > 0 ? lo - 1 : 0;
  }
  if (low > T - 2) low = T - 2;
  const double a = log(table[low]), b = log(table[low + 1]);
  const double gap = a - b;
  double w = gap == 0 ? 0.0 : (a - ls) / gap;
  w = w < 0 ? 0.0 : (w > 1 ? 1.0 : w);
  return (1 - w) * static_cast<double>(low) + w * static_cast<double>(low + 1);
}

// ---------------------------------------------------------------------------------------------
// Sigma grids (fastdiff.spacings), between lo and hi; the ends are pinned to lo and hi exactly
// so that t(hi) and t(lo) are exactly the table's timesteps on every backend.
// ---------------------------------------------------------------------------------------------
FD_HD double grid_sigma(const ScheduleSpec& s, int64_t j, double lo, double hi) {
  if (j == 0) return hi;
  if (j == s.n - 1) return lo;
  if (s.grid == kGridKarras) {  // Karras et al. 2022 (arXiv:2206.00364), eq. 5
    const double ramp = torch_linspace(0.0, 1.0, s.n, j);
    const double min_inv = pow(lo, 1 / s.rho), max_inv = pow(hi, 1 / s.rho);
    return pow(max_inv + ramp * (min_inv - max_inv), s.rho);
  }
  if (s.grid == kGridExponential)  // uniform in log sigma
    return exp(torch_linspace(log(hi), log(lo), s.n, j));
  // polyexponential (k-diffusion): log sigma = ramp^rho (log hi - log lo) + log lo
  const double ramp = pow(torch_linspace(1.0, 0.0, s.n, j), s.rho);
  const double log_lo = log(lo);
  return exp(ramp * (log(hi) - log_lo) + log_lo);
}

// ---------------------------------------------------------------------------------------------
// One column of the [5, N+1] table. `table` is the training sigmas [T].
// ---------------------------------------------------------------------------------------------
FD_HD void schedule_column(const ScheduleSpec& s, const double* table, int64_t j,
                           double* out, int64_t stride) {
  const int64_t n = s.n, T = s.T;
  double t, sigma;
  if (j == n) {  // the final entry: 0 or the table's smallest sigma, at t(sigma) = 0
    sigma = s.final_sigma == kFinalSigmaMin ? table[0] : 0.0;
    t = sigma_to_t(table, T, sigma);
  } else {
    t = spacing_timestep(s, j);
    sigma = interp_table(table, T, t);
    if (s.grid != kGridDiscrete) {
      double lo, hi;
      if (s.family == kFamilyDpmSolver) {  // the whole training range
        lo = table[0];
        hi = table[T - 1];
      } else {  // the range of the sigmas at the spaced timesteps
        lo = interp_table(table, T, spacing_timestep(s, n - 1));
        hi = interp_table(table, T, spacing_timestep(s, 0));
      }
      sigma = grid_sigma(s, j, lo, hi);
      t = sigma_to_t(table, T, sigma);
      if (s.family == kFamilyDpmSolver && s.grid == kGridKarras && s.round_karras) t = rint(t);
    }
  }
  if (s.family == kFamilyDpmSolver) t = trunc(t);  // diffusers' .to(int64)
  const double alpha = 1 / sqrt(1 + sigma * sigma);
  out[0] = t;
  out[stride] = sigma;
  out[2 * stride] = alpha;
  out[3 * stride] = alpha * sigma;
  out[4 * stride] = -log(sigma);  // +inf at sigma = 0 (infinite SNR), exact
}

// Launchers (csrc/schedule_cpu.cpp, csrc/schedule_cuda.cu): fill out [5 * (n + 1) + 2 * T]
// (table, then train). Return 0 on success, else an error code (CUDA: the cudaError_t).
int schedule_tables_cpu(const ScheduleSpec& spec, double* out);
int schedule_tables_cuda(const ScheduleSpec& spec, double* out, int device, void* stream);

}  // namespace fastdiff
