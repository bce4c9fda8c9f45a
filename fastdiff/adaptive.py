"""DPM-Solver-12 / 23 with adaptive step size on fastdiff's fused kernels.

`sample_dpm_adaptive` is k-diffusion's `sample_dpm_adaptive` (Lu et al. 2022, DPM-Solver,
arXiv:2206.00927, Sec. 3.4 and App. C: an embedded pair of orders (1, 2) or (2, 3) whose
difference a PID controller (Soderlind 2003) turns into the next step): same arguments, defaults,
model calls, noise draws, callback and numbers as the pure-PyTorch reference
`fastdiff.reference.solvers.dpm_solver.sample_dpm_adaptive`, which stays the specification.

Why it is not a plan (`fastdiff.Sampler`): whether a step is accepted, and so every later step
size, depends on an error norm of the data. But each *attempted* step is linear in the model
outputs with coefficients that depend only on that attempt's lambdas: with eps_k = (u_k - D_k) /
sigma_k (u_0 = x), DPM-Solver's intermediate points u_1, u_2 and both solutions x_low, x_high are
x plus fixed multiples of the eps_k. So every attempt runs as 2 (order 2) or 3 (order 3) fused
`fastdiff.ops.lincomb` launches, one after each model call but the last, whose coefficients are
computed on the host with the same float operations as the reference's `DPMSolver.dpm_solver_*_
step` (in the lambdas' dtype: float32 for Python-float sigma_min / sigma_max, as in k-diffusion),
then combined in float64. The error norm is k-diffusion's expression, and the controller reads it
once per attempted step: one host read per attempt, inherent to adaptive stepping (no CUDA
graph). The ancestral noise (eta > 0) is drawn with `noise_sampler` after an accepted step, as
k-diffusion draws it, and added by one more launch.

Differences from the reference: the callback's "denoised" is the model's output itself (the
reference's x - sigma * eps equals it up to round-off); at eta = 0 nothing is drawn (as in the
reference; k-diffusion draws at every accepted step and multiplies the draw by 0); a non-finite
error estimate raises `fastdiff.sampler.NonFiniteError` (k-diffusion rejects the step, its step
size becomes NaN and its loop never ends).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from fastdiff.ops import lincomb, resolve
from fastdiff.reference.solvers._utils import default_noise_sampler
from fastdiff.reference.solvers.dpm_solver import _check_sigma_range, _dpm_solver_for

__all__ = ["sample_dpm_adaptive"]


def _check_options(order, rtol, atol, h_init):
    if isinstance(order, bool) or order not in (2, 3):
        raise ValueError(f"order: expected 2 (DPM-Solver-12) or 3 (DPM-Solver-23), got {order!r}")
    for name, value, positive in (("rtol", rtol, True), ("atol", atol, False),
                                  ("h_init", h_init, True)):
        v = float(value)
        if not math.isfinite(v) or (abs(v) if name == "h_init" else v) < 0 or \
                (positive and v == 0):
            want = "a finite nonzero number" if name == "h_init" else \
                "a finite number > 0" if positive else "a finite number >= 0"
            raise ValueError(f"{name}: expected {want}, got {value!r}")


def _floats(*scalars):
    """0-d tensors (the lambdas' dtype and device) as Python floats, in one transfer."""
    return torch.stack([v.double() for v in scalars]).tolist()


def _attempt_coefficients(dpm, order, s, t_):
    """Per launch, the coefficient rows over its inputs, from the reference's scalar operations.

    Order 2 (x_low = DPM-Solver-1, x_high = DPM-Solver-2 with r1 = 1/2):
      launch 1 [x, D0] -> [u1, x_low];   launch 2 [x, D0, u1, D1] -> [x_high].
    Order 3 (x_low = DPM-Solver-2 with r1 = 1/3, x_high = DPM-Solver-3, r1 = 1/3, r2 = 2/3):
      launch 1 [x, D0] -> [u1];   launch 2 [x, D0, u1, D1] -> [u2, x_low];
      launch 3 [x, D0, u2, D2] -> [x_high].
    Returns (tables, s_k): tables as nested lists of float64 values; s_k the lambdas of the
    intermediate model calls."""
    sigma = dpm.sigma
    h = t_ - s
    if order == 2:  # DPMSolver.dpm_solver_1_step and dpm_solver_2_step(r1=1/2)
        r1 = 1 / 2
        s1 = s + r1 * h
        a = sigma(t_) * h.expm1()
        b1 = sigma(s1) * (r1 * h).expm1()
        c = sigma(t_) / (2 * r1) * h.expm1()
        sig_s, sig_1, a, b1, c = _floats(sigma(s), sigma(s1), a, b1, c)
        # x - w0 eps0 - w1 eps1, eps0 = (x - D0) / sig_s, eps1 = (u1 - D1) / sig_1
        return [
            [[1 - b1 / sig_s, b1 / sig_s], [1 - a / sig_s, a / sig_s]],
            [[1 - (a - c) / sig_s, (a - c) / sig_s, -c / sig_1, c / sig_1]],
        ], (s1,)
    # DPMSolver.dpm_solver_2_step(r1=1/3) and dpm_solver_3_step(r1=1/3, r2=2/3); the second
    # shares the first's eps at s1 (k-diffusion's eps cache)
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = s + r1 * h, s + r2 * h
    a = sigma(t_) * h.expm1()
    b1 = sigma(s1) * (r1 * h).expm1()
    c_low = sigma(t_) / (2 * r1) * h.expm1()
    e2 = sigma(s2) * (r2 * h).expm1()
    f2 = sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1)
    g = sigma(t_) / r2 * (h.expm1() / h - 1)
    sig_s, sig_1, sig_2, a, b1, c_low, e2, f2, g = _floats(
        sigma(s), sigma(s1), sigma(s2), a, b1, c_low, e2, f2, g)
    return [
        [[1 - b1 / sig_s, b1 / sig_s]],
        [[1 - (e2 - f2) / sig_s, (e2 - f2) / sig_s, -f2 / sig_1, f2 / sig_1],
         [1 - (a - c_low) / sig_s, (a - c_low) / sig_s, -c_low / sig_1, c_low / sig_1]],
        [[1 - (a - g) / sig_s, (a - g) / sig_s, -g / sig_2, g / sig_2]],
    ], (s1, s2)


