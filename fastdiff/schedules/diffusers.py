"""diffusers compatibility: the timesteps and sigmas diffusers' schedulers compute in
``set_timesteps`` (there in float32; here in float64, so values agree to float32 rounding).
`diffusers_timesteps` is the schedule kernel's specification (fastdiff/reference/schedule.py)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fastdiff.reference.schedule import (
    TIMESTEP_FAMILIES,
    _check_count,
    diffusers_timesteps,
    discrete_sigma_to_t,
)
from fastdiff.schedules.model import alphas_cumprod_to_sigma
from fastdiff.schedules.spacings import (
    _stretch_to_terminal,
    get_sigmas_beta,
    get_sigmas_exponential,
    get_sigmas_karras,
    time_shift,
)

__all__ = ["TIMESTEP_FAMILIES", "diffusers_timesteps", "diffusers_sigmas",
           "diffusers_flow_sigmas"]


def _np_sigma_to_t(sigmas: Tensor, log_sigmas: Tensor) -> Tensor:
    # diffusers' _sigma_to_t clamps sigma at 1e-10 before the log; otherwise k-diffusion's map.
    return discrete_sigma_to_t(sigmas.clamp_min(1e-10), log_sigmas)


def diffusers_sigmas(alphas_cumprod, num_inference_steps: int, *, family: str = "euler",
                     timestep_spacing: str = "linspace", steps_offset: int = 0,
                     sigma_schedule: str | None = None, final_sigmas_type: str = "zero",
                     sigma_min: float | None = None, sigma_max: float | None = None,
                     lambda_min_clipped: float = -math.inf, round_timesteps: bool = True,
                     ) -> tuple[Tensor, Tensor]:
    """``(sigmas, timesteps)`` as diffusers' EulerDiscreteScheduler (``family="euler"``) or
    DPMSolverMultistepScheduler (``family="dpmsolver"``) ``set_timesteps`` computes them.

    ``alphas_cumprod`` is the scheduler's table (pass ``scheduler.alphas_cumprod``, after its
    zero-SNR clamp). Sigmas at the timesteps are interpolated *linearly in sigma* (np.interp) --
    unlike k-diffusion's log-linear ``t_to_sigma``. ``sigma_schedule`` in {None, "karras",
    "exponential", "beta"} (``use_*_sigmas``) replaces them, and the timesteps become
    ``t(sigma)`` by log-sigma interpolation. Where the classes differ:

    - euler: the karras/exponential/beta range is the interpolated sigmas' range (or the config's
      ``sigma_min``/``sigma_max``); timesteps stay fractional.
    - dpmsolver: the range is the whole training table; karras timesteps are rounded
      (``round_timesteps``; diffusers skips it for squaredcos_cap_v2) and all are then cast to
      int64 (truncated); ``lambda_min_clipped`` cuts the top of the table.

    ``final_sigmas_type="sigma_min"`` appends the training table's smallest sigma.

    One deliberate difference: where the exact t(sigma) is an integer (t(sigma_max) = N - 1),
    diffusers' float32 table can land a hair below it and truncate to N - 2; fastdiff keeps N - 1.
    Not covered: DPM-Solver's ``use_lu_lambdas``/``use_flow_sigmas``, Euler's
    ``interpolation_type="log_linear"`` and ``timestep_type="continuous"``.
    """
    if family not in ("euler", "dpmsolver"):
        raise ValueError(f"family must be 'euler' or 'dpmsolver', got {family!r}")
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError("final_sigmas_type must be 'zero' or 'sigma_min', "
                         f"got {final_sigmas_type!r}")
    table = alphas_cumprod_to_sigma(alphas_cumprod)
    if not bool(torch.isfinite(table).all()):
        raise ValueError("alphas_cumprod has a zero: clamp it first (diffusers uses 2**-24)")
    log_sigmas, n = table.log(), num_inference_steps
    last = None
    if family == "dpmsolver":
        # number of trailing table entries whose lambda = -log sigma is below lambda_min_clipped
        lam_ascending = torch.flip(-log_sigmas, [0])
        last = table.numel() - int(torch.searchsorted(lam_ascending, lambda_min_clipped))
    timesteps = diffusers_timesteps(n, table.numel(), timestep_spacing, steps_offset, family, last)
    sigmas = torch.from_numpy(np.interp(timesteps.numpy(), np.arange(table.numel()), table.numpy()))

    if sigma_schedule is not None:
        if family == "euler":
            lo = float(sigmas[-1]) if sigma_min is None else sigma_min
            hi = float(sigmas[0]) if sigma_max is None else sigma_max
        else:
            lo, hi = float(table[0]), float(table[-1])
        if sigma_schedule == "karras":
            sigmas = get_sigmas_karras(n, lo, hi, dtype=torch.float64, final_sigma="none")
        elif sigma_schedule == "exponential":
            sigmas = get_sigmas_exponential(n, lo, hi, dtype=torch.float64, final_sigma="none")
        elif sigma_schedule == "beta":
            sigmas = get_sigmas_beta(n, lo, hi, final_sigma="none")
        else:
            raise ValueError("sigma_schedule must be None, 'karras', 'exponential' or 'beta', "
                             f"got {sigma_schedule!r}")
        timesteps = _np_sigma_to_t(sigmas, log_sigmas)
        if family == "dpmsolver" and sigma_schedule == "karras" and round_timesteps:
            timesteps = timesteps.round()
    if family == "dpmsolver":
        timesteps = timesteps.trunc()  # diffusers' .to(torch.int64)
    last_sigma = table[:1] if final_sigmas_type == "sigma_min" else table.new_zeros(1)
    return torch.cat([sigmas, last_sigma]), timesteps


def diffusers_flow_sigmas(num_inference_steps: int, num_train_timesteps: int = 1000, *,
                          shift: float = 1.0, use_dynamic_shifting: bool = False,
                          mu: float | None = None, time_shift_type: str = "exponential",
                          shift_terminal: float | None = None,
                          sigma_schedule: str | None = None) -> tuple[Tensor, Tensor]:
    """``(sigmas, timesteps)`` (``sigmas`` are flow s, with a final 0) as diffusers'
    FlowMatchEulerDiscreteScheduler ``set_timesteps(n, mu=mu)`` computes them.

    The scheduler's training grid ``s = (1..N)/N`` is shifted once at construction (static
    shift only), which fixes its ``sigma_min``/``sigma_max``; set_timesteps then spaces n values
    uniformly between those and shifts *again* -- the endpoint really is shifted twice.
    """
    n, big_n = num_inference_steps, num_train_timesteps
    _check_count("num_inference_steps", n)
    if use_dynamic_shifting and mu is None:
        raise ValueError("use_dynamic_shifting=True needs mu (see calculate_shift)")
    train = torch.arange(big_n, 0, -1, dtype=torch.float64) / big_n
    if not use_dynamic_shifting:
        train = time_shift(train, shift=shift)
    s_max, s_min = float(train[0]), float(train[-1])
    s = torch.linspace(s_max * big_n, s_min * big_n, n, dtype=torch.float64) / big_n
    if use_dynamic_shifting:
        s = time_shift(s, mu=mu, time_shift_type=time_shift_type)
    else:
        s = time_shift(s, shift=shift)
    if shift_terminal:
        s = _stretch_to_terminal(s, shift_terminal)
    if sigma_schedule is not None:
        lo, hi = float(s[-1]), float(s[0])
        fns = {"karras": get_sigmas_karras, "exponential": get_sigmas_exponential}
        if sigma_schedule == "beta":
            s = get_sigmas_beta(n, lo, hi, final_sigma="none")
        elif sigma_schedule in fns:
            s = fns[sigma_schedule](n, lo, hi, dtype=torch.float64, final_sigma="none")
        else:
            raise ValueError("sigma_schedule must be None, 'karras', 'exponential' or 'beta', "
                             f"got {sigma_schedule!r}")
    return torch.cat([s, s.new_zeros(1)]), s * big_n
