"""Multistep DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095, Algorithm 2 and the SDE
variants): 2M (with CFG++), 2M SDE (midpoint / heun), k-diffusion's 3M SDE and the third-order
3M. Conventions and the exact solution they approximate: see `dpmpp`.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from ._dpmpp_common import (
    _brownian_sampler,
    _callback,
    _check_eta,
    _denoise,
    _half_log_snrs,
    _phis,
    _setup,
    _sigma_fn,
    _t_fn,
)
from ._utils import (
    check_model_kind,
    offset_first_sigma,
)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    cfg_pp=False):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2): multistep, one model
    call per step, D_i = (1 + 1/(2r)) D(x_i) - 1/(2r) D(x_{i-1}) with r = h_{i-1} / h_i.
    First-order steps at the start and into sigma = 0.

    cfg_pp: CFG++ (Chung et al. 2024, arXiv:2406.08070; ComfyUI's `dpmpp_2m_cfg_pp`): the step
    runs from x + (D_i - D_u,i) (renoising with the unconditional noise estimate) and the
    multistep correction differences D_i against the previous *unconditional* output:

        x' = D_i + (sigma'/sigma)(x - D_u,i) - expm1(-h) / (2r) (D_i - D_u,i-1).

    D_u = D gives the base sampler.
    """
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    q = _2m_schedule(sigmas)
    old_denoised = None
    for i in trange(len(sig) - 1, disable=disable):
        denoised, uncond = _denoise(model, x, sigmas[i] * s_in, extra_args, cfg_pp)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised  # the h -> inf limit of the first-order step
        else:
            if cfg_pp:
                x = x + (denoised - uncond)
            if old_denoised is None:
                denoised_d = denoised
            else:
                denoised_d = q["w_new"][i] * denoised - q["w_old"][i] * old_denoised
            x = q["scale"][i] * x - q["expm1"][i] * denoised_d
        old_denoised = uncond
    return x


