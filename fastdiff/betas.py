"""Betas of discrete VP (DDPM-family) schedules, in float64, the same on every platform.

diffusers' schedulers build their tables from these (linear, scaled-linear, cosine, sigmoid,
Laplace, exp and trained betas; zero-terminal-SNR rescaling). fastdiff computes them so that the
float64 values do not depend on the CPU (torch's SIMD linspace and sqrt round differently with
4 and 8 lanes), because the schedule kernels (csrc/include/fastdiff/schedule.h,
fastdiff/kernels/schedule.py) must reproduce them bitwise; fastdiff.schedules re-exports them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")


def _f64(x) -> Tensor:
    """x as a float64 tensor (keeps the device of a tensor input)."""
    if isinstance(x, Tensor):
        return x.to(torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def _check_count(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")


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
