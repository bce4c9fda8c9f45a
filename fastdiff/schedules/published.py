"""Published schedules: tables found by search or optimisation for a given model, and their
log-linear interpolation to any step count (as the authors and ComfyUI do). Float64.

- Align Your Steps (Sabour, Fidler & Kreis 2024, arXiv:2404.14507; the tables of
  research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html): 10-step schedules for
  Stable Diffusion 1.5 and SDXL (the SD1.5 sigma table at the published timesteps
  [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0] and [999, 845, 730, 587, 443, 310, 193,
  116, 53, 13, 0]) and Stable Video Diffusion (EDM sigmas);
- GITS (Chen et al. 2024, arXiv:2405.11326): `fastdiff.schedules.gits`;
- OptimalSteps (Pei et al. 2025, "Optimal Stepsize for Diffusion Sampling", arXiv:2503.21774;
  github.com/bebebe666/OptimalSteps): flow-time schedules for FLUX, Wan and Chroma.

Each function returns ``steps + 1`` values (fewer with ``denoise < 1``: the last
``round(steps * denoise) + 1``), the last one 0, in the model's sampling units (VE sigma for
SD1.5 / SDXL / SVD, flow time s for FLUX / Wan / Chroma).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastdiff.reference.schedule import _check_count
from fastdiff.schedules import gits

__all__ = ["AYS_MODELS", "OPTIMAL_STEPS_MODELS", "GITS_COEFFS", "loglinear_interp",
           "get_sigmas_ays", "get_sigmas_gits", "get_sigmas_optimal_steps"]

_AYS = {
    "SD1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "SDXL": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945,
             0.8620721141, 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177,
             0.0291671582),
    "SVD": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}
_OPTIMAL_STEPS = {
    "FLUX": (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001),
    "Wan": (1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96,
            0.946, 0.927, 0.902, 0.864, 0.776, 0.539, 0.208, 0.001),
    "Chroma": (0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943, 0.931,
               0.917, 0.9, 0.881, 0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599, 0.55,
               0.501, 0.451, 0.402, 0.355, 0.311, 0.27, 0.232, 0.199, 0.169, 0.143, 0.12, 0.101,
               0.084, 0.07, 0.058, 0.048, 0.001),
}
AYS_MODELS = tuple(_AYS)
OPTIMAL_STEPS_MODELS = tuple(_OPTIMAL_STEPS)
GITS_COEFFS = tuple(gits.PATHS)


def loglinear_interp(t_steps, num_steps: int) -> Tensor:
    """Resample a decreasing table to ``num_steps`` values: log(sigma) linear in the position
    ``linspace(0, 1, .)`` between the table's points (the AYS how-to's ``loglinear_interp``)."""
    ys = np.log(np.asarray(t_steps, dtype=np.float64)[::-1])
    xs, new_xs = np.linspace(0, 1, len(ys)), np.linspace(0, 1, num_steps)
    return torch.from_numpy(np.exp(np.interp(new_xs, xs, ys))[::-1].copy())


def _finish(table, steps: int, denoise: float, interpolate: bool) -> Tensor:
    """``steps + 1`` values (interpolated if the table has another length), the tail for
    ``denoise``, the last set to 0."""
    if not (isinstance(denoise, int | float) and 0 <= denoise <= 1):
        raise ValueError(f"denoise must be a number in [0, 1], got {denoise!r}")
    if denoise <= 0:
        return torch.zeros(0, dtype=torch.float64)
    total = steps if denoise >= 1 else round(steps * denoise)
    sigmas = torch.tensor(table, dtype=torch.float64)
    if interpolate and sigmas.numel() != steps + 1:
        sigmas = loglinear_interp(sigmas, steps + 1)
    sigmas = sigmas[-(total + 1):].clone()
    sigmas[-1] = 0
    return sigmas


def _pick(name: str, value, options: dict):
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return options[value]


def get_sigmas_ays(model_type: str = "SD1", steps: int = 10, denoise: float = 1.0) -> Tensor:
    """Align Your Steps for ``model_type`` "SD1", "SDXL" or "SVD" (ComfyUI's
    AlignYourStepsScheduler): the published 10-step table, log-linearly interpolated to other
    step counts."""
    table = _pick("model_type", model_type, _AYS)
    _check_count("steps", steps)
    return _finish(table, steps, denoise, interpolate=True)


def get_sigmas_optimal_steps(model_type: str = "FLUX", steps: int = 20,
                             denoise: float = 1.0) -> Tensor:
    """OptimalSteps for ``model_type`` "FLUX" (10 steps), "Wan" (20) or "Chroma" (40), flow
    times s (ComfyUI's OptimalStepsScheduler), log-linearly interpolated to other step counts."""
    table = _pick("model_type", model_type, _OPTIMAL_STEPS)
    _check_count("steps", steps)
    if steps < 3:
        raise ValueError(f"steps must be >= 3 for OptimalSteps, got {steps}")
    return _finish(table, steps, denoise, interpolate=True)


def get_sigmas_gits(coeff: float = 1.20, steps: int = 10, denoise: float = 1.0) -> Tensor:
    """GITS for SD1.5 with coefficient ``coeff`` in 0.80, 0.85, ..., 1.50 (ComfyUI's
    GITSScheduler): the published schedule for 2..20 steps; above 20, the 20-step one
    log-linearly interpolated."""
    if not isinstance(coeff, int | float) or round(coeff, 2) not in gits.PATHS:
        raise ValueError(f"coeff must be one of {GITS_COEFFS}, got {coeff!r}")
    _check_count("steps", steps)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 for GITS, got {steps}")
    paths = gits.PATHS[round(coeff, 2)]
    inner = [int(i) for i in paths[min(steps, len(paths) + 1) - 2].split()]
    table = [gits.GRID[i] for i in (100, *inner, 0)]
    return _finish(table, steps, denoise, interpolate=steps > len(paths) + 1)
