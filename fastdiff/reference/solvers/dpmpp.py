"""DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095) in the k-diffusion convention.

x = x0 + sigma * eps, the model is a denoiser D(x, sigma) ~ E[x0 | x] (DPM-Solver++'s data
prediction x_theta with alpha = 1) and lambda = -log(sigma) is the half log-SNR. Between lambda_s
and lambda_t = lambda_s + h the probability-flow ODE has the exact solution (variation of
constants, the data-prediction form of DPM-Solver++)

    x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda D(lambda) dlambda,

and every solver here replaces D by a low-order expansion in lambda built from denoisings at
the current, earlier (multistep) or intermediate (singlestep) points and integrates it exactly:
  - first order:  x_t = (sigma_t / sigma_s) x_s - expm1(-h) D_s            (DDIM; = Euler here)
  - phi-weights:  phi_1 = expm1(-h), phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2, so that
                  int_0^h e^(tau-h) tau^k / k! dtau = -phi_1, h phi_2, -h^2 phi_3 for k = 0, 1, 2.
At sigma_t = 0 (h = inf) the exact limit of the first-order step is x_t = D_s, and every solver
takes that step there (higher-order differences divide by h and degenerate).

The five k-diffusion samplers (`sample_dpmpp_2s_ancestral`, `_sde`, `_2m`, `_2m_sde`, `_3m_sde`)
keep k-diffusion 0.1.1's signatures and numbers: their arithmetic runs on the `sigmas` tensor in
k-diffusion's operation order (float32 runs round like k-diffusion), while branch decisions use the
host copy from `validate_sigmas` (no device syncs in the loop). With eta = 0 they draw no noise and
need no torchsde (k-diffusion still draws, or seeds a Brownian tree from the global RNG, and
multiplies the noise by 0: same outputs, different global RNG state afterwards). The new
deterministic samplers (`sample_dpmpp_2s`, `_3s`, `_3m`) compute their coefficients on the host in
float64.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from ._utils import (
    BrownianTreeNoiseSampler,
    SolverInfo,
    check_model_kind,
    default_noise_sampler,
    denoise_with_uncond,
    get_ancestral_step,
    half_log_snr,
    half_log_snr_to_sigma,
    offset_first_sigma,
    to_d,
    validate_sigmas,
    validate_x,
)

__all__ = [
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_2s",
    "sample_dpmpp_3s",
    "sample_dpmpp_3m",
]

_PAPER = "Lu et al. 2022, DPM-Solver++ (arXiv:2211.01095)"


def _sigma_fn(t):
    return t.neg().exp()


def _t_fn(sigma):
    return sigma.log().neg()


def _setup(x, sigmas, extra_args):
    validate_x(x)
    sig = validate_sigmas(sigmas)
    if any(sig[k + 1] >= sig[k] for k in range(len(sig) - 1)):
        raise ValueError("sigmas: expected a strictly decreasing schedule (lambda steps h > 0)")
    extra_args = {} if extra_args is None else extra_args
    return sig, extra_args, x.new_ones([x.shape[0]])


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


# --- k-diffusion 0.1.1 samplers -------------------------------------------------------------

def _denoise(model, x, sigma, extra_args, cfg_pp):
    """(D, D_u): with CFG++ the unconditional output of the same guided call, else (D, D)."""
    if cfg_pp:
        return denoise_with_uncond(model, x, sigma, **extra_args)
    denoised = model(x, sigma, **extra_args)
    return denoised, denoised


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
    for i in trange(len(sig) - 1, disable=disable):
        denoised, uncond = _denoise(model, x, sigmas[i] * s_in, extra_args, cfg_pp)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _callback(callback, x, i, sigmas[i], denoised)
        if cfg_pp:
            x = x + (denoised - uncond)
        if get_ancestral_step(sig[i], sig[i + 1], eta=eta)[0] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            # Algorithm 1: u = first-order step to the midpoint s (in lambda), then a full step
            # with D(u, s) (for r = 1/2 the weight of D(x, t) is 1 - 1/(2r) = 0).
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h / 2).expm1() * denoised
            denoised_2, uncond_2 = _denoise(model, x_2, _sigma_fn(s) * s_in, extra_args, cfg_pp)
            if cfg_pp == "comfyui":  # ComfyUI's final update corrects with the midpoint's D_u
                x = x + (uncond - uncond_2)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if eta and sig[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _dpmpp_2s_ancestral_rf(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                           noise_sampler):
    from .euler import _rf_step

    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, scale, renoise = _rf_step(sigmas, i, eta)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            continue
        if sig[i] == 1.0:
            sigma_s = 0.9999  # ComfyUI's: lambda(1) = -inf
        else:
            t_i, t_down = half_log_snr(sigmas[i], "flow"), half_log_snr(sigma_down, "flow")
            sigma_s = half_log_snr_to_sigma(t_i + (t_down - t_i) / 2, "flow")
        ratio = sigma_s / sigmas[i]
        denoised_2 = model(ratio * x + (1 - ratio) * denoised, sigma_s * s_in, **extra_args)
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised_2
        if eta > 0:
            x = scale * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


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
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        # The sigmas below are exp(-(-log sigma)) as in k-diffusion: the Brownian tree is then
        # queried at bit-identical times, so seeded runs match k-diffusion's.
        sigma_t, sigma_s = _sigma_fn(t), _sigma_fn(s)

        # Sub-step 1: ancestral first-order step t -> s.
        sd, su = get_ancestral_step(sigma_t, sigma_s, eta)
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / sigma_t) * x - (t - s_).expm1() * denoised
        if eta:
            x_2 = x_2 + noise_sampler(sigma_t, sigma_s) * s_noise * su
        denoised_2 = model(x_2, sigma_s * s_in, **extra_args)

        # Sub-step 2: ancestral step t -> t_next with the 2S combination of the two denoisings.
        sd, su = get_ancestral_step(sigma_t, _sigma_fn(t_next), eta)
        t_next_ = _t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / sigma_t) * x - (t - t_next_).expm1() * denoised_d
        if eta:
            x = x + noise_sampler(sigma_t, _sigma_fn(t_next)) * s_noise * su
    return x


def _dpmpp_sde_flow(model, x, sigmas, sig, extra_args, s_in, callback, disable, eta, s_noise,
                    noise_sampler, r, first_sigma):
    """`sample_dpmpp_sde` on a flow model, in ComfyUI's general alpha/sigma form (VE sigmas of
    the ancestral split are exp(-lambda))."""
    sigmas, sig = offset_first_sigma(sigmas, sig, "flow", first_sigma)
    fac = 1 / (2 * r)
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = half_log_snr(sigmas[i], "flow"), half_log_snr(sigmas[i + 1], "flow")
        h = lam_t - lam_s
        lam_1 = lam_s + r * h
        sigma_1 = half_log_snr_to_sigma(lam_1, "flow")
        alpha_s, alpha_1 = sigmas[i] * lam_s.exp(), sigma_1 * lam_1.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        sd, su = get_ancestral_step(lam_s.neg().exp(), lam_1.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        x_2 = (alpha_1 / alpha_s) * (-h_).exp() * x - alpha_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_1 * noise_sampler(sigmas[i], sigma_1) * s_noise * su
        denoised_2 = model(x_2, sigma_1 * s_in, **extra_args)
        sd, su = get_ancestral_step(lam_s.neg().exp(), lam_t.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


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
    old_denoised = None
    for i in trange(len(sig) - 1, disable=disable):
        denoised, uncond = _denoise(model, x, sigmas[i] * s_in, extra_args, cfg_pp)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised  # the h -> inf limit of the first-order step
        else:
            if cfg_pp:
                x = x + (denoised - uncond)
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (t - _t_fn(sigmas[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = uncond
    return x


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
    old_denoised = None
    h_last = None
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised  # denoising step
        else:
            t, s = half_log_snr(sigmas[i], model_kind), half_log_snr(sigmas[i + 1], model_kind)
            h = s - t
            eta_h = eta * h
            alpha_t = 1.0 if model_kind == "ve" else sigmas[i + 1] * s.exp()  # 1 - s (flow)
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x \
                + alpha_t * (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    w = (-h - eta_h).expm1().neg() / (-h - eta_h) + 1
                else:
                    w = 0.5 * (-h - eta_h).expm1().neg()
                x = x + alpha_t * w * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] \
                    * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
    return x


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
    denoised_1, denoised_2 = None, None
    h_1, h_2 = None, None
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised  # denoising step
        else:
            t, s = half_log_snr(sigmas[i], model_kind), half_log_snr(sigmas[i + 1], model_kind)
            h = s - t
            h_eta = h * (eta + 1)
            if model_kind == "ve":
                alpha_t, decay = 1.0, torch.exp(-h_eta)
            else:  # flow (ComfyUI's CONST): alpha = 1 - s, and s_t / s_s replaces e^-h
                alpha_t = sigmas[i + 1] * s.exp()
                decay = sigmas[i + 1] / sigmas[i] * (-h * eta).exp()
            x = decay * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] \
                    * (-2 * h * eta).expm1().neg().sqrt() * s_noise
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x


# --- deterministic DPM-Solver++ samplers, float64 host coefficients -------------------------

def _phis(h: float) -> tuple[float, float, float]:
    """phi_1 = expm1(-h), phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2 (dpm-solver's notation)."""
    phi_1 = math.expm1(-h)
    phi_2 = phi_1 / h + 1
    return phi_1, phi_2, phi_2 / h - 0.5


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


_ETA0 = {"eta": 0.0}
_CFG_PP = "Chung et al. 2024, CFG++ (arXiv:2406.08070) on "
_FLOW = {"model_kind": "flow"}
SOLVERS = {
    "dpmpp_2m_cfg_pp": SolverInfo(sample_dpmpp_2m, order=2, nfe_per_step=1, stochastic=False,
                                  paper=_CFG_PP + _PAPER + ", Alg. 2",
                                  kwargs={"cfg_pp": True}),
    "dpmpp_2s_ancestral_cfg_pp": SolverInfo(sample_dpmpp_2s_ancestral, order=2, nfe_per_step=2,
                                            stochastic=True,
                                            paper=_CFG_PP + _PAPER + ", Alg. 1, ancestral",
                                            kwargs={"cfg_pp": True},
                                            deterministic_kwargs=_ETA0),
    "dpmpp_2m": SolverInfo(sample_dpmpp_2m, order=2, nfe_per_step=1, stochastic=False,
                           paper=_PAPER + ", Alg. 2"),
    "dpmpp_3m": SolverInfo(sample_dpmpp_3m, order=3, nfe_per_step=1, stochastic=False,
                           paper=_PAPER + ", 3rd-order multistep"),
    "dpmpp_2s": SolverInfo(sample_dpmpp_2s, order=2, nfe_per_step=2, stochastic=False,
                           paper=_PAPER + ", Alg. 1"),
    "dpmpp_3s": SolverInfo(sample_dpmpp_3s, order=3, nfe_per_step=3, stochastic=False,
                           paper="Lu et al. 2022, DPM-Solver-3 (arXiv:2206.00927, Alg. 2) in "
                                 "data prediction, " + _PAPER),
    "dpmpp_2s_ancestral": SolverInfo(sample_dpmpp_2s_ancestral, order=2, nfe_per_step=2,
                                     stochastic=True, paper=_PAPER + ", Alg. 1, ancestral",
                                     deterministic_kwargs=_ETA0),
    "dpmpp_sde": SolverInfo(sample_dpmpp_sde, order=2, nfe_per_step=2, stochastic=True,
                            paper=_PAPER + ", Alg. 1 with Brownian-tree noise (k-diffusion)",
                            deterministic_kwargs=_ETA0),
    "dpmpp_2m_sde": SolverInfo(sample_dpmpp_2m_sde, order=2, nfe_per_step=1, stochastic=True,
                               paper=_PAPER + ", SDE-DPM-Solver++(2M)",
                               kwargs={"solver_type": "midpoint"}, deterministic_kwargs=_ETA0),
    "dpmpp_2m_sde_heun": SolverInfo(sample_dpmpp_2m_sde, order=2, nfe_per_step=1, stochastic=True,
                                    paper=_PAPER + ", SDE-DPM-Solver++(2M), heun",
                                    kwargs={"solver_type": "heun"}, deterministic_kwargs=_ETA0),
    # order 2, not 3: k-diffusion's D2 weight is half the exact one (see sample_dpmpp_3m_sde)
    "dpmpp_3m_sde": SolverInfo(sample_dpmpp_3m_sde, order=2, nfe_per_step=1, stochastic=True,
                               paper=_PAPER + ", 3M SDE (k-diffusion)",
                               deterministic_kwargs=_ETA0),
    # ComfyUI's flow-model (CONST) branches
    "dpmpp_2s_ancestral_RF": SolverInfo(sample_dpmpp_2s_ancestral, order=2, nfe_per_step=2,
                                        stochastic=True, param="flow", kwargs=_FLOW,
                                        paper=_PAPER + ", Alg. 1, ancestral, flow renoising "
                                        "(ComfyUI's _RF)", deterministic_kwargs=_ETA0),
    "dpmpp_sde_flow": SolverInfo(sample_dpmpp_sde, order=2, nfe_per_step=2, stochastic=True,
                                 param="flow", kwargs=_FLOW, deterministic_kwargs=_ETA0,
                                 paper=_PAPER + ", Alg. 1, Brownian noise, flow lambda"),
    "dpmpp_2m_sde_flow": SolverInfo(sample_dpmpp_2m_sde, order=2, nfe_per_step=1,
                                    stochastic=True, param="flow", deterministic_kwargs=_ETA0,
                                    kwargs={**_FLOW, "solver_type": "midpoint"},
                                    paper=_PAPER + ", SDE-DPM-Solver++(2M), flow lambda"),
    "dpmpp_2m_sde_heun_flow": SolverInfo(sample_dpmpp_2m_sde, order=2, nfe_per_step=1,
                                         stochastic=True, param="flow",
                                         deterministic_kwargs=_ETA0,
                                         kwargs={**_FLOW, "solver_type": "heun"},
                                         paper=_PAPER + ", SDE-DPM-Solver++(2M) heun, flow "
                                         "lambda"),
    "dpmpp_3m_sde_flow": SolverInfo(sample_dpmpp_3m_sde, order=2, nfe_per_step=1,
                                    stochastic=True, param="flow", kwargs=_FLOW,
                                    deterministic_kwargs=_ETA0,
                                    paper=_PAPER + ", 3M SDE (k-diffusion), flow lambda"),
}
