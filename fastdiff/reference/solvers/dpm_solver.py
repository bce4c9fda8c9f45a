"""DPM-Solver with noise prediction (Lu et al. 2022, arXiv:2206.00927), on the k-diffusion
(VE) ODE: alpha = 1, sigma_t = sigma, lambda = -log sigma, eps = (x - D(x, sigma)) / sigma.

In these variables the exact solution (paper eq. 3.4, alpha = 1) is

    x_t = x_s - sigma_t int_{lambda_s}^{lambda_t} e^{lambda} eps(x_lambda, lambda) dlambda,

and DPM-Solver-k Taylor-expands eps in lambda (h = lambda_t - lambda_s):

- `sample_dpm_solver_singlestep(order=1|2|3)`: paper Algorithms 4 (DPM-Solver-2, r1 = 1/2)
  and 5 (DPM-Solver-3, r1 = 1/3, r2 = 2/3); order 1 is DDIM (eq. 3.7) = Euler in sigma.
- `sample_dpm_solver_multistep(order=1|2|3)`: the multistep form (Lu et al. 2022b,
  arXiv:2211.01095, Alg. 2 and App. B, "DPM-Solver" noise-prediction branch of the official
  code), reusing past eps values; lower orders while history builds up.
- `sample_dpm_fast`, `sample_dpm_adaptive`: k-diffusion's DPM-Solver-fast (paper Sec. 3.4,
  orders 3,...,3,2,1 on a lambda-uniform grid) and DPM-Solver-12/23 adaptive step size
  (paper Sec. 3.4, App. C), same signatures and numbers as k-diffusion. DPM-Solver-fast's
  steps depend only on (sigma_min, sigma_max, n), so it is linear in the model outputs and has
  a fused plan: the registry entry "dpm_fast" is `sample_dpm_fast_sigmas`, its schedule form
  (ComfyUI's). The adaptive solver accepts steps on the host and stays eager.

Final sigma = 0 (lambda = +inf): every DPM-Solver update tends to x_next = D(x, sigma_i) as
sigma_next -> 0 (sigma_t e^h = sigma_s stays finite, the higher-order terms carry an extra 1/h),
so that step is taken as the first-order (DDIM / Euler) step x_next = denoised.

Step coefficients are host float64 (`math`) computed from the sigmas once per step; the model is
called at `sigma * s_in` with sigma taken from tensors built once per run.
"""

from __future__ import annotations

import functools
import math

import torch
from tqdm.auto import tqdm, trange

from ._utils import (
    SolverInfo,
    default_noise_sampler,
    get_ancestral_step,
    validate_sigmas,
    validate_x,
)

__all__ = [
    "sample_dpm_solver_singlestep",
    "sample_dpm_solver_multistep",
    "sample_dpm_fast",
    "sample_dpm_fast_sigmas",
    "sample_dpm_adaptive",
    "DPMSolver",
    "PIDStepSizeController",
]

_PAPER = "Lu et al. 2022, DPM-Solver (arXiv:2206.00927)"


def _check_order(order, allowed):
    if order not in allowed:
        raise ValueError(f"order: expected one of {sorted(allowed)}, got {order!r}")


def _stage_sigmas(sig, order, dtype, device):
    """Intermediate sigmas of every singlestep DPM-Solver step, one tensor per run:
    row i holds sigma at lambda_i + r h for r in (1/2,) or (1/3, 2/3)."""
    rs = {1: (), 2: (1 / 2,), 3: (1 / 3, 2 / 3)}[order]
    rows = []
    for s, t in zip(sig[:-1], sig[1:], strict=True):
        lam_s, lam_t = -math.log(s), (-math.log(t) if t > 0 else math.inf)
        h = lam_t - lam_s
        rows.append([math.exp(-(lam_s + r * h)) if t > 0 else 0.0 for r in rs] or [0.0])
    return torch.tensor(rows, dtype=dtype, device=device)


