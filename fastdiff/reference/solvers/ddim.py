"""DDIM, DDPM (ancestral) and LCM multistep sampling, written in the k-diffusion convention.

The papers work in VP coordinates: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Here the state
is the VE (k-diffusion) sample x = x0 + sigma * eps and the model is a denoiser D(x, sigma) ~ x0.
The two are the same process up to scale:

    x_vp = sqrt(abar) * x,    abar = 1 / (1 + sigma^2),    1 - abar = sigma^2 / (1 + sigma^2),

so each step below converts to VP, applies the paper's update verbatim, and converts back. The
coefficients are host float64 numbers computed from the validated sigma list (no device syncs in
the loop), and `1 - abar` is formed as sigma^2 / (1 + sigma^2), never by subtraction, so nothing
cancels near sigma = 0.

Any consecutive pair of sigmas is a valid "t -> t-1" step: alpha_t := abar_t / abar_{t-1}, as in
diffusers when it skips timesteps.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from ._utils import (
    SolverInfo,
    check_model_kind,
    default_noise_sampler,
    validate_sigmas,
    validate_x,
)

__all__ = ["sample_ddim", "sample_ddpm", "sample_lcm", "alpha_bar", "ddim_coefficients",
           "ddpm_coefficients"]

_DDIM = "Song et al. 2021, DDIM (arXiv:2010.02502)"
_DDPM = "Ho et al. 2020, DDPM (arXiv:2006.11239)"
_LCM = "Luo et al. 2023, LCM (arXiv:2310.04378)"


def alpha_bar(sigma: float) -> tuple[float, float]:
    """(abar, 1 - abar) of a VE noise level: abar = 1 / (1 + sigma^2) (no cancellation)."""
    return 1.0 / (1.0 + sigma * sigma), sigma * sigma / (1.0 + sigma * sigma)


def ddim_coefficients(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Song et al. 2021 eq. (12) with sigma_t(eta) of eq. (16), divided by sqrt(abar_{t-1}).

    VP form:  x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma_t^2) eps + sigma_t z,
              sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}).
    Returns (c_eps, c_z) of the VE form  x_next = x0 + c_eps * eps + c_z * z.

    For eta > 1 eq. (12) would need sqrt of a negative number; like k-diffusion's ancestral
    step we cap sigma_t^2 at 1 - abar_{t-1} (the whole variance is then fresh noise).
    """
    ab, one_m_ab = alpha_bar(sigma)
    ab_next, one_m_ab_next = alpha_bar(sigma_next)
    # 1 - abar_t / abar_{t-1}, without cancellation
    one_m_ratio = (sigma * sigma - sigma_next * sigma_next) / (1.0 + sigma * sigma)
    var_t = eta * eta * (one_m_ab_next / one_m_ab) * one_m_ratio  # eq. (16), squared
    var_t = min(var_t, one_m_ab_next)
    c_eps = math.sqrt(max(one_m_ab_next - var_t, 0.0)) / math.sqrt(ab_next)
    c_z = math.sqrt(var_t) / math.sqrt(ab_next)
    return c_eps, c_z


