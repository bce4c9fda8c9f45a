"""Pseudo numerical methods: PNDM / PLMS (Liu et al. 2022) and iPNDM (Zhang & Chen 2022).

Liu et al. 2022 (arXiv:2202.09778) split a step into a gradient part (an estimate eps' of the
noise) and a transfer part phi(x_t, eps', t, t - delta), eq. (9): the DDIM (eta = 0) step with
that eps'. In VE coordinates (x = x0 + sigma eps, k-diffusion convention) the transfer is linear,

    phi(x, eps', sigma, sigma_next) = x + (sigma_next - sigma) * eps',

because dx/dsigma = eps = (x - D(x, sigma)) / sigma is the probability-flow ODE. PLMS takes eps'
as the 4-step Adams-Bashforth combination of the eps at the last four grid points, eq. (12):

    eps' = (55 eps_i - 59 eps_{i-1} + 37 eps_{i-2} - 9 eps_{i-3}) / 24.

Convergence order, derived (and measured in tests/test_solvers_ddim.py). The fixed AB weights are
those of *equal* steps: on a grid uniform in sigma, eps' is the AB4 estimate of the mean of eps
over the step, exact for cubics, so the AB steps have local error O(h^5). On a grid that is
uniform in some other variable u (Karras, log-sigma, uniform-t VP), eps' estimates the mean of eps
over u instead of over sigma; the two differ by O(h^2), so the method is only 2nd order there.
After the AB part, the warm start bounds the global order (a fixed number of steps with local
error O(h^(p+1)) adds O(h^(p+1)) globally):
- warmup="prk" (original F-PNDM): 3 pseudo Runge-Kutta steps, RK4 with the transfer, eq. (13):
  order 4 on a uniform-in-sigma grid.
- warmup="plms" (diffusers' PNDMScheduler with skip_prk_steps=True, crowsonkb's PLMS): one
  pseudo improved-Euler step (2 NFE) then AB2, AB3: the AB2 step (local O(h^3)) makes it order 3.
- iPNDM: Euler, AB2, AB3 warm start (1 NFE each): the Euler step (local O(h^2)) makes it order 2,
  though its error constant is tiny when the first steps are at large sigma (eps barely varies).
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from ._utils import SolverInfo, validate_sigmas, validate_x

__all__ = ["sample_pndm", "sample_ipndm", "AB_WEIGHTS", "adams_bashforth", "transfer",
           "diff_sampler_weights"]

_PNDM = "Liu et al. 2022, PNDM (arXiv:2202.09778)"
_IPNDM = "Zhang & Chen 2022, DEIS (arXiv:2204.13902) iPNDM"

# Adams-Bashforth weights for equal steps, newest eps first (Liu et al. eq. 12 for order 4).
AB_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def transfer(x, eps, sigma: float, sigma_next: float):
    """PNDM eq. (9): the DDIM transfer of x from sigma to sigma_next along a given eps."""
    return x + (sigma_next - sigma) * eps


def adams_bashforth(history):
    """eps' from the eps at the last len(history) grid points (oldest first, newest last)."""
    weights = AB_WEIGHTS[len(history)]
    out = weights[0] * history[-1]
    for w, e in zip(weights[1:], reversed(history[:-1]), strict=True):
        out = out + w * e
    return out


def _setup(x, sigmas, extra_args):
    validate_x(x)
    sig = validate_sigmas(sigmas)
    if any(s <= 0 for s in sig[:-1]):
        raise ValueError("sigmas: expected positive values before the last one (only the final "
                         "sigma may be 0)")
    extra_args = {} if extra_args is None else extra_args
    return sig, extra_args, x.new_ones([x.shape[0]])


