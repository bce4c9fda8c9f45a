"""Rectified flow / flow matching samplers: Euler and Heun on the flow ODE.

Convention of Esser et al. 2024 (SD3, arXiv:2403.03206) and diffusers; rectified flow (Liu et
al. 2022, arXiv:2209.03003) and flow matching (Lipman et al. 2022, arXiv:2210.02747) with time
running the other way: the noisy sample at flow time s in [0, 1] is

    x_s = (1 - s) x0 + s eps,        s = 1: pure noise,  s = 0: data,

and the model is a *flow denoiser* model(x, s) ~ E[x0 | x_s = x]. The probability-flow ODE is
dx/ds = v = E[eps - x0 | x_s]; from x = (1 - s) x0 + s eps, eps - x0 = (x - x0) / s, so

    v(x, s) = (x - D(x, s)) / s,

the same form as the Karras ODE. diffusers' FlowMatchEulerDiscreteScheduler uses the network's
velocity directly, prev = x + (s_next - s) * v: the same numbers when D = x - s v.

`sigmas` here are flow times s (decreasing from <= 1 to >= 0), registry param "flow". The VE
noise level of flow time s is sigma = s / (1 - s) (x_s / (1 - s) = x0 + sigma eps).
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from ._utils import SolverInfo, validate_sigmas, validate_x

__all__ = ["sample_flow_euler", "sample_flow_heun", "flow_velocity"]

_FLOW = ("Liu et al. 2022, rectified flow (arXiv:2209.03003); Esser et al. 2024, SD3 "
         "(arXiv:2403.03206)")


def flow_velocity(x, s: float, denoised):
    """v = dx/ds = (x - D(x, s)) / s for x_s = (1 - s) x0 + s eps (s > 0)."""
    return (x - denoised) / s


def _setup(x, sigmas, extra_args):
    validate_x(x)
    sig = validate_sigmas(sigmas)
    if sig[0] > 1:
        raise ValueError(f"sigmas: flow times must lie in [0, 1], got first value {sig[0]}")
    if any(s <= 0 for s in sig[:-1]):
        raise ValueError("sigmas: expected positive flow times before the last one (only the "
                         "final time may be 0)")
    extra_args = {} if extra_args is None else extra_args
    return sig, extra_args, x.new_ones([x.shape[0]])


@torch.no_grad()
def sample_flow_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler's method on the rectified-flow ODE dx/ds = v (Liu et al. 2022 Alg. 1 sampling;
    the update of diffusers' FlowMatchEulerDiscreteScheduler). Order 1."""
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        x = x + (sig[i + 1] - sig[i]) * flow_velocity(x, sig[i], denoised)
    return x


@torch.no_grad()
def sample_flow_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun's 2nd-order method (explicit trapezoid) on the rectified-flow ODE dx/ds = v, as
    Karras et al. 2022 (arXiv:2206.00364) Algorithm 1 does for the VE ODE. The velocity at s = 0
    is 0/0 in the denoiser form, so a step ending at s = 0 is an Euler step (it lands on D).
    Order 2; 2 NFE per step (1 for a final step to 0)."""
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        dt = sig[i + 1] - sig[i]
        v = flow_velocity(x, sig[i], denoised)
        x_pred = x + dt * v
        if sig[i + 1] == 0:  # host float: Euler into s = 0
            x = x_pred
            continue
        denoised_2 = model(x_pred, sigmas[i + 1] * s_in, **extra_args)
        v_2 = flow_velocity(x_pred, sig[i + 1], denoised_2)
        x = x + dt * (v + v_2) / 2
    return x


SOLVERS = {
    "flow_euler": SolverInfo(fn=sample_flow_euler, order=1, nfe_per_step=1, stochastic=False,
                             paper=_FLOW, param="flow"),
    "flow_heun": SolverInfo(fn=sample_flow_heun, order=2, nfe_per_step=2, stochastic=False,
                            paper=_FLOW + "; Karras et al. 2022 Alg. 1", param="flow"),
}