def ddpm_coefficients(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """Ho et al. 2020 eqs. (6)-(7): the posterior q(x_{t-1} | x_t, x0) = N(mu, beta_tilde I),

        mu = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
             + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
        beta_tilde = (1 - abar_{t-1}) / (1 - abar_t) beta_t,   alpha_t = abar_t / abar_{t-1},

    with beta_t = 1 - alpha_t (diffusers' variance_type "fixed_small"). Returns the VP
    coefficients (c_x0, c_xt, std) of x_{t-1} = c_x0 x0 + c_xt x_t + std z.
    """
    ab, one_m_ab = alpha_bar(sigma)
    ab_next, one_m_ab_next = alpha_bar(sigma_next)
    alpha_t = ab / ab_next
    beta_t = (sigma * sigma - sigma_next * sigma_next) / (1.0 + sigma * sigma)  # 1 - alpha_t
    c_x0 = math.sqrt(ab_next) * beta_t / one_m_ab
    c_xt = math.sqrt(alpha_t) * one_m_ab_next / one_m_ab
    std = math.sqrt(one_m_ab_next / one_m_ab * beta_t)
    return c_x0, c_xt, std


def _setup(x, sigmas, extra_args):
    validate_x(x)
    sig = validate_sigmas(sigmas)
    if any(s <= 0 for s in sig[:-1]):
        raise ValueError("sigmas: expected positive values before the last one (only the final "
                         "sigma may be 0)")
    extra_args = {} if extra_args is None else extra_args
    return sig, extra_args, x.new_ones([x.shape[0]])


def _check_nonneg(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name}: expected a non-negative number, got {value}")


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0,
                s_noise=1.0, noise_sampler=None):
    """DDIM sampling, Song et al. 2021 (arXiv:2010.02502) eq. (12) with sigma_t(eta) of eq. (16).

    eta = 0 is the deterministic DDIM sampler, which in VE coordinates is exactly Euler's method
    on dx/dsigma = (x - D) / sigma; eta = 1 is DDPM's ancestral sampler (Ho et al. 2020), whose
    posterior std beta_tilde it reproduces.
    """
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    _check_nonneg("eta", eta)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        eps = (x - denoised) / sig[i]  # eq. (9) solved for eps: x = x0 + sigma eps
        c_eps, c_z = ddim_coefficients(sig[i], sig[i + 1], eta)
        x = denoised + c_eps * eps
        if c_z > 0:  # host float: no device branch; deterministic DDIM draws no noise
            x = x + c_z * s_noise * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                noise_sampler=None):
    """DDPM ancestral sampling, Ho et al. 2020 (arXiv:2006.11239): x_{t-1} drawn from the
    posterior q(x_{t-1} | x_t, x0 = D(x_t)) of eqs. (6)-(7), variance beta_tilde ("fixed_small").

    Consecutive sigmas may be any pair (t -> t-1 with alpha_t = abar_t / abar_{t-1}), so this also
    covers strided DDPM sampling. The step into sigma = 0 returns the denoised sample.
    """
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        c_x0, c_xt, std = ddpm_coefficients(sig[i], sig[i + 1])
        x_vp = math.sqrt(alpha_bar(sig[i])[0]) * x  # VE -> VP
        x_vp = c_x0 * denoised + c_xt * x_vp  # posterior mean, eq. (7)
        if std > 0:  # host float; the posterior at sigma_next = 0 is a point mass
            x_vp = x_vp + std * s_noise * noise_sampler(sigmas[i], sigmas[i + 1])
        x = x_vp / math.sqrt(alpha_bar(sig[i + 1])[0])  # VP -> VE
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None,
               noise_sampler=None, model_kind="ve"):
    """Multistep latent consistency sampling: Luo et al. 2023 (arXiv:2310.04378) Algorithm 1,
    the multistep consistency sampler of Song et al. 2023 (arXiv:2303.01469) Algorithm 1.

    `model` is the consistency function f(x, sigma) ~ x0 (an LCM with its c_skip/c_out boundary
    scalings folded in). Each step maps to x0 and re-noises it to the next level with *fresh*
    noise, x <- f(x, sigma_i) + sigma_{i+1} z (VP: sqrt(abar) f + sqrt(1 - abar) z), so the
    sampler is stochastic and has no ODE order. The last step (sigma_next = 0) returns f(x).
    model_kind="flow" renoises a flow model's x0 as x = s z + (1 - s) x0 (ComfyUI's CONST
    `noise_scaling`).
    """
    check_model_kind(model_kind)
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        x = denoised
        if sig[i + 1] > 0 and model_kind == "flow":
            x = sig[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1]) + (1 - sig[i + 1]) * x
        elif sig[i + 1] > 0:  # host float
            x = x + sig[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


SOLVERS = {
    # eta = 0: deterministic DDIM = Euler on the PF-ODE (order 1 on any spacing).
    "ddim": SolverInfo(fn=sample_ddim, order=1, nfe_per_step=1, stochastic=False,
                       paper=_DDIM + " eq. 12", kwargs={"eta": 0.0}),
    # eta = 1 reproduces DDPM's posterior (tested); order is the ODE order of eta = 0.
    "ddim_eta": SolverInfo(fn=sample_ddim, order=1, nfe_per_step=1, stochastic=True,
                           paper=_DDIM + " eq. 12, 16", kwargs={"eta": 1.0},
                           deterministic_kwargs={"eta": 0.0}),
    # No deterministic mode: "order" is that of its eta = 0 counterpart (DDIM), for bookkeeping.
    "ddpm": SolverInfo(fn=sample_ddpm, order=1, nfe_per_step=1, stochastic=True,
                       paper=_DDPM + " eqs. 6-7"),
    # Consistency sampling has no ODE order; 1 is a placeholder (tests treat it as stochastic).
    "lcm": SolverInfo(fn=sample_lcm, order=1, nfe_per_step=1, stochastic=True,
                      paper=_LCM + " Alg. 1"),
    # flow model (ComfyUI's CONST noise_scaling): x = s z + (1 - s) x0
    "lcm_flow": SolverInfo(fn=sample_lcm, order=1, nfe_per_step=1, stochastic=True,
                           paper=_LCM + " Alg. 1, flow renoising", param="flow",
                           kwargs={"model_kind": "flow"}),
}