def _2m_schedule(sigmas):
    """`sample_dpmpp_2m`'s per-step numbers for the whole schedule at once, bit for bit
    k-diffusion's per-step 0-d arithmetic (tested): lambda t = -log sigma, h = t_next - t,
    r = (t - t_prev) / h, the 2M weights 1 + 1/(2r), 1/(2r) (NaN at step 0) and the weights of
    x and D. Row i is step i."""
    t_all = _t_fn(sigmas)
    t, t_next = t_all[:-1], t_all[1:]
    h = t_next - t
    r = (t - torch.cat([t.new_full([1], math.nan), t[:-1]])) / h
    return {"w_new": (1 + 1 / (2 * r)).tolist(), "w_old": (1 / (2 * r)).tolist(),
            "scale": (_sigma_fn(t_next) / _sigma_fn(t)).tolist(), "expm1": (-h).expm1().tolist()}


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                        s_noise=1.0, noise_sampler=None, solver_type="midpoint", model_kind="ve",
                        first_sigma=1 - 1e-4):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, arXiv:2211.01095, SDE-DPM-Solver++(2M);
    k-diffusion's form): the exact solution of the reverse SDE with the data-prediction model
    frozen / linear in lambda, over an interval where the noise is eta-weighted:

        x_t = (sigma_t/sigma_s) e^(-eta h) x_s + (1 - e^(-(1+eta) h)) D_s + [correction]
              + sigma_t sqrt(1 - e^(-2 eta h)) z.

    The second-order correction uses the backward difference (D_s - D_prev) / r: solver_type
    'midpoint' weights it with (1 - e^(-(1+eta) h)) / 2, 'heun' with the exact integral weight
    of the linear term. eta = 0 is the ODE solver ('midpoint' = `sample_dpmpp_2m`).
    model_kind="flow" (ComfyUI's CONST branch): lambda = log((1 - s)/s), the data terms scaled
    by alpha_t = 1 - s_t, a first s >= 1 moved to `first_sigma` (`_utils.offset_first_sigma`).
    """
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError(f"solver_type: expected 'heun' or 'midpoint', got {solver_type!r}")
    _check_eta(eta)
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = _brownian_sampler(x, sigmas, eta, noise_sampler)
    sigmas, sig = offset_first_sigma(sigmas, sig, check_model_kind(model_kind), first_sigma)
    q = _2m_sde_schedule(sigmas, eta, solver_type, model_kind)
    old_denoised = None
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised  # denoising step
        else:
            x = q["decay"][i] * x + q["w_0"][i] * denoised
            if old_denoised is not None:
                x = x + q["w_1"][i] * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] \
                    * q["noise"][i] * s_noise
        old_denoised = denoised
    return x


def _2m_sde_schedule(sigmas, eta, solver_type, model_kind):
    """`sample_dpmpp_2m_sde`'s per-step numbers for the whole schedule at once, bit for bit
    k-diffusion's / ComfyUI's per-step 0-d arithmetic (tested): with lambda t -> s over step i,
    h = s - t, the weights of x (decay), D (w_0) and D - D_prev (w_1 = alpha_t w / r,
    r = h_{i-1} / h_i; NaN at step 0) and the noise factor sqrt(1 - e^(-2 eta h)). Row i is
    step i."""
    lam = _half_log_snrs(sigmas, model_kind)
    t, s = lam[:-1], lam[1:]
    h = s - t
    eta_h = eta * h
    alpha_t = 1.0 if model_kind == "ve" else sigmas[1:] * s.exp()  # 1 - s (flow)
    r = torch.cat([h.new_full([1], math.nan), h[:-1]]) / h
    if solver_type == "heun":
        w = (-h - eta_h).expm1().neg() / (-h - eta_h) + 1
    else:
        w = 0.5 * (-h - eta_h).expm1().neg()
    return {"decay": (sigmas[1:] / sigmas[:-1] * (-eta_h).exp()).tolist(),
            "w_0": (alpha_t * (-h - eta_h).expm1().neg()).tolist(),
            "w_1": (alpha_t * w * (1 / r)).tolist(),
            "noise": (-2 * eta_h).expm1().neg().sqrt().tolist()}


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                        s_noise=1.0, noise_sampler=None, model_kind="ve", first_sigma=1 - 1e-4):
    """DPM-Solver++(3M) SDE (k-diffusion; the third-order multistep data-prediction update of
    DPM-Solver++, Lu et al. 2022, arXiv:2211.01095, with the SDE variant's eta-weighted decay).

    With H = (1 + eta) h: x_t = e^(-H) x_s + (1 - e^(-H)) D_s + phi_2 D1 - phi_3 D2 + noise, where
    D1, D2 are divided differences of the last three denoisings (D1 ~ h D', D2 ~ h^2 D''/2) and
    phi_2 = expm1(-H)/H + 1, phi_3 = phi_2/H - 1/2. First and second order for the first two
    steps. model_kind="flow": ComfyUI's CONST branch (as in `sample_dpmpp_2m_sde`).
    k-diffusion's numbers are kept, but the D2 term carries half the weight of the exact
    integral (-h^2 phi_3 D''), so with eta = 0 this is a *second*-order method; see
    `sample_dpmpp_3m` for the third-order one.
    """
    _check_eta(eta)
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = _brownian_sampler(x, sigmas, eta, noise_sampler)
    sigmas, sig = offset_first_sigma(sigmas, sig, check_model_kind(model_kind), first_sigma)
    q = _3m_sde_schedule(sigmas, eta, model_kind)
    denoised_1, denoised_2 = None, None
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised  # denoising step
        else:
            x = q["decay"][i] * x + q["w_0"][i] * denoised
            if denoised_2 is not None:
                r0, r1 = q["r0"][i], q["r1"][i]
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + q["w_phi_2"][i] * d1 - q["w_phi_3"][i] * d2
            elif denoised_1 is not None:
                d = (denoised - denoised_1) / q["r0"][i]
                x = x + q["w_phi_2"][i] * d
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] \
                    * q["noise"][i] * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
    return x


def _3m_sde_schedule(sigmas, eta, model_kind):
    """`sample_dpmpp_3m_sde`'s per-step numbers for the whole schedule at once, bit for bit
    k-diffusion's / ComfyUI's per-step 0-d arithmetic (tested): with lambda t -> s over step i,
    h = s - t, H = (1 + eta) h, the weights of x (decay) and D (w_0 = alpha_t (1 - e^-H)),
    alpha_t phi_2, alpha_t phi_3, the step ratios r0 = h_{i-1} / h_i, r1 = h_{i-2} / h_i (NaN
    where they do not exist) and the noise factor sqrt(1 - e^(-2 eta h)). Row i is step i."""
    lam = _half_log_snrs(sigmas, model_kind)
    t, s = lam[:-1], lam[1:]
    h = s - t
    h_eta = h * (eta + 1)
    if model_kind == "ve":
        alpha_t, decay = 1.0, torch.exp(-h_eta)
    else:  # flow (ComfyUI's CONST): alpha = 1 - s, and s_t / s_s replaces e^-h
        alpha_t = sigmas[1:] * s.exp()
        decay = sigmas[1:] / sigmas[:-1] * (-h * eta).exp()
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    phi_3 = phi_2 / h_eta - 0.5
    nan = h.new_full([2], math.nan)
    return {"decay": decay.tolist(), "w_0": (alpha_t * (-h_eta).expm1().neg()).tolist(),
            "w_phi_2": (alpha_t * phi_2).tolist(), "w_phi_3": (alpha_t * phi_3).tolist(),
            "r0": (torch.cat([nan[:1], h[:-1]]) / h).tolist(),
            "r1": (torch.cat([nan, h[:-2]]) / h).tolist(),
            "noise": (-2 * h * eta).expm1().neg().sqrt().tolist()}


def _multistep_order(i, n, max_order, lower_order_final, euler_at_final):
    """Order of step i of n: warm-up (only i earlier denoisings exist), then as diffusers'
    DPMSolverMultistepScheduler: lower_order_final lowers the last two steps when n < 15."""
    order = min(max_order, i + 1)
    if lower_order_final and n < 15:
        order = min(order, n - i)
    if euler_at_final and i == n - 1:
        order = 1
    return order


@torch.no_grad()
def sample_dpmpp_3m(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    lower_order_final=False, euler_at_final=False):
    """DPM-Solver++(3M): third-order multistep data-prediction solver (Lu et al. 2022,
    arXiv:2211.01095; the Taylor form of dpm-solver's `multistep_dpm_solver_third_update`), one
    model call per step. D is expanded as D_i + (tau/h) D1 + (tau/h)^2 D2 / 2 with r0 = h_{i-1}/h,
    r1 = h_{i-2}/h and the backward divided differences

        D1_0 = (D_i - D_{i-1}) / r0,   D1_1 = (D_{i-1} - D_{i-2}) / r1
        D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1)     (~ h D')
        D2 = 2 (D1_0 - D1_1) / (r0+r1)           (~ h^2 D'')
        x' = (sigma_{i+1}/sigma_i) x - phi_1 D_i + phi_2 D1 - phi_3 D2

    since int_0^h e^(tau-h) tau^2/2 dtau = -h^2 phi_3. Note the factor 2 in D2: dpm-solver,
    diffusers (solver_order=3) and k-diffusion's `sample_dpmpp_3m_sde` use D2 without it, which
    leaves an O(h^3) local error (their 3M is second order; `sample_dpmpp_3m_sde` keeps
    k-diffusion's numbers). Here a quadratic D is integrated exactly.

    Warm-up: first order, then second order (x' += phi_2 D1_0, as k-diffusion's 3M); the first
    step's O(h^2) error is taken at sigma_max, where D is nearly constant in lambda, so it shows
    only for very many steps. Options (as
    diffusers): lower_order_final lowers the last two steps to orders 1 and 2 when there are
    fewer than 15 steps; euler_at_final makes the last step first order. Into sigma = 0 the step
    is always first order: x' = D_i.
    """
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    n = len(sig) - 1
    denoised_1 = denoised_2 = None
    for i in trange(n, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        order = _multistep_order(i, n, 3, lower_order_final, euler_at_final)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            phi_1, phi_2, phi_3 = _phis(h)
            x = (sig[i + 1] / sig[i]) * x - phi_1 * denoised
            if order >= 2:
                r0 = math.log(sig[i - 1] / sig[i]) / h
                d1_0 = (denoised - denoised_1) / r0
            if order == 2:
                x = x + phi_2 * d1_0
            elif order == 3:
                r1 = math.log(sig[i - 2] / sig[i - 1]) / h
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = 2 * (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - phi_3 * d2
        denoised_1, denoised_2 = denoised, denoised_1
    return x
