"""Singlestep DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095, Algorithm 1; DPM-Solver-3,
arXiv:2206.00927): 2S ancestral (and its flow-model _RF form), the Brownian-noise SDE sampler,
and the deterministic 2S / 3S. Conventions and the exact solution they approximate: see `dpmpp`.
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
    default_noise_sampler,
    get_ancestral_step,
    half_log_snr_to_sigma,
    offset_first_sigma,
    to_d,
)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                              eta=1.0, s_noise=1.0, noise_sampler=None, cfg_pp=False,
                              model_kind="ve"):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, arXiv:2211.01095,
    Algorithm 1 with r = 1/2): a 2S step down to sigma_down, then fresh noise of std sigma_up
    (`get_ancestral_step`). Euler (x -> D) where sigma_down = 0. eta = 0 is `sample_dpmpp_2s`.

    cfg_pp: CFG++ (Chung et al. 2024, arXiv:2406.08070; ComfyUI's `dpmpp_2s_ancestral_cfg_pp`):
    the data-prediction step runs from x + (D - D_u) instead of x, i.e. the state's noise part is
    the unconditional estimate x - D_u (D_u = D gives the base sampler). cfg_pp="comfyui"
    (`fastdiff.comfyui`'s numbers): the final update runs from x + (D - D_u(u)), the first
    call's D with the midpoint call's D_u (ComfyUI's post-CFG hook keeps the latest call's D_u);
    that is not the base sampler even for equal halves, and without guidance it fails the
    mixture distribution test (SW1 0.136 > 0.122 at 50 steps), so the registry keeps True.

    model_kind="flow" is ComfyUI's `sample_dpmpp_2s_ancestral_RF`: the step goes down to the flow
    s_down of `euler._rf_step` with the midpoint in lambda = log((1 - s)/s) (0.9999 from s = 1),
    each sub-step x <- (s'/s) x + (1 - s'/s) D exact for frozen D, then the flow renoising.
    """
    _check_eta(eta)
    if check_model_kind(model_kind) == "flow":
        if cfg_pp:
            raise ValueError("cfg_pp: not available with model_kind='flow'")
        return _dpmpp_2s_ancestral_rf(model, x, sigmas, extra_args, callback, disable, eta,
                                      s_noise, noise_sampler)
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    q = _2s_ancestral_schedule(sigmas, eta)
    for i in trange(len(sig) - 1, disable=disable):
        denoised, uncond = _denoise(model, x, sigmas[i] * s_in, extra_args, cfg_pp)
        _callback(callback, x, i, sigmas[i], denoised)
        if cfg_pp:
            x = x + (denoised - uncond)
        if get_ancestral_step(sig[i], sig[i + 1], eta=eta)[0] == 0:
            x = x + to_d(x, sigmas[i], denoised) * q["dt"][i]
        else:
            # Algorithm 1: u = first-order step to the midpoint s (in lambda), then a full step
            # with D(u, s) (for r = 1/2 the weight of D(x, t) is 1 - 1/(2r) = 0).
            x_2 = q["scale_1"][i] * x - q["w_1"][i] * denoised
            denoised_2, uncond_2 = _denoise(model, x_2, q["sigma_s"][i] * s_in, extra_args,
                                            cfg_pp)
            if cfg_pp == "comfyui":  # ComfyUI's final update corrects with the midpoint's D_u
                x = x + (uncond - uncond_2)
            x = q["scale_2"][i] * x - q["w_2"][i] * denoised_2
        if eta and sig[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * q["up"][i]
    return x


def _2s_ancestral_schedule(sigmas, eta):
    """`sample_dpmpp_2s_ancestral`'s per-step numbers for the whole schedule at once, bit for bit
    k-diffusion's per-step 0-d arithmetic (tested): the ancestral split (sigma_down, sigma_up),
    lambda t = -log sigma_i, t_next = -log sigma_down, h = t_next - t, the midpoint s = t + h/2
    and the weights of x and D of both sub-steps (dt: Euler's sigma_down - sigma_i). Row i is
    step i (unused entries where sigma_down = 0 are NaN or inf)."""
    sigma_down, sigma_up = get_ancestral_step(sigmas[:-1], sigmas[1:], eta=eta)
    t, t_next = _t_fn(sigmas[:-1]), _t_fn(sigma_down)
    h = t_next - t
    s = t + h / 2
    sigma_s = _sigma_fn(s)
    return {"dt": (sigma_down - sigmas[:-1]).tolist(), "sigma_s": sigma_s,
            "scale_1": (sigma_s / _sigma_fn(t)).tolist(), "w_1": (-h / 2).expm1().tolist(),
            "scale_2": (_sigma_fn(t_next) / _sigma_fn(t)).tolist(), "w_2": (-h).expm1().tolist(),
            "up": _host(sigma_up)}


def _dpmpp_2s_ancestral_rf(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                           noise_sampler):
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    q = _2s_ancestral_rf_schedule(sigmas, sig, eta)
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * q["dt"][i]
            continue
        sigma_s = 0.9999 if sig[i] == 1.0 else q["sigma_s"][i]  # ComfyUI's: lambda(1) = -inf
        ratio = q["ratio_s"][i]
        denoised_2 = model(ratio * x + (1 - ratio) * denoised, sigma_s * s_in, **extra_args)
        ratio = q["ratio_down"][i]
        x = ratio * x + (1 - ratio) * denoised_2
        if eta > 0:
            x = q["scale"][i] * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise \
                * q["renoise"][i]
    return x


def _2s_ancestral_rf_schedule(sigmas, sig, eta):
    """`_dpmpp_2s_ancestral_rf`'s per-step numbers for the whole schedule at once, bit for bit
    ComfyUI's per-step 0-d arithmetic (tested) -- but the midpoint's sigmoid (its vectorised
    kernel rounds differently), which stays per step: the flow split of `euler._rf_step`
    (s_down, rescale, renoise std), the midpoint s in lambda = log((1 - s)/s) and the ratios
    s/s_i, s_down/s_i. Row i is step i."""
    from .euler import _rf_step

    # _rf_step(sigmas, i, eta) reads sigmas[i] and sigmas[i + 1]: rows 0 and 1 here, all steps
    sigma_down, scale, renoise = _rf_step(torch.stack([sigmas[:-1], sigmas[1:]]), 0, eta)
    t_i, t_down = _half_log_snrs(sigmas[:-1], "flow"), _half_log_snrs(sigma_down, "flow")
    mid = t_i + (t_down - t_i) / 2
    sigma_s = torch.stack([half_log_snr_to_sigma(v, "flow") for v in mid.unbind()])
    first = torch.tensor([v == 1.0 for v in sig[:-1]], device=sigmas.device)
    ratio_s = torch.where(first, 0.9999, sigma_s) / sigmas[:-1]
    return {"dt": (sigma_down - sigmas[:-1]).tolist(), "sigma_s": sigma_s,
            "ratio_s": ratio_s.tolist(), "ratio_down": (sigma_down / sigmas[:-1]).tolist(),
            "scale": scale.tolist(), "renoise": renoise.tolist()}


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                     s_noise=1.0, noise_sampler=None, r=1 / 2, model_kind="ve",
                     first_sigma=1 - 1e-4):
    """DPM-Solver++ (stochastic), k-diffusion's singlestep SDE sampler: DPM-Solver++(2S)
    (Lu et al. 2022, arXiv:2211.01095, Algorithm 1, intermediate point at lambda + r h) where each
    of the two sub-steps is ancestral (down to sigma_down, then noise of std sigma_up).

    The noise is Brownian-bridge consistent: by default a `BrownianTreeNoiseSampler` over the
    schedule, queried on the intervals [sigma_t, sigma_s] and [sigma_t, sigma_next]. eta = 0 is
    the deterministic DPM-Solver++(2S) with this r (`sample_dpmpp_2s`). Euler where sigma_next = 0.
    model_kind="flow" (ComfyUI's CONST branch): lambda = log((1 - s)/s), the data terms and noise
    scaled by alpha = 1 - s, a first s >= 1 moved to `first_sigma` (`_utils.offset_first_sigma`);
    into s = 0, x = D.
    """
    _check_eta(eta)
    if not 0 < r <= 1:
        raise ValueError(f"r: expected 0 < r <= 1, got {r}")
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = _brownian_sampler(x, sigmas, eta, noise_sampler)
    if check_model_kind(model_kind) == "flow":
        return _dpmpp_sde_flow(model, x, sigmas, sig, extra_args, s_in, callback, disable, eta,
                               s_noise, noise_sampler, r, first_sigma)
    fac = 1 / (2 * r)  # Algorithm 1: D = (1 - 1/(2r)) D(x, t) + 1/(2r) D(u, s)
    q = _sde_schedule(sigmas, r, eta)
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        # Sub-step 1: ancestral first-order step t -> s.
        x_2 = q["scale_1"][i] * x - q["expm1_1"][i] * denoised
        if eta:
            x_2 = x_2 + noise_sampler(q["sigma_t"][i], q["sigma_s"][i]) * s_noise * q["up_1"][i]
        denoised_2 = model(x_2, q["sigma_s"][i] * s_in, **extra_args)

        # Sub-step 2: ancestral step t -> t_next with the 2S combination of the two denoisings.
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = q["scale_2"][i] * x - q["expm1_2"][i] * denoised_d
        if eta:
            x = x + noise_sampler(q["sigma_t"][i], q["sigma_next"][i]) * s_noise * q["up_2"][i]
    return x


