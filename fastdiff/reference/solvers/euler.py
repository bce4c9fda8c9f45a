"""Euler, Heun and DPM-2 samplers (and their ancestral variants) on the Karras ODE.

Same signatures, keyword arguments and numbers as `k_diffusion.sampling` (Crowson); the step
loop never branches on device values: branch decisions come from the host copy of `sigmas` made
once per run by `validate_sigmas`, while the arithmetic itself uses the `sigmas` tensor so that
float32 runs round exactly like k-diffusion's.

ODE: dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, arXiv:2206.00364, eq. 3 with
sigma(t) = t, s(t) = 1).
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from ._utils import (
    SolverInfo,
    check_model_kind,
    default_noise_sampler,
    denoise_with_uncond,
    get_ancestral_step,
    half_log_snr,
    to_d,
    validate_sigmas,
    validate_x,
)

__all__ = [
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_heunpp2",
    "sample_gradient_estimation",
]

_KARRAS = "Karras et al. 2022, EDM (arXiv:2206.00364)"


def _churn(x, sigmas, sig, i, s_churn, s_tmin, s_tmax, s_noise):
    """EDM Algorithm 2 lines 4-6: raise the noise level from sigma_i to sigma_hat = (1 + gamma)
    sigma_i by adding fresh noise, gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax].

    Returns (x, sigma_hat). With s_churn > 0 a normal draw is made at *every* step (also where
    gamma = 0) so that the global RNG stream matches k-diffusion's; with s_churn = 0 none is made.
    """
    n = len(sig) - 1
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
    if s_churn <= 0:
        return x, sigmas[i]
    eps = torch.randn_like(x) * s_noise
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def _setup(x, sigmas, extra_args):
    validate_x(x)
    sig = validate_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    return sig, extra_args, x.new_ones([x.shape[0]])


def _denoise(model, x, sigma, extra_args, cfg_pp):
    """(D, the prediction the step renoises with): D itself, or with CFG++ (Chung et al. 2024,
    arXiv:2406.08070) the unconditional D_u of the same guided call."""
    return denoise_with_uncond(model, x, sigma, **extra_args) if cfg_pp else \
        (model(x, sigma, **extra_args),) * 2


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, cfg_pp=False, model_kind="ve"):
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022), arXiv:2206.00364.

    With s_churn = 0 (default) this is the plain Euler method on the probability-flow ODE.
    cfg_pp: CFG++ (Chung et al. 2024, arXiv:2406.08070, Algorithm 1 on the Karras ODE; ComfyUI's
    `euler_cfg_pp`): x' = D + sigma' (x - D_u) / sigma, the guided x0 renoised with the
    unconditional noise estimate (`_utils.denoise_with_uncond`); with D_u = D it is Euler.
    model_kind="flow" (flow times s; Euler on the flow ODE has the same update) matters with
    cfg_pp only: ComfyUI's CONST branch x' = (1 - s') D + s' (x - (1 - s) D_u) / s
    (`_cfg_pp_flow_step` at eta = 0).
    """
    flow_cfg_pp = check_model_kind(model_kind) == "flow" and cfg_pp
    if model_kind == "flow" and s_churn > 0:
        raise ValueError("s_churn: the churn raises a VE sigma; not available with "
                         "model_kind='flow'")
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    for i in trange(len(sig) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, sig, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised, renoise = _denoise(model, x, sigma_hat * s_in, extra_args, cfg_pp)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat,
                      "denoised": denoised})
        if flow_cfg_pp:
            x = _cfg_pp_flow_step(x, sigmas, sig, i, denoised, renoise, 0.0, 0.0, None)
            continue
        d = to_d(x, sigma_hat, renoise)
        if cfg_pp:
            x = denoised + d * sigmas[i + 1]
        else:
            x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


def _rf_step(sigmas, i, eta):
    """The flow-model ancestral split of ComfyUI's `_RF` samplers (x = (1 - s) x0 + s eps): the
    deterministic part ends at s_down = s_{i+1} (1 + (s_{i+1}/s_i - 1) eta); rescaling by
    (1 - s_{i+1}) / (1 - s_down) and adding noise of std
    sqrt(s_{i+1}^2 - s_down^2 (1 - s_{i+1})^2 / (1 - s_down)^2) lands on the marginal at s_{i+1}
    (the noise-to-signal ratio s / (1 - s) is that of VE sigma_down, then topped up).
    Returns tensors (s_down, renoise scale, renoise std), in ComfyUI's operation order."""
    sigma_down = sigmas[i + 1] * (1 + (sigmas[i + 1] / sigmas[i] - 1) * eta)
    alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
    renoise = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_ip1 / alpha_down, renoise


