"""Helpers shared by the DPM-Solver++ samplers (`dpmpp_singlestep`, `dpmpp_multistep`): the
k-diffusion time maps lambda <-> sigma, argument checks, the default Brownian noise and the phi
weights. The method and its conventions are described in `dpmpp`'s docstring."""

from __future__ import annotations

import math

import torch

from ._utils import (
    BrownianTreeNoiseSampler,
    denoise_with_uncond,
    half_log_snr,
    validate_sigmas,
    validate_x,
)

_PAPER = "Lu et al. 2022, DPM-Solver++ (arXiv:2211.01095)"


def _sigma_fn(t):
    return t.neg().exp()


def _t_fn(sigma):
    return sigma.log().neg()


def _half_log_snrs(sigmas, model_kind):
    """`half_log_snr` of every value of a 1-D tensor, for the samplers' per-schedule tables.
    Flow's logit one value at a time: torch's logit kernel runs a parallel loop whatever the
    size (~5 ms a call for 10 values on a busy 2-core machine); 0-d calls stay on one thread
    and give the same bits."""
    if model_kind != "flow":
        return half_log_snr(sigmas, model_kind)
    return torch.stack([half_log_snr(s, "flow") for s in sigmas.unbind()])


def _setup(x, sigmas, extra_args):
    """Checked inputs of the exponential-integrator samplers here and in `sde`: host sigmas
    (strictly decreasing, so every lambda step h > 0), extra_args and s_in."""
    validate_x(x)
    sig = validate_sigmas(sigmas)
    _check_decreasing(sig)
    extra_args = {} if extra_args is None else extra_args
    return sig, extra_args, x.new_ones([x.shape[0]])


def _check_decreasing(sig):
    if any(sig[k + 1] >= sig[k] for k in range(len(sig) - 1)):
        raise ValueError("sigmas: expected a strictly decreasing schedule (lambda steps h > 0)")


def _check_eta(eta):
    if eta < 0:
        raise ValueError(f"eta: expected a value >= 0, got {eta}")


def _brownian_sampler(x, sigmas, eta, noise_sampler):
    """k-diffusion's default for the SDE samplers: a Brownian tree over [sigma_min, sigma_max],
    so the noise is one Brownian path whatever the step count. Not built when eta = 0."""
    if noise_sampler is not None or not eta:
        return noise_sampler
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())


def _callback(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _denoise(model, x, sigma, extra_args, cfg_pp):
    """(D, D_u): with CFG++ the unconditional output of the same guided call, else (D, D)."""
    if cfg_pp:
        return denoise_with_uncond(model, x, sigma, **extra_args)
    denoised = model(x, sigma, **extra_args)
    return denoised, denoised


def _phis(h: float) -> tuple[float, float, float]:
    """phi_1 = expm1(-h), phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2 (dpm-solver's notation)."""
    phi_1 = math.expm1(-h)
    phi_2 = phi_1 / h + 1
    return phi_1, phi_2, phi_2 / h - 0.5