@torch.no_grad()
def sample_dpm_solver_singlestep(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                 order=3):
    """Singlestep DPM-Solver-`order` with noise prediction on the given sigmas (Lu et al. 2022,
    arXiv:2206.00927, Alg. 4-5 with r1 = 1/2, resp. r1 = 1/3, r2 = 2/3). `order` model calls per
    step; global error O(h^order). The step into sigma = 0 is first order (x_next = denoised).
    """
    validate_x(x)
    sig = validate_sigmas(sigmas)
    _check_order(order, {1, 2, 3})
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    stages = _stage_sigmas(sig, order, sigmas.dtype, sigmas.device)

    def eps_fn(x_, sigma_t, sigma_f):  # sigma_t: tensor for the model, sigma_f: host float
        return (x_ - model(x_, sigma_t * s_in, **extra_args)) / sigma_f

    for i in trange(len(sig) - 1, disable=disable):
        sigma_s, sigma_t = sig[i], sig[i + 1]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        if sigma_t == 0:
            x = denoised
            continue
        eps = (x - denoised) / sigma_s
        h = math.log(sigma_s) - math.log(sigma_t)
        phi = sigma_t * math.expm1(h)  # = sigma_s - sigma_t
        if order == 1:  # DDIM, eq. 3.7
            x = x - phi * eps
        elif order == 2:  # Alg. 4, r1 = 1/2
            r1 = 1 / 2
            s1 = stages[i, 0]
            sigma_1 = sigma_s * math.exp(-r1 * h)
            u1 = x - sigma_1 * math.expm1(r1 * h) * eps
            eps_1 = eps_fn(u1, s1, sigma_1)
            x = x - phi * eps - phi / (2 * r1) * (eps_1 - eps)
        else:  # Alg. 5, r1 = 1/3, r2 = 2/3
            r1, r2 = 1 / 3, 2 / 3
            sigma_1, sigma_2 = sigma_s * math.exp(-r1 * h), sigma_s * math.exp(-r2 * h)
            u1 = x - sigma_1 * math.expm1(r1 * h) * eps
            d1 = eps_fn(u1, stages[i, 0], sigma_1) - eps
            u2 = (x - sigma_2 * math.expm1(r2 * h) * eps
                  - sigma_2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * d1)
            d2 = eps_fn(u2, stages[i, 1], sigma_2) - eps
            x = x - phi * eps - sigma_t / r2 * (math.expm1(h) / h - 1) * d2
    return x


