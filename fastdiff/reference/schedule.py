"""Reference of the schedule tables: the specification every backend of
`fastdiff.ops.schedule_tables` must match, in host float64. It holds the arithmetic the kernels
(csrc/include/fastdiff/schedule.h, fastdiff/kernels/schedule.py) reproduce bitwise -- betas,
diffusers' timestep spacings, the log-linear t <-> sigma maps, the karras / exponential /
polyexponential grids -- and fastdiff.schedules builds on it (the layers of DESIGN.md: the
reference imports no schedule, the schedules import no op). tests/test_schedules.py checks these
functions against diffusers and k-diffusion.

For a discrete VP schedule (its ``alphas_cumprod``) and ``n`` steps:

1. timesteps: diffusers' ``set_timesteps`` spacing (`diffusers_timesteps`) of the ``family`` --
   "euler" (fractional float32 'linspace'), "ddim" (rounded) or "dpmsolver" (n + 1 points, the
   last dropped) -- keeping exactly n values ('trailing' can get an (n+1)-th from numpy's
   arange, e.g. T = 1000, n = 61; diffusers then runs an extra step near t = -1);
2. sigmas at them by np.interp (linear in sigma, as diffusers) on the training sigmas, where
   ``abar = 0`` (zero terminal SNR) reads as 2**-24 (`discrete_sigmas`);
3. a ``grid`` other than "discrete" replaces them by karras / exponential / polyexponential
   sigmas (`grid_sigmas`) between the range of step 2 (dpmsolver: the whole training range),
   with both ends pinned to the range's ends (the formulas give them up to pow/exp rounding;
   pinned, t(sigma_max) = T - 1 exactly, even where a zero-SNR table is not monotone at its
   end), and the timesteps become ``t(sigma)`` (`discrete_sigma_to_t`); dpmsolver rounds karras
   timesteps (``round_karras``; diffusers skips it for squaredcos_cap_v2) and truncates all
   timesteps to integers, as diffusers' ``.to(int64)``;
4. the final sigma: 0 or the training table's smallest sigma, at ``t(final sigma)`` = 0;
5. ``alpha_t = 1 / sqrt(1 + sigma^2)``, ``sigma_t = alpha_t * sigma``, ``lambda = -log sigma``
   (lambda = +inf at sigma = 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _f64(x) -> Tensor:
    """x as a float64 tensor (keeps the device of a tensor input)."""
    if isinstance(x, Tensor):
        return x.to(torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def _check_count(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")


# ----------------------------------------------------------------------------------------------
# Betas of discrete VP (DDPM-family) schedules, the same on every platform: torch's SIMD
# linspace and sqrt round differently with 4 and 8 lanes, and the kernels must match bitwise.
# ----------------------------------------------------------------------------------------------
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")


def _alpha_bar_cosine(t: float) -> float:
    # Nichol & Dhariwal 2021 (arXiv:2102.09672), eq. 17 with s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _alpha_bar_laplace(t: float) -> float:
    # Hang et al. 2024 (arXiv:2407.03297) Laplace log-SNR; as diffusers, which returns
    # sqrt(snr / (1 + snr)) and the 1e-6 guard against log(0) at t = 0 and t = 1.
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def _alpha_bar_exp(t: float) -> float:
    return math.exp(t * -12.0)


_ALPHA_BAR_FNS = {"cosine": _alpha_bar_cosine, "laplace": _alpha_bar_laplace,
                  "exp": _alpha_bar_exp}


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> Tensor:
    """Betas that discretise a continuous ``alpha_bar(t)``, t in [0, 1] (Nichol & Dhariwal 2021,
    arXiv:2102.09672, Sec. 3.2):
    ``beta_i = min(1 - alpha_bar((i+1)/N) / alpha_bar(i/N), max_beta)``.

    ``alpha_transform_type`` is ``"cosine"`` (eq. 17), ``"laplace"`` or ``"exp"``, exactly as
    diffusers' ``betas_for_alpha_bar`` (which returns float32; this returns float64).
    """
    if alpha_transform_type not in _ALPHA_BAR_FNS:
        raise ValueError(f"alpha_transform_type must be one of {tuple(_ALPHA_BAR_FNS)}, "
                         f"got {alpha_transform_type!r}")
    _check_count("num_diffusion_timesteps", num_diffusion_timesteps)
    fn, n = _ALPHA_BAR_FNS[alpha_transform_type], num_diffusion_timesteps
    if alpha_transform_type == "cosine":
        betas = [min(_cosine_beta(i, n), max_beta) for i in range(n)]
    else:
        betas = [min(1 - fn((i + 1) / n) / fn(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


def _cosine_beta(i: int, n: int) -> float:
    """``1 - alpha_bar((i+1)/n) / alpha_bar(i/n)`` for the cosine schedule without cancellation.

    With x, y the angles ``(t + 0.008) / 1.008 * pi / 2`` at t = i/n and (i+1)/n,
    ``1 - cos^2 y / cos^2 x = sin(y - x) sin(y + x) / cos^2 x``, and every angle is formed from
    integers: ``y - x = (1/n) / 1.008 * pi/2``, ``cos x = sin((n - i)/n / 1.008 * pi/2)``, and
    ``y + x`` -- or ``pi - (y + x)`` past pi/2, where sin is ill-conditioned. Within 8 ulps of
    the exact value (mpmath); the direct form subtracts two squares ~4e-5 apart at t = 0, which
    turns an ulp of cos into ~5e-12 of beta there (so its value would depend on the libm)."""
    h = math.pi / 2
    c = math.sin((n - i) / n / 1.008 * h)
    if (2 * i + 1) * 125 <= 124 * n:  # y + x <= pi / 2
        s = ((2 * i + 1) / n + 0.016) / 1.008 * h
    else:
        s = (2 * n - 2 * i - 1) / n / 1.008 * h
    return math.sin(1 / n / 1.008 * h) * math.sin(s) / (c * c)


def _linspace(start: float, end: float, n: int) -> Tensor:
    """``torch.linspace(start, end, n)`` in float64 by its scalar formula (from the start for the
    first half, from the end after), the same on every CPU: torch's vectorised kernel rounds
    some entries differently with 4 and with 8 SIMD lanes. The schedule kernels
    (csrc/include/fastdiff/schedule.h) compute each entry alone, this way."""
    if n == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    step = (end - start) / (n - 1)
    i = torch.arange(n, dtype=torch.float64)
    return torch.where(i < n // 2, start + step * i, end - step * (n - 1 - i))


def make_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000,
               beta_start: float = 0.0001, beta_end: float = 0.02,
               trained_betas=None) -> Tensor:
    """The betas of diffusers' DDPM/DDIM schedulers (same names and defaults), in float64.

    - ``"linear"``: DDPM (Ho et al. 2020, arXiv:2006.11239, Sec. 4).
    - ``"scaled_linear"``: linear in sqrt(beta) (Latent/Stable Diffusion, Rombach et al. 2022).
    - ``"squaredcos_cap_v2"``: cosine (Nichol & Dhariwal 2021), see `betas_for_alpha_bar`.
    - ``"sigmoid"``: GeoDiff (Xu et al. 2022, arXiv:2203.02923):
      ``sigmoid(linspace(-6, 6, N)) * (beta_end - beta_start) + beta_start``.
    - ``"laplace"``, ``"exp"``: `betas_for_alpha_bar` with that transform.
    - ``trained_betas``: the user's own betas (overrides ``beta_schedule``).
    """
    if trained_betas is not None:
        betas = _f64(trained_betas)
        if betas.ndim != 1 or betas.numel() == 0 or not bool(((betas >= 0) & (betas <= 1)).all()):
            raise ValueError("trained_betas must be a non-empty 1-D sequence of values in [0, 1]")
        return betas.clone()
    _check_count("num_train_timesteps", num_train_timesteps)
    n = num_train_timesteps
    if beta_schedule == "linear":
        return _linspace(beta_start, beta_end, n)
    if beta_schedule == "scaled_linear":
        return _linspace(beta_start**0.5, beta_end**0.5, n) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n, alpha_transform_type="cosine")
    if beta_schedule in ("laplace", "exp"):
        return betas_for_alpha_bar(n, alpha_transform_type=beta_schedule)
    if beta_schedule == "sigmoid":
        ramp = _linspace(-6.0, 6.0, n)
        return torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def _sqrt_rn(x: Tensor) -> Tensor:
    """Correctly rounded sqrt. torch's AVX-512 float64 sqrt is an ulp off for ~1% of inputs, and
    `rescale_zero_terminal_snr` amplifies an ulp of sqrt(abar) ~5000x in sigma near t = 0
    (1 - abar is small there), so the host result would depend on the CPU; numpy's (and CUDA's)
    sqrt is IEEE."""
    if x.device.type != "cpu":
        return x.sqrt()
    return torch.from_numpy(np.sqrt(x.numpy()))


def rescale_zero_terminal_snr(betas) -> Tensor:
    """Rescale betas so the last step has zero SNR (Lin et al. 2023, arXiv:2305.08891, Alg. 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    The result has ``betas[-1] = 1`` and ``alphas_cumprod[-1] = 0`` exactly.
    """
    alphas_bar_sqrt = _sqrt_rn(torch.cumprod(1 - _f64(betas), dim=0))
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_from_betas(betas) -> Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` (Ho et al. 2020, Sec. 2), float64."""
    return torch.cumprod(1 - _f64(betas), dim=0)


# diffusers (EulerDiscreteScheduler, DPMSolverMultistepScheduler) replaces the zero terminal
# alphas_cumprod by the smallest positive float16 subnormal so the first sigma is finite.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def discrete_sigmas(alphas_cumprod, zero_snr_alphas_cumprod: float = ZERO_SNR_ALPHA_CUMPROD
                    ) -> Tensor:
    """The training sigmas ``sqrt((1 - abar) / abar)`` of a table, an exact ``abar = 0`` read as
    ``zero_snr_alphas_cumprod`` (as diffusers) so that the last sigma is finite."""
    a = _f64(alphas_cumprod)
    a = torch.where(a == 0, torch.full_like(a, zero_snr_alphas_cumprod), a)
    return ((1 - a) / a).sqrt()


