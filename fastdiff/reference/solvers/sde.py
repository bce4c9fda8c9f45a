"""Exponential SDE samplers in data prediction: ER-SDE-Solver-3 and SEEDS-3, and the registry
entries of the stochastic SEEDS-2 family (`exponential.sample_seeds_2`: seeds_2 and, at r = 1,
the stochastic exponential Heun), with ComfyUI's names, options and numbers.

Both families integrate the reverse SDE in half log-SNR lambda = log(alpha / sigma) with the
data prediction D frozen or interpolated over a step. The model kind is an explicit input
(`model_kind`), as ComfyUI branches on `isinstance(model_sampling, CONST)`:
  - "ve" (k-diffusion sigma, x = x0 + sigma eps; EPS / V / EDM models): alpha = 1,
    lambda = -log(sigma);
  - "flow" (rectified flow, x_s = (1 - s) x0 + s eps, s in [0, 1]; ComfyUI's CONST: Flux, SD3,
    Wan): alpha = 1 - s, lambda = log((1 - s) / s). s = 1 has lambda = -inf, so a first
    s >= 1 is moved to `first_sigma` (ComfyUI: the model's percent_to_sigma(1e-4), 1 - 1e-4
    for an unshifted flow), where the model is also called.
All coefficients are host float64 (one set per plan), so the step is linear in x, D and noise.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from . import _dpmpp_common
from ._utils import (
    SolverInfo,
    check_model_kind,
    default_noise_sampler,
    offset_first_sigma,
)
from .exponential import sample_seeds_2

__all__ = ["sample_er_sde", "sample_seeds_3", "er_sde_noise_scaler", "ode_noise_scaler"]

_ER_SDE = "Cui et al. 2023, ER-SDE-Solver-3 (arXiv:2309.06169)"
_SEEDS = "Gonzalez et al. 2023, SEEDS (arXiv:2305.14267, NeurIPS 2023)"


def half_log_snr(sigma: float, model_kind: str) -> float:
    """lambda = log(alpha / sigma): -log(sigma) (ve), log((1 - s) / s) (flow); +inf at 0."""
    if sigma == 0:
        return math.inf
    return math.log((1 - sigma) / sigma) if model_kind == "flow" else -math.log(sigma)


def sigma_of_half_log_snr(lam: float, model_kind: str) -> float:
    """The inverse of `half_log_snr`: exp(-lambda) (ve), 1 / (1 + exp(lambda)) (flow)."""
    if model_kind == "flow":
        return 1.0 / (1.0 + math.exp(lam)) if lam < 700 else math.exp(-lam)
    return math.exp(-lam)


def _setup(x, sigmas, extra_args, model_kind, first_sigma):
    """`_dpmpp_common._setup`'s checked inputs with a first flow time >= 1 moved (as ComfyUI);
    also the sigmas tensor the model is called with."""
    sig, extra_args, s_in = _dpmpp_common._setup(x, sigmas, extra_args)
    check_model_kind(model_kind)
    if model_kind == "flow" and sig[0] > 1:
        raise ValueError(f"sigmas: flow times must lie in [0, 1], got first value {sig[0]}")
    sigmas, moved = offset_first_sigma(sigmas, sig, model_kind, first_sigma)
    if moved is not sig:
        _dpmpp_common._check_decreasing(moved)  # the moved time must stay above the next one
    return moved, sigmas, extra_args, s_in


def _callback(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


# --- ER-SDE-Solver-3 ---------------------------------------------------------------------------

def er_sde_noise_scaler(x):
    """The default noise scaler of ER-SDE-Solver (the authors' code and ComfyUI):
    h(lambda) = lambda (exp(lambda^0.3) + 10)."""
    return x * ((x ** 0.3).exp() + 10.0)


def ode_noise_scaler(x):
    """h(lambda) = lambda: the ER-SDE with zero noise, i.e. the probability-flow ODE
    (arXiv:2309.06169, Sec. 3.2); with s_noise = 0 the solver is then an ODE solver."""
    return x


N_INTEGRATION_POINTS = 200  # ComfyUI's rectangle rule for the noise-scaler integrals


def _er_integrals(noise_scaler, lam_s: float, lam_t: float, integral: str
                  ) -> tuple[float, float]:
    """int 1/h and int (v - lam_s)/h dv from lam_t up to lam_s (er-lambda time), in float64
    (once per plan): ComfyUI's 200-point left rectangle rule from lam_t ("rectangle"), or
    32-point Gauss-Legendre ("exact": to float64 accuracy for a smooth scaler)."""
    if integral == "rectangle":
        step = -(lam_t - lam_s) / N_INTEGRATION_POINTS
        pos = lam_t + torch.arange(N_INTEGRATION_POINTS, dtype=torch.float64) * step
        weights = torch.full_like(pos, step)
    else:
        import numpy as np

        nodes, w = np.polynomial.legendre.leggauss(32)
        half = (lam_s - lam_t) / 2
        pos = torch.from_numpy(lam_t + half * (nodes + 1))
        weights = torch.from_numpy(half * w)
    scaled = noise_scaler(pos)
    return (float((weights / scaled).sum()), float((weights * (pos - lam_s) / scaled).sum()))


def _scale(noise_scaler, v: float) -> float:
    return float(noise_scaler(torch.tensor(v, dtype=torch.float64)))


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                  noise_sampler=None, noise_scaler=None, max_stage=3, model_kind="ve",
                  first_sigma=1 - 1e-4, integral="rectangle"):
    """Extended reverse-time SDE solver, VP ER-SDE-Solver-3 (Cui et al. 2023, arXiv:2309.06169,
    Algorithm 3 in data prediction; the authors' code and ComfyUI's `er_sde`).

    In er-lambda time l = sigma / alpha with a noise scaler h(l) (`noise_scaler`), one model
    call per step:

        x' = (alpha'/alpha) (h(l')/h(l)) x + alpha' (1 - h(l')/h(l)) D
             + alpha' (l' - l + h(l') int_l'^l dv/h(v)) D'                    (stage 2)
             + alpha' ((l' - l)^2/2 + h(l') int_l'^l (v - l)/h(v) dv) D''     (stage 3)
             + alpha' sqrt(l'^2 - l^2 (h(l')/h(l))^2) s_noise z,

    D', D'' backward divided differences in l of the last three denoisings (the stages are
    used as they become available, up to `max_stage`). The integrals are computed in float64 at
    plan time: by ComfyUI's 200-point rectangle rule (`integral="rectangle"`, ComfyUI's
    numbers) or exactly ("exact", Gauss-Legendre). The rule's error in the stage-2/3 weights is
    a fixed fraction (~1/400) of those O(h^2) weights, so with it the solver is asymptotically
    first order (measured 1.65 at 128-512 steps, tests/test_convergence.py's grid). With exact
    integrals it is second order, not third: D' is the plain backward difference
    (D - D_prev) / (l - l_prev), whose O(h) error times the O(h^2) stage-2 weight is an O(h^3)
    local error that the stage-3 term (D'' times O(h^3)) does not cancel (measured 2.05; the
    authors' code and ComfyUI use this D'). `noise_scaler=ode_noise_scaler` (h(l) = l) has no
    noise and is an ODE solver. Into sigma = 0: x' = D.
    """
    if integral not in ("rectangle", "exact"):
        raise ValueError(f"integral: expected 'rectangle' or 'exact', got {integral!r}")
    if max_stage not in (1, 2, 3):
        raise ValueError(f"max_stage: expected 1, 2 or 3, got {max_stage!r}")
    noise_scaler = er_sde_noise_scaler if noise_scaler is None else noise_scaler
    if not callable(noise_scaler):
        raise TypeError(f"noise_scaler: expected a callable, got {type(noise_scaler).__name__}")
    sig, sigmas, extra_args, s_in = _setup(x, sigmas, extra_args, model_kind, first_sigma)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    er = [math.exp(-half_log_snr(s, model_kind)) for s in sig]  # l = sigma / alpha
    old_denoised = old_denoised_d = None
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        if sig[i + 1] == 0:
            x = denoised
        else:
            l_s, l_t = er[i], er[i + 1]
            alpha_s, alpha_t = sig[i] / l_s, sig[i + 1] / l_t
            h_t = _scale(noise_scaler, l_t)
            r = h_t / _scale(noise_scaler, l_s)
            x = (alpha_t / alpha_s * r) * x + (alpha_t * (1 - r)) * denoised
            if stage >= 2:
                dt = l_t - l_s
                s_1, s_u = _er_integrals(noise_scaler, l_s, l_t, integral)
                denoised_d = (denoised - old_denoised) / (l_s - er[i - 1])
                x = x + (alpha_t * (dt + s_1 * h_t)) * denoised_d
                if stage >= 3:
                    denoised_u = (denoised_d - old_denoised_d) / ((l_s - er[i - 2]) / 2)
                    x = x + (alpha_t * (dt**2 / 2 + s_u * h_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                var = l_t**2 - l_s**2 * r**2
                std = math.sqrt(var) if var > 0 else 0.0  # ComfyUI: sqrt(.).nan_to_num(0)
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (alpha_t * s_noise * std)
        old_denoised = denoised
    return x


# --- SEEDS --------------------------------------------------------------------------------------

def _ei_phis(h: float) -> tuple[float, float]:
    """(h phi_1(h), h phi_2(h)) = (expm1(h), (expm1(h) - h) / h): the exponential-integrator
    weights in SEEDS' notation, one expm1 for both."""
    phi_1 = math.expm1(h)
    return phi_1, (phi_1 - h) / h


def _node(lam_s: float, h: float, r: float, model_kind: str) -> tuple[float, float]:
    """(sigma, alpha) at lambda_s + r h of a step of h in half log-SNR (torch.lerp's formula
    lam_s + r (lam_t - lam_s), as ComfyUI)."""
    lam = lam_s + r * h
    sigma = sigma_of_half_log_snr(lam, model_kind)
    return sigma, sigma * math.exp(lam)


def _seeds_noise(noise, factor, sigma_a, sigma_b, noise_sampler):
    """The SEEDS noise carried to the next node: noise e^f + sqrt(1 - e^(2f)) z(a, b)."""
    fresh = noise_sampler(sigma_a, sigma_b) * math.sqrt(-math.expm1(2 * factor))
    return fresh if noise is None else noise * math.exp(factor) + fresh


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                   s_noise=1.0, noise_sampler=None, r_1=1 / 3, r_2=2 / 3, model_kind="ve",
                   first_sigma=1 - 1e-4):
    """SEEDS-3 (Gonzalez et al. 2023, arXiv:2305.14267, VP data prediction, 3 stages; ComfyUI's
    `seeds_3`): nodes at r_1 h and r_2 h in lambda,

        u_1 = (sigma_1/sigma) e^(-r_1 h eta) x - alpha_1 expm1(-r_1 h_eta) D + sigma_1 n_1
        u_2 = (sigma_2/sigma) e^(-r_2 h eta) x - alpha_2 (a1 D + a2 D(u_1)) + sigma_2 n_2,
              a2 = (r_2/r_1) h phi_2(-r_2 h_eta), a1 = expm1(-r_2 h_eta) - a2
        x'  = (sigma'/sigma) e^(-h eta) x - alpha' (b1 D + b3 D(u_2)) + sigma' n',
              b3 = h phi_2(-h_eta) / r_2, b1 = expm1(-h_eta) - b3,

    with the noise continued along one path between the nodes (n' = n e^f + sqrt(1 - e^(2f)) z
    for the step f = (r_a - r_b) h eta between nodes; times s_noise). eta = 0 is DPM-Solver-3
    in data prediction (order 3 with r_2 = 2/3).
    """
    if not 0 < r_1 < r_2 < 1:
        raise ValueError(f"r_1, r_2: expected 0 < r_1 < r_2 < 1, got r_1={r_1}, r_2={r_2}")
    _dpmpp_common._check_eta(eta)
    sig, sigmas, extra_args, s_in = _setup(x, sigmas, extra_args, model_kind, first_sigma)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    inject = eta > 0 and s_noise > 0
    # Each lambda once per schedule (a step's lambda_t is the next one's lambda_s), and the
    # step's constants once per step: the same float operations as written out per use, so the
    # same bits (a plan traces this loop, ~20 host operations a model call).
    lams = [half_log_snr(s, model_kind) for s in sig]
    eta_1, r_21 = eta + 1, r_2 / r_1
    for i in trange(len(sig) - 1, disable=disable):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        _callback(callback, x, i, sigma, denoised)
        sigma_s, sigma_t = sig[i], sig[i + 1]
        if sigma_t == 0:
            x = denoised
            continue
        lam_s, lam_t = lams[i], lams[i + 1]
        h = lam_t - lam_s
        h_eta = h * eta_1
        (sigma_1, alpha_1), (sigma_2, alpha_2) = (_node(lam_s, h, r_1, model_kind),
                                                  _node(lam_s, h, r_2, model_kind))
        alpha_t = sigma_t * math.exp(lam_t)
        f_1 = -r_1 * h * eta  # the noise decay to node 1, e^f_1
        x_2 = (sigma_1 / sigma_s * math.exp(f_1)) * x \
            - (alpha_1 * math.expm1(-r_1 * h_eta)) * denoised
        noise = None
        if inject:
            noise = _seeds_noise(None, f_1, sigma, sigma_1, noise_sampler)
            x_2 = x_2 + noise * (sigma_1 * s_noise)
        denoised_2 = model(x_2, sigma_1 * s_in, **extra_args)
        phi_1, phi_2 = _ei_phis(-r_2 * h_eta)
        a2 = r_21 * phi_2
        a1 = phi_1 - a2
        x_3 = (sigma_2 / sigma_s * math.exp(-r_2 * h * eta)) * x \
            - alpha_2 * (a1 * denoised + a2 * denoised_2)
        if inject:
            noise = _seeds_noise(noise, (r_1 - r_2) * h * eta, sigma_1, sigma_2, noise_sampler)
            x_3 = x_3 + noise * (sigma_2 * s_noise)
        denoised_3 = model(x_3, sigma_2 * s_in, **extra_args)
        phi_1, phi_2 = _ei_phis(-h_eta)
        b3 = phi_2 / r_2
        b1 = phi_1 - b3
        x = (sigma_t / sigma_s * math.exp(-h * eta)) * x \
            - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            noise = _seeds_noise(noise, (r_2 - 1) * h * eta, sigma_2, sigmas[i + 1],
                                 noise_sampler)
            x = x + noise * (sigma_t * s_noise)
    return x


def _entries(name, fn, order, nfe, paper, kwargs=None, deterministic=None):
    """The VE entry and its flow-model twin (`<name>_flow`: ComfyUI's CONST branch)."""
    kwargs = kwargs or {}
    return {
        name: SolverInfo(fn, order=order, nfe_per_step=nfe, stochastic=True, paper=paper,
                         kwargs=kwargs, deterministic_kwargs=deterministic or {}),
        # no ODE order on the flow grid from s = 1: the moved first time is an O(1e-4) offset
        name + "_flow": SolverInfo(fn, order=order, nfe_per_step=nfe, stochastic=True,
                                   paper=paper + ", flow (CONST) branch",
                                   kwargs={**kwargs, "model_kind": "flow"}, param="flow"),
    }


_ETA0 = {"eta": 0.0}
SOLVERS = {
    # order 2: the ODE (h(l) = l) with exact integrals (see sample_er_sde)
    **_entries("er_sde", sample_er_sde, 2, 1, _ER_SDE,
               deterministic={"noise_scaler": ode_noise_scaler, "s_noise": 0.0,
                              "integral": "exact"}),
    **_entries("seeds_2", sample_seeds_2, 2, 2, _SEEDS + ", SEEDS-2", deterministic=_ETA0),
    **_entries("seeds_3", sample_seeds_3, 3, 3, _SEEDS + ", SEEDS-3", deterministic=_ETA0),
    **_entries("exp_heun_2_x0_sde", sample_seeds_2, 2, 2,
               _SEEDS + ", exponential Heun (SEEDS-2, r = 1)",
               kwargs={"r": 1.0, "solver_type": "phi_2"}, deterministic=_ETA0),
}
