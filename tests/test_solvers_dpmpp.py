"""DPM-Solver++, UniPC and DEIS reference samplers: orders, exactness, identities, input checks.

Ground truth is mathematics, not the code under test:
  - x0 ~ N(m, diag(s^2)) has the exact denoiser D(x, sigma) = m + s^2 / (s^2 + sigma^2) (x - m) and
    the exact probability-flow ODE solution x(sigma) = m + (x(sigma0) - m) sqrt(s^2 + sigma^2) /
    sqrt(s^2 + sigma0^2), so global errors, and convergence orders, are measured exactly;
  - for a denoiser that is a polynomial in lambda = -log sigma (and ignores x), the exact step is
    x_t = (sigma_t/sigma_s) x_s + sigma_t int e^lambda D dlambda in closed form, so a multistep
    formula of order p must reproduce degree p - 1 exactly once its history is full;
  - algebraic identities between solvers that hold for every model (e.g. UniP-2 with
    B(h) = e^-h - 1 is DPM-Solver++(2M), first-order UniPC / DEIS are Euler).
k-diffusion parity of the k-diffusion samplers is in tests/test_kdiffusion_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.reference.solvers import deis, dpmpp, unipc

F64 = torch.float64
# VE entries (the flow-model ones are measured on the flow ODE in tests/test_convergence.py)
REGISTRY = {k: v for k, v in {**dpmpp.SOLVERS, **unipc.SOLVERS, **deis.SOLVERS}.items()
            if v.param == "ve"}


def _ode_kwargs(info):
    return {**info.kwargs, **info.deterministic_kwargs}


class Gaussian:
    """Exact denoiser and ODE solution for x0 ~ N(m, diag(s^2)), VE noising x = x0 + sigma eps."""

    def __init__(self, s):
        self.s = torch.tensor(s, dtype=F64)
        self.m = torch.linspace(-1.0, 1.0, len(s), dtype=F64)

    def __call__(self, x, sigma):  # in x's dtype, like a network
        m, s2 = self.m.to(x.dtype), self.s.to(x.dtype) ** 2
        return m + s2 / (s2 + sigma.reshape(-1, 1).to(x.dtype) ** 2) * (x - m)

    def solution(self, x, sigma_from, sigma_to):
        s2 = self.s**2
        return self.m + (x - self.m) * torch.sqrt((s2 + sigma_to**2) / (s2 + sigma_from**2))

    def start(self, n, sigma_max, seed=0):
        g = torch.Generator().manual_seed(seed)
        return self.m + torch.randn(n, len(self.s), generator=g, dtype=F64) * sigma_max


def _lambda_uniform(sigma_max, sigma_min, n):
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 1,
                                    dtype=F64))


# --- convergence orders ----------------------------------------------------------------------

# The registry order is the order of the scheme (local error O(h^(p+1)) once the history is
# full). The multistep solvers warm up with first- and second-order steps whose O(h^2) / O(h^3)
# contributions scale like (s / sigma_max)^2 here, so with widths s <= 1 and sigma_max = 80
# (EDM's) they stay far below the scheme's own error over these step counts (they would
# dominate only for N >> 512; with s = 3 they already do at N ~ 128). sigma_min = 0.3 ends
# inside the widths' transition, where D still varies: ending where D is flat lets the leading
# error term telescope and inflates the measured order.
ORDER_PROBLEM = Gaussian([0.3, 0.6, 1.0])
ORDER_STEPS = (64, 128, 256)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_measured_order_matches_registry(name):
    info = REGISTRY[name]
    g = ORDER_PROBLEM
    x = g.start(4, 80.0)
    exact = g.solution(x, 80.0, 0.3)
    errs = []
    for n in ORDER_STEPS:
        out = info.fn(g, x, _lambda_uniform(80.0, 0.3, n), disable=True, **_ode_kwargs(info))
        errs.append((out - exact).abs().max().item())
    # least-squares slope of log(err) against log(h), h ~ 1/N
    lx = [-math.log(n) for n in ORDER_STEPS]
    ly = [math.log(e) for e in errs]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) \
        / sum((a - mx) ** 2 for a in lx)
    assert abs(slope - info.order) < 0.3, (name, info.order, slope, errs)


# --- exactness on polynomial denoisers -------------------------------------------------------

POLY = (0.7, -0.4, 0.25)  # D(lambda) = a + b lambda + c lambda^2


def _poly(lam, degree):
    return sum(c * lam**k for k, c in enumerate(POLY[: degree + 1]))


def _exp_poly_integral(u0, u1, degree):
    """int_{u0}^{u1} e^u (a + b u + c u^2) du, from the antiderivative e^u (a + b(u-1) +
    c(u^2 - 2u + 2)) truncated to `degree`."""
    a, b, c = (list(POLY[: degree + 1]) + [0.0, 0.0])[:3]

    def anti(u):
        return math.exp(u) * (a + b * (u - 1) + c * (u * u - 2 * u + 2))

    return anti(u1) - anti(u0)


SIGMAS_UNEVEN = torch.tensor([10.0, 6.0, 4.5, 2.5, 1.2, 0.8, 0.3], dtype=F64)

# (registry name, degree reproduced exactly once the history is full, eps form)
EXACT_CASES = [
    ("dpmpp_3m", 2, False),
    ("dpmpp_2m_sde_heun", 1, False),
    ("unipc_bh1_3_nc", 2, False),
    ("unipc_bh2_3_nc", 2, False),
    ("deis_2", 1, True),
    ("deis_3", 2, True),
]


def _step_residual(info, degree, eps_form, k):
    """Error of step k -> k+1 against the exact step, for a denoiser polynomial in lambda (or,
    for DEIS, eps polynomial in log sigma), isolated by running sigmas[:k+1] and sigmas[:k+2]."""
    if eps_form:
        def model(x, sigma):  # eps(x, sigma) = q(log sigma), D = x - sigma * eps
            return x - sigma.reshape(-1, 1) * _poly(sigma.log().reshape(-1, 1), degree)
    else:
        def model(x, sigma):
            return _poly(-sigma.log().reshape(-1, 1), degree).expand_as(x)
    x = torch.full((2, 3), 5.0, dtype=F64)
    kw = _ode_kwargs(info)
    x_k = info.fn(model, x, SIGMAS_UNEVEN[: k + 1], disable=True, **kw)
    x_next = info.fn(model, x, SIGMAS_UNEVEN[: k + 2], disable=True, **kw)
    s0, s1 = SIGMAS_UNEVEN[k].item(), SIGMAS_UNEVEN[k + 1].item()
    if eps_form:  # dx/dsigma = eps: x_t = x_s + int e^v q(v) dv, v = log sigma
        want = x_k + _exp_poly_integral(math.log(s0), math.log(s1), degree)
    else:
        want = s1 / s0 * x_k + s1 * _exp_poly_integral(-math.log(s0), -math.log(s1), degree)
    return (x_next - want).abs().max().item(), want.abs().max().item()


@pytest.mark.parametrize(("name", "degree", "eps_form"), EXACT_CASES)
def test_multistep_update_is_exact_for_polynomials(name, degree, eps_form):
    for k in (3, 4, 5):  # after the warm-up steps 0, 1 (and 2)
        err, scale = _step_residual(REGISTRY[name], degree, eps_form, k)
        assert err <= 1e-12 * scale, (name, k, err)


def test_dpmpp_3m_sde_weights_the_second_difference_by_half(tol):
    """k-diffusion's 3M (eta = 0) is not exact for a quadratic D (its D2 term has half the exact
    weight, so it is second order) while its warm-up equals `sample_dpmpp_3m`'s."""
    err, scale = _step_residual(REGISTRY["dpmpp_3m_sde"], 2, False, 4)
    assert err > 1e-4 * scale
    g = Gaussian([0.5, 1.0, 2.0])
    x = g.start(3, 10.0)
    for n in (1, 2):  # first- and second-order warm-up steps only
        sig = SIGMAS_UNEVEN[: n + 1]
        torch.testing.assert_close(dpmpp.sample_dpmpp_3m(g, x, sig, disable=True),
                                   dpmpp.sample_dpmpp_3m_sde(g, x, sig, disable=True, eta=0.0),
                                   **tol(F64))