@torch.no_grad()
def sample_pndm(model, x, sigmas, extra_args=None, callback=None, disable=None, warmup="plms"):
    """PNDM / PLMS, Liu et al. 2022 (arXiv:2202.09778) Algorithm 2 (F-PNDM), in VE coordinates.

    warmup="plms" (default) matches diffusers' PNDMScheduler(skip_prk_steps=True): the first step
    is a pseudo improved-Euler step (eps' = (eps(x) + eps(phi(x, eps(x))) / 2, 2 NFE), then AB2,
    AB3 and AB4 (eq. 12) on the eps history: N + 1 NFE for N steps.
    warmup="prk" is the paper's F-PNDM: 3 pseudo RK4 steps (eq. 13; 4 NFE each, the half step at
    the sigma midpoint, where diffusers uses the timestep midpoint) then AB4: N + 9 NFE.
    A warm-up step that would have to evaluate the model at sigma = 0 falls back to AB with the
    history available (eps at sigma = 0 is undefined in the denoiser convention).

    Order 4 ("prk") / 3 ("plms") on a grid uniform in sigma; 2 on other spacings (module doc).
    """
    if warmup not in ("plms", "prk"):
        raise ValueError(f"warmup: expected 'plms' or 'prk', got {warmup!r}")
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    n_warmup = 1 if warmup == "plms" else 3

    def eps_at(x_, sigma_t, sigma_f):  # sigma as a device tensor for the model, host float here
        return (x_ - model(x_, sigma_t * s_in, **extra_args)) / sigma_f

    history = []  # eps at the grid points already passed, oldest first (at most 3 kept)
    for i in trange(len(sig) - 1, disable=disable):
        s, s_next = sig[i], sig[i + 1]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        eps = (x - denoised) / s
        if i < n_warmup and s_next > 0 and warmup == "plms":
            eps_pred = eps_at(transfer(x, eps, s, s_next), sigmas[i + 1], s_next)
            eps_prime = (eps + eps_pred) / 2
        elif i < n_warmup and s_next > 0:  # pseudo Runge-Kutta, eq. (13)
            s_mid, sigma_mid = (s + s_next) / 2, (sigmas[i] + sigmas[i + 1]) / 2
            e2 = eps_at(transfer(x, eps, s, s_mid), sigma_mid, s_mid)
            e3 = eps_at(transfer(x, e2, s, s_mid), sigma_mid, s_mid)
            e4 = eps_at(transfer(x, e3, s, s_next), sigmas[i + 1], s_next)
            eps_prime = (eps + 2 * e2 + 2 * e3 + e4) / 6
        else:  # pseudo linear multistep, eq. (12) (lower order while the history is short)
            eps_prime = adams_bashforth(history + [eps])
        history = (history + [eps])[-3:]
        x = transfer(x, eps_prime, s, s_next)
    return x


