"""SA-Solver: stochastic Adams predictor-corrector in data prediction (Xue et al., "SA-Solver:
Stochastic Adams Solver for Fast Sampling of Diffusion Models", NeurIPS 2023, arXiv:2309.05019),
with ComfyUI's option names, defaults and step logic (`sa_solver`, `sa_solver_pece`; read, not
copied: GPL-3.0).

The reverse SDE with stochasticity tau (tau = 0: the probability-flow ODE) in half log-SNR
lambda = log(alpha / sigma) has, over one step lambda_s -> lambda_t = lambda_s + h with tau
constant on it, the exact solution (the paper's eq. 9 for data prediction)

    x_t = (sigma_t / sigma_s) e^(-tau^2 h) x_s
          + alpha_t int_{lambda_s}^{lambda_t} c e^(-c (lambda_t - l)) D(l) dl
          + sigma_t sqrt(1 - e^(-2 tau^2 h)) z,              c = 1 + tau^2.

Adams methods replace D by its Lagrange interpolant through the last K denoised outputs and
integrate the interpolant exactly: the predictor (stochastic Adams-Bashforth, eq. 15) through
D at lambda_{i-K+1..i}, the corrector (stochastic Adams-Moulton, eq. 18) through the
same points plus D at the predicted x_t (re-evaluated at the corrected x_t too with
`use_pece`, Predict-Evaluate-Correct-Evaluate). The corrector reuses the predictor's noise z.
A predictor of order s_p with a corrector of order s_c converges with order min(s_p + 1, s_c)
in ODE mode (the corrector gains one order on its predictor, as UniPC's; SA-Solver Sec. 4):
4 for ComfyUI's defaults (3, 4), measured in tests/test_convergence.py and
tests/test_sa_solver.py.

The model kind is an explicit input (ComfyUI branches on `isinstance(model_sampling, CONST)`):
"ve" (alpha = 1, lambda = -log sigma) or "flow" (alpha = 1 - s, lambda = log((1 - s) / s); a
first s >= 1 moves to `first_sigma`, as for the other exponential SDE samplers, `sde.py`).
All coefficients are host float64 numbers: the step is linear in x, D and z, and traces into a
fused plan like every other solver.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from ._utils import SolverInfo, default_noise_sampler
from .sde import _setup, half_log_snr

__all__ = ["sample_sa_solver", "sample_sa_solver_pece", "sa_weights", "tau_interval"]

_PAPER = "Xue et al. 2023, SA-Solver (arXiv:2309.05019, NeurIPS 2023)"


def _moments(x_h: float, order: int) -> list[float]:
    """M_p = int_0^h c e^(-c v) (v / h)^p dv for p < order, with X = c h: (p! / X^p) P(p+1, X),
    P the regularised lower incomplete gamma function. For X <= 50 its series
    e^-X sum_{m >= 1} p! X^m / (p + m)! (positive terms, no cancellation as X -> 0); above,
    1 - e^-X sum_{k <= p} X^k / k!, where the sum is below 1e-13."""
    out = []
    for p in range(order):
        if x_h <= 50.0:
            term, total, m = x_h / (p + 1), 0.0, 1
            while term > 1e-17 * total or m <= 2:
                total += term
                term *= x_h / (p + 1 + m)
                m += 1
            out.append(math.exp(-x_h) * total)
        else:
            partial = sum(x_h**k / math.factorial(k) for k in range(p + 1))
            out.append(math.factorial(p) / x_h**p * (1.0 - math.exp(-x_h) * partial))
    return out


def _times_linear(a: list[float], c0: float, c1: float) -> list[float]:
    """Monomial coefficients (lowest first) of a(u) (c0 + c1 u): the schoolbook product, each
    coefficient summed from 0.0 in the order i + j = k with i ascending (so the signs of zero
    coefficients too are those of the general product)."""
    out = [0.0 + a[0] * c0]
    for k in range(1, len(a)):
        out.append((0.0 + a[k - 1] * c1) + a[k] * c0)
    out.append(0.0 + a[-1] * c1)
    return out


def sa_weights(nodes: list[float], lam_s: float, lam_t: float, tau: float) -> list[float]:
    """w_j = int_{lambda_s}^{lambda_t} c e^(-c (lambda_t - l)) L_j(l) dl for the Lagrange basis
    L_j of `nodes` (half log-SNRs), c = 1 + tau^2: the Adams weights of eqs. 15 / 18 divided by
    alpha_t. Computed in the scaled variable u = (lambda_t - l) / h (nodes at O(1) u whatever
    the grid: a well-conditioned basis), from the exact moments of `_moments`."""
    h = lam_t - lam_s
    if not h > 0:
        raise ValueError(f"sa_weights: expected lambda_t > lambda_s, got h = {h}")
    u = [(lam_t - lam) / h for lam in nodes]
    moments = _moments((1.0 + tau * tau) * h, len(u))
    weights = []
    for j, uj in enumerate(u):
        basis = [1.0]  # monomial coefficients of L_j(u), lowest first
        for m, um in enumerate(u):
            if m != j:
                d = uj - um
                basis = _times_linear(basis, -um / d, 1.0 / d)
        weights.append(sum([b * mp for b, mp in zip(basis, moments, strict=True)]))
    return weights


def _simple_order_2(lam_prev: float, lam_s: float, lam_t: float, tau: float, corrector: bool
                    ) -> list[float]:
    """The paper's simplified two-point weights (Appendix D; ComfyUI's simple_order_2), for
    nodes (lambda_prev, lambda_s) (predictor) or (lambda_s, lambda_t) (corrector): the first-order
    weight 1 - e^(-c h) split with the leading term of the slope's integral, c h^2 / 2 over the
    node spacing (predictor) or c h / 2 on the new node (corrector)."""
    c, h = 1.0 + tau * tau, lam_t - lam_s
    total = -math.expm1(-c * h)
    if corrector:
        new = 0.5 * c * h
        return [total - new, new]
    old = 0.5 * c * h * h / (lam_prev - lam_s)
    return [old, total - old]


def tau_interval(start_sigma: float, end_sigma: float, eta: float = 1.0):
    """tau(sigma) = eta on start_sigma >= sigma >= end_sigma, else 0 (ComfyUI's
    get_tau_interval_func: the paper's interval of stochasticity, in sigma instead of t)."""
    def tau_func(sigma) -> float:
        if eta <= 0:
            return 0.0
        return float(eta) if start_sigma >= float(sigma) >= end_sigma else 0.0
    return tau_func


def _check_order(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None,
                     tau_func=None, s_noise=1.0, noise_sampler=None, predictor_order=3,
                     corrector_order=4, use_pece=False, simple_order_2=False, eta=1.0,
                     sde_start_sigma=math.inf, sde_end_sigma=0.0, model_kind="ve",
                     first_sigma=1 - 1e-4, final="predictor"):
    """SA-Solver (module docstring), one model call per step (two with `use_pece`).

    Step i: D_i = model(x_pred_i); correct the step lambda_{i-1} -> lambda_i through
    D_{i-K+1..i} (K = min(corrector_order, i + 1), none at i = 0), with the tau and noise of its
    predictor; with `use_pece` re-evaluate D_i at the corrected x_i; then predict lambda_i ->
    lambda_{i+1} from the corrected x_i through D_{i-K'+1..i}, K' = min(predictor_order, i + 1),
    with tau = tau_func(sigma_{i+1}) and noise sigma_{i+1} sqrt(1 - e^(-2 tau^2 h)) s_noise z
    (drawn only where tau > 0 and s_noise > 0, as ComfyUI draws). Into sigma = 0: x = D.
    With a final sigma of 0 the orders are lowered over the last steps as ComfyUI does
    (predictor <= steps left - 1, corrector <= steps left), and without `use_pece` the last
    step is not corrected.

    `tau_func(sigma) -> tau` sets the stochasticity; without it tau = eta on the interval
    sde_start_sigma >= sigma >= sde_end_sigma (default: everywhere) and 0 elsewhere
    (`tau_interval`; ComfyUI takes the interval from the model's schedule, percent 0.2 to 0.8:
    fastdiff.comfyui does too). eta = 0 is the ODE solver. `simple_order_2` uses the paper's
    simplified weights for two-point steps. `final` for a last sigma > 0: "predictor" returns
    the predicted sample at the last sigma; "corrector" returns ComfyUI's result there, the
    corrected sample at the sigma before it (its loop ends after the last correction).
    """
    _check_order("predictor_order", predictor_order, 1)
    _check_order("corrector_order", corrector_order, 0)
    if final not in ("predictor", "corrector"):
        raise ValueError(f"final: expected 'predictor' or 'corrector', got {final!r}")
    if s_noise < 0 or eta < 0:
        raise ValueError(f"s_noise, eta: expected values >= 0, got {s_noise}, {eta}")
    if tau_func is None:
        tau_func = tau_interval(sde_start_sigma, sde_end_sigma, eta)
    elif not callable(tau_func):
        raise TypeError(f"tau_func: expected a callable, got {type(tau_func).__name__}")
    sig, sigmas, extra_args, s_in = _setup(x, sigmas, extra_args, model_kind, first_sigma)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    n = len(sig) - 1
    lam = [half_log_snr(s, model_kind) for s in sig]
    alpha = [s * math.exp(v) if s > 0 else 1.0 for s, v in zip(sig, lam)]
    into_zero = sig[-1] == 0
    window = max(predictor_order, corrector_order)
    history: list = []  # the last `window` denoised outputs, D_{i-len+1..i}
    x_pred, tau, noise = x, 0.0, None

    def step(i: int, k: int, x_from, nodes: list[int]):
        """x at sigma_{k} from x_from at sigma_{i} through D at the `nodes` levels (the last
        len(nodes) entries of `history`), without noise."""
        lams = [lam[j] for j in nodes]
        if simple_order_2 and len(nodes) == 2:
            w = _simple_order_2(lams[0], lam[i], lam[k], tau, corrector=nodes[-1] == k)
        else:
            w = sa_weights(lams, lam[i], lam[k], tau)
        out = x_from * (sig[k] / sig[i] * math.exp(-tau * tau * (lam[k] - lam[i])))
        for wj, d in zip(w, history[-len(nodes):]):
            out = out + d * (alpha[k] * wj)
        return out

    for i in trange(n, disable=disable):
        denoised = model(x_pred, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x_pred, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        history = (history + [denoised])[-window:]
        k_pred = min(predictor_order, len(history))
        k_corr = 0 if i == 0 or (sig[i + 1] == 0 and not use_pece) else \
            min(corrector_order, len(history))
        if into_zero:  # ComfyUI's lower order towards a final 0
            k_pred, k_corr = min(k_pred, n - 1 - i), min(k_corr, n - i)
        if k_corr == 0:
            x = x_pred
        else:  # correct lambda_{i-1} -> lambda_i through D_{i-k+1..i}
            x = step(i - 1, i, x, list(range(i - k_corr + 1, i + 1)))
            if noise is not None:
                x = x + noise
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                history[-1] = denoised
        if sig[i + 1] == 0:
            x = denoised
            continue
        tau = float(tau_func(torch.tensor(sig[i + 1], dtype=torch.float64)))
        x_pred = step(i, i + 1, x, list(range(i - k_pred + 1, i + 1)))
        noise = None
        if tau > 0 and s_noise > 0:
            h = lam[i + 1] - lam[i]
            std = sig[i + 1] * math.sqrt(-math.expm1(-2 * tau * tau * h)) * s_noise
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) * std
            x_pred = x_pred + noise
    return x if into_zero or final == "corrector" else x_pred


@torch.no_grad()
def sample_sa_solver_pece(model, x, sigmas, extra_args=None, callback=None, disable=None,
                          **options):
    """SA-Solver in PECE mode (Predict-Evaluate-Correct-Evaluate): `sample_sa_solver` with
    use_pece=True, two model calls per step (one at the first)."""
    if "use_pece" in options:
        raise TypeError("sample_sa_solver_pece: use_pece is fixed (True) by the name")
    return sample_sa_solver(model, x, sigmas, extra_args, callback, disable, use_pece=True,
                            **options)


def _entries(name, kwargs, nfe):
    """The VE entry and its flow-model twin (ComfyUI's CONST branch), as in sde.py."""
    return {
        name: SolverInfo(sample_sa_solver, order=4, nfe_per_step=nfe, stochastic=True,
                         paper=_PAPER, kwargs=kwargs, deterministic_kwargs={"eta": 0.0}),
        # no ODE order on the flow grid from s = 1: the moved first time is an O(1e-4) offset;
        # tests/test_sa_solver.py measures the flow ODE order from s = 0.999
        name + "_flow": SolverInfo(sample_sa_solver, order=4, nfe_per_step=nfe,
                                   stochastic=True, paper=_PAPER + ", flow (CONST) branch",
                                   kwargs={**kwargs, "model_kind": "flow"}, param="flow"),
    }


SOLVERS = {
    # order min(predictor 3 + 1, corrector 4) = 4 (module docstring)
    **_entries("sa_solver", {}, 1),
    **_entries("sa_solver_pece", {"use_pece": True}, 2),
}