def _sde_schedule(sigmas, r, eta):
    """`sample_dpmpp_sde`'s per-step numbers for the whole schedule at once (k-diffusion
    computes them per step on 0-d tensors; these vectorised ops give the same bits, tested):
    lambda t = -log sigma, s = t + r h, the sigmas exp(-(-log sigma)) as in k-diffusion (the
    Brownian tree is then queried at bit-identical times, so seeded runs match k-diffusion's),
    and per sub-step the ancestral split's sigma_up and the weights of x and D. Row i is step i
    (the entries of a step into sigma = 0 are not used)."""
    t = _t_fn(sigmas[:-1])
    t_next = _t_fn(sigmas[1:])
    h = t_next - t
    s = t + h * r
    sigma_t, sigma_s, sigma_next = _sigma_fn(t), _sigma_fn(s), _sigma_fn(t_next)
    sd, up_1 = get_ancestral_step(sigma_t, sigma_s, eta)
    s_ = _t_fn(sd)
    sd, up_2 = get_ancestral_step(sigma_t, sigma_next, eta)
    t_next_ = _t_fn(sd)
    return {"sigma_t": sigma_t, "sigma_s": sigma_s, "sigma_next": sigma_next,
            "scale_1": (_sigma_fn(s_) / sigma_t).tolist(), "expm1_1": (t - s_).expm1().tolist(),
            "up_1": _host(up_1), "scale_2": (_sigma_fn(t_next_) / sigma_t).tolist(),
            "expm1_2": (t - t_next_).expm1().tolist(), "up_2": _host(up_2)}


