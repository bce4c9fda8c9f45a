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

import contextlib
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


# torch splits elementwise ops of more than 32768 elements over its threads, and exp / sqrt of
# more than ~100; on a busy 2-core machine each such call can wait ~1 ms for a descheduled thread
# (the per-step quadrature took 3 s at 1000 steps under load 3, any chunking 0.8 s at load 6).
# The quadrature is tiny ops on 3 steps at a time, so it runs on one thread (`_one_thread`); its
# values do not depend on that (tests/test_deis_tab.py checks 1 against 2 threads).
_BLOCK_ELEMENTS = 32768
_ONE = torch.tensor(1.0, dtype=torch.float64)


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads set to 1 for the block, then restored. (Another Python thread's
    torch ops in the meantime also get one thread: slower, never different.)"""
    saved = torch.get_num_threads()
    if saved > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if saved > 1:
            torch.set_num_threads(saved)


def _tab_block(taus, nodes, beta_0, beta_d, work, out):
    """diff-sampler's rectangle rule for a block of steps of one order: taus [R, n_quad] the
    quadrature points, nodes[k] [R, 1] the node t_{i-k}, work [order + 3 + max(0, order - 4),
    R', n_quad] scratch (R' >= R); the sums sum(f prod_{k != j} (tau - t_k)) into out [R, order],
    which the caller scales to the weights. Per step (tests/test_deis_tab.py: bit for bit a
    per-step loop of these operations, within 1e-13 of diff-sampler's own arithmetic)
    u = tau (-beta_d / 2) - beta_0,   alpha = exp(u tau),
    f = (u + beta_0 / 2) / sqrt(alpha (1 - alpha)),
    weight_j = sum(f prod_{k != j} (tau - t_k)) * (-dt / prod_{k != j} (t_j - t_k)):
    log(alpha) = u tau, so diff-sampler's integrand -dlog(alpha)/dtau / (2 sqrt(alpha (1 - alpha)))
    is -f (u is formed once for both; its sign and factor go into the one number per weight);
    the Lagrange basis' denominator is one number per (step, j), so a point costs no division
    but the integrand's one. The products run over k ascending; f (tau - t_0) ... (tau - t_{m-1})
    is shared by every j >= m, so it is formed once (in the buffers of tau - t_0 and alpha,
    which are no longer read by then)."""
    order = len(nodes)
    alpha, f, poly, *rest = work[:, :len(taus)].unbind()
    diffs = rest[:order]
    torch.mul(taus, -0.5 * beta_d, out=f).sub_(beta_0)  # u
    torch.mul(f, taus, out=alpha).exp_()
    f.add_(0.5 * beta_0).div_(torch.sub(_ONE, alpha, out=poly).mul_(alpha).sqrt_())
    for k in range(order):
        torch.sub(taus, nodes[k], out=diffs[k])
    # prefix[m] = f (tau - t_0) ... (tau - t_{m-1}); prefix[order - 1] only goes into a sum.
    store = [diffs[0], alpha, *rest[order:]]
    prefix = [f]
    for m in range(1, order - 1):
        prefix.append(torch.mul(prefix[m - 1], diffs[m - 1], out=store[m - 1]))
    for j in range(order - 1, -1, -1):
        if j == order - 1:
            src = torch.mul(prefix[j - 1], diffs[j - 1], out=poly)
        else:
            src = prefix[j]
            for k in range(j + 1, order):
                src = torch.mul(src, diffs[k], out=poly)
        torch.sum(src, dim=1, out=out[:, j])


def tab_coefficients(sig: list[float], max_order: int, n_quad: int = 10000,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, eps_s: float = 1e-3
                     ) -> list[list[float]]:
    """diff-sampler's 'tab' DEIS weights (Zhou et al., github.com/zju-pi/diff-sampler,
    Apache-2.0; ComfyUI's `deis`): time-AB DEIS in the VP time t of a linear-beta VP SDE fitted
    to the EDM range [sigma_min, sigma_max] (t(sigma_max) = 1, t(sigma_min) = eps_s), eps
    extrapolated by the Lagrange polynomial in t and integrated against
    -d log(alpha)/dt / (2 sqrt(alpha (1 - alpha))) by diff-sampler's rectangle rule on n_quad
    points (its numbers, not an exact integral). Row i: weights of eps_i, eps_{i-1}, ...; empty
    for a first-order (Euler in sigma) step. Computed a block of steps at a time (`_tab_block`,
    bit for bit a per-step loop of its arithmetic; 1000 steps are 10^7 quadrature points), with
    the Lagrange denominators divided out once per weight where diff-sampler divides per point
    (round-off apart: measured within 1.7e-15 relative, tests/test_deis_tab.py)."""
    t = torch.tensor(sig, dtype=torch.float64)
    lo, hi = math.log(sigma_min**2 + 1), math.log(sigma_max**2 + 1)
    beta_d = 2 * (lo / eps_s - hi) / (eps_s - 1)
    beta_0 = hi - 0.5 * beta_d
    t = ((beta_0**2 + 2 * beta_d * (t**2 + 1).log()).sqrt() - beta_0) / beta_d
    t_host = t.tolist()
    n = len(sig) - 1
    rows: list[list[float]] = [[] for _ in range(n)]
    block = max(1, _BLOCK_ELEMENTS // n_quad)
    taus = torch.empty(block, n_quad, dtype=torch.float64)
    work = torch.empty(max_order + 3 + max(0, max_order - 4), block, n_quad, dtype=torch.float64)
    with _one_thread():
        for order in range(2, max_order + 1):
            steps = [i for i in range(n) if min(i + 1, max_order) == order]
            if not steps:
                continue
            ii = torch.tensor(steps)
            nodes = [t[ii - k][:, None] for k in range(order)]
            neg_dt = (t[ii] - t[ii + 1]) / n_quad
            scale = torch.empty(len(steps), order, dtype=torch.float64)
            for j in range(order):  # -dt / prod_{k != j} (t_j - t_k), k ascending
                denominator = None
                for k in range(order):
                    if k != j:
                        diff = t[ii - j] - t[ii - k]
                        denominator = diff if denominator is None else denominator * diff
                torch.div(neg_dt, denominator, out=scale[:, j])
            weights = torch.empty(len(steps), order, dtype=torch.float64)
            for start in range(0, len(steps), block):
                part = slice(start, start + block)
                for r, i in enumerate(steps[part]):
                    torch.linspace(t_host[i], t_host[i + 1], n_quad, dtype=torch.float64,
                                   out=taus[r])
                _tab_block(taus[:len(steps[part])], [v[part] for v in nodes], beta_0, beta_d,
                           work, weights[part])
            weights.mul_(scale)
            for i, row in zip(steps, weights.tolist(), strict=True):
                rows[i] = row
    return rows


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3,
                lower_order_final=True, deis_mode="logrho"):
    """Multistep DEIS of order 1-3 (Zhang & Chen 2023, arXiv:2204.13902, rho-AB-DEIS with the
    log-rho polynomial of diffusers' DEISMultistepScheduler); one model call per step.

    x_{i+1} = x_i + sum_j c_j eps_{i-j}, eps_k = (x_k - D(x_k, sigma_k)) / sigma_k, using
    min(order, i + 1) past values (warm-up). lower_order_final (as diffusers): with fewer than
    15 steps the last two steps use orders 1 and at most 2. order=1 is DDIM (= Euler in VE).
    deis_mode="tab": ComfyUI's `deis` (`tab_coefficients`: diff-sampler's time-AB DEIS, no
    lower_order_final, an Euler step in sigma first and into sigma = 0).
    """
    if deis_mode == "tab":
        return _sample_deis_tab(model, x, sigmas, extra_args, callback, disable, order)
    if deis_mode != "logrho":
        raise ValueError(f"deis_mode: expected 'logrho' or 'tab', got {deis_mode!r}")
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


def _sample_deis_tab(model, x, sigmas, extra_args, callback, disable, max_order):
    validate_x(x)
    sig = validate_sigmas(sigmas)
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f"order: expected 1..4 with deis_mode='tab', got {max_order!r}")
    coeffs = tab_coefficients(sig, max_order)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    history = []  # eps, newest first
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        history = [(x - denoised) / sig[i]] + history[: max_order - 1]
        if sig[i + 1] <= 0 or not coeffs[i]:
            x = x + (sig[i + 1] - sig[i]) * history[0]
        else:
            for c_j, eps_j in zip(coeffs[i], history, strict=False):
                x = x + c_j * eps_j
    return x


SOLVERS = {
    f"deis_{p}": SolverInfo(sample_deis, order=p, nfe_per_step=1, stochastic=False,
                            paper=_PAPER, kwargs={"order": p, "lower_order_final": False})
    for p in (1, 2, 3)
}
SOLVERS["deis_tab"] = SolverInfo(sample_deis, order=3, nfe_per_step=1, stochastic=False,
                                 paper="Zhang & Chen 2023, DEIS (arXiv:2204.13902), t-AB-DEIS "
                                 "('tab', diff-sampler; ComfyUI)",
                                 kwargs={"order": 3, "deis_mode": "tab"})