# ----------------------------------------------------------------------------------------------
# Discrete t <-> sigma (k-diffusion's DiscreteSchedule.sigma_to_t / t_to_sigma)
# ----------------------------------------------------------------------------------------------
def discrete_sigma_to_t(sigma, log_sigmas: Tensor, quantize: bool = False) -> Tensor:
    """Timestep of ``sigma`` by linear interpolation in log-sigma between table entries, exactly
    k-diffusion's ``DiscreteSchedule.sigma_to_t`` (and diffusers' ``_sigma_to_t``).

    ``low`` is the last index whose log-sigma is <= log(sigma) (0 if none), capped at N - 2; the
    weight is clamped to [0, 1], so values outside the table map to its end timesteps: sigma = 0
    gives t = 0 (computed from the smallest positive float, not from log(0) = -inf) and
    sigma = inf gives N - 1. ``quantize=True`` returns the nearest index instead.
    """
    sigma, log_sigmas = _f64(sigma), _f64(log_sigmas)
    log_sigma = torch.log(sigma.clamp_min(torch.finfo(torch.float64).tiny)).reshape(-1)
    dists = log_sigma - log_sigmas[:, None]  # [N, M]
    if quantize:
        return dists.abs().argmin(dim=0).reshape(sigma.shape).to(torch.float64)
    # argmax of the cumulative count returns its first maximum: the last index with dist >= 0.
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.numel() - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    gap = lo - hi
    w = torch.where(gap == 0, torch.zeros_like(gap), (lo - log_sigma) / gap).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def discrete_t_to_sigma(t, log_sigmas: Tensor) -> Tensor:
    """Sigma at a (fractional) timestep: linear interpolation of log-sigma between the two
    neighbouring table entries, as k-diffusion's ``DiscreteSchedule.t_to_sigma``. ``t`` is clamped
    to [0, N - 1]."""
    log_sigmas = _f64(log_sigmas)
    t = _f64(t).clamp(0, log_sigmas.numel() - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t - t.floor()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


# ----------------------------------------------------------------------------------------------
# diffusers' timestep spacings
# ----------------------------------------------------------------------------------------------
# Which diffusers schedulers compute their timesteps the same way:
#   "ddim":      n timesteps rounded to integers (DDIM, DDPM, PNDM);
#   "euler":     n timesteps, 'linspace' not rounded (Euler, EulerAncestral, Heun, LMS);
#   "dpmsolver": n + 1 points with the last dropped and 'leading' ratio last // (n + 1)
#                (DPMSolverMultistep, UniPCMultistep, DEISMultistep).
TIMESTEP_FAMILIES = ("ddim", "euler", "dpmsolver")


def diffusers_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                        timestep_spacing: str = "leading", steps_offset: int = 0,
                        family: str = "ddim", last_timestep: int | None = None) -> Tensor:
    """The timesteps of diffusers' ``set_timesteps`` (float64, descending), for the spacings of
    Lin et al. 2023 (arXiv:2305.08891) Table 2. numpy reproduces diffusers' rounding bit for bit.

    - ``"linspace"``: ``linspace(0, N - 1, n)`` (dpmsolver: ``linspace(0, last - 1, n + 1)``
      without its last point 0), rounded except for the "euler" family, whose fractional values
      are diffusers' float32 ones, exactly;
    - ``"leading"``: ``arange(n) * (N // n) + steps_offset`` (dpmsolver: ``arange(n + 1) *
      (last // (n + 1))`` without 0, plus offset);
    - ``"trailing"``: ``round(arange(N, 0, -N / n)) - 1`` (dpmsolver starts at ``last``).

    ``steps_offset`` only affects "leading", as in diffusers. ``last_timestep`` (dpmsolver) is
    ``N - clipped_idx`` from ``lambda_min_clipped``; default N.
    """
    if family not in TIMESTEP_FAMILIES:
        raise ValueError(f"family must be one of {TIMESTEP_FAMILIES}, got {family!r}")
    _check_count("num_inference_steps", num_inference_steps)
    n, big_n = num_inference_steps, num_train_timesteps
    if n > big_n:
        raise ValueError(f"num_inference_steps={n} cannot exceed num_train_timesteps={big_n}")
    last = big_n if last_timestep is None else int(last_timestep)
    if family == "dpmsolver":
        if timestep_spacing == "linspace":
            t = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif timestep_spacing == "leading":
            t = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
        elif timestep_spacing == "trailing":
            t = np.arange(last, 0, -big_n / n).round() - 1
        else:
            t = None
    elif timestep_spacing == "linspace" and family == "ddim":
        t = np.linspace(0, big_n - 1, n).round()[::-1]
    elif timestep_spacing == "linspace":
        # the euler family feeds these fractional float32 values to the model: keep them exactly
        t = np.linspace(0, big_n - 1, n, dtype=np.float32)[::-1]
    elif timestep_spacing == "leading":
        t = (np.arange(0, n) * (big_n // n)).round()[::-1] + steps_offset
    elif timestep_spacing == "trailing":
        # np.arange with a float step, as diffusers: its length is ceil(N / (N / n)).
        t = np.round(np.arange(big_n, 0, -big_n / n)) - 1
    else:
        t = None
    if t is None:
        raise ValueError("timestep_spacing must be 'linspace', 'leading' or 'trailing', "
                         f"got {timestep_spacing!r}")
    return torch.from_numpy(np.array(t, dtype=np.float64))  # a copy: t may be a reversed view


# ----------------------------------------------------------------------------------------------
# Grids (k-diffusion's get_sigmas_karras / _exponential / _polyexponential without the final
# entry; fastdiff.schedules.spacings adds validation, dtypes and the final sigma)
# ----------------------------------------------------------------------------------------------
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (arXiv:2206.00364), eq. 5: ``sigma_i = (sigma_max^(1/rho) + i/(n-1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, i = 0..n-1."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log sigma (= uniform in lambda: DPM-Solver's 'logSNR' skip type)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0
                           ) -> Tensor:
    """``log sigma_i = ramp_i^rho (log sigma_max - log sigma_min) + log sigma_min``, ramp 1 -> 0."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return torch.exp(ramp * (log_max - log_min) + log_min)


# ----------------------------------------------------------------------------------------------
# The tables
# ----------------------------------------------------------------------------------------------
ROWS = ("timesteps", "sigmas", "alpha_t", "sigma_t", "lam")
_GRIDS = {"karras": karras_sigmas, "exponential": exponential_sigmas,
          "polyexponential": polyexponential_sigmas}


def tables_from_schedule(schedule, num_inference_steps: int, *,
                         spacing: str = "linspace", steps_offset: int = 0, family: str = "euler",
                         grid: str = "discrete", rho: float = 7.0, final_sigma: str = "zero",
                         round_karras: bool = True) -> tuple[Tensor, Tensor]:
    """``(table [5, n + 1], train [2, T])`` float64 on the CPU for a discrete VP schedule (anything
    with ``alphas_cumprod``, its ``sigmas`` and ``log_sigmas``, e.g. `DiscreteVPSchedule`):
    table rows `ROWS`, train rows (alphas_cumprod, training sigmas)."""
    n, table, log_sigmas = num_inference_steps, schedule.sigmas, schedule.log_sigmas
    big_n = table.numel()
    timesteps = diffusers_timesteps(n, big_n, spacing, steps_offset, family)[:n]
    sigmas = torch.from_numpy(np.interp(timesteps.numpy(), np.arange(big_n), table.numpy()))
    if grid != "discrete":
        if family == "dpmsolver":
            lo, hi = float(table[0]), float(table[-1])
        else:
            lo, hi = float(sigmas[-1]), float(sigmas[0])
        kw = {} if grid == "exponential" else {"rho": rho}
        sigmas = _GRIDS[grid](n, lo, hi, **kw)
        sigmas[-1], sigmas[0] = lo, hi
        timesteps = discrete_sigma_to_t(sigmas, log_sigmas)
        if family == "dpmsolver" and grid == "karras" and round_karras:
            timesteps = timesteps.round()
    final = table[:1] if final_sigma == "sigma_min" else table.new_zeros(1)
    sigmas = torch.cat([sigmas, final])
    timesteps = torch.cat([timesteps, discrete_sigma_to_t(final, log_sigmas)])
    if family == "dpmsolver":
        timesteps = timesteps.trunc()
    alpha = torch.rsqrt(1 + sigmas * sigmas)
    rows = [timesteps, sigmas, alpha, alpha * sigmas, -torch.log(sigmas)]
    return torch.stack(rows), torch.stack([schedule.alphas_cumprod, table])


def schedule_tables(num_inference_steps: int, *, beta_schedule: str = "linear",
                    num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                    beta_end: float = 0.02, rescale_betas_zero_snr: bool = False,
                    **kwargs) -> tuple[Tensor, Tensor]:
    """The tables of the closed-form schedule (`make_betas`; diffusers' config names), as
    `tables_from_schedule`. dpmsolver's karras rounding follows diffusers: off for
    squaredcos_cap_v2."""
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    kwargs.setdefault("round_karras", beta_schedule != "squaredcos_cap_v2")
    return tables_from_schedule(_Table(alphas_cumprod_from_betas(betas)), num_inference_steps,
                                **kwargs)


class _Table:
    """The three attributes `tables_from_schedule` reads, for a table of alphas_cumprod."""

    def __init__(self, alphas_cumprod: Tensor):
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = discrete_sigmas(alphas_cumprod)
        self.log_sigmas = self.sigmas.log()
