"""ComfyUI's sigma schedules: ``SCHEDULER_NAMES`` and ``calculate_sigmas`` (comfy/samplers.py)
and the scheduler nodes (comfy_extras: BasicScheduler, Karras/Exponential/Polyexponential/
Laplace/VP/SDTurbo/BetaSampling schedulers, AlignYourSteps, GITS, OptimalSteps), with ComfyUI's
names, option names and defaults, on fastdiff.schedules' float64 functions.

``model_sampling`` is a `fastdiff.schedules.ModelSampling` or anything `ModelSampling.of`
takes: a `DiscreteVPSchedule` (ComfyUI's ModelSamplingDiscrete: SD1.5 is
``DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)``), a `FlowSchedule`
with its ``shift`` (ModelSamplingDiscreteFlow), an `EDMSchedule`, ``ModelSampling.flux(...)``,
or ComfyUI's own object. ComfyUI returns float32; these return float64 (the same numbers to
float32 rounding: ComfyUI also stores its model tables in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff.schedules import spacings as _spacings
from fastdiff.schedules.model_sampling import (
    ModelSampling,
    beta_scheduler,
    ddim_uniform_scheduler,
    get_sigmas_kl_optimal,
    linear_quadratic_scheduler,
    normal_scheduler,
    sd_turbo_scheduler,
    sgm_uniform_scheduler,
    simple_scheduler,
)
from fastdiff.schedules.published import (
    get_sigmas_ays,
    get_sigmas_gits,
    get_sigmas_optimal_steps,
)

__all__ = ["SCHEDULER_NAMES", "SCHEDULER_HANDLERS", "calculate_sigmas", "basic_scheduler",
           "karras_scheduler", "exponential_scheduler", "polyexponential_scheduler",
           "laplace_scheduler", "vp_scheduler", "sd_turbo_scheduler", "beta_sampling_scheduler",
           "align_your_steps_scheduler", "gits_scheduler", "optimal_steps_scheduler",
           "kl_optimal_scheduler", "ModelSampling", "simple_scheduler", "ddim_uniform_scheduler",
           "normal_scheduler", "sgm_uniform_scheduler", "beta_scheduler",
           "linear_quadratic_scheduler"]

# ComfyUI's node defaults for the range schedulers (SD1.5's table ends, float32)
_SIGMA_MAX, _SIGMA_MIN = 14.614642, 0.0291675


def _kd(fn):
    """A k-diffusion range schedule called as ComfyUI's handlers call it, float64 out."""
    def handler(n, sigma_min, sigma_max):
        return fn(n, sigma_min, sigma_max, dtype=torch.float64)
    return handler


