"""Linear multistep (Adams-Bashforth on a variable sigma grid) sampler, as k-diffusion's
`sample_lms`, with all step coefficients computed once per run.

Step i integrates the Lagrange polynomial through the last `m = min(i + 1, order)` derivatives
d_{i-j} = (x - D) / sigma at sigma_{i-j}:

    x_{i+1} = x_i + sum_j c_ij d_{i-j},   c_ij = int_{sigma_i}^{sigma_{i+1}} l_j(tau) dtau,
    l_j(tau) = prod_{k != j} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})

(Adams-Bashforth for nonuniform grids, e.g. Hairer, Norsett & Wanner, Solving ODEs I, III.5).
k-diffusion integrates each l_j per step with `scipy.integrate.quad`; l_j has degree m - 1 <= 3,
so an m-point Gauss-Legendre rule (exact to degree 2m - 1) gives the same integrals to float64
round-off, evaluated in the stable product form, with no scipy.

Convergence: the first steps of an order-k run use orders 1, 2, ..., k - 1 (no extra model
calls to start up), and the order-1 first step has a local error O(h^2), so the *global* error
of `order >= 2` is O(h^2) asymptotically, although for order 3, 4 its constant is small.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from tqdm.auto import trange

from ._utils import SolverInfo, to_d, validate_sigmas, validate_x

__all__ = ["sample_lms", "lms_coefficients", "linear_multistep_coeff"]


@functools.lru_cache(maxsize=8)
def _gauss_legendre(m: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's m-point rule, computed once per m (an eigenvalue problem: 0.2 ms a call, per step
    of a 1000-step plan otherwise)."""
    xi, w = np.polynomial.legendre.leggauss(m)
    xi.flags.writeable = w.flags.writeable = False
    return xi, w


def lms_coefficients(sigmas: list[float], order: int) -> list[list[float]]:
    """Returns, for each step i, the LMS weights [c_i0, c_i1, ...] (newest derivative first).

    Computed in float64 on the host: `m`-point Gauss-Legendre on [sigma_i, sigma_{i+1}] for the
    Lagrange basis of nodes sigma_i, sigma_{i-1}, ..., sigma_{i-m+1}.
    """
    t = np.asarray(sigmas, dtype=np.float64)
    coeffs = []
    for i in range(len(t) - 1):
        m = min(i + 1, order)
        nodes = t[i - np.arange(m)]  # sigma_i, sigma_{i-1}, ...
        xi, w = _gauss_legendre(m)
        h = t[i + 1] - t[i]
        tau = t[i] + 0.5 * h * (xi + 1.0)  # quadrature points in [sigma_i, sigma_{i+1}]
        row = []
        for j in range(m):
            others = np.delete(nodes, j)
            basis = np.prod((tau[:, None] - others) / (nodes[j] - others), axis=1)
            row.append(float(0.5 * h * np.dot(w, basis)))
        coeffs.append(row)
    return coeffs


def linear_multistep_coeff(order, t, i, j):
    """k-diffusion's per-step helper: the weight of d_{i-j} in LMS step i (exact, no scipy)."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")
    return lms_coefficients(list(np.asarray(t, dtype=np.float64)[: i + 2]), order)[i][j]


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4,
               denoise_final=False):
    """Linear multistep method of the given order (1-4) on the Karras ODE dx/dsigma =
    (x - D) / sigma (Karras et al. 2022, arXiv:2206.00364, eq. 3; k-diffusion's `sample_lms`).
    order=1 is `sample_euler`. Lower orders are used while history builds up.
    denoise_final: the step into sigma = 0 is x = D (ComfyUI's `sample_lms`), not the
    polynomial integrated to 0 (k-diffusion's)."""
    validate_x(x)
    sig = validate_sigmas(sigmas)
    if not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"order: expected an int in 1..4, got {order!r}")
    if order > 1 and any(b == a for a, b in zip(sig[:-2], sig[1:-1], strict=True)):
        raise ValueError("sigmas: sample_lms with order > 1 needs strictly decreasing sigmas")
    coeffs = lms_coefficients(sig, order)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    ds = []  # newest last; at most `order` entries
    for i in trange(len(sig) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        if denoise_final and sig[i + 1] == 0:
            x = denoised
        else:
            x = x + sum(c * d for c, d in zip(coeffs[i], reversed(ds), strict=True))
    return x


_PAPER = "Karras et al. 2022 (arXiv:2206.00364) ODE; Adams-Bashforth LMS (k-diffusion)"

SOLVERS = {
    "lms": SolverInfo(sample_lms, order=4, nfe_per_step=1, stochastic=False, paper=_PAPER,
                      kwargs={"order": 4}),
    "lms_2": SolverInfo(sample_lms, order=2, nfe_per_step=1, stochastic=False, paper=_PAPER,
                        kwargs={"order": 2}),
    "lms_3": SolverInfo(sample_lms, order=3, nfe_per_step=1, stochastic=False, paper=_PAPER,
                        kwargs={"order": 3}),
}
