"""Model noise schedules: the mathematics of diffusion noise levels, computed in float64.

One meaning per name across fastdiff:

``sigma``
    The k-diffusion / variance-exploding noise level: ``x = x0 + sigma * eps`` (Karras et al.
    2022, arXiv:2206.00364, eq. 1 with s(t) = 1). Every schedule, whatever its kind, reports
    this sigma, so a denoiser ``D(x, sigma)`` and the k-diffusion solvers work with all of them.
``alpha``
    The scale of the space the model's input lives in, relative to the VE one: ``x_model =
    alpha * x_ve``, hence ``x_model = alpha * x0 + alpha * sigma * eps``.

    - ``"vp"`` (Ho et al. 2020; Song et al. 2021): ``x = sqrt(abar) x0 + sqrt(1 - abar) eps``,
      so ``alpha = sqrt(abar) = 1 / sqrt(1 + sigma^2)`` and ``sigma = sqrt((1 - abar) / abar)``.
    - ``"ve"``, ``"edm"``: ``alpha = 1``.
    - ``"flow"`` (rectified flow, Liu et al. 2022; Esser et al. 2024): ``x = (1 - s) x0 + s eps``
      with ``s`` in [0, 1]. Dividing by ``1 - s``: ``x / (1 - s) = x0 + s / (1 - s) eps``, so
      ``sigma = s / (1 - s)``, ``s = sigma / (1 + sigma)`` and ``alpha = 1 - s = 1 / (1 + sigma)``.
``lambda``
    ``-log(sigma) = log(alpha_t / sigma_t)`` where ``sigma_t = alpha * sigma`` is the noise std in
    the model's space. This is *half* the log-SNR (``log SNR = 2 lambda``); it is the lambda of
    DPM-Solver (Lu et al. 2022, arXiv:2206.00927, Sec. 3.1) and of k-diffusion's DPM-Solver code
    (``t = -log sigma``). It does not depend on the kind.
``t``
    The model's own time/timestep input: an index 0..N-1 for discrete VP models, t in
    [eps_s, 1] for the continuous VP SDE, [0, 1] for VE, ``t = sigma`` for EDM, ``t = N * s`` for
    flow models (diffusers' convention, N = num_train_timesteps).

The ends of a schedule, where naive formulas produce log(0), 0/0 or inf:

- ``sigma = 0`` (the last step): ``lambda = +inf`` (infinite SNR; exact, returned as +inf, never
  as a silently wrong finite number), ``alpha = 1`` and ``t(0)`` is the schedule's smallest t.
- ``abar = 0`` (zero terminal SNR, Lin et al. 2023, arXiv:2305.08891): ``sigma = inf``. The
  discrete schedule replaces an exact zero by ``2**-24`` as diffusers' Euler and DPM-Solver
  schedulers do, giving ``sigma_max = sqrt((1 - 2**-24) / 2**-24) ~= 4096``, finite and
  representable in float16 (max 65504).
- ``s = 1`` (flow, pure noise): ``sigma = inf``, ``alpha = 0``; flow solvers work in ``s``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastdiff.reference.schedule import (
    BETA_SCHEDULES,
    ZERO_SNR_ALPHA_CUMPROD,
    _check_count,
    _f64,
    alphas_cumprod_from_betas,
    betas_for_alpha_bar,
    discrete_sigma_to_t,
    discrete_sigmas,
    discrete_t_to_sigma,
    make_betas,
    rescale_zero_terminal_snr,
)

__all__ = [
    "KINDS", "BETA_SCHEDULES", "ZERO_SNR_ALPHA_CUMPROD",
    "alphas_cumprod_to_sigma", "sigma_to_alphas_cumprod", "sigma_to_alpha", "alpha_to_sigma",
    "sigma_to_lambda", "lambda_to_sigma", "sigma_to_flow", "flow_to_sigma",
    "betas_for_alpha_bar", "make_betas", "rescale_zero_terminal_snr", "alphas_cumprod_from_betas",
    "discrete_sigma_to_t", "discrete_t_to_sigma",
    "NoiseSchedule", "DiscreteVPSchedule", "VPSchedule", "VESchedule", "EDMSchedule",
    "FlowSchedule",
]

KINDS = ("vp", "ve", "edm", "flow")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Conversions (float64 tensors in and out; python numbers are accepted)
# ----------------------------------------------------------------------------------------------
def alphas_cumprod_to_sigma(alphas_cumprod) -> Tensor:
    """VP -> VE: ``sigma = sqrt((1 - abar) / abar)``; ``abar = 0`` gives ``inf``."""
    a = _f64(alphas_cumprod)
    return ((1 - a) / a).sqrt()


def sigma_to_alphas_cumprod(sigma) -> Tensor:
    """VE -> VP: ``abar = 1 / (1 + sigma^2)``; ``sigma = inf`` gives 0."""
    s = _f64(sigma)
    return 1 / (1 + s * s)


def sigma_to_alpha(sigma, kind: str = "vp") -> Tensor:
    """The model-space scale ``alpha`` for a VE ``sigma`` (see the module docstring)."""
    _check_kind(kind)
    s = _f64(sigma)
    if kind == "vp":
        return torch.rsqrt(1 + s * s)
    if kind == "flow":
        return 1 / (1 + s)
    return torch.ones_like(s)


def alpha_to_sigma(alpha, kind: str = "vp") -> Tensor:
    """Inverse of `sigma_to_alpha`: vp ``sqrt(1 - alpha^2) / alpha``, flow ``(1 - alpha) / alpha``.

    ``alpha = 0`` gives ``inf``. For ``"ve"``/``"edm"`` alpha is identically 1 and carries no
    information, so asking for the inverse is an error.
    """
    _check_kind(kind)
    a = _f64(alpha)
    if kind == "vp":
        return (1 - a * a).clamp_min(0).sqrt() / a
    if kind == "flow":
        return (1 - a) / a
    raise ValueError(f"alpha is identically 1 for kind={kind!r}; it does not determine sigma")


def sigma_to_lambda(sigma) -> Tensor:
    """``lambda = -log(sigma)`` (half the log-SNR). ``sigma = 0`` gives ``+inf`` (exact)."""
    return -torch.log(_f64(sigma))


def lambda_to_sigma(lam) -> Tensor:
    """``sigma = exp(-lambda)``; ``lambda = +inf`` gives 0."""
    return torch.exp(-_f64(lam))


def sigma_to_flow(sigma) -> Tensor:
    """VE sigma -> rectified-flow ``s = sigma / (1 + sigma)``; ``sigma = inf`` gives exactly 1."""
    s = _f64(sigma)
    return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))


def flow_to_sigma(s) -> Tensor:
    """Rectified-flow ``s`` -> VE ``sigma = s / (1 - s)``; ``s = 1`` gives ``inf``."""
    s = _f64(s)
    return s / (1 - s)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------
class NoiseSchedule:
    """Common interface: ``sigma(t)``, ``t(sigma)``, ``alpha(t)``, ``lam(t)`` (lambda) and the
    range of the schedule. All values are float64 tensors (``sigma_min``/``sigma_max``/``t_min``/
    ``t_max`` are python floats). Subclasses define ``sigma`` and ``t``."""

    kind: str = ""
    t_min: float = 0.0
    t_max: float = 1.0

    def sigma(self, t) -> Tensor:
        raise NotImplementedError

    def t(self, sigma) -> Tensor:
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(self.t_max))

    def alpha(self, t) -> Tensor:
        return sigma_to_alpha(self.sigma(t), self.kind)

    def alpha_from_sigma(self, sigma) -> Tensor:
        return sigma_to_alpha(sigma, self.kind)

    def lam(self, t) -> Tensor:
        """lambda(t) = -log sigma(t), half the log-SNR."""
        return sigma_to_lambda(self.sigma(t))

    def t_from_lambda(self, lam) -> Tensor:
        return self.t(lambda_to_sigma(lam))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, sigma_min={self.sigma_min:.6g}, "
                f"sigma_max={self.sigma_max:.6g})")


class DiscreteVPSchedule(NoiseSchedule):
    """A discrete-time VP model's table ``alphas_cumprod[0..N-1]`` (DDPM, Ho et al. 2020).

    ``t`` is the (fractional) training timestep; between table entries log-sigma is linear in t,
    as in k-diffusion's ``DiscreteSchedule``. ``alphas_cumprod`` keeps the table as given
    (``abar = 0`` stays 0 for DDIM-type solvers); ``sigmas`` replaces an exact zero by
    ``zero_snr_alphas_cumprod`` (``2**-24``, as diffusers) so that ``sigma_max`` is finite.
    Where the entry before it is already below ``2**-24`` (e.g. "linear" betas rescaled to zero
    SNR: 4.2e-9), the last sigma (4096) is smaller than the one before (15400), as in diffusers;
    ``t(sigma)`` then follows k-diffusion's rule, which maps sigma_max to t = N - 1.
    """

    kind = "vp"

    def __init__(self, alphas_cumprod, zero_snr_alphas_cumprod: float = ZERO_SNR_ALPHA_CUMPROD):
        a = _f64(alphas_cumprod).flatten()
        if a.numel() < 2 or not bool(((a >= 0) & (a <= 1)).all()):
            raise ValueError("alphas_cumprod must hold at least 2 values in [0, 1]")
        if bool((a[1:] > a[:-1]).any()):
            raise ValueError("alphas_cumprod must be non-increasing in t")
        if bool((a[:-1] == 0).any()):
            raise ValueError("only the last alphas_cumprod may be 0 (zero terminal SNR)")
        self.alphas_cumprod = a
        self.sigmas = discrete_sigmas(a, zero_snr_alphas_cumprod)
        self.log_sigmas = self.sigmas.log()
        self.t_min, self.t_max = 0.0, float(a.numel() - 1)
        self.config: dict | None = None  # from_betas' arguments, when it made the table

    @classmethod
    def from_betas(cls, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                   beta_start: float = 0.0001, beta_end: float = 0.02, trained_betas=None,
                   rescale_betas_zero_snr: bool = False, **kwargs) -> DiscreteVPSchedule:
        """From diffusers-style scheduler config values (see `make_betas`)."""
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        schedule = cls(alphas_cumprod_from_betas(betas), **kwargs)
        if trained_betas is None and not kwargs:  # a closed form: the kernels can rebuild it
            schedule.config = dict(beta_schedule=beta_schedule,
                                   num_train_timesteps=num_train_timesteps,
                                   beta_start=beta_start, beta_end=beta_end,
                                   rescale_betas_zero_snr=bool(rescale_betas_zero_snr))
        return schedule

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, t) -> Tensor:
        return discrete_t_to_sigma(t, self.log_sigmas)

    def t(self, sigma, quantize: bool = False) -> Tensor:
        return discrete_sigma_to_t(sigma, self.log_sigmas, quantize)


class VPSchedule(NoiseSchedule):
    """Continuous VP SDE with linear beta(t) = beta_min + beta_d t (Song et al. 2021,
    arXiv:2011.13456, Sec. 3.4 and App. B): ``log alpha(t) = -beta_d t^2 / 4 - beta_min t / 2``, so
    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (k-diffusion's get_sigmas_vp;
    DPM-Solver's NoiseScheduleVP('linear') with beta_1 - beta_0 = beta_d). t in [eps_s, 1]."""

    kind = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3):
        if beta_d < 0 or beta_min < 0 or beta_d + beta_min <= 0:
            raise ValueError("need beta_d >= 0, beta_min >= 0, not both 0; "
                             f"got beta_d={beta_d}, beta_min={beta_min}")
        if not 0 < eps_s < 1:
            raise ValueError(f"eps_s must be in (0, 1), got {eps_s}")
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)
        self.t_min, self.t_max = float(eps_s), 1.0

    def _neg2_log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def sigma(self, t) -> Tensor:
        return torch.expm1(self._neg2_log_alpha(_f64(t))).sqrt()

    def alpha(self, t) -> Tensor:
        return torch.exp(-0.5 * self._neg2_log_alpha(_f64(t)))

    def t(self, sigma) -> Tensor:
        # Solve beta_d/2 t^2 + beta_min t = L, L = log(1 + sigma^2), in the cancellation-free
        # form t = 2L / (beta_min + sqrt(beta_min^2 + 2 beta_d L)); sigma = 0 gives t = 0.
        big_l = torch.log1p(_f64(sigma) ** 2)
        return 2 * big_l / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self.beta_d * big_l))