# --- identities that hold for every model ----------------------------------------------------

GAUSS = Gaussian([0.5, 1.0, 2.0])


def _karras(n, sigma_min=0.02, sigma_max=20.0, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=F64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def _euler(model, x, sigmas):
    """Plain Euler on dx/dsigma = (x - D) / sigma (Karras et al. 2022, Alg. 2 without churn)."""
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i].reshape(1))) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@pytest.mark.parametrize("final_zero", [True, False])
def test_identities_between_solvers(final_zero, tol):
    sig = _karras(12) if final_zero else _karras(12)[:-1]
    x = GAUSS.start(3, 20.0)
    run = dict(disable=True)
    close = dict(**tol(F64))
    two_s = dpmpp.sample_dpmpp_2s(GAUSS, x, sig, **run)
    # eta = 0: no noise; the 2S step of both is DPM-Solver++ Algorithm 1.
    torch.testing.assert_close(dpmpp.sample_dpmpp_2s_ancestral(GAUSS, x, sig, eta=0.0, **run),
                               two_s, **close)
    for r in (0.5, 0.3):
        torch.testing.assert_close(dpmpp.sample_dpmpp_sde(GAUSS, x, sig, eta=0.0, r=r, **run),
                                   dpmpp.sample_dpmpp_2s(GAUSS, x, sig, r=r, **run), **close)
    two_m = dpmpp.sample_dpmpp_2m(GAUSS, x, sig, **run)
    torch.testing.assert_close(dpmpp.sample_dpmpp_2m_sde(GAUSS, x, sig, eta=0.0, **run),
                               two_m, **close)
    # UniP-2 with B(h) = e^-h - 1 and a = 1/2: -B(h)/2 (D_i - D_{i-1}) / r_1 is 2M's correction.
    torch.testing.assert_close(
        unipc.sample_unipc(GAUSS, x, sig, order=2, variant="bh2", use_corrector=False,
                           lower_order_final=False, **run), two_m, **close)
    # First order: the exponential integrator with x0 prediction is Euler in VE (DDIM).
    euler = _euler(GAUSS, x, sig)
    for variant in ("bh1", "bh2"):
        torch.testing.assert_close(
            unipc.sample_unipc(GAUSS, x, sig, order=1, variant=variant, use_corrector=False,
                               **run), euler, **close)
    torch.testing.assert_close(deis.sample_deis(GAUSS, x, sig, order=1, **run), euler, **close)


