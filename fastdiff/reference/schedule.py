"""Reference of the schedule tables: the specification every backend of
`fastdiff.ops.schedule_tables` must match, built from fastdiff.schedules and fastdiff.spacings
(which tests/test_schedules.py checks against diffusers and k-diffusion). Host float64.

For a discrete VP schedule (its ``alphas_cumprod``) and ``n`` steps:

1. timesteps: diffusers' ``set_timesteps`` spacing (`spacings.diffusers_timesteps`) of the
   ``family`` -- "euler" (fractional float32 'linspace'), "ddim" (rounded) or "dpmsolver" (n + 1
   points, the last dropped) -- keeping exactly n values ('trailing' can get an (n+1)-th from
   numpy's arange, e.g. T = 1000, n = 61; diffusers then runs an extra step near t = -1);
2. sigmas at them by np.interp (linear in sigma, as diffusers) on the training sigmas, where
   ``abar = 0`` (zero terminal SNR) reads as 2**-24 (`DiscreteVPSchedule.sigmas`);
3. a ``grid`` other than "discrete" replaces them by karras / exponential / polyexponential
   sigmas (`spacings.get_sigmas_*`) between the range of step 2 (dpmsolver: the whole training
   range), with both ends pinned to the range's ends (the formulas give them up to pow/exp
   rounding; pinned, t(sigma_max) = T - 1 exactly, even where a zero-SNR table is not monotone
   at its end), and the timesteps become ``t(sigma)`` (`schedules.discrete_sigma_to_t`);
   dpmsolver rounds karras timesteps (``round_karras``; diffusers skips it for
   squaredcos_cap_v2) and truncates all timesteps to integers, as diffusers' ``.to(int64)``;
4. the final sigma: 0 or the training table's smallest sigma, at ``t(final sigma)`` = 0;
5. ``alpha_t = 1 / sqrt(1 + sigma^2)``, ``sigma_t = alpha_t * sigma``, ``lambda = -log sigma``
   (`schedules.sigma_to_alpha`, `sigma_to_lambda`; lambda = +inf at sigma = 0).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastdiff import schedules as S
from fastdiff import spacings as P

ROWS = ("timesteps", "sigmas", "alpha_t", "sigma_t", "lam")
_GRIDS = {"karras": P.get_sigmas_karras, "exponential": P.get_sigmas_exponential,
          "polyexponential": P.get_sigmas_polyexponential}


def tables_from_schedule(schedule: S.DiscreteVPSchedule, num_inference_steps: int, *,
                         spacing: str = "linspace", steps_offset: int = 0, family: str = "euler",
                         grid: str = "discrete", rho: float = 7.0, final_sigma: str = "zero",
                         round_karras: bool = True) -> tuple[Tensor, Tensor]:
    """``(table [5, n + 1], train [2, T])`` float64 on the CPU for any `DiscreteVPSchedule`:
    table rows `ROWS`, train rows (alphas_cumprod, training sigmas)."""
    n, table, log_sigmas = num_inference_steps, schedule.sigmas, schedule.log_sigmas
    big_n = table.numel()
    timesteps = P.diffusers_timesteps(n, big_n, spacing, steps_offset, family)[:n]
    sigmas = torch.from_numpy(np.interp(timesteps.numpy(), np.arange(big_n), table.numpy()))
    if grid != "discrete":
        if family == "dpmsolver":
            lo, hi = float(table[0]), float(table[-1])
        else:
            lo, hi = float(sigmas[-1]), float(sigmas[0])
        kw = {} if grid == "exponential" else {"rho": rho}
        sigmas = _GRIDS[grid](n, lo, hi, dtype=torch.float64, final_sigma="none", **kw)
        sigmas[-1], sigmas[0] = lo, hi
        timesteps = S.discrete_sigma_to_t(sigmas, log_sigmas)
        if family == "dpmsolver" and grid == "karras" and round_karras:
            timesteps = timesteps.round()
    final = table[:1] if final_sigma == "sigma_min" else table.new_zeros(1)
    sigmas = torch.cat([sigmas, final])
    timesteps = torch.cat([timesteps, S.discrete_sigma_to_t(final, log_sigmas)])
    if family == "dpmsolver":
        timesteps = timesteps.trunc()
    alpha = S.sigma_to_alpha(sigmas)
    rows = [timesteps, sigmas, alpha, alpha * sigmas, S.sigma_to_lambda(sigmas)]
    return torch.stack(rows), torch.stack([schedule.alphas_cumprod, table])


def schedule_tables(num_inference_steps: int, *, beta_schedule: str = "linear",
                    num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                    beta_end: float = 0.02, rescale_betas_zero_snr: bool = False,
                    **kwargs) -> tuple[Tensor, Tensor]:
    """The tables of `DiscreteVPSchedule.from_betas(...)` (`tables_from_schedule`; diffusers'
    config names). dpmsolver's karras rounding follows diffusers: off for squaredcos_cap_v2."""
    schedule = S.DiscreteVPSchedule.from_betas(beta_schedule, num_train_timesteps, beta_start,
                                               beta_end,
                                               rescale_betas_zero_snr=rescale_betas_zero_snr)
    kwargs.setdefault("round_karras", beta_schedule != "squaredcos_cap_v2")
    return tables_from_schedule(schedule, num_inference_steps, **kwargs)