@torch.no_grad()
def sample_dpm_solver_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                order=2, lower_order_final=True):
    """Multistep DPM-Solver-`order` with noise prediction (Lu et al. 2022b, arXiv:2211.01095,
    App. B; the official code's "dpmsolver" multistep updates). One model call per step.

    Step i uses order min(order, i + 1) (warm-up, no extra calls); with `lower_order_final` and
    fewer than 10 steps the last steps also use order min(order, steps left), which stabilises
    few-step sampling (as the official code does). The step into sigma = 0 is first order
    (x_next = denoised). Order 3 uses the Taylor-consistent weight 2 * phi_3 on the second
    difference (see the comment in the loop), so it converges with order 3.
    """
    validate_x(x)
    sig = validate_sigmas(sigmas)
    _check_order(order, {1, 2, 3})
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n = len(sig) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    eps_hist = []  # newest last
    for i in trange(n, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised})
        eps_hist = [*eps_hist[-2:], (x - denoised) / sig[i]]
        if sig[i + 1] == 0:
            x = denoised
            continue
        # Official DPM-Solver code: lower orders at the end only for < 10 steps, so that the
        # asymptotic order is kept (a final first-order step would make the method order 2).
        k = min(order, i + 1, n - i if lower_order_final and n < 10 else order)
        sigma_t = sig[i + 1]
        h = lam[i + 1] - lam[i]
        phi_1 = math.expm1(h)
        eps_0 = eps_hist[-1]
        x = x - sigma_t * phi_1 * eps_0
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (eps_0 - eps_hist[-2]) / r0
            if k == 2:
                x = x - 0.5 * sigma_t * phi_1 * d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = (eps_hist[-2] - eps_hist[-3]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                # d1 ~ h eps'(lambda_i) and d2 ~ h^2 eps''/2 (a second divided difference), while
                # int_0^h e^{h-u} u^2/2 du = h^2 phi_3 with phi_3 = (phi_1 - h)/h^2 - 1/2 multiplies
                # eps''; hence 2 * phi_3 * d2. The official code (and k-diffusion's / diffusers'
                # 3M) use phi_3 * d2, which is only second order globally (measured on the exact
                # GMM ODE: slopes 2.1 vs 3.0 for this form).
                x = (x - sigma_t * (phi_1 / h - 1) * d1
                     - 2 * sigma_t * ((phi_1 - h) / h**2 - 0.5) * d2)
    return x


class PIDStepSizeController:
    """A PID controller for ODE adaptive step size control (k-diffusion; Soderlind 2003)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    def limiter(self, x):
        return 1 + math.atan(x - 1)

    def propose_step(self, error):
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = self.limiter(factor)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


class DPMSolver:
    """DPM-Solver-1/2/3 steps in t = lambda = -log sigma (arXiv:2206.00927), a port of
    k-diffusion's class: eps values are cached per step so shared evaluations are not repeated.
    """

    def __init__(self, model, extra_args=None, eps_callback=None, info_callback=None):
        self.model = model
        self.extra_args = {} if extra_args is None else extra_args
        self.eps_callback = eps_callback
        self.info_callback = info_callback

    def t(self, sigma):
        return -sigma.log()

    def sigma(self, t):
        return t.neg().exp()

    def eps(self, eps_cache, key, x, t):
        if key in eps_cache:
            return eps_cache[key], eps_cache
        sigma = self.sigma(t) * x.new_ones([x.shape[0]])
        eps = (x - self.model(x, sigma, **self.extra_args)) / self.sigma(t)
        if self.eps_callback is not None:
            self.eps_callback()
        return eps, {key: eps, **eps_cache}

    def dpm_solver_1_step(self, x, t, t_next, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        return x - self.sigma(t_next) * h.expm1() * eps, eps_cache

    def dpm_solver_2_step(self, x, t, t_next, r1=1 / 2, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        x_2 = (x - self.sigma(t_next) * h.expm1() * eps
               - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps))
        return x_2, eps_cache

    def dpm_solver_3_step(self, x, t, t_next, r1=1 / 3, r2=2 / 3, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        s1 = t + r1 * h
        s2 = t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2, eps_cache = self.eps(eps_cache, "eps_r2", u2, s2)
        x_3 = (x - self.sigma(t_next) * h.expm1() * eps
               - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps))
        return x_3, eps_cache

    def _step(self, order, x, t, t_next, eps_cache):
        if order == 1:
            return self.dpm_solver_1_step(x, t, t_next, eps_cache=eps_cache)
        if order == 2:
            return self.dpm_solver_2_step(x, t, t_next, eps_cache=eps_cache)
        return self.dpm_solver_3_step(x, t, t_next, eps_cache=eps_cache)

    def _ancestral(self, t, t_next, t_end, eta):
        """Target t_next_ of the deterministic part and std su of the added noise.

        Where the clamp to t_end hits, su is the square root of sigma(t_next)^2 - sigma(t_end)^2,
        0 up to round-off. With float64 end points and dpm_fast's float32 grid that round-off can
        be negative, and k-diffusion's sqrt gives NaN there; it is clamped at 0 here (equal
        numbers wherever k-diffusion's are finite)."""
        if not eta:
            return t_next, 0.0
        sd, _ = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_next_ = torch.minimum(t_end, self.t(sd))
        return t_next_, (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2).clamp(min=0) ** 0.5

    def dpm_solver_fast(self, x, t_start, t_end, nfe, eta=0.0, s_noise=1.0, noise_sampler=None):
        """DPM-Solver-fast (paper Sec. 3.4): m = floor(nfe / 3) + 1 lambda-uniform steps of
        order 3, ending with orders (2, 1) or (nfe mod 3), so that exactly `nfe` calls are used."""
        noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
        if not t_end > t_start and eta:
            raise ValueError("eta must be 0 for reverse sampling")
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            eps_cache = {}
            t, t_next = ts[i], ts[i + 1]
            t_next_, su = self._ancestral(t, t_next, t_end, eta)
            eps, eps_cache = self.eps(eps_cache, "eps", x, t)
            denoised = x - self.sigma(t) * eps
            if self.info_callback is not None:
                self.info_callback({"x": x, "i": i, "t": ts[i], "t_up": t, "denoised": denoised})
            x, eps_cache = self._step(order, x, t, t_next_, eps_cache)
            if eta:  # eta = 0: su = 0, skip the draw
                x = x + su * s_noise * noise_sampler(self.sigma(t), self.sigma(t_next))
        return x

    def dpm_solver_adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078,
                            h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                            eta=0.0, s_noise=1.0, noise_sampler=None, *, attempt=None,
                            add_noise=None, check_error=None):
        """DPM-Solver-12 / 23 (paper Sec. 3.4 and App. C): embedded pairs of orders
        (1, 2) or (2, 3) give an error estimate that a PID controller turns into the step.

        The controller loop is shared with the fused-kernel version (fastdiff.adaptive), which
        replaces how one step is attempted: `attempt(x, s, t_) -> (x_low, x_high, denoised)`
        (default `_adaptive_attempt`), `add_noise(x, scale, z)` (default x + scale * z) and
        `check_error(error, s, info)`, called on every error estimate (default none)."""
        noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
        if order not in {2, 3}:
            raise ValueError("order should be 2 or 3")
        if attempt is None:
            attempt = functools.partial(self._adaptive_attempt, order)
        if add_noise is None:
            add_noise = lambda x, scale, z: x + scale * z  # noqa: E731
        forward = t_end > t_start
        if not forward and eta:
            raise ValueError("eta must be 0 for reverse sampling")
        h_init = abs(h_init) * (1 if forward else -1)
        atol = torch.tensor(atol)
        rtol = torch.tensor(rtol)
        s = t_start
        x_prev = x
        pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order,
                                    accept_safety)
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            t_, su = self._ancestral(s, t, t_end, eta)
            x_low, x_high, denoised = attempt(x, s, t_)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if check_error is not None:
                check_error(error, s, info)
            if pid.propose_step(error):
                x_prev = x_low
                x = x_high
                if eta:
                    x = add_noise(x, su * s_noise, noise_sampler(self.sigma(s), self.sigma(t)))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if self.info_callback is not None:
                self.info_callback({"x": x, "i": info["steps"] - 1, "t": s, "t_up": s,
                                    "denoised": denoised, "error": error, "h": pid.h, **info})
        return x, info

    def _adaptive_attempt(self, order, x, s, t_):
        """One attempted step from s to t_: (x_low, x_high, denoised at s), the embedded pair
        DPM-Solver-1 / 2 (order 2) or DPM-Solver-2 (r1 = 1/3) / 3 (order 3)."""
        eps_cache = {}
        eps, eps_cache = self.eps(eps_cache, "eps", x, s)
        denoised = x - self.sigma(s) * eps
        if order == 2:
            x_low, eps_cache = self.dpm_solver_1_step(x, s, t_, eps_cache=eps_cache)
            x_high, eps_cache = self.dpm_solver_2_step(x, s, t_, eps_cache=eps_cache)
        else:
            x_low, eps_cache = self.dpm_solver_2_step(x, s, t_, r1=1 / 3, eps_cache=eps_cache)
            x_high, eps_cache = self.dpm_solver_3_step(x, s, t_, eps_cache=eps_cache)
        return x_low, x_high, denoised