def _rf_down_host(sig, i, eta) -> float:
    return sig[i + 1] * (1 + (sig[i + 1] / sig[i] - 1) * eta)


def _cfg_pp_flow_step(x, sigmas, sig, i, denoised, uncond, eta, s_noise, noise_sampler):
    """One step of ComfyUI's `euler_ancestral_cfg_pp` on a flow model (x = (1 - s) x0 + s eps):
    the VE CFG++ ancestral step taken on y = x / (1 - s) at VE noise v = s / (1 - s),

        x' = a' D + a' v_down (x - a D_u) / s + a' v_up z,    a = 1 - s = s e^lambda,

    with (v_down, v_up) = get_ancestral_step(v, v', eta) (lambda = log((1 - s)/s), as ComfyUI
    computes a). At s = 1 (a = 0, v = inf) the limit is v_down = 0, v_up = v' for eta > 0 (all
    of x is noise, ComfyUI's min(v', nan) = v'), v_down = v' for eta = 0; into s' = 0, x = D."""
    if sig[i + 1] == 0:
        return denoised
    alpha_t = sigmas[i + 1] * half_log_snr(sigmas[i + 1], "flow").exp()
    v_next = sigmas[i + 1] / alpha_t
    if sig[i] == 1:  # host branch: a = 0, and the VE noise level is infinite
        d = x / sigmas[i]
        v_down, v_up = (0.0, v_next) if eta else (v_next, 0.0)
    else:
        alpha_s = sigmas[i] * half_log_snr(sigmas[i], "flow").exp()
        d = to_d(x, sigmas[i], alpha_s * uncond)  # the unconditional noise estimate
        v_down, v_up = get_ancestral_step(sigmas[i] / alpha_s, v_next, eta=eta)
    x = alpha_t * denoised + (alpha_t * v_down) * d
    if eta > 0 and s_noise > 0:
        x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * v_up
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None, cfg_pp=False,
                           model_kind="ve"):
    """Ancestral sampling with Euler steps: an Euler step down to sigma_down, then fresh noise
    of std sigma_up (`get_ancestral_step`). eta=0 is `sample_euler`; eta=1 is the DDPM ancestral
    sampler (Ho et al. 2020, arXiv:2006.11239) in sigma parameterisation.
    cfg_pp: CFG++ (Chung et al. 2024, arXiv:2406.08070; ComfyUI's `euler_ancestral_cfg_pp`):
    the step down is x' = D + sigma_down (x - D_u) / sigma, renoised with the unconditional
    noise estimate (D_u = D gives the base sampler).

    model_kind="flow" is ComfyUI's `sample_euler_ancestral_RF` (flow times s, `_rf_step`): the
    exact first-order step x <- (s_down/s) x + (1 - s_down/s) D, then the flow renoising; into
    s = 0, x = D. With cfg_pp it is the CONST branch of ComfyUI's `euler_ancestral_cfg_pp`
    (`euler_cfg_pp` at eta = 0), which is not the _RF split: `_cfg_pp_flow_step`.
    """
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    flow_cfg_pp = check_model_kind(model_kind) == "flow" and cfg_pp
    for i in trange(len(sig) - 1, disable=disable):
        denoised, renoise = _denoise(model, x, sigmas[i] * s_in, extra_args, cfg_pp)
        if flow_cfg_pp:
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                          "denoised": denoised})
            x = _cfg_pp_flow_step(x, sigmas, sig, i, denoised, renoise, eta, s_noise,
                                  noise_sampler)
            continue
        if model_kind == "flow":
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                          "denoised": denoised})
            if sig[i + 1] == 0:
                x = denoised
                continue
            sigma_down, scale, renoise = _rf_step(sigmas, i, eta)
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = scale * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise
            continue
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        d = to_d(x, sigmas[i], renoise)
        x = denoised + d * sigma_down if cfg_pp else x + d * (sigma_down - sigmas[i])
        if eta and sig[i + 1] > 0:  # eta = 0: no noise term, so no draw either
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Implements Algorithm 2 (Heun steps) from Karras et al. (2022), arXiv:2206.00364: the
    explicit trapezoidal rule, with an Euler step where sigma_{i+1} = 0 (lines 9-11)."""
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    for i in trange(len(sig) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, sig, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat,
                      "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt  # Euler: D(x, 0) would be evaluated at sigma = 0 (division by 0)
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


def _dpm_2_mid(sigma, sigma_next):
    """The midpoint of `_dpm_2_step` in log sigma and its two step sizes, (sigma_mid,
    sigma_mid - sigma, sigma_next - sigma): on 0-d tensors, or elementwise on a schedule's (the
    vectorised kernels give the per-step bits: tests/test_reference_schedules.py)."""
    sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
    return sigma_mid, sigma_mid - sigma, sigma_next - sigma


def _dpm_2_step(model, x, d, sigma_mid, to_mid, to_next, s_in, extra_args):
    """Midpoint step in log sigma (DPM-Solver-2 with r = 1/2, Lu et al. 2022, arXiv:2206.00927,
    written on the Karras ODE as in k-diffusion): Euler to the geometric mean of the two sigmas,
    then a full step with the slope found there (`_dpm_2_mid`'s numbers)."""
    x_2 = x + d * to_mid
    denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
    d_2 = to_d(x_2, sigma_mid, denoised_2)
    return x + d_2 * to_next


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """A sampler inspired by DPM-Solver-2 (Lu et al. 2022, arXiv:2206.00927) and Algorithm 2
    from Karras et al. (2022): midpoint steps in log sigma, Euler into sigma = 0."""
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    sigma_mid, to_mid, to_next = _dpm_2_mid(sigmas[:-1], sigmas[1:])  # without churn
    to_mid, to_next = to_mid.tolist(), to_next.tolist()
    for i in trange(len(sig) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, sig, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat,
                      "denoised": denoised})
        if sig[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)  # log(0) is undefined: Euler step
        elif s_churn > 0:
            x = _dpm_2_step(model, x, d, *_dpm_2_mid(sigma_hat, sigmas[i + 1]), s_in,
                            extra_args)
        else:
            x = _dpm_2_step(model, x, d, sigma_mid[i], to_mid[i], to_next[i], s_in, extra_args)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None, model_kind="ve"):
    """Ancestral sampling with DPM-Solver second-order steps (k-diffusion): a DPM-2 step down to
    sigma_down, then fresh noise of std sigma_up. eta=0 is `sample_dpm_2`.

    Deviation from k-diffusion: where sigma_down = 0 but sigma_{i+1} > 0 (only possible for
    eta > 1), k-diffusion adds no noise and leaves x at noise level 0; here the sigma_up noise is
    added as in every other ancestral step. For eta <= 1 the numbers are k-diffusion's.

    model_kind="flow" is ComfyUI's `sample_dpm_2_ancestral_RF`: the DPM-2 step goes down to the
    flow s_down of `_rf_step`, then x is rescaled and renoised as there (Euler, no noise, where
    s_down = 0).
    """
    check_model_kind(model_kind)
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    flow = model_kind == "flow"
    # The per-step numbers for the whole schedule at once (bit for bit the per-step 0-d
    # arithmetic: tests/test_reference_schedules.py); row i is step i.
    if flow:  # _rf_step reads sigmas[i] and sigmas[i + 1]: rows 0 and 1 here, all steps
        sigma_down, scale, renoise = _rf_step(torch.stack([sigmas[:-1], sigmas[1:]]), 0, eta)
        scale, renoise = scale.tolist(), renoise.tolist()
    else:
        sigma_down, sigma_up = get_ancestral_step(sigmas[:-1], sigmas[1:], eta=eta)
        sigma_up = sigma_up.tolist() if isinstance(sigma_up, torch.Tensor) else None
    sigma_mid, to_mid, to_down = _dpm_2_mid(sigmas[:-1], sigma_down)
    to_mid, to_down = to_mid.tolist(), to_down.tolist()
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if flow:
            sigma_down_host = _rf_down_host(sig, i, eta)
        else:
            sigma_down_host = get_ancestral_step(sig[i], sig[i + 1], eta=eta)[0]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        d = to_d(x, sigmas[i], denoised)
        if sigma_down_host == 0:
            x = x + d * to_down[i]  # log(0) is undefined: Euler step
        else:
            x = _dpm_2_step(model, x, d, sigma_mid[i], to_mid[i], to_down[i], s_in, extra_args)
            if flow and eta > 0:
                x = scale[i] * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise \
                    * renoise[i]
        if not flow and eta and sig[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up[i]
    return x


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                   s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun++ (ComfyUI's `sample_heunpp2`, from Carzit's sd-webui-samplers-scheduler, MIT):
    Euler predictors through sigma_{i+1} and sigma_{i+2} (3 model calls), then one step with the
    slope w1 d_i + w2 d_{i+1} + w3 d_{i+2}, w2 = sigma_{i+1} / (3 sigma_0), w3 = sigma_{i+2} /
    (3 sigma_0), w1 = 1 - w2 - w3; the second-to-last step is Heun-like with w2 = sigma_{i+1} /
    (2 sigma_0), the last an Euler step. Churn as EDM Algorithm 2 (`_churn`).

    Order 1: with d_k = d + d' (sigma_k - sigma_i) + O(h^2) the slope is
    d + d' dt (sigma_{i+1} + 2 sigma_{i+2}) / (3 sigma_0) + O(h^2), and second order needs that
    factor to be 1/2: it is sigma_i / sigma_0, not 1/2, except at one point of the run.
    (ComfyUI draws a normal sample every step even at s_churn = 0; none is drawn here.)
    """
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    s_end = sig[-1]
    # The per-step numbers for the whole schedule at once: bit for bit the per-step 0-d
    # arithmetic (tests/test_reference_schedules.py); dt only without churn (sigma_hat = sigma_i).
    step = (sigmas[1:] - sigmas[:-1]).tolist()
    w2_heun = (sigmas[1:] / (2 * sigmas[0])).tolist()
    w2, w3 = sigmas[1:-1] / (3 * sigmas[0]), sigmas[2:] / (3 * sigmas[0])
    w1, w2, w3 = (1 - w2 - w3).tolist(), w2.tolist(), w3.tolist()
    for i in trange(len(sig) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, sig, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat,
                      "denoised": denoised})
        dt = step[i] if s_churn <= 0 else sigmas[i + 1] - sigma_hat
        if sig[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
        if sig[i + 2] == s_end:
            x = x + (d * (1 - w2_heun[i]) + d_2 * w2_heun[i]) * dt
            continue
        x_3 = x_2 + d_2 * step[i + 1]
        d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **extra_args))
        x = x + (w1[i] * d + w2[i] * d_2 + w3[i] * d_3) * dt
    return x


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None,
                               ge_gamma=2.0, cfg_pp=False):
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models
    from an Optimization Perspective", ICML, arXiv:2306.04848, Algorithm 2; ComfyUI's
    `sample_gradient_estimation`): Euler with the slope d_i + (gamma - 1)(d_i - d_{i-1}) after
    the first step, x = D into sigma = 0.

    Order 1 (gamma != 1 changes the error constant, not the order): second order would need
    (gamma - 1)(sigma_{i-1} - sigma_i) = (sigma_i - sigma_{i+1}) / 2, which a fixed gamma meets
    on no usual grid (on a lambda-uniform grid the ratio of the two steps tends to 1, so gamma
    would have to be 3/2; it is 2 by default).

    cfg_pp: CFG++ (Chung et al. 2024, arXiv:2406.08070; ComfyUI's `gradient_estimation_cfg_pp`):
    the slopes d are the unconditional ones (x - D_u) / sigma and the Euler step lands at
    D + sigma' d (as `sample_euler`'s cfg_pp); D_u = D gives the base sampler.
    """
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    old_d = None
    for i in trange(len(sig) - 1, disable=disable):
        denoised, renoise = _denoise(model, x, sigmas[i] * s_in, extra_args, cfg_pp)
        d = to_d(x, sigmas[i], renoise)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        dt = sigmas[i + 1] - sigmas[i]
        if sig[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


_CFG_PP = "Chung et al. 2024, CFG++ (arXiv:2406.08070)"
SOLVERS = {
    "euler_cfg_pp": SolverInfo(sample_euler, order=1, nfe_per_step=1, stochastic=False,
                               paper=_CFG_PP + " on " + _KARRAS + ", Alg. 2 (Euler)",
                               kwargs={"cfg_pp": True}),
    "euler_ancestral_cfg_pp": SolverInfo(sample_euler_ancestral, order=1, nfe_per_step=1,
                                         stochastic=True, paper=_CFG_PP + ", ancestral Euler",
                                         kwargs={"cfg_pp": True},
                                         deterministic_kwargs={"eta": 0.0}),
    "euler": SolverInfo(sample_euler, order=1, nfe_per_step=1, stochastic=False,
                        paper=_KARRAS + ", Alg. 2 (Euler)"),
    "heun": SolverInfo(sample_heun, order=2, nfe_per_step=2, stochastic=False,
                       paper=_KARRAS + ", Alg. 2"),
    "dpm_2": SolverInfo(sample_dpm_2, order=2, nfe_per_step=2, stochastic=False,
                        paper="Lu et al. 2022, DPM-Solver-2 (arXiv:2206.00927) on " + _KARRAS),
    "euler_ancestral": SolverInfo(sample_euler_ancestral, order=1, nfe_per_step=1,
                                  stochastic=True, paper="Ho et al. 2020, DDPM (arXiv:2006.11239)"
                                  " ancestral step; " + _KARRAS,
                                  deterministic_kwargs={"eta": 0.0}),
    "dpm_2_ancestral": SolverInfo(sample_dpm_2_ancestral, order=2, nfe_per_step=2,
                                  stochastic=True,
                                  paper="Lu et al. 2022, DPM-Solver-2 (arXiv:2206.00927), "
                                  "ancestral (k-diffusion)",
                                  deterministic_kwargs={"eta": 0.0}),
    # ComfyUI's flow-model (CONST) variants: flow times s, model_kind="flow"
    "euler_ancestral_RF": SolverInfo(sample_euler_ancestral, order=1, nfe_per_step=1,
                                     stochastic=True, paper="ancestral Euler with flow renoising "
                                     "(ComfyUI's _RF); " + _KARRAS, param="flow",
                                     kwargs={"model_kind": "flow"},
                                     deterministic_kwargs={"eta": 0.0}),
    "dpm_2_ancestral_RF": SolverInfo(sample_dpm_2_ancestral, order=2, nfe_per_step=2,
                                     stochastic=True, paper="Lu et al. 2022, DPM-Solver-2 "
                                     "(arXiv:2206.00927), ancestral with flow renoising "
                                     "(ComfyUI's _RF)", param="flow",
                                     kwargs={"model_kind": "flow"},
                                     deterministic_kwargs={"eta": 0.0}),
    # CFG++ on flow models: the CONST branch of ComfyUI's euler(_ancestral)_cfg_pp
    "euler_cfg_pp_flow": SolverInfo(sample_euler, order=1, nfe_per_step=1, stochastic=False,
                                    param="flow",
                                    paper=_CFG_PP + ", Euler (DDIM) on the flow ODE (ComfyUI)",
                                    kwargs={"cfg_pp": True, "model_kind": "flow"}),
    "euler_ancestral_cfg_pp_flow": SolverInfo(sample_euler_ancestral, order=1, nfe_per_step=1,
                                              stochastic=True, param="flow",
                                              paper=_CFG_PP + ", ancestral Euler in VE "
                                              "variables of a flow model (ComfyUI)",
                                              kwargs={"cfg_pp": True, "model_kind": "flow"},
                                              deterministic_kwargs={"eta": 0.0}),
    "heunpp2": SolverInfo(sample_heunpp2, order=1, nfe_per_step=3, stochastic=False,
                          paper="Heun++ (Carzit, sd-webui-samplers-scheduler; ComfyUI)"),
    "gradient_estimation_cfg_pp": SolverInfo(sample_gradient_estimation, order=1,
                                             nfe_per_step=1, stochastic=False,
                                             paper=_CFG_PP + " on Permenter & Yuan 2024 "
                                             "(arXiv:2306.04848, Alg. 2)",
                                             kwargs={"cfg_pp": True}),
    "gradient_estimation": SolverInfo(sample_gradient_estimation, order=1, nfe_per_step=1,
                                      stochastic=False, paper="Permenter & Yuan 2024, gradient "
                                      "estimation (arXiv:2306.04848, Alg. 2)"),
}
