"""Triton kernel of the schedule tables (reference: fastdiff/reference/schedule.py), float64.

One program computes a sampling run's tables from the spec's numbers (no host-device copy):
the training table's betas, their cumulative product (a scan), the zero-SNR rescale, the
training sigmas, then per step the timestep, sigma, alpha_t, sigma_t and lambda. The element
math transcribes csrc/include/fastdiff/schedule.h line for line; read that file for the why.
The training rows of the output buffer double as the scratch the per-step gathers read, behind
a barrier. Products and sums are not fused into FMAs (``enable_fp_fusion=False``), as numpy
computes diffusers' spacings (float64 sqrt and division are IEEE in Triton); ``pow`` is
``exp(y log x)`` (the interpreter has no libdevice).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from fastdiff.kernels import device_guard

MAX_BLOCK = 1 << 16  # whole tables in one program: 64k float64 values per tensor at most


@triton.jit
def _torch_linspace(start, end, n, i):
    """torch.linspace(start, end, n)[i]: from the start for the first half, from the end after.
    (Literal ends must be exact in float32, as -6, 0 and 1 are: Triton may narrow them.)"""
    step = (end - start) / tl.maximum(n - 1, 1).to(tl.float64)
    v = tl.where(i < n // 2, start + step * i.to(tl.float64),
                 end - step * (n - 1 - i).to(tl.float64))
    return tl.where(n == 1, start + 0 * step, v)


@triton.jit
def _rint(x):
    """Round half to even (np.round, torch.round)."""
    r = tl.floor(x)
    d = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _alpha_bar(kind, t):
    """alpha_bar(t) of laplace (kind 4) or exp (5)."""
    if kind == 4:  # Hang et al. 2024, with diffusers' 1e-6 guard
        sign = tl.where(0.5 - t >= 0, 1.0, -1.0)
        snr = tl.exp(-0.5 * sign * tl.log(1 - 2 * tl.abs(0.5 - t) + 1e-6))
        a = tl.sqrt(snr / (1 + snr))
    else:
        a = tl.exp(t * -12.0)
    return a


@triton.jit
def _beta(kind, i, T, beta_start, beta_end):
    """beta_i of fastdiff.reference.schedule.make_betas (kinds in ops.schedule.BETAS order)."""
    if kind == 0:
        beta = _torch_linspace(beta_start, beta_end, T, i)
    elif kind == 1:
        root = _torch_linspace(tl.sqrt(beta_start), tl.sqrt(beta_end), T, i)
        beta = root * root
    elif kind == 3:
        ramp = _torch_linspace(-6.0, 6.0, T, i)
        beta = 1 / (1 + tl.exp(-ramp)) * (beta_end - beta_start) + beta_start
    else:
        t0 = i.to(tl.float64) / T.to(tl.float64)
        t1 = (i + 1).to(tl.float64) / T.to(tl.float64)
        if kind == 2:  # cosine without cancellation (fastdiff.reference.schedule._cosine_beta)
            # (pi / 2 written out: a float constant bound to a name would become float32)
            n = T.to(tl.float64)
            c = tl.sin((T - i).to(tl.float64) / n / 1.008 * 1.5707963267948966)
            s = tl.where((2 * i + 1) * 125 <= 124 * T,
                         ((2 * i + 1).to(tl.float64) / n + 0.016) / 1.008 * 1.5707963267948966,
                         (2 * T - 2 * i - 1).to(tl.float64) / n / 1.008 * 1.5707963267948966)
            beta = tl.sin(1 / n / 1.008 * 1.5707963267948966) * tl.sin(s) / (c * c)
        else:
            beta = 1 - _alpha_bar(kind, t1) / _alpha_bar(kind, t0)
        beta = tl.where(beta < 0.999, beta, 0.999)
    return beta


@triton.jit
def _np_linspace0(stop, num, k):
    """np.linspace(0, stop, num)[k] = k * (stop / (num - 1)), the last exactly stop; num = 1: 0."""
    v = k.to(tl.float64) * (stop / tl.maximum(num - 1, 1).to(tl.float64))
    return tl.where(num == 1, 0.0, tl.where(k == num - 1, stop, v))


@triton.jit
def _timestep(j, n, T, spacing, family, steps_offset):
    """Timestep of step j (diffusers' spacings with numpy's arithmetic; schedule.h)."""
    big = T.to(tl.float64)
    if spacing == 2:  # np.arange(T, 0, -T / n)[j]: numpy fills start + j ((start + step) - start)
        step = -(big / n.to(tl.float64))
        ts = _rint(big + j.to(tl.float64) * ((big + step) - big)) - 1
    elif family == 2:  # n + 1 points, descending, the last dropped
        if spacing == 0:
            ts = _rint(_np_linspace0(big - 1, n + 1, n - j))
        else:
            ts = ((n - j) * (T // (n + 1)) + steps_offset).to(tl.float64)
    elif spacing == 0:
        ts = _np_linspace0(big - 1, n, n - 1 - j)
        if family == 0:  # diffusers' float32 values, fractional
            ts = ts.to(tl.float32).to(tl.float64)
        else:
            ts = _rint(ts)
    else:
        ts = ((n - 1 - j) * (T // n) + steps_offset).to(tl.float64)
    return ts


@triton.jit
def _interp(SIG, T, x, mask):
    """np.interp(x, arange(T), sigmas)."""
    last = (T - 1).to(tl.float64)
    jf = tl.floor(tl.minimum(tl.maximum(x, 0.0), last))
    jj = jf.to(tl.int32)
    y0 = tl.load(SIG + jj, mask=mask, other=1.0)
    y1 = tl.load(SIG + tl.minimum(jj + 1, T - 1), mask=mask, other=1.0)
    v = (y1 - y0) / 1.0 * (x - jf) + y0
    return tl.where((x < 0) | (x >= last) | (jf == x), y0, v)


@triton.jit
def _sigma_to_t(SIG, T, sigma, mask, LOG_T: tl.constexpr):
    """k-diffusion's sigma_to_t: log-sigma interpolation from the last entry <= sigma."""
    ls = tl.log(tl.maximum(sigma, 2.2250738585072014e-308))
    lo = tl.zeros(sigma.shape, tl.int32)
    hi = lo + (T - 1)  # first index in [0, T - 1) whose log sigma is > ls
    for _ in range(LOG_T):
        active = lo < hi
        mid = (lo + hi) // 2
        right = active & (tl.log(tl.load(SIG + mid, mask=mask & active, other=1.0)) <= ls)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    low = tl.maximum(lo - 1, 0)
    low = tl.where(tl.log(tl.load(SIG + T - 1)) <= ls, T - 1, low)
    low = tl.minimum(low, T - 2)
    a = tl.log(tl.load(SIG + low, mask=mask, other=1.0))
    b = tl.log(tl.load(SIG + low + 1, mask=mask, other=1.0))
    gap = a - b
    w = tl.where(gap == 0, 0.0, (a - ls) / tl.where(gap == 0, 1.0, gap))
    w = tl.minimum(tl.maximum(w, 0.0), 1.0)
    return (1 - w) * low.to(tl.float64) + w * (low + 1).to(tl.float64)


