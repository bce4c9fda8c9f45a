"""UniPC: unified predictor-corrector (Zhao et al. 2023, arXiv:2302.04867), data-prediction form.

k-diffusion convention: x = x0 + sigma * eps, the model is a denoiser D(x, sigma) (UniPC's
x_theta with alpha = 1), lambda = -log(sigma). One step from lambda_s to lambda_t = lambda_s + h
with the p most recent denoisings m_0 = D(x_s), m_k = D at lambda_{s_k} (k = 1..p-1):

    r_k  = (lambda_{s_k} - lambda_s) / h,      D1_k = (m_k - m_0) / r_k
    UniP-p (predictor):  x_t = (sigma_t/sigma_s) x_s - expm1(-h) m_0 - B(h) sum_k a_k D1_k
    UniC-p (corrector):  x_t^c = (sigma_t/sigma_s) x_s - expm1(-h) m_0
                                  - B(h) (sum_k a^c_k D1_k + a^c_p (D(x_t) - m_0))

The weights a solve the order conditions R a = b with R_{jk} = r_k^(j-1) (r_p = 1 for the new
point) and b_j = j! (-h) phi_{j+1}(-h) / B(h), phi_{j+1}(z) = (phi_j(z) - 1/j!) / z, phi_1(z) =
(e^z - 1) / z; B(h) = -h ('bh1') or expm1(-h) ('bh2'). As in diffusers'
UniPCMultistepScheduler, UniP-2 uses a = [1/2] and UniC-1 a^c = [1/2] in closed form.

UniC re-uses the model call D(x_t) that the next step needs anyway, so UniPC-p costs one call per
step: UniP-p alone has order p, UniP-p + UniC-p has order p + 1 (the paper's main result). The
corrected x_t is the state carried on, while D is kept at the predicted x_t (there is no model
call at the corrected point). No corrector follows the last step (no model call there).
Warm-up: the first steps use lower orders (UniP-1 + UniC-1 first), whose O(h^3) error term is
taken at sigma_max where D is nearly constant in lambda, so it shows only for very many steps.
Coefficients are computed on the host in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import trange

from ._utils import SolverInfo, validate_sigmas, validate_x

__all__ = ["sample_unipc"]

_PAPER = "Zhao et al. 2023, UniPC (arXiv:2302.04867)"


def _b_of_h(h: float, variant: str) -> float:
    """B(h) in the data-prediction form (argument -h): bh1 = -h, bh2 = e^(-h) - 1."""
    return -h if variant == "bh1" else math.expm1(-h)


def unipc_weights(rks: list[float], h: float, variant: str, corrector: bool) -> list[float]:
    """The UniP / UniC weights a for relative nodes `rks` (the last one is 1, the new point).

    The order p is len(rks). Predictor: a solves the first p-1 order conditions on the p-1 past
    nodes (a = [1/2] for p = 2; empty for p = 1). Corrector: a solves all p conditions including
    the new point (a = [1/2] for p = 1).
    """
    p = len(rks)
    hh = -h  # data prediction integrates e^(lambda - lambda_t) over lambda: the phi's of -h
    b_h = _b_of_h(h, variant)
    b = []
    h_phi_k = math.expm1(hh) / hh - 1  # hh * phi_2(hh)
    factorial = 1
    for j in range(1, p + 1):
        b.append(h_phi_k * factorial / b_h)  # j! * hh * phi_{j+1}(hh) / B(h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = [[r ** (j - 1) for r in rks] for j in range(1, p + 1)]
    if not corrector:
        if p == 1:
            return []
        if p == 2:
            return [0.5]
        R, b = [row[:-1] for row in R[:-1]], b[:-1]
    elif p == 1:
        return [0.5]
    # numpy's LAPACK solve: a 3x3 system per step costs 20 us there, 85 us in torch
    return np.linalg.solve(np.array(R, dtype=np.float64), np.array(b, dtype=np.float64)).tolist()


def _unipc_update(x, m0, history, lambdas, h, sigma_ratio, variant, model_t=None):
    """x_t = (sigma_t/sigma_s) x - expm1(-h) m0 - B(h) * (sum_k a_k D1_k [+ a_p (model_t - m0)]).

    `history` holds the earlier denoisings m_1.. (newest first), `lambdas` their lambda minus
    lambda_s. With model_t this is UniC (order len(history) + 1), else UniP (len(history) + 1).
    """
    rks = [lam / h for lam in lambdas] + [1.0]
    a = unipc_weights(rks, h, variant, corrector=model_t is not None)
    x_t = sigma_ratio * x - math.expm1(-h) * m0
    res = 0
    for a_k, m_k, r_k in zip(a[: len(history)], history, rks[:-1], strict=True):
        res = res + a_k * (m_k - m0) / r_k
    if model_t is not None:
        res = res + a[-1] * (model_t - m0)
    if a:  # UniP-1 has no correction term
        x_t = x_t - _b_of_h(h, variant) * res
    return x_t


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2,
                 variant="bh2", use_corrector=True, lower_order_final=True):
    """UniPC-p (Zhao et al. 2023, arXiv:2302.04867): multistep UniP-p predictor with the UniC-p
    corrector, data prediction, B(h) variant 'bh1' or 'bh2'; one model call per step.

    Step i: evaluate D(x_i); if i > 0 and use_corrector, correct x_i with UniC (order of the
    previous predictor) using D(x_i); then predict x_{i+1} with UniP of order
    min(order, i + 1) (warm-up), and, with lower_order_final and fewer than 15 steps
    (lower_order_final="always": at every step count, as UniPC's code and ComfyUI's uni_pc),
    min(that, n - i) (the last step first order), which stabilises few-step sampling. The 15 is
    diffusers' documented rule for UniPC and the one its DPM-Solver and DEIS code applies;
    diffusers' UniPC code (0.42) lowers at every step count, which caps the global order at 2
    (a first-order last step into sigma_min > 0). Into sigma = 0 the step is always
    x_{i+1} = D(x_i), the h -> inf limit of UniP-1 (higher-order differences divide by h and
    degenerate). Order of accuracy: order + 1 with the corrector, order without.
    """
    validate_x(x)
    sig = validate_sigmas(sigmas)
    if any(sig[k + 1] >= sig[k] for k in range(len(sig) - 1)):
        raise ValueError("sigmas: expected a strictly decreasing schedule (lambda steps h > 0)")
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant: expected 'bh1' or 'bh2', got {variant!r}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    n = len(sig) - 1
    outputs = []  # denoisings at the grid points, newest first (at most `order`)
    x_last, order_last = None, 0
    for i in trange(n, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if use_corrector and i > 0:
            # UniC: re-do the last step x_last -> x_i with the new D(x_i) as an extra node.
            h = lam[i] - lam[i - 1]
            past = [lam[i - 1 - k] - lam[i - 1] for k in range(1, order_last)]
            x = _unipc_update(x_last, outputs[0], outputs[1:order_last], past, h,
                              sig[i] / sig[i - 1], variant, model_t=denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        outputs = [denoised] + outputs[: order - 1]
        if sig[i + 1] == 0:
            x = denoised
            continue
        p = min(order, i + 1)
        if lower_order_final == "always" or (lower_order_final and n < 15):
            p = min(p, n - i)
        h = lam[i + 1] - lam[i]
        past = [lam[i - k] - lam[i] for k in range(1, p)]
        x_last, order_last = x, p
        x = _unipc_update(x, denoised, outputs[1:p], past, h, sig[i + 1] / sig[i], variant)
    return x


def _entries():
    entries = {}
    for variant in ("bh1", "bh2"):
        for p in (1, 2, 3):
            # lower_order_final (default) only acts below 15 steps; off here so that few-step
            # plans are the main formula too. The step into sigma = 0 is first order regardless.
            kw = {"order": p, "variant": variant, "lower_order_final": False}
            entries[f"unipc_{variant}_{p}"] = SolverInfo(
                sample_unipc, order=p + 1, nfe_per_step=1, stochastic=False,
                paper=_PAPER + f", UniPC-{p} ({variant})", kwargs=kw)
            entries[f"unipc_{variant}_{p}_nc"] = SolverInfo(
                sample_unipc, order=p, nfe_per_step=1, stochastic=False,
                paper=_PAPER + f", UniP-{p} ({variant}, no corrector)",
                kwargs={**kw, "use_corrector": False})
    return entries


SOLVERS = _entries()