def _tables(rows, x):
    """The launches' coefficient tables [1, num_out, num_in] on x's device in the accumulation
    dtype, copied to the device in one transfer."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = [v for table in rows for out in table for v in out]
    data = torch.tensor(flat, dtype=acc).to(x.device)
    tables, at = [], 0
    for table in rows:
        n = len(table) * len(table[0])
        tables.append(data[at:at + n].view(1, len(table), len(table[0])))
        at += n
    return tables


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None,
                        disable=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0,
                        icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0,
                        noise_sampler=None, return_info=False, *, backend="auto"):
    """DPM-Solver-12 (`order=2`) / 23 (`order=3`) with adaptive step size (arXiv:2206.00927,
    Sec. 3.4), k-diffusion's signature and numbers, every attempted step as fused lincomb
    launches (module docstring); one host read of the error norm per attempted step.

    `backend`: "auto", "reference", "cpu", "cuda" or "triton" for the launches, as for
    `fastdiff.Sampler`. Returns x, or (x, info) with info = {"steps", "nfe", "n_accept",
    "n_reject"} when `return_info`."""
    _check_sigma_range(x, sigma_min, sigma_max)
    _check_options(order, rtol, atol, h_init)
    backend = resolve(backend, x.device)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    extra_args = {} if extra_args is None else extra_args
    with tqdm(disable=disable) as pbar:
        dpm = _dpm_solver_for(model, extra_args, pbar, callback)
        t_start, t_end = dpm.t(torch.as_tensor(sigma_max)), dpm.t(torch.as_tensor(sigma_min))
        s_in = x.new_ones([x.shape[0]])
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32

        def denoise(u, t):  # the reference's DPMSolver.eps, without the division
            d = model(u, dpm.sigma(t) * s_in, **extra_args)
            pbar.update()
            return d

        def attempt(x, s, t_):  # the reference's DPMSolver._adaptive_attempt as launches
            rows, stages = _attempt_coefficients(dpm, order, s, t_)
            tables = _tables(rows, x)
            d0 = denoise(x, s)
            u1, *low = lincomb([x, d0], tables[0], backend=backend)
            d1 = denoise(u1, stages[0])
            if order == 2:
                x_low, (x_high,) = low[0], lincomb([x, d0, u1, d1], tables[1], backend=backend)
            else:
                u2, x_low = lincomb([x, d0, u1, d1], tables[1], backend=backend)
                d2 = denoise(u2, stages[1])
                (x_high,) = lincomb([x, d0, u2, d2], tables[2], backend=backend)
            return x_low, x_high, d0

        def add_noise(x, scale, z):
            coef = torch.tensor([[[1.0, float(scale)]]], dtype=acc).to(x.device)
            return lincomb([x, z.to(x.dtype)], coef, backend=backend)[0]

        def check_error(error, s, info):
            if not math.isfinite(float(error)):  # the controller would reject forever
                from fastdiff.sampler import NonFiniteError

                sigma = float(dpm.sigma(s))
                raise NonFiniteError(f"dpm_adaptive: the error estimate of the step from sigma"
                                     f" {sigma:.6g} is {float(error)}", info["steps"], sigma)

        x, info = dpm.dpm_solver_adaptive(
            x, t_start, t_end, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety,
            eta, s_noise, noise_sampler, attempt=attempt, add_noise=add_noise,
            check_error=check_error)
    if return_info:
        return x, info
    return x