@triton.jit
def _grid_sigma(j, n, grid, lo, hi, rho):
    """Karras (1), exponential (2) or polyexponential (3) sigma j; the ends pinned to hi, lo."""
    if grid == 1:  # Karras et al. 2022, eq. 5
        ramp = _torch_linspace(0.0, 1.0, n, j)
        min_inv = tl.exp(tl.log(lo) * (1 / rho))
        max_inv = tl.exp(tl.log(hi) * (1 / rho))
        s = tl.exp(rho * tl.log(max_inv + ramp * (min_inv - max_inv)))
    elif grid == 2:
        s = tl.exp(_torch_linspace(tl.log(hi), tl.log(lo), n, j))
    else:
        ramp = _torch_linspace(1.0, 0.0, n, j)  # ramp^rho; 0 only at j = n - 1, pinned below
        ramp = tl.exp(rho * tl.log(tl.maximum(ramp, 2.2250738585072014e-308)))
        log_lo = tl.log(lo)
        s = tl.exp(ramp * (tl.log(hi) - log_lo) + log_lo)
    return tl.where(j == 0, hi, tl.where(j == n - 1, lo, s))


# (ints equal to 1 are not specialised: n = 1 is a value, not a new kernel)
@triton.jit(do_not_specialize=["T", "n", "betas", "rescale", "spacing", "family", "steps_offset",
                               "grid", "final_sigma", "round_karras"])
