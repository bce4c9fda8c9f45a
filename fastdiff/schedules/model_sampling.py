"""Schedulers that read a model's own table of noise levels (ComfyUI's ``SCHEDULER_HANDLERS``
and its scheduler nodes), in float64.

`ModelSampling` is ComfyUI's ``model_sampling`` interface (comfy/model_sampling.py) over
fastdiff's schedules: ``sigmas`` (the model's training noise levels, ascending in its timestep,
in its sampler's units: VE sigma for VP / EDM models, flow time s for flow models), their ends
``sigma_min`` / ``sigma_max``, and the maps ``sigma(timestep)`` / ``timestep(sigma)``. Each
scheduler returns a descending float64 tensor that `fastdiff.Sampler(sigmas=...)`, the
`fastdiff.k_diffusion` functions and the drop-ins' ``set_timesteps(sigmas=...)`` accept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fastdiff.reference.schedule import _check_count, _f64, discrete_sigma_to_t
from fastdiff.schedules.model import DiscreteVPSchedule, EDMSchedule, FlowSchedule
from fastdiff.schedules.spacings import beta_ppf, time_shift

__all__ = ["ModelSampling", "simple_scheduler", "ddim_uniform_scheduler", "normal_scheduler",
           "sgm_uniform_scheduler", "beta_scheduler", "linear_quadratic_scheduler",
           "get_sigmas_kl_optimal", "sd_turbo_scheduler"]


class ModelSampling:
    """A model's table of noise levels and its timestep maps, as ComfyUI's schedulers read them.

    Make one with `of` (from a `DiscreteVPSchedule`, `FlowSchedule`, `EDMSchedule`, another
    `ModelSampling` or any object with ComfyUI's ``sigmas`` / ``sigma`` / ``timestep``) or with
    the constructors named after ComfyUI's classes."""

    def __init__(self, sigmas, sigma: Callable, timestep: Callable, kind: str | None = None):
        table = _f64(sigmas).flatten().cpu()
        if table.numel() < 2 or not bool(torch.isfinite(table).all()):
            raise ValueError("sigmas must hold at least 2 finite noise levels")
        self.sigmas, self.kind = table, kind
        self._sigma, self._timestep = sigma, timestep

    sigma_min = property(lambda self: float(self.sigmas[0]), doc="the table's first level")
    sigma_max = property(lambda self: float(self.sigmas[-1]), doc="the table's last level")

    def sigma(self, timestep) -> Tensor:
        return _f64(self._sigma(_f64(timestep)))

    def timestep(self, sigma) -> Tensor:
        return _f64(self._timestep(_f64(sigma)))

    @classmethod
    def discrete(cls, schedule: DiscreteVPSchedule) -> ModelSampling:
        """ComfyUI's ModelSamplingDiscrete: the training sigmas; sigma(t) log-linear between
        entries, timestep(sigma) the nearest entry (k-diffusion's ``DiscreteSchedule``)."""
        log_sigmas = schedule.log_sigmas
        return cls(schedule.sigmas, schedule.sigma,
                   lambda s: discrete_sigma_to_t(s, log_sigmas, quantize=True), "vp")

    @classmethod
    def discrete_flow(cls, shift: float = 1.0, timesteps: int = 1000,
                      multiplier: float = 1000) -> ModelSampling:
        """ComfyUI's ModelSamplingDiscreteFlow (SD3, Wan, ...): s = shift(u) at u = i/N,
        i = 1..N, where ``shift(u) = shift * u / (1 + (shift - 1) u)``; timestep = s * multiplier,
        and sigma(timestep) shifts ``timestep / multiplier`` (so it shifts a second time)."""
        _check_count("timesteps", timesteps)

        def sigma(t):
            return time_shift(t / multiplier, shift=shift)

        return cls(sigma(torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
                         * multiplier), sigma, lambda s: s * multiplier, "flow")

    @classmethod
    def flux(cls, shift: float = 1.15, timesteps: int = 10000) -> ModelSampling:
        """ComfyUI's ModelSamplingFlux: s = e^mu / (e^mu + 1/u - 1) at u = i/N with mu =
        ``shift`` (`spacings.time_shift` with ``mu``), timestep = s."""
        _check_count("timesteps", timesteps)

        def sigma(t):
            return time_shift(t, mu=shift)

        return cls(sigma(torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps),
                   sigma, lambda s: s.clone(), "flow")

    @classmethod
    def continuous_edm(cls, sigma_min: float = 0.002, sigma_max: float = 120.0) -> ModelSampling:
        """ComfyUI's ModelSamplingContinuousEDM: 1000 levels uniform in log sigma; timestep =
        log(sigma) / 4."""
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        table = torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000,
                               dtype=torch.float64).exp()
        return cls(table, lambda t: (t / 0.25).exp(), lambda s: 0.25 * s.log(), "edm")

    @classmethod
    def of(cls, model_sampling) -> ModelSampling:
        """A `ModelSampling` for a fastdiff schedule (`DiscreteVPSchedule`: `discrete`;
        `FlowSchedule`: `discrete_flow` with its shift and N; `EDMSchedule`: `continuous_edm`
        with its range) or for an object with ComfyUI's interface (e.g. ComfyUI's own)."""
        if isinstance(model_sampling, ModelSampling):
            return model_sampling
        if isinstance(model_sampling, DiscreteVPSchedule):
            return cls.discrete(model_sampling)
        if isinstance(model_sampling, FlowSchedule):
            n = model_sampling.num_train_timesteps
            return cls.discrete_flow(model_sampling.shift, n, n)
        if isinstance(model_sampling, EDMSchedule):
            return cls.continuous_edm(model_sampling.sigma_min, model_sampling.sigma_max)
        if all(hasattr(model_sampling, a) for a in ("sigmas", "sigma", "timestep")):
            ms = model_sampling
            return cls(ms.sigmas, lambda t: ms.sigma(t), lambda s: ms.timestep(s),
                       getattr(ms, "kind", None))
        raise TypeError("model_sampling must be a ModelSampling, a DiscreteVPSchedule, a"
                        " FlowSchedule, an EDMSchedule or an object with sigmas, sigma() and"
                        f" timestep(), got {type(model_sampling).__name__}")

    def __repr__(self) -> str:
        return (f"ModelSampling(kind={self.kind!r}, {self.sigmas.numel()} levels, "
                f"sigma_min={self.sigma_min:.6g}, sigma_max={self.sigma_max:.6g})")