def test_final_step_options(tol):
    sig = _karras(10)[:-1]  # ends at sigma_min > 0, so the options matter
    x = GAUSS.start(3, 20.0)
    x_prev = dpmpp.sample_dpmpp_3m(GAUSS, x, sig[:-1], disable=True)
    ratio = (sig[-1] / sig[-2]).item()
    euler_last = ratio * x_prev + (1 - ratio) * GAUSS(x_prev, sig[-2].reshape(1))
    torch.testing.assert_close(
        dpmpp.sample_dpmpp_3m(GAUSS, x, sig, disable=True, euler_at_final=True), euler_last,
        **tol(F64))
    assert not torch.allclose(  # 9 steps < 15: the last two steps are lowered
        dpmpp.sample_dpmpp_3m(GAUSS, x, sig, disable=True, lower_order_final=True),
        dpmpp.sample_dpmpp_3m(GAUSS, x, sig, disable=True))
    long = _karras(16)[:-1]  # 15 steps: lower_order_final is off (as diffusers)
    torch.testing.assert_close(
        dpmpp.sample_dpmpp_3m(GAUSS, x, long, disable=True, lower_order_final=True),
        dpmpp.sample_dpmpp_3m(GAUSS, x, long, disable=True), **tol(F64))
    with_final = unipc.sample_unipc(GAUSS, x, sig, order=3, disable=True)
    without = unipc.sample_unipc(GAUSS, x, sig, order=3, disable=True, lower_order_final=False)
    assert not torch.allclose(with_final, without)


# --- every solver: sampling to sigma = 0, dtypes, callbacks, no in-place change --------------

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_samples_to_zero_converge_and_keep_inputs(name):
    info = REGISTRY[name]
    x = GAUSS.start(3, 20.0)
    x_copy = x.clone()
    exact = GAUSS.solution(x, 20.0, 0.0)
    errs = []
    for n in (8, 32):
        calls = []
        sig = _karras(n)
        out = info.fn(GAUSS, x, sig, callback=calls.append, disable=True, **_ode_kwargs(info))
        assert out.dtype == F64 and out.shape == x.shape and bool(torch.isfinite(out).all())
        assert [c["i"] for c in calls] == list(range(n))
        assert set(calls[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        errs.append((out - exact).abs().max().item())
    assert torch.equal(x, x_copy), f"{name} modified x in place"
    assert errs[1] < errs[0], errs
    out32 = info.fn(GAUSS, x.float(), _karras(8).float(), disable=True, **_ode_kwargs(info))
    assert out32.dtype == torch.float32 and bool(torch.isfinite(out32).all())


def test_stochastic_solvers_add_noise_and_keep_inputs():
    x = GAUSS.start(3, 20.0)
    x_copy = x.clone()
    sig = _karras(6)
    for name, info in REGISTRY.items():
        if not info.stochastic:
            continue
        torch.manual_seed(0)
        noisy = info.fn(GAUSS, x, sig, disable=True, **info.kwargs)
        ode = info.fn(GAUSS, x, sig, disable=True, **_ode_kwargs(info))
        assert bool(torch.isfinite(noisy).all()) and not torch.allclose(noisy, ode), name
    assert torch.equal(x, x_copy)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("fn", "kwargs", "match"), [
    (unipc.sample_unipc, {"order": 4}, "order"),
    (unipc.sample_unipc, {"variant": "bh3"}, "variant"),
    (deis.sample_deis, {"order": 0}, "order"),
    (dpmpp.sample_dpmpp_2m_sde, {"solver_type": "euler"}, "solver_type"),
    (dpmpp.sample_dpmpp_2s_ancestral, {"eta": -1.0}, "eta"),
    (dpmpp.sample_dpmpp_2s, {"r": 0.0}, "r"),
    (dpmpp.sample_dpmpp_3s, {"r1": 0.7, "r2": 0.6}, "r1"),
])
def test_bad_arguments_raise(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(GAUSS, GAUSS.start(2, 20.0), _karras(4), disable=True, **kwargs)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "deis_3"])
def test_bad_sigmas_raise(name):
    fn = REGISTRY[name].fn
    x = GAUSS.start(2, 20.0)
    with pytest.raises(ValueError, match="sigmas"):
        fn(GAUSS, x, torch.tensor([1.0, 2.0, 0.0], dtype=F64), disable=True)  # increasing
    with pytest.raises(ValueError, match="sigmas"):
        fn(GAUSS, x, torch.tensor([2.0, 1.0, 1.0], dtype=F64), disable=True)  # zero-length step
    with pytest.raises(TypeError, match="sigmas"):
        fn(GAUSS, x, [2.0, 1.0], disable=True)