def schedule_kernel(
    OUT,  # float64 [5 * (n + 1) + 2 * T]: table [5, n + 1], then train [2, T] (also scratch)
    T,  # num_train_timesteps
    n,  # num_inference_steps
    betas,  # beta schedule code (ops.schedule.BETAS)
    rescale,  # 1: zero terminal SNR (Lin et al. 2023, Alg. 1)
    spacing,  # 0 linspace, 1 leading, 2 trailing
    family,  # 0 euler, 1 ddim, 2 dpmsolver
    steps_offset,  # added to 'leading' timesteps
    grid,  # 0 discrete, 1 karras, 2 exponential, 3 polyexponential
    final_sigma,  # 0 zero, 1 sigma_min
    round_karras,  # dpmsolver + karras: round t(sigma) before truncating
    beta_start,  # float64, as its int64 bits
    beta_end,  # float64, as its int64 bits
    rho,  # float64 karras / polyexponential exponent, as its int64 bits
    BLOCK_T: tl.constexpr,  # power of 2 >= T
    BLOCK_N: tl.constexpr,  # power of 2 >= n + 1
    LOG_T: tl.constexpr,  # binary-search steps over T entries
):
    cols = n + 1
    ABAR = OUT + 5 * cols  # train row 0: alphas_cumprod
    SIG = ABAR + T  # train row 1: sigmas
    i = tl.arange(0, BLOCK_T)
    in_t = i < T
    # float64 settings arrive as their int64 bits (Triton types float arguments as fp32)
    beta_start = beta_start.to(tl.int64).to(tl.float64, bitcast=True)
    beta_end = beta_end.to(tl.int64).to(tl.float64, bitcast=True)
    rho = rho.to(tl.int64).to(tl.float64, bitcast=True)
    beta = _beta(betas, tl.minimum(i, T - 1), T, beta_start, beta_end)
    abar = tl.cumprod(tl.where(in_t, 1 - beta, 1.0), axis=0)
    if rescale != 0:
        first = tl.sqrt(tl.sum(tl.where(i == 0, abar, 0.0), axis=0))
        last = tl.sqrt(tl.sum(tl.where(i == T - 1, abar, 0.0), axis=0))
        scale = first / (first - last)
        tl.store(ABAR + i, abar, mask=in_t)
        tl.debug_barrier()
        prev = tl.load(ABAR + i - 1, mask=in_t & (i > 0), other=1.0)
        x = (tl.sqrt(abar) - last) * scale
        x_prev = (tl.sqrt(prev) - last) * scale
        cur = x * x
        alpha = tl.where(i == 0, cur, cur / (x_prev * x_prev))
        abar = tl.cumprod(tl.where(in_t, 1 - (1 - alpha), 1.0), axis=0)
        tl.debug_barrier()
    tl.store(ABAR + i, abar, mask=in_t)
    a = tl.where(abar == 0, 5.9604644775390625e-08, abar)  # 2^-24, diffusers' zero-SNR clamp
    tl.store(SIG + i, tl.sqrt((1 - a) / a), mask=in_t)
    tl.debug_barrier()

    j = tl.arange(0, BLOCK_N)
    col = j < cols
    step = j < n
    jc = tl.minimum(j, n - 1)  # lanes past the steps compute step n - 1 (not stored as such)
    ts = _timestep(jc, n, T, spacing, family, steps_offset)
    sigma = _interp(SIG, T, ts, col)
    sig0 = tl.load(SIG)
    if grid != 0:
        if family == 2:  # the whole training range
            lo = sig0
            hi = tl.load(SIG + T - 1)
        else:  # the range of the sigmas at the spaced timesteps
            lo = tl.sum(tl.where(j == n - 1, sigma, 0.0), axis=0)
            hi = tl.sum(tl.where(j == 0, sigma, 0.0), axis=0)
        sigma = _grid_sigma(jc, n, grid, lo, hi, rho)
    sigma = tl.where(step, sigma, tl.where(final_sigma == 1, sig0, 0.0))
    t = tl.where(step, ts, 0.0)
    if grid != 0:
        t = _sigma_to_t(SIG, T, sigma, col, LOG_T)
        if (family == 2) & (grid == 1) & (round_karras != 0):
            t = tl.where(step, _rint(t), t)
    elif final_sigma == 1:
        t = tl.where(step, t, _sigma_to_t(SIG, T, sigma, col, LOG_T))
    if family == 2:  # diffusers' .to(int64)
        t = tl.where(t >= 0, tl.floor(t), tl.ceil(t))
    alpha = 1 / tl.sqrt(1 + sigma * sigma)
    tl.store(OUT + j, t, mask=col)
    tl.store(OUT + cols + j, sigma, mask=col)
    tl.store(OUT + 2 * cols + j, alpha, mask=col)
    tl.store(OUT + 3 * cols + j, alpha * sigma, mask=col)
    lam = tl.where(sigma > 0, -tl.log(tl.maximum(sigma, 2.2250738585072014e-308)), float("inf"))
    tl.store(OUT + 4 * cols + j, lam, mask=col)  # +inf at sigma = 0 (infinite SNR), exact


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def schedule_tables(out: torch.Tensor, *, betas: int, num_train_timesteps: int,
                    beta_start: float, beta_end: float, rescale_zero_snr: bool, spacing: int,
                    family: int, steps_offset: int, num_inference_steps: int, grid: int,
                    rho: float, final_sigma: int, round_karras: bool) -> None:
    """Launches the kernel into `out` (float64, contiguous, 5 (n + 1) + 2 T values); fastdiff.ops
    has validated the spec and the buffer."""
    big_t, n = num_train_timesteps, num_inference_steps
    block_t = triton.next_power_of_2(big_t)
    block_n = triton.next_power_of_2(n + 1)
    if max(block_t, block_n) > MAX_BLOCK:
        raise ValueError(f"the triton backend handles num_train_timesteps <= {MAX_BLOCK}")
    with device_guard(out):
        schedule_kernel[(1,)](
            out, big_t, n, betas, int(rescale_zero_snr), spacing, family, steps_offset, grid,
            final_sigma, int(round_karras), _bits(beta_start), _bits(beta_end), _bits(rho),
            BLOCK_T=block_t, BLOCK_N=block_n, LOG_T=block_t.bit_length(),
            num_warps=8 if max(block_t, block_n) >= 1024 else 4, enable_fp_fusion=False,
        )