def _host(v):
    """A per-step tensor as host floats (get_ancestral_step's 0.0 for eta = 0 stays a number)."""
    return v.tolist() if isinstance(v, torch.Tensor) else v


def _dpmpp_sde_flow(model, x, sigmas, sig, extra_args, s_in, callback, disable, eta, s_noise,
                    noise_sampler, r, first_sigma):
    """`sample_dpmpp_sde` on a flow model, in ComfyUI's general alpha/sigma form (VE sigmas of
    the ancestral split are exp(-lambda))."""
    sigmas, sig = offset_first_sigma(sigmas, sig, "flow", first_sigma)
    fac = 1 / (2 * r)
    q = _sde_flow_schedule(sigmas, r, eta)
    noisy = eta > 0 and s_noise > 0
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        sigma_1 = q["sigma_1"][i]
        x_2 = q["scale_1"][i] * x - q["weight_1"][i] * denoised
        if noisy:
            x_2 = x_2 + q["alpha_1"][i] * noise_sampler(sigmas[i], sigma_1) * s_noise \
                * q["up_1"][i]
        denoised_2 = model(x_2, sigma_1 * s_in, **extra_args)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = q["scale_2"][i] * x - q["weight_2"][i] * denoised_d
        if noisy:
            x = x + q["alpha_t"][i] * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise \
                * q["up_2"][i]
    return x


