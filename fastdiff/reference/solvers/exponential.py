"""Exponential integrators in data prediction: RES multistep and exponential Heun / SEEDS-2.

Between half log-SNRs lambda_s and lambda_t = lambda_s + h the probability-flow ODE in data
prediction has the exact solution (variation of constants, Lu et al. 2022, arXiv:2211.01095)

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda D(lambda) dlambda,

with lambda = log(alpha / sigma): -log(sigma) for VE (alpha = 1) and log((1 - s) / s) for a flow
model (alpha = 1 - s; `model_kind="flow"`, ComfyUI's CONST model sampling). Expanding D to first
order in lambda through two nodes and integrating exactly gives the two phi-weights

    h phi_1(-h) = (1 - e^-h),   h phi_2(-h) = (e^-h - 1 + h) / h,

and a second-order method whatever the second node is:
- `sample_res_multistep`: the second node is the previous step's D (RES, Zhang et al. 2023,
  arXiv:2308.02157, the 2nd-order multistep scheme; ComfyUI's `res_multistep`), one call a step;
- `sample_seeds_2`: the second node is a fresh call at lambda_s + r h after a first-order step
  there (SEEDS-2, Gonzalez et al. 2023, arXiv:2305.14267, in its VP data-prediction form with
  SDE parameter eta; eta = 0 is deterministic). r = 1 with the phi_2 weights is ComfyUI's
  `exp_heun_2_x0` (the exponential Heun method: a DPM-Solver++(1) predictor to lambda_t, then the
  trapezoid-like phi_2 corrector); solver_type="phi_1" averages the two D instead.
Coefficients are host float64 numbers; the step into sigma = 0 is x = D (the h -> inf limit).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from ._utils import (
    SolverInfo,
    check_model_kind,
    default_noise_sampler,
    denoise_with_uncond,
    get_ancestral_step,
    offset_first_sigma,
    validate_sigmas,
    validate_x,
)

__all__ = ["sample_res_multistep", "sample_seeds_2"]

_RES = "Zhang et al. 2023, RES (arXiv:2308.02157), 2nd-order multistep"
_SEEDS = "Gonzalez et al. 2023, SEEDS (arXiv:2305.14267)"


def _lambda(sigma: float, model_kind: str) -> float:
    if model_kind == "flow":
        return math.log((1 - sigma) / sigma)
    return -math.log(sigma)


def _sigma(lam: float, model_kind: str) -> float:
    return 1 / (1 + math.exp(lam)) if model_kind == "flow" else math.exp(-lam)


def _h_phi_2(h: float, expm1_h: float) -> float:
    """h phi_2(h) = (e^h - 1 - h) / h (ComfyUI's ei_h_phi_2), given expm1(h) = h phi_1(h)."""
    return (expm1_h - h) / h


def _setup(x, sigmas, extra_args):
    validate_x(x)
    sig = validate_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    return sig, extra_args, x.new_ones([x.shape[0]])


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None,
                         s_noise=1.0, noise_sampler=None, eta=0.0, cfg_pp=False):
    """RES second-order multistep (Zhang et al. 2023, arXiv:2308.02157, their 2-stage multistep
    exponential scheme with c_2 from the previous node), ComfyUI's `res_multistep`.

    Step i (lambda = -log sigma): h = lambda(sigma_down) - lambda_i, c_2 = (lambda_{i-1} -
    lambda(previous sigma_down)) / h, b_2 = phi_2(-h) / c_2, b_1 = phi_1(-h) - b_2,

        x <- e^-h x + h (b_1 D_i + b_2 D_{i-1}),

    an Euler step first and where sigma_down = 0; eta > 0 makes each step ancestral (down to
    sigma_down, then noise of std sigma_up, `get_ancestral_step`): ComfyUI's
    `res_multistep_ancestral` (eta = 1). With eta = 0 (default) c_2 = -h_{i-1} / h and this is
    a second-order ODE method. ComfyUI draws a zero-weighted noise sample every step at eta = 0;
    no draw is made here.

    cfg_pp: CFG++ (Chung et al. 2024, arXiv:2406.08070; ComfyUI's `res_multistep_cfg_pp` and
    `res_multistep_ancestral_cfg_pp`): the Euler step lands at D + sigma_down (x - D_u)/sigma,
    the multistep one runs from x + (D - D_u) with the unconditional outputs as its nodes,
    x <- e^-h (x + D_i - D_u,i) + h (b_1 D_u,i + b_2 D_u,i-1); D_u = D gives the base sampler.
    """
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    if eta < 0:
        raise ValueError(f"eta: expected a value >= 0, got {eta}")
    if eta and noise_sampler is None:
        noise_sampler = default_noise_sampler(x)
    old_denoised, old_sigma_down = None, None
    for i in trange(len(sig) - 1, disable=disable):
        if cfg_pp:
            denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, **extra_args)
        else:
            denoised = uncond = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sig[i], sig[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        if (sigma_down == 0 or old_denoised is None) and cfg_pp:
            x = denoised + (x - uncond) * (sigma_down / sig[i])  # Euler, CFG++
        elif sigma_down == 0 or old_denoised is None:
            x = x + (x - denoised) * ((sigma_down - sig[i]) / sig[i])  # Euler
        else:
            t, t_next = -math.log(sig[i]), -math.log(sigma_down)
            t_old, t_prev = -math.log(old_sigma_down), -math.log(sig[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            if cfg_pp:
                x = x + (denoised - uncond)
            x = math.exp(-h) * x + h * (b1 * uncond + b2 * old_denoised)
        if eta and sig[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
        old_denoised, old_sigma_down = uncond, sigma_down
    return x


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                   s_noise=1.0, noise_sampler=None, r=0.5, solver_type="phi_1",
                   model_kind="ve", first_sigma=1 - 1e-4):
    """SEEDS-2 (Gonzalez et al. 2023, arXiv:2305.14267), two stages in data prediction and
    half log-SNR time, as ComfyUI's `sample_seeds_2`:

        x_2 = (sigma_1/sigma_s) e^(-r h eta) x - alpha_1 expm1(-r h (1+eta)) D   [+ noise]
        x'  = (sigma_t/sigma_s) e^(-h eta) x - alpha_t (b_1 D + b_2 D(x_2, sigma_1))  [+ noise]

    with lambda_1 = lambda_s + r h; solver_type "phi_1": b_1 + b_2 = expm1(-H), D averaged with
    weight 1/(2r) on D(x_2) ("lerp"); "phi_2": b_2 = h phi_2(-H) / r, b_1 = expm1(-H) - b_2,
    H = h (1 + eta). The noise of the two stages is correlated as SEEDS requires (the first
    stage's draw decays into the second). eta = 0 is deterministic; eta = 0, r = 1, "phi_2" is
    ComfyUI's `exp_heun_2_x0`. model_kind "flow" uses lambda = log((1 - s)/s), alpha = 1 - s and
    moves a first s >= 1 to `first_sigma` (module doc). At r = 1 the second stage's fresh noise
    has weight 0 and is not drawn (ComfyUI draws it).
    """
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    check_model_kind(model_kind)
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"solver_type: expected 'phi_1' or 'phi_2', got {solver_type!r}")
    if not 0 < r <= 1:
        raise ValueError(f"r: expected 0 < r <= 1, got {r}")
    if eta < 0:
        raise ValueError(f"eta: expected a value >= 0, got {eta}")
    inject = eta > 0 and s_noise > 0
    if inject and noise_sampler is None:
        noise_sampler = default_noise_sampler(x)
    sigmas, sig = offset_first_sigma(sigmas, sig, model_kind, first_sigma)
    # each lambda once per schedule (a step's lambda_t is the next one's lambda_s; the same
    # operations, so the same bits); the final sigma = 0 has none (that step is x = D)
    lams = [_lambda(s, model_kind) if s > 0 else math.inf for s in sig]
    for i in trange(len(sig) - 1, disable=disable):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sig[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = lams[i], lams[i + 1]
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1 = lam_s + r * h
        sigma_1 = sig[i + 1] if r == 1 else _sigma(lam_1, model_kind)
        alpha_1, alpha_t = sigma_1 * math.exp(lam_1), sig[i + 1] * math.exp(lam_t)
        x_2 = (sigma_1 / sig[i] * math.exp(-r * h * eta)) * x \
            - (alpha_1 * math.expm1(-r * h_eta)) * denoised
        if inject:
            noise_1 = noise_sampler(sigma, sigma_1) * math.sqrt(-math.expm1(-2 * r * h * eta))
            x_2 = x_2 + noise_1 * (sigma_1 * s_noise)
        denoised_2 = model(x_2, sigma_1 * s_in, **extra_args)
        if solver_type == "phi_1":
            fac = 1 / (2 * r)
            b1 = b2 = math.expm1(-h_eta)
            b1, b2 = b1 * (1 - fac), b2 * fac
        else:
            phi_1 = math.expm1(-h_eta)
            b2 = _h_phi_2(-h_eta, phi_1) / r
            b1 = phi_1 - b2
        x = (sig[i + 1] / sig[i] * math.exp(-h * eta)) * x \
            - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject:
            seg = (r - 1) * h * eta
            noise = noise_1 * math.exp(seg)
            if r < 1:
                noise = noise + noise_sampler(sigma_1, sigmas[i + 1]) \
                    * math.sqrt(-math.expm1(2 * seg))
            x = x + noise * (sig[i + 1] * s_noise)
    return x


_ETA0 = {"eta": 0.0}
_CFG_PP = "Chung et al. 2024, CFG++ (arXiv:2406.08070) on "
_EXP_HEUN = {"eta": 0.0, "s_noise": 0.0, "r": 1.0, "solver_type": "phi_2"}
SOLVERS = {
    "res_multistep": SolverInfo(sample_res_multistep, order=2, nfe_per_step=1, stochastic=False,
                                paper=_RES, kwargs={"eta": 0.0}),
    "res_multistep_cfg_pp": SolverInfo(sample_res_multistep, order=2, nfe_per_step=1,
                                       stochastic=False, paper=_CFG_PP + _RES,
                                       kwargs={"eta": 0.0, "cfg_pp": True}),
    "res_multistep_ancestral": SolverInfo(sample_res_multistep, order=2, nfe_per_step=1,
                                          stochastic=True, paper=_RES + ", ancestral",
                                          kwargs={"eta": 1.0}, deterministic_kwargs=_ETA0),
    "res_multistep_ancestral_cfg_pp": SolverInfo(sample_res_multistep, order=2, nfe_per_step=1,
                                                 stochastic=True,
                                                 paper=_CFG_PP + _RES + ", ancestral",
                                                 kwargs={"eta": 1.0, "cfg_pp": True},
                                                 deterministic_kwargs=_ETA0),
    "exp_heun_2_x0": SolverInfo(sample_seeds_2, order=2, nfe_per_step=2, stochastic=False,
                                paper="exponential Heun in data prediction: " + _SEEDS
                                + " with eta = 0, r = 1", kwargs=_EXP_HEUN),
    # seeds_2 and exp_heun_2_x0_sde (stochastic options of sample_seeds_2) are in sde.py
    "exp_heun_2_x0_flow": SolverInfo(sample_seeds_2, order=2, nfe_per_step=2, stochastic=False,
                                     paper="exponential Heun in data prediction: " + _SEEDS
                                     + " with eta = 0, r = 1, flow lambda", param="flow",
                                     kwargs={**_EXP_HEUN, "model_kind": "flow"}),
}
