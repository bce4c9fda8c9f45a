"""DEIS: diffusion exponential integrator sampler (Zhang & Chen 2023, arXiv:2204.13902).

k-diffusion (VE) convention: x = x0 + sigma * eps, the model is a denoiser D(x, sigma), and the
probability-flow ODE in the paper's time-rescaled variable rho (rho = sigma / alpha, which is
sigma itself in VE) is simply

    dx / drho = eps(x, rho),      eps = (x - D(x, rho)) / rho.

Multistep DEIS (rho-AB-DEIS) freezes eps as the polynomial through the last p values and
integrates it exactly: x_{i+1} = x_i + sum_j c_j eps_{i-j} with
c_j = int_{rho_i}^{rho_{i+1}} L_j drho, L_j the Lagrange basis. As diffusers'
DEISMultistepScheduler (algorithm_type 'deis', solver_type 'logrho') the polynomial is in
log(rho). With v = log(rho / rho_i) and nodes v_k = log(rho_{i-k} / rho_i) the weights are

    c_j = rho_i * int_0^delta e^v L_j(v) dv,      delta = log(rho_{i+1} / rho_i) < 0,

built from J_k = int_0^delta e^v v^k dv: J_0 = expm1(delta), J_k = delta^k e^delta - k J_{k-1}
(integration by parts). At rho_{i+1} = 0, delta = -inf and the limits J_k = (-1)^(k+1) k!
are finite, so DEIS needs no special last step. Order p: local error O(h^(p+1)).
The first steps (warm-up) use lower orders; their O(h^2) error term is taken at sigma_max where
eps is nearly constant, so it shows only for very many steps. Coefficients: host float64.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from ._utils import SolverInfo, validate_sigmas, validate_x

__all__ = ["sample_deis"]

_PAPER = "Zhang & Chen 2023, DEIS (arXiv:2204.13902), rho-AB-DEIS, log-rho (diffusers)"


def _exp_moments(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """J_k = int_0^delta e^v v^k dv, k = 0, 1, 2, delta = log(sigma_next / sigma)."""
    if sigma_next == 0:  # delta = -inf: e^delta delta^k -> 0
        return -1.0, 1.0, -2.0
    delta = math.log(sigma_next / sigma)
    e = sigma_next / sigma  # e^delta
    j0 = math.expm1(delta)
    j1 = delta * e - j0
    j2 = delta * delta * e - 2 * j1
    return j0, j1, j2


def deis_coefficients(sigma: float, sigma_next: float, past: list[float]) -> list[float]:
    """Weights c_j of eps at sigma, then at the `past` sigmas (newest first), order len(past)+1.

    The Lagrange basis in v = log(rho / sigma) on nodes 0, v_1, v_2, expanded in powers of v and
    integrated against e^v with `_exp_moments`.
    """
    j0, j1, j2 = _exp_moments(sigma, sigma_next)
    v = [math.log(s / sigma) for s in past]
    if len(v) == 0:
        c = [j0]
    elif len(v) == 1:
        (v1,) = v
        # L_0 = (v - v1) / (0 - v1), L_1 = v / v1
        c = [j0 - j1 / v1, j1 / v1]
    elif len(v) == 2:
        v1, v2 = v
        # L_0 = (v - v1)(v - v2) / (v1 v2), L_1 = v (v - v2) / (v1 (v1 - v2)),
        # L_2 = v (v - v1) / (v2 (v2 - v1))
        c = [(j2 - (v1 + v2) * j1 + v1 * v2 * j0) / (v1 * v2),
             (j2 - v2 * j1) / (v1 * (v1 - v2)),
             (j2 - v1 * j1) / (v2 * (v2 - v1))]
    else:
        raise ValueError(f"past: expected at most 2 earlier sigmas, got {len(v)}")
    return [sigma * c_j for c_j in c]


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3,
                lower_order_final=True):
    """Multistep DEIS of order 1-3 (Zhang & Chen 2023, arXiv:2204.13902, rho-AB-DEIS with the
    log-rho polynomial of diffusers' DEISMultistepScheduler); one model call per step.

    x_{i+1} = x_i + sum_j c_j eps_{i-j}, eps_k = (x_k - D(x_k, sigma_k)) / sigma_k, using
    min(order, i + 1) past values (warm-up). lower_order_final (as diffusers): with fewer than
    15 steps the last two steps use orders 1 and at most 2. order=1 is DDIM (= Euler in VE).
    """
    validate_x(x)
    sig = validate_sigmas(sigmas)
    if any(sig[k + 1] >= sig[k] for k in range(len(sig) - 1)):
        raise ValueError("sigmas: expected a strictly decreasing schedule")
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n = len(sig) - 1
    eps_history = []  # newest first
    for i in trange(n, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        eps_history = [(x - denoised) / sig[i]] + eps_history[: order - 1]
        p = min(order, i + 1)
        if lower_order_final and n < 15:
            p = min(p, n - i)
        coeffs = deis_coefficients(sig[i], sig[i + 1], [sig[i - k] for k in range(1, p)])
        for c_j, eps_j in zip(coeffs, eps_history[:p], strict=True):
            x = x + c_j * eps_j
    return x


SOLVERS = {
    f"deis_{p}": SolverInfo(sample_deis, order=p, nfe_per_step=1, stochastic=False,
                            paper=_PAPER, kwargs={"order": p, "lower_order_final": False})
    for p in (1, 2, 3)
}