def diff_sampler_weights(sig: list[float], i: int, order: int) -> list[float]:
    """The variable-step iPNDM weights of diff-sampler (Zhou et al. 2024, github.com/zju-pi/
    diff-sampler, Apache-2.0; ComfyUI's `sample_ipndm_v`), newest derivative first, step size
    included. Their order-3 and order-4 closed forms group `(1 - a * b) / 2` where the
    Adams-Bashforth integral has `(1 - a) / 2 * b` (a = h / (3 (h + h_1)), b = h (h + h_1) /
    (h_1 (h_1 + h_2))): the two differ by (1 - b) / 2 times the second divided difference. On
    equal steps b = 1 (exact); on a log-uniform grid b = 1 + O(h) with a small constant, a
    local error O(h^4): order 3, not 4, on a log-uniform grid (measured 2.96 at N = 1024-2048);
    on a Karras grid (rho = 7, 80 -> 0.05) measured 1.8-1.9 at N = 256-1024, i.e. order 2.
    Kept as written for ComfyUI's numbers; `weights="variable"` is the exact variable-step
    method (order 4)."""
    t = sig
    h = t[i + 1] - t[i]
    if order == 1:
        return [h]
    h1 = t[i] - t[i - 1]
    if order == 2:
        return [h * (2 + h / h1) / 2, -h * (h / h1) / 2]
    h2 = t[i - 1] - t[i - 2]
    temp1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [h * ((2 + h / h1) / 2 + temp1), h * (-(h / h1) / 2 - (1 + h1 / h2) * temp1),
                h * temp1 * h1 / h2]
    h3 = t[i - 2] - t[i - 3]
    temp2 = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) \
        * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [h * ((2 + h / h1) / 2 + temp1 + temp2),
            h * (-(h / h1) / 2 - (1 + h1 / h2) * temp1 - (1 + h1 / h2 + q) * temp2),
            h * (temp1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * temp2),
            h * -temp2 * q * h1 / h2]


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4,
                 weights="fixed", denoise_final=False):
    """Improved PNDM, Zhang & Chen 2022 (DEIS, arXiv:2204.13902, Sec. 4 / App.): PLMS whose
    warm start uses lower-order Adams-Bashforth steps instead of Runge-Kutta, so every step costs
    one NFE: orders 1, 2, 3, 4 on dx/dsigma = (x - D) / sigma.

    weights: "fixed" (default; k-diffusion master's `sample_ipndm`): the equal-step AB weights
    (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24: order 2 in general (the Euler first
    step; module doc). "variable": the Adams-Bashforth weights of the actual steps (the integral
    of the Lagrange polynomial through the last derivatives, `lms.lms_coefficients`): iPNDM-v,
    order `max_order` from the main formula. "diff_sampler": diff-sampler's / ComfyUI's closed
    form of iPNDM-v (`diff_sampler_weights`: order 3 log-uniform, 2 on Karras grids).
    denoise_final: the step into sigma = 0 is x = D (ComfyUI) instead of the AB step.
    """
    if max_order not in AB_WEIGHTS:
        raise ValueError(f"max_order: expected 1, 2, 3 or 4, got {max_order!r}")
    if weights not in ("fixed", "variable", "diff_sampler"):
        raise ValueError(f"weights: expected 'fixed', 'variable' or 'diff_sampler', got "
                         f"{weights!r}")
    sig, extra_args, s_in = _setup(x, sigmas, extra_args)
    if weights == "variable":
        from .lms import lms_coefficients

        variable = lms_coefficients(sig, max_order)
    history = []  # derivatives at the grid points already passed, oldest first
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        d = (x - denoised) / sig[i]
        history = (history + [d])[-max_order:]
        if denoise_final and sig[i + 1] == 0:
            x = denoised
        elif weights == "fixed":
            x = transfer(x, adams_bashforth(history), sig[i], sig[i + 1])
        else:
            w = variable[i] if weights == "variable" else \
                diff_sampler_weights(sig, i, len(history))
            for w_j, d_j in zip(w, reversed(history), strict=True):
                x = x + w_j * d_j
    return x


_UNIFORM = "order holds on a grid uniform in sigma; fixed AB weights give order 2 on others"

SOLVERS = {
    # PLMS (diffusers PNDMScheduler, skip_prk_steps=True); N + 1 NFE for N steps. Order 3:
    # bounded by the warm-up (module doc); needs a uniform-in-sigma grid (else 2).
    "plms": SolverInfo(fn=sample_pndm, order=3, nfe_per_step=1, stochastic=False,
                       paper=_PNDM + " eq. 12; " + _UNIFORM, kwargs={"warmup": "plms"}),
    # F-PNDM with pseudo-RK4 warm-up; N + 9 NFE for N >= 3 steps; order 4 on uniform sigma.
    "pndm": SolverInfo(fn=sample_pndm, order=4, nfe_per_step=1, stochastic=False,
                       paper=_PNDM + " Alg. 2; " + _UNIFORM, kwargs={"warmup": "prk"}),
    # Euler warm start bounds the order to 2 on every grid (module doc).
    "ipndm": SolverInfo(fn=sample_ipndm, order=2, nfe_per_step=1, stochastic=False,
                        paper=_IPNDM),
    # the variable-step AB weights: order 4 from the main formula (warm-up as ipndm's)
    "ipndm_v": SolverInfo(fn=sample_ipndm, order=4, nfe_per_step=1, stochastic=False,
                          paper=_IPNDM + ", variable-step (iPNDM-v)",
                          kwargs={"weights": "variable"}),
    # ComfyUI's ipndm_v numbers (diff-sampler's closed form): order 3 on graded grids
    "ipndm_v_comfyui": SolverInfo(fn=sample_ipndm, order=3, nfe_per_step=1, stochastic=False,
                                  paper=_IPNDM + ", variable-step, diff-sampler's closed form",
                                  kwargs={"weights": "diff_sampler"}),
}
