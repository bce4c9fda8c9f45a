"""Spacings: which noise levels a sampling run visits. Computed in float64.

Every ``get_sigmas_*`` returns a descending 1-D tensor: ``n`` noise levels from the largest to
the smallest (both included), then a final entry chosen by ``final_sigma``:

- ``"zero"``: append 0 (k-diffusion's ``append_zero``; the last step lands on the data);
- ``"sigma_min"``: append the smallest level again (diffusers' ``final_sigmas_type="sigma_min"``);
- ``"none"``: append nothing (DPM-Solver's grids, which end at t = eps).

The four k-diffusion names keep k-diffusion's signatures and, by default, its output dtype
(``torch.get_default_dtype()``, usually float32); they compute in float64 and accept
``dtype=torch.float64``. The others return float64 by default. No table contains NaN or inf.

diffusers' own spacings are in `fastdiff.schedules.diffusers`; ComfyUI's schedulers, which read
a model's sigma table, in `fastdiff.schedules.model_sampling`; published tables in
`fastdiff.schedules.published`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fastdiff.reference.schedule import (
    _check_count,
    _f64,
    exponential_sigmas,
    karras_sigmas,
    polyexponential_sigmas,
)
from fastdiff.schedules.model import NoiseSchedule

__all__ = [
    "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_vp",
    "get_sigmas_laplace",
    "beta_ppf", "get_sigmas_beta", "get_sigmas_time_uniform", "get_sigmas_time_quadratic",
    "get_sigmas_logsnr", "time_shift", "calculate_shift", "get_sigmas_flow", "sigmas_from_user",
    "sigmas_from_timesteps", "FINAL_SIGMAS",
]

FINAL_SIGMAS = ("zero", "sigma_min", "none")


def _finish(sigmas: Tensor, final_sigma: str, device, dtype) -> Tensor:
    """Append the final entry (see the module docstring) and cast."""
    if final_sigma == "zero":
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    elif final_sigma == "sigma_min":
        sigmas = torch.cat([sigmas, sigmas[-1:]])
    elif final_sigma != "none":
        raise ValueError(f"final_sigma must be one of {FINAL_SIGMAS}, got {final_sigma!r}")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError("the spacing produced non-finite sigmas; check sigma_min/sigma_max")
    return sigmas.to(device=device, dtype=torch.float64 if dtype is None else dtype)


def _kd_dtype(dtype):
    return torch.get_default_dtype() if dtype is None else dtype


def _check_rho(rho) -> None:
    try:
        ok = not isinstance(rho, bool) and 0 < float(rho) < math.inf
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(f"rho must be a positive finite number, got {rho!r}")


def _check_range(sigma_min, sigma_max, allow_zero_min: bool = False) -> None:
    ok_min = sigma_min >= 0 if allow_zero_min else sigma_min > 0
    if not (ok_min and sigma_min <= sigma_max < math.inf):
        low = ">= 0" if allow_zero_min else "> 0"
        raise ValueError(f"need sigma_min {low} and sigma_min <= sigma_max < inf, "
                         f"got sigma_min={sigma_min}, sigma_max={sigma_max}")


# ----------------------------------------------------------------------------------------------
# k-diffusion spacings (same signatures as k_diffusion.sampling.get_sigmas_*)
# ----------------------------------------------------------------------------------------------
def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu", *, dtype=None,
                      final_sigma="zero") -> Tensor:
    """Karras et al. 2022 (arXiv:2206.00364), eq. 5: ``sigma_i = (sigma_max^(1/rho) + i/(n-1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, i = 0..n-1."""
    _check_count("n", n)
    _check_range(sigma_min, sigma_max, allow_zero_min=True)
    _check_rho(rho)
    return _finish(karras_sigmas(n, sigma_min, sigma_max, rho), final_sigma, device,
                   _kd_dtype(dtype))


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu", *, dtype=None,
                           final_sigma="zero") -> Tensor:
    """Uniform in log sigma (= uniform in lambda: DPM-Solver's 'logSNR' skip type)."""
    _check_count("n", n)
    _check_range(sigma_min, sigma_max)
    return _finish(exponential_sigmas(n, sigma_min, sigma_max), final_sigma, device,
                   _kd_dtype(dtype))


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0, device="cpu", *, dtype=None,
                               final_sigma="zero") -> Tensor:
    """Polynomial in log sigma: ``log sigma_i = ramp_i^rho (log sigma_max - log sigma_min) +
    log sigma_min`` with ramp from 1 to 0 (k-diffusion); rho = 1 is `get_sigmas_exponential`."""
    _check_count("n", n)
    _check_range(sigma_min, sigma_max)
    _check_rho(rho)
    return _finish(polyexponential_sigmas(n, sigma_min, sigma_max, rho), final_sigma, device,
                   _kd_dtype(dtype))


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device="cpu", *, dtype=None,
                  final_sigma="zero") -> Tensor:
    """The continuous VP SDE (Song et al. 2021) at n times uniform in [eps_s, 1] (see
    `schedules.VPSchedule`): ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
    _check_count("n", n)
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    sigmas = torch.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt()
    return _finish(sigmas, final_sigma, device, _kd_dtype(dtype))


def get_sigmas_laplace(n, sigma_min, sigma_max, mu=0.0, beta=0.5, device="cpu", *,
                       dtype=torch.float64, final_sigma="zero") -> Tensor:
    """Laplace-distributed log sigma (Hang et al. 2024, "Improved Noise Schedule for Diffusion
    Training", arXiv:2407.03297; ComfyUI's LaplaceScheduler): with x uniform in [0, 1],
    ``log sigma = mu - beta sign(1/2 - x) log(1 - 2 |1/2 - x| + 1e-5)`` (the quantile function
    of Laplace(mu, beta) at 1 - x; 1e-5 keeps log(0) away), clamped to [sigma_min, sigma_max].
    ComfyUI appends nothing (its runs end at sigma_min): pass ``final_sigma="none"`` for that."""
    _check_count("n", n)
    _check_range(sigma_min, sigma_max)
    if not (math.isfinite(mu) and 0 <= beta < math.inf):
        raise ValueError(f"need a finite mu and beta >= 0, got mu={mu}, beta={beta}")
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    lam = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
    return _finish(lam.exp().clamp(sigma_min, sigma_max), final_sigma, device, dtype)


# ----------------------------------------------------------------------------------------------
# Beta-distribution spacing (Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173)
# ----------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, modified Lentz (Numerical Recipes,
    3rd ed., Sec. 6.4); converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-16:
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` (the Beta(a, b) CDF), float64."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b  # symmetry I_x(a,b)=1-I_{1-x}(b,a)


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) (scipy.stats.beta.ppf) by bisection on the monotone CDF until the
    bracket cannot shrink in float64, returning its upper end, the smallest float with
    ``CDF >= q`` (the quantile's definition); without scipy. Uses ``ppf(q; a, b) = 1 - ppf(1 - q;
    b, a)`` for q > 1/2, and the median 1/2 of a symmetric one exactly (ComfyUI's beta schedule
    rounds ``ppf * 999``, and 499.5 is a tie)."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    if q == 0 or q == 1:
        return float(q)
    if q == 0.5 and a == b:
        return 0.5
    if q > 0.5:  # solve in the upper tail, where 1 - x is small: keeps its relative accuracy
        return 1 - beta_ppf(1 - q, b, a)
    lo, hi = 0.0, 1.0
    while True:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            return hi
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid


def get_sigmas_beta(n, sigma_min, sigma_max, alpha=0.6, beta=0.6, device="cpu", *,
                    dtype=torch.float64, final_sigma="zero") -> Tensor:
    """``sigma_i = sigma_min + ppf(1 - i/(n-1); alpha, beta) (sigma_max - sigma_min)``: dense near
    both ends of the range (Lee et al. 2024; diffusers' ``_convert_to_beta``)."""
    _check_count("n", n)
    _check_range(sigma_min, sigma_max, allow_zero_min=True)
    qs = 1 - np.linspace(0, 1, n)
    ppf = torch.tensor([beta_ppf(float(q), alpha, beta) for q in qs], dtype=torch.float64)
    return _finish(sigma_min + ppf * (sigma_max - sigma_min), final_sigma, device, dtype)


# ----------------------------------------------------------------------------------------------
# DPM-Solver skip types (Lu et al. 2022, arXiv:2206.00927; its code's get_time_steps)
# ----------------------------------------------------------------------------------------------
def _t_range(schedule: NoiseSchedule, t_max, t_min):
    if schedule.kind == "flow":
        raise ValueError("flow sigmas reach inf at s = 1; use get_sigmas_flow (spacing in s)")
    t_max = schedule.t_max if t_max is None else float(t_max)
    t_min = schedule.t_min if t_min is None else float(t_min)
    if not t_min <= t_max:
        raise ValueError(f"need t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    return t_max, t_min


def get_sigmas_time_uniform(schedule: NoiseSchedule, n, t_max=None, t_min=None, *,
                            device="cpu", dtype=torch.float64, final_sigma="zero") -> Tensor:
    """Uniform in the schedule's t (DPM-Solver 'time_uniform'). For a `DiscreteVPSchedule` this
    is k-diffusion's ``DiscreteSchedule.get_sigmas(n)``. DPM-Solver with N steps is
    ``n = N + 1, final_sigma="none"``."""
    _check_count("n", n)
    t_max, t_min = _t_range(schedule, t_max, t_min)
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64)
    return _finish(schedule.sigma(t), final_sigma, device, dtype)


def get_sigmas_time_quadratic(schedule: NoiseSchedule, n, t_max=None, t_min=None, *,
                              device="cpu", dtype=torch.float64, final_sigma="zero") -> Tensor:
    """Uniform in sqrt(t) (DPM-Solver 'time_quadratic', recommended for guided sampling)."""
    _check_count("n", n)
    t_max, t_min = _t_range(schedule, t_max, t_min)
    t = torch.linspace(t_max**0.5, t_min**0.5, n, dtype=torch.float64) ** 2
    return _finish(schedule.sigma(t), final_sigma, device, dtype)


def get_sigmas_logsnr(schedule: NoiseSchedule, n, t_max=None, t_min=None, *, device="cpu",
                      dtype=torch.float64, final_sigma="zero") -> Tensor:
    """Uniform in lambda = -log sigma (DPM-Solver 'logSNR'); lambda is linear in log sigma, so this
    is `get_sigmas_exponential` between sigma(t_min) and sigma(t_max) and needs no t(lambda)."""
    _check_count("n", n)
    t_max, t_min = _t_range(schedule, t_max, t_min)
    lam = torch.linspace(float(schedule.lam(t_max)), float(schedule.lam(t_min)), n,
                         dtype=torch.float64)
    return _finish(torch.exp(-lam), final_sigma, device, dtype)


# ----------------------------------------------------------------------------------------------
# Rectified flow (values are s in [0, 1], not VE sigmas)
# ----------------------------------------------------------------------------------------------
def time_shift(s, shift: float | None = None, mu: float | None = None,
               time_shift_type: str = "exponential", power: float = 1.0) -> Tensor:
    """Shift flow times ``s`` in [0, 1] towards more noise (Esser et al. 2024, arXiv:2403.03206,
    Sec. 5.3.2), as diffusers' ``FlowMatchEulerDiscreteScheduler``.

    - static (``shift``): ``shift * s / (1 + (shift - 1) * s)``;
    - dynamic (``mu``, resolution dependent; see `calculate_shift`):
      ``"exponential"``: ``e^mu / (e^mu + (1/s - 1)^power)``;
      ``"linear"``: ``mu / (mu + (1/s - 1)^power)``.

    The static shift is the exponential one with ``mu = log(shift)``, ``power = 1``. Written as
    ``c s^p / (c s^p + (1 - s)^p)`` so s = 0 maps to 0 without dividing by zero.
    """
    if (shift is None) == (mu is None):
        raise ValueError("pass exactly one of shift= (static) or mu= (dynamic shifting)")
    s = _f64(s)
    if shift is not None:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        return shift * s / (1 + (shift - 1) * s)
    if time_shift_type == "exponential":
        c = math.exp(mu)
    elif time_shift_type == "linear":
        c = float(mu)
    else:
        raise ValueError("time_shift_type must be 'exponential' or 'linear', "
                         f"got {time_shift_type!r}")
    num = c * s**power
    return num / (num + (1 - s) ** power)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent ``mu``: linear in the number of latent tokens, from ``base_shift`` at
    ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (as diffusers' Flux/SD3 pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def _stretch_to_terminal(s: Tensor, shift_terminal: float) -> Tensor:
    # LTX-Video / diffusers stretch_shift_to_terminal: rescale 1 - s so the last s is the terminal.
    if not 0 < shift_terminal < 1:
        raise ValueError(f"shift_terminal must be in (0, 1), got {shift_terminal}")
    one_minus = 1 - s
    if float(one_minus[-1]) <= 0:
        raise ValueError("shift_terminal needs a grid whose last s is < 1 (n >= 2)")
    return 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))


def get_sigmas_flow(n, shift=1.0, *, mu=None, time_shift_type="exponential", s_max=1.0,
                    s_min=None, shift_terminal=None, device="cpu", dtype=torch.float64,
                    final_sigma="zero") -> Tensor:
    """Flow times ``s``: n values uniform from ``s_max`` to ``s_min`` (default 1/n: with a final 0,
    the uniform grid of [0, 1], as diffusers' Flux pipeline), then shifted by `time_shift` --
    statically by ``shift`` (SD3, Esser et al. 2024, Sec. 5.3.2) or, if ``mu`` is given, dynamically
    (``time_shift_type`` 'exponential' or 'linear', see `calculate_shift`) -- and, if
    ``shift_terminal`` is set, stretched so the last value is ``shift_terminal``."""
    _check_count("n", n)
    s_min = 1.0 / n if s_min is None else float(s_min)
    if not 0 <= s_min <= s_max <= 1:
        raise ValueError(f"need 0 <= s_min <= s_max <= 1, got s_min={s_min}, s_max={s_max}")
    s = torch.linspace(s_max, s_min, n, dtype=torch.float64)
    if mu is None:
        s = time_shift(s, shift=shift)
    else:
        s = time_shift(s, mu=mu, time_shift_type=time_shift_type)
    if shift_terminal:
        s = _stretch_to_terminal(s, shift_terminal)
    return _finish(s, final_sigma, device, dtype)


# ----------------------------------------------------------------------------------------------
# User-given
# ----------------------------------------------------------------------------------------------
def sigmas_from_user(sigmas, *, device="cpu", dtype=torch.float64, final_sigma="none") -> Tensor:
    """Validate the user's own sigmas (finite, >= 0, non-increasing) and add the final entry
    (default: none, the list is used as given)."""
    s = _f64(sigmas).flatten()
    if s.numel() < 1 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("sigmas must be a non-empty sequence of finite values >= 0")
    if bool((s[1:] > s[:-1]).any()):
        raise ValueError("sigmas must be non-increasing")
    return _finish(s, final_sigma, device, dtype)


def sigmas_from_timesteps(schedule: NoiseSchedule, timesteps, *, device="cpu",
                          dtype=torch.float64, final_sigma="zero") -> Tensor:
    """Sigmas at the user's own (descending) timesteps, via ``schedule.sigma(t)``."""
    t = _f64(timesteps).flatten()
    if t.numel() < 1 or bool((t[1:] > t[:-1]).any()):
        raise ValueError("timesteps must be a non-empty, non-increasing sequence")
    return _finish(schedule.sigma(t), final_sigma, device, dtype)