def _sde_flow_schedule(sigmas, r, eta):
    """`_dpmpp_sde_flow`'s per-step numbers for the whole schedule at once, bit for bit those of
    ComfyUI's per-step 0-d arithmetic (tested) -- but the midpoint's sigmoid, whose vectorised
    kernel rounds differently, which stays per step. Row i is step i."""
    lam = _half_log_snrs(sigmas, "flow")
    lam_s, lam_t = lam[:-1], lam[1:]
    h = lam_t - lam_s
    lam_1 = lam_s + r * h
    sigma_1 = torch.stack([half_log_snr_to_sigma(v, "flow") for v in lam_1.unbind()])
    alpha_s, alpha_1 = sigmas[:-1] * lam_s.exp(), sigma_1 * lam_1.exp()
    alpha_t = sigmas[1:] * lam_t.exp()
    out = {"sigma_1": sigma_1, "alpha_1": alpha_1.tolist(), "alpha_t": alpha_t.tolist()}
    for k, lam, alpha in ((1, lam_1, alpha_1), (2, lam_t, alpha_t)):
        sd, su = get_ancestral_step(lam_s.neg().exp(), lam.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        out[f"scale_{k}"] = ((alpha / alpha_s) * (-h_).exp()).tolist()
        out[f"weight_{k}"] = (alpha * (-h_).expm1()).tolist()
        out[f"up_{k}"] = _host(su)
    return out


@torch.no_grad()
def sample_dpmpp_2s(model, x, sigmas, extra_args=None, callback=None, disable=None, r=1 / 2):
    """DPM-Solver++(2S) (Lu et al. 2022, arXiv:2211.01095, Algorithm 1), singlestep, 2 model
    calls per step:

        u   = (sigma_s / sigma_i) x - expm1(-r h) D(x, sigma_i),   lambda_s = lambda_i + r h
        D_i = (1 - 1/(2r)) D(x, sigma_i) + 1/(2r) D(u, sigma_s)
        x'  = (sigma_{i+1} / sigma_i) x - expm1(-h) D_i

    r = 1/2 (default) is the midpoint in lambda. Into sigma = 0: x' = D(x, sigma_i).
    """
    if not 0 < r <= 1:
        raise ValueError(f"r: expected 0 < r <= 1, got {r}")
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sig[i] / sig[i + 1])
        sigma_s = sig[i] * math.exp(-r * h)
        u = (sigma_s / sig[i]) * x - math.expm1(-r * h) * denoised
        denoised_s = model(u, sigma_s * s_in, **extra_args)
        denoised_d = (1 - 1 / (2 * r)) * denoised + (1 / (2 * r)) * denoised_s
        x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * denoised_d
    return x


@torch.no_grad()
def sample_dpmpp_3s(model, x, sigmas, extra_args=None, callback=None, disable=None, r1=1 / 3,
                    r2=2 / 3):
    """DPM-Solver++(3S): DPM-Solver-3 (Lu et al. 2022, arXiv:2206.00927, Algorithm 2) in the
    data-prediction form of DPM-Solver++ (arXiv:2211.01095; dpm-solver's
    `singlestep_dpm_solver_third_update`, 'dpmsolver' type), 3 model calls per step:

        u1 = (sigma_1/sigma_i) x - phi_1(r1 h) D_i                    (lambda_1 = lambda_i + r1 h)
        u2 = (sigma_2/sigma_i) x - phi_1(r2 h) D_i
             + (r2/r1) phi_2(r2 h) (D(u1) - D_i)                      (lambda_2 = lambda_i + r2 h)
        x' = (sigma_{i+1}/sigma_i) x - phi_1(h) D_i + (1/r2) phi_2(h) (D(u2) - D_i)

    (phi_k(.) as in the module docstring, evaluated at the given step size.)

    Third order needs r2 = 2/3 (the final quadrature uses nodes 0 and r2 only); r1 is free.
    Into sigma = 0: x' = D(x, sigma_i).
    """
    if not 0 < r1 < r2 <= 1:
        raise ValueError(f"r1, r2: expected 0 < r1 < r2 <= 1, got r1={r1}, r2={r2}")
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        h = math.log(sig[i] / sig[i + 1])
        sigma_1, sigma_2 = sig[i] * math.exp(-r1 * h), sig[i] * math.exp(-r2 * h)
        phi_11 = _phis(r1 * h)[0]
        phi_12, phi_22, _ = _phis(r2 * h)
        phi_1, phi_2, _ = _phis(h)
        u1 = (sigma_1 / sig[i]) * x - phi_11 * denoised
        denoised_1 = model(u1, sigma_1 * s_in, **extra_args)
        u2 = (sigma_2 / sig[i]) * x - phi_12 * denoised \
            + (r2 / r1) * phi_22 * (denoised_1 - denoised)
        denoised_2 = model(u2, sigma_2 * s_in, **extra_args)
        x = (sig[i + 1] / sig[i]) * x - phi_1 * denoised \
            + (1 / r2) * phi_2 * (denoised_2 - denoised)
    return x