def _steps(steps) -> int:
    _check_count("steps", steps)
    return steps


def _with_zero(values) -> Tensor:
    return torch.cat([_f64(values).flatten().cpu(), torch.zeros(1, dtype=torch.float64)])


def simple_scheduler(model_sampling, steps: int) -> Tensor:
    """Every ``len(sigmas) / steps``-th table entry from the top, then 0 (ComfyUI's "simple")."""
    table, n = ModelSampling.of(model_sampling).sigmas, _steps(steps)
    stride = table.numel() / n
    return _with_zero([float(table[-(1 + int(x * stride))]) for x in range(n)])


def ddim_uniform_scheduler(model_sampling, steps: int) -> Tensor:
    """Entries 1, 1 + k, 1 + 2k, ... (k = len // steps) reversed, after a 0 (ComfyUI's
    "ddim_uniform": DDIM's uniform timesteps, Song et al. 2021, with its offset of 1). A table
    whose entry 1 is already 0 gets one more step and no appended 0."""
    table, n = ModelSampling.of(model_sampling).sigmas, _steps(steps)
    if math.isclose(float(table[1]), 0, abs_tol=1e-5):
        n, head = n + 1, []
    else:
        head = [0.0]
    stride = max(table.numel() // n, 1)
    picked = [float(table[x]) for x in range(1, table.numel(), stride)]
    return torch.tensor((head + picked)[::-1], dtype=torch.float64)


def normal_scheduler(model_sampling, steps: int, sgm: bool = False) -> Tensor:
    """Uniform in the model's timestep from timestep(sigma_max) to timestep(sigma_min), then 0
    (ComfyUI's "normal"; with ``sgm``, "sgm_uniform": steps + 1 points without the last, as
    Stability's sgm). Where sigma(end) is already 0 the grid takes one more point instead of 0."""
    ms, n = ModelSampling.of(model_sampling), _steps(steps)
    start = float(ms.timestep(torch.tensor(ms.sigma_max, dtype=torch.float64)))
    end = float(ms.timestep(torch.tensor(ms.sigma_min, dtype=torch.float64)))
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, n + 1, dtype=torch.float64)[:-1]
    else:
        if math.isclose(float(ms.sigma(torch.tensor(end))), 0, abs_tol=1e-5):
            n, append_zero = n + 1, False
        timesteps = torch.linspace(start, end, n, dtype=torch.float64)
    sigmas = ms.sigma(timesteps)
    return _with_zero(sigmas) if append_zero else sigmas