def kl_optimal_scheduler(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """ComfyUI's ``kl_optimal_scheduler`` (`fastdiff.schedules.get_sigmas_kl_optimal`)."""
    return get_sigmas_kl_optimal(n, sigma_min, sigma_max)


# name -> (handler, whether it takes the model sampling (else n, sigma_min, sigma_max)), in
# ComfyUI's order
SCHEDULER_HANDLERS = {
    "simple": (simple_scheduler, True),
    "sgm_uniform": (sgm_uniform_scheduler, True),
    "karras": (_kd(_spacings.get_sigmas_karras), False),
    "exponential": (_kd(_spacings.get_sigmas_exponential), False),
    "ddim_uniform": (ddim_uniform_scheduler, True),
    "beta": (beta_scheduler, True),
    "normal": (normal_scheduler, True),
    "linear_quadratic": (linear_quadratic_scheduler, True),
    "kl_optimal": (kl_optimal_scheduler, False),
}
SCHEDULER_NAMES = list(SCHEDULER_HANDLERS)


def calculate_sigmas(model_sampling, scheduler_name: str, steps: int) -> Tensor:
    """ComfyUI's ``calculate_sigmas``: the ``scheduler_name`` schedule (one of
    `SCHEDULER_NAMES`) for ``steps`` steps of the model whose noise levels ``model_sampling``
    describes (see the module docstring); float64, descending, ending at 0."""
    if scheduler_name not in SCHEDULER_HANDLERS:
        raise ValueError(f"scheduler_name must be one of {SCHEDULER_NAMES}, "
                         f"got {scheduler_name!r}")
    handler, use_ms = SCHEDULER_HANDLERS[scheduler_name]
    ms = ModelSampling.of(model_sampling)
    if use_ms:
        return handler(ms, steps)
    return handler(n=steps, sigma_min=ms.sigma_min, sigma_max=ms.sigma_max)


def basic_scheduler(model_sampling, scheduler: str, steps: int, denoise: float = 1.0) -> Tensor:
    """ComfyUI's BasicScheduler node: ``calculate_sigmas`` for ``int(steps / denoise)`` steps,
    the last ``steps + 1`` of them (empty for ``denoise`` 0)."""
    if not (isinstance(denoise, int | float) and 0 <= denoise <= 1):
        raise ValueError(f"denoise must be a number in [0, 1], got {denoise!r}")
    if denoise <= 0:
        return torch.zeros(0, dtype=torch.float64)
    total = steps if denoise >= 1 else int(steps / denoise)
    return calculate_sigmas(model_sampling, scheduler, total)[-(steps + 1):]


def karras_scheduler(steps: int = 20, sigma_max: float = _SIGMA_MAX,
                     sigma_min: float = _SIGMA_MIN, rho: float = 7.0) -> Tensor:
    """ComfyUI's KarrasScheduler node (Karras et al. 2022, eq. 5)."""
    return _spacings.get_sigmas_karras(steps, sigma_min, sigma_max, rho, dtype=torch.float64)


def exponential_scheduler(steps: int = 20, sigma_max: float = _SIGMA_MAX,
                          sigma_min: float = _SIGMA_MIN) -> Tensor:
    """ComfyUI's ExponentialScheduler node (uniform in log sigma)."""
    return _spacings.get_sigmas_exponential(steps, sigma_min, sigma_max, dtype=torch.float64)


def polyexponential_scheduler(steps: int = 20, sigma_max: float = _SIGMA_MAX,
                              sigma_min: float = _SIGMA_MIN, rho: float = 1.0) -> Tensor:
    """ComfyUI's PolyexponentialScheduler node."""
    return _spacings.get_sigmas_polyexponential(steps, sigma_min, sigma_max, rho,
                                                dtype=torch.float64)


def laplace_scheduler(steps: int = 20, sigma_max: float = _SIGMA_MAX,
                      sigma_min: float = _SIGMA_MIN, mu: float = 0.0,
                      beta: float = 0.5) -> Tensor:
    """ComfyUI's LaplaceScheduler node (Hang et al. 2024): ``steps`` levels and, as ComfyUI,
    no final 0 (the run ends at sigma_min)."""
    return _spacings.get_sigmas_laplace(steps, sigma_min, sigma_max, mu, beta,
                                        final_sigma="none")


def vp_scheduler(steps: int = 20, beta_d: float = 19.9, beta_min: float = 0.1,
                 eps_s: float = 0.001) -> Tensor:
    """ComfyUI's VPScheduler node (the continuous VP SDE, Song et al. 2021)."""
    return _spacings.get_sigmas_vp(steps, beta_d, beta_min, eps_s, dtype=torch.float64)


def beta_sampling_scheduler(model_sampling, steps: int = 20, alpha: float = 0.6,
                            beta: float = 0.6) -> Tensor:
    """ComfyUI's BetaSamplingScheduler node: `beta_scheduler` with its alpha and beta."""
    return beta_scheduler(model_sampling, steps, alpha=alpha, beta=beta)


def align_your_steps_scheduler(model_type: str = "SD1", steps: int = 10,
                               denoise: float = 1.0) -> Tensor:
    """ComfyUI's AlignYourStepsScheduler node (`fastdiff.schedules.get_sigmas_ays`)."""
    return get_sigmas_ays(model_type, steps, denoise)


def gits_scheduler(coeff: float = 1.20, steps: int = 10, denoise: float = 1.0) -> Tensor:
    """ComfyUI's GITSScheduler node (`fastdiff.schedules.get_sigmas_gits`)."""
    return get_sigmas_gits(coeff, steps, denoise)


def optimal_steps_scheduler(model_type: str = "FLUX", steps: int = 20,
                            denoise: float = 1.0) -> Tensor:
    """ComfyUI's OptimalStepsScheduler node (`fastdiff.schedules.get_sigmas_optimal_steps`)."""
    return get_sigmas_optimal_steps(model_type, steps, denoise)