class VESchedule(NoiseSchedule):
    """Continuous VE SDE (Song et al. 2021, arXiv:2011.13456, Sec. 3.4 and App. C):
    ``sigma(t) = sigma_min * (sigma_max / sigma_min)^t``, t in [0, 1]. ``t(sigma)`` clamps at
    t = 0 below sigma_min (so sigma = 0 gives the endpoint, not -inf)."""

    kind = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        self._smin, self._smax = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t) -> Tensor:
        return self._smin * torch.exp(_f64(t) * self._log_ratio)

    def t(self, sigma) -> Tensor:
        sigma = _f64(sigma).clamp_min(self._smin)
        return torch.log(sigma / self._smin) / self._log_ratio


class EDMSchedule(NoiseSchedule):
    """EDM (Karras et al. 2022, arXiv:2206.00364, Table 1): ``sigma(t) = t``, ``s(t) = 1``, on
    [sigma_min, sigma_max]. ``sigma_data`` is the data std used by EDM's preconditioning;
    ``rho`` the exponent of its default spacing (`spacings.get_sigmas_karras`)."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 rho: float = 7.0):
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.rho = float(sigma_data), float(rho)

    def sigma(self, t) -> Tensor:
        return _f64(t).clone()

    def t(self, sigma) -> Tensor:
        return _f64(sigma).clone()


class FlowSchedule(NoiseSchedule):
    """Rectified flow ``x = (1 - s) x0 + s eps`` (Liu et al. 2022, arXiv:2209.03003; Esser et al.
    2024, arXiv:2403.03206). The model's timestep is ``t = N s`` (diffusers); ``sigma = s/(1-s)``.

    ``s_min`` (default 1/N, diffusers' smallest training s, shifted by ``shift``) fixes
    ``sigma_min``; ``sigma_max`` is +inf (s = 1 is pure noise): sample in ``s`` with
    `spacings.get_sigmas_flow`. Shifting is a choice of spacing (which s to visit,
    `spacings.time_shift`), not a change of this t <-> sigma map. ``shift`` is the model's own
    training shift (SD3: 3.0; ComfyUI's ModelSamplingDiscreteFlow): its table of training s is
    ``shift * u / (1 + (shift - 1) u)`` at u = i/N, i = 1..N, which is what the table-reading
    schedulers (`fastdiff.schedules.model_sampling`) read.
    """

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, s_min: float | None = None,
                 shift: float = 1.0):
        _check_count("num_train_timesteps", num_train_timesteps)
        if not (isinstance(shift, int | float) and 0 < shift < math.inf):
            raise ValueError(f"shift must be a positive finite number, got {shift!r}")
        self.num_train_timesteps, self.shift = num_train_timesteps, float(shift)
        u = 1.0 / num_train_timesteps
        s_min = shift * u / (1 + (shift - 1) * u) if s_min is None else float(s_min)
        if not 0 < s_min < 1:
            raise ValueError(f"s_min must be in (0, 1), got {s_min}")
        self.t_min, self.t_max = s_min * num_train_timesteps, float(num_train_timesteps)

    def s(self, t) -> Tensor:
        return _f64(t) / self.num_train_timesteps

    def t_from_s(self, s) -> Tensor:
        return _f64(s) * self.num_train_timesteps

    def sigma(self, t) -> Tensor:
        return flow_to_sigma(self.s(t))

    def t(self, sigma) -> Tensor:
        return self.t_from_s(sigma_to_flow(sigma))

    def alpha(self, t) -> Tensor:
        return 1 - self.s(t)  # exact at s = 1, where sigma is inf