def sgm_uniform_scheduler(model_sampling, steps: int) -> Tensor:
    """ComfyUI's "sgm_uniform": `normal_scheduler` with ``sgm=True``."""
    return normal_scheduler(model_sampling, steps, sgm=True)


def beta_scheduler(model_sampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Beta-distributed *timesteps* (Lee et al. 2024, arXiv:2407.12173, as ComfyUI's "beta"):
    ``t_i = rint(ppf(1 - i/steps; alpha, beta) * (N - 1))``, i = 0..steps-1, the table read at
    each, repeated timesteps dropped, then 0. (`spacings.get_sigmas_beta` is diffusers' and
    k-diffusion-style beta, which places the quantiles in sigma instead.)"""
    table, n = ModelSampling.of(model_sampling).sigmas, _steps(steps)
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
    total = table.numel() - 1
    qs = 1 - np.linspace(0, 1, n, endpoint=False)
    ts = np.rint(np.array([beta_ppf(float(q), alpha, beta) for q in qs]) * total)
    picked, last = [], None
    for t in ts:
        if t != last:
            picked.append(float(table[int(t)]))
        last = t
    return _with_zero(picked)


def linear_quadratic_scheduler(model_sampling, steps: int, threshold_noise: float = 0.025,
                               linear_steps: int | None = None) -> Tensor:
    """Mochi's schedule (Genmo 2024; ComfyUI's "linear_quadratic"), in flow time scaled by
    sigma_max: 1 - s goes linearly from 0 to ``threshold_noise`` over ``linear_steps`` (default
    steps // 2) steps, then along the quadratic that continues it with matching slope to 1."""
    ms, n = ModelSampling.of(model_sampling), _steps(steps)
    if n == 1:
        schedule = [1.0, 0.0]
    else:
        lin = n // 2 if linear_steps is None else int(linear_steps)
        if not 0 < lin < n:
            raise ValueError(f"linear_steps must be in [1, steps - 1], got {linear_steps!r}")
        ramp = [i * threshold_noise / lin for i in range(lin)]
        step_diff = lin - threshold_noise * n
        quad = n - lin
        a = step_diff / (lin * quad**2)
        b = threshold_noise / lin - 2 * step_diff / quad**2
        c = a * lin**2
        schedule = [1.0 - x for x in ramp + [a * i**2 + b * i + c for i in range(lin, n)] + [1.0]]
    return torch.tensor(schedule, dtype=torch.float64) * ms.sigma_max


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """The KL-optimal schedule (AUTOMATIC1111 PR 15608; Align Your Steps, Sabour et al. 2024,
    arXiv:2404.14507, Thm. 3.1 for the Euler solver): uniform in ``arctan(sigma)``,
    ``sigma_i = tan((1 - i/(n-1)) atan(sigma_max) + i/(n-1) atan(sigma_min))``, then 0."""
    _check_count("n", n)
    if not 0 <= sigma_min <= sigma_max < math.inf:
        raise ValueError(f"need 0 <= sigma_min <= sigma_max < inf, got {sigma_min}, {sigma_max}")
    w = torch.arange(n, dtype=torch.float64) / (n - 1) if n > 1 else torch.zeros(1,
                                                                               dtype=torch.float64)
    return _with_zero((w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)).tan())


def sd_turbo_scheduler(model_sampling, steps: int = 1, denoise: float = 1.0) -> Tensor:
    """SD-Turbo's timesteps (Sauer et al. 2023, arXiv:2311.17042; ComfyUI's SDTurboScheduler):
    ``steps`` of 999, 899, ..., 99, starting ``10 - int(10 denoise)`` in, read through
    sigma(timestep), then 0."""
    ms = ModelSampling.of(model_sampling)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 10:
        raise ValueError(f"steps must be an int in [1, 10], got {steps!r}")
    if not (isinstance(denoise, int | float) and 0 <= denoise <= 1):
        raise ValueError(f"denoise must be a number in [0, 1], got {denoise!r}")
    start = 10 - int(10 * denoise)
    timesteps = (torch.arange(10, 0, -1, dtype=torch.float64) * 100 - 1)[start:start + steps]
    return _with_zero(ms.sigma(timesteps))