def _dpm_solver_for(model, extra_args, pbar, callback):
    dpm_solver = DPMSolver(model, extra_args, eps_callback=pbar.update)
    if callback is not None:
        dpm_solver.info_callback = lambda info: callback({
            "sigma": dpm_solver.sigma(info["t"]), "sigma_hat": dpm_solver.sigma(info["t_up"]),
            **info})
    return dpm_solver


def _check_sigma_range(x, sigma_min, sigma_max):
    validate_x(x)
    if not sigma_min > 0 or not sigma_max > 0:
        raise ValueError("sigma_min and sigma_max must not be 0")


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None,
                    disable=None, eta=0.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast (fixed step size, `n` model calls). See arXiv:2206.00927, Sec. 3.4.

    As in k-diffusion, Python-float sigma_min/sigma_max become default-dtype tensors, and the
    lambda grid is `torch.linspace`'s default dtype (float32) whatever their dtype. The fused
    plan is `fastdiff.Sampler(model, "dpm_fast", sigmas)` for n + 1 sigmas from sigma_max down
    to sigma_min (`sample_dpm_fast_sigmas`; a plan's end points are float64)."""
    _check_sigma_range(x, sigma_min, sigma_max)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of model calls) must be a positive int, got {n!r}")
    with tqdm(total=n, disable=disable) as pbar:
        dpm_solver = _dpm_solver_for(model, extra_args, pbar, callback)
        return dpm_solver.dpm_solver_fast(
            x, dpm_solver.t(torch.as_tensor(sigma_max)), dpm_solver.t(torch.as_tensor(sigma_min)),
            n, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_fast_sigmas(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=0.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast on a sigma schedule, as ComfyUI's `dpm_fast` runs it (its wrapper in
    comfy/samplers.py): `sample_dpm_fast` with n = len(sigmas) - 1 model calls from sigmas[0] to
    the last positive sigma, whose sample it returns. The interior sigmas set only the count:
    the steps are DPM-Solver-fast's own lambda-uniform grid (arXiv:2206.00927, Sec. 3.4), in
    float32 as k-diffusion's `torch.linspace` makes it, its end points in the sigmas' dtype.

    Global order 3 when n = 2 (mod 3) (orders 3, ..., 3, 2); otherwise the last step is first
    order (orders ..., 3, 1 or ..., 2, 1) and the method second order."""
    sig = validate_sigmas(sigmas)
    last = len(sig) - 1 if sig[-1] > 0 else len(sig) - 2
    if not sig[last] > 0:
        raise ValueError("sigmas: dpm_fast ends at the last positive sigma; got none before the "
                         f"final 0 ({sig})")
    return sample_dpm_fast(model, x, sigmas[last], sigmas[0], len(sig) - 1, extra_args, callback,
                           disable, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None,
                        disable=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0,
                        icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0,
                        noise_sampler=None, return_info=False):
    """DPM-Solver-12 and 23 (adaptive step size). See arXiv:2206.00927, Sec. 3.4. Eager only:
    step acceptance is decided on the host."""
    _check_sigma_range(x, sigma_min, sigma_max)
    with tqdm(disable=disable) as pbar:
        dpm_solver = _dpm_solver_for(model, extra_args, pbar, callback)
        x, info = dpm_solver.dpm_solver_adaptive(
            x, dpm_solver.t(torch.as_tensor(sigma_max)), dpm_solver.t(torch.as_tensor(sigma_min)),
            order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise,
            noise_sampler)
    if return_info:
        return x, info
    return x


SOLVERS = {
    f"dpm_solver_{k}": SolverInfo(
        sample_dpm_solver_singlestep, order=k, nfe_per_step=k, stochastic=False,
        paper=_PAPER + (", eq. 3.7 (DDIM)" if k == 1 else f", Alg. {k + 2}"), kwargs={"order": k})
    for k in (1, 2, 3)
}
SOLVERS.update({
    f"dpm_solver_{k}m": SolverInfo(
        sample_dpm_solver_multistep, order=k, nfe_per_step=1, stochastic=False,
        paper="Lu et al. 2022b, multistep DPM-Solver (arXiv:2211.01095), App. B",
        kwargs={"order": k})
    for k in (2, 3)
})
# ComfyUI's `dpm_fast` (k-diffusion's sample_dpm_fast(sigma_min, sigma_max, n) on a schedule):
# one model call per sigma interval on average, n = 2 (mod 3) for its order 3 (see the function)
SOLVERS["dpm_fast"] = SolverInfo(
    sample_dpm_fast_sigmas, order=3, nfe_per_step=1, stochastic=False,
    paper=_PAPER + ", Sec. 3.4 (DPM-Solver-fast)")
