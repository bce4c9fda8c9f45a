"""Tests for the DDIM / DDPM / LCM, PNDM / iPNDM and flow-matching reference solvers.

Ground truth is an exact Gaussian data distribution x0 ~ N(M, diag(S^2)), for which the denoiser,
the probability-flow ODE solution and the consistency function are closed-form (derived below,
independently of the solvers), plus diffusers' schedulers on the same inputs.
"""

import math

import pytest
import torch

from fastdiff.reference.solvers import ddim, flow, pndm
from fastdiff.reference.solvers._utils import default_noise_sampler

F64 = torch.float64
M = torch.tensor([0.5, -1.0], dtype=F64)  # data mean
S = torch.tensor([1.0, 0.6], dtype=F64)  # data std per dimension

SOLVERS = {**ddim.SOLVERS, **pndm.SOLVERS, **flow.SOLVERS}


# ---- exact Gaussian, VE convention: x = x0 + sigma eps ---------------------------------------

def gauss_denoiser(x, sigma):
    """E[x0 | x] = M + S^2 / (S^2 + sigma^2) (x - M) (Gaussian conditioning)."""
    sigma = sigma.reshape(-1, 1)
    return M + S**2 / (S**2 + sigma**2) * (x - M)


def gauss_ode(x, sigma0, sigma1):
    """PF-ODE dx/dsigma = (x - D) / sigma = (x - M) sigma / (S^2 + sigma^2), solved exactly:
    x - M scales with sqrt(S^2 + sigma^2)."""
    return M + (x - M) * torch.sqrt(S**2 + sigma1**2) / torch.sqrt(S**2 + sigma0**2)


def gauss_consistency(x, sigma):
    """The consistency function f(x, sigma) = ODE solution at sigma = 0 (Song et al. 2023)."""
    return gauss_ode(x, sigma.reshape(-1, 1), 0.0)


def gauss_marginal(n, sigma, generator):
    """n exact draws of x_sigma ~ N(M, S^2 + sigma^2)."""
    z = torch.randn(n, 2, generator=generator, dtype=F64)
    return M + torch.sqrt(S**2 + sigma**2) * z


# ---- exact Gaussian, flow convention: x_s = (1 - s) x0 + s eps -------------------------------

def flow_var(s):
    return (1 - s) ** 2 * S**2 + s**2  # Var[x_s] per dimension


def flow_gauss_denoiser(x, s):
    """E[x0 | x_s] = M + Cov(x0, x_s) / Var(x_s) (x - E x_s), Cov = (1 - s) S^2."""
    s = s.reshape(-1, 1)
    return M + (1 - s) * S**2 / flow_var(s) * (x - (1 - s) * M)


def flow_gauss_ode(x, s0, s1):
    """dx/ds = (x - D) / s solved exactly: with u = x - (1 - s) M, du/ds = u (s - (1 - s) S^2) /
    Var(x_s) = u d/ds log sqrt(Var(x_s)), so u scales with sqrt(Var(x_s))."""
    return (1 - s1) * M + (x - (1 - s0) * M) * torch.sqrt(flow_var(s1) / flow_var(s0))


def test_flow_ground_truth_matches_ve_ground_truth():
    """The two derivations agree: x_s / (1 - s) is the VE sample at sigma = s / (1 - s)."""
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    s0, s1 = torch.tensor(0.8, dtype=F64), torch.tensor(0.3, dtype=F64)
    sig0, sig1 = s0 / (1 - s0), s1 / (1 - s1)
    torch.testing.assert_close(flow_gauss_denoiser(x, s0.expand(16)),
                               gauss_denoiser(x / (1 - s0), sig0.expand(16)), rtol=1e-13, atol=0)
    torch.testing.assert_close(flow_gauss_ode(x, s0, s1),
                               (1 - s1) * gauss_ode(x / (1 - s0), sig0, sig1),
                               rtol=1e-13, atol=0)


# ---- convergence orders ----------------------------------------------------------------------

def uniform(n, hi, lo):
    return torch.linspace(hi, lo, n + 1, dtype=F64)


def karras(n, hi, lo, rho=7.0):
    ramp = torch.linspace(0, 1, n + 1, dtype=F64)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def sd3_shift(n, shift=3.0):
    s = torch.linspace(1, 0, n + 1, dtype=F64)
    return shift * s / (1 + (shift - 1) * s)


def fitted_order(ns, errs):
    """Least-squares slope of -log(err) against log(N)."""
    lx = torch.tensor([math.log(n) for n in ns], dtype=F64)
    ly = torch.tensor([math.log(e) for e in errs], dtype=F64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return -float((lx * ly).sum() / (lx * lx).sum())


def measured_order(name, grid, ns=(20, 40, 80, 160)):
    info = SOLVERS[name]
    kwargs = {**info.kwargs, **info.deterministic_kwargs}
    gen = torch.Generator().manual_seed(1)
    errs = []
    for n in ns:
        sig = grid(n)
        if info.param == "flow":
            x = torch.randn(32, 2, generator=gen, dtype=F64)  # exact marginal at s = 1
            out = info.fn(flow_gauss_denoiser, x, sig, disable=True, **kwargs)
            exact = flow_gauss_ode(x, sig[0], sig[-1])
        else:
            x = gauss_marginal(32, sig[0], gen)
            out = info.fn(gauss_denoiser, x, sig, disable=True, **kwargs)
            exact = gauss_ode(x, sig[0], sig[-1])
        errs.append((out - exact).abs().max().item())
    return fitted_order(ns, errs), errs


# Uniform-in-sigma grid from sigma = 1 (data scale) to 0.1: the warm-up steps of the multistep
# methods fall where eps varies, so their (derived) asymptotic orders show already at N <= 80.
# From sigma = 10 the warm-up error is negligible until N ~ 1000 and all three look 4th order.
UNIFORM = lambda n: uniform(n, 1.0, 0.1)
KARRAS = lambda n: karras(n, 10.0, 0.05)


@pytest.mark.parametrize("name, grid", [
    ("ddim", UNIFORM), ("ddim", KARRAS), ("ddim_eta", KARRAS),  # eta = 0 is Euler: any grid
    ("plms", UNIFORM), ("pndm", UNIFORM), ("ipndm", UNIFORM),  # AB weights need equal steps
    ("flow_euler", lambda n: uniform(n, 1.0, 0.0)), ("flow_euler", sd3_shift),
    ("flow_heun", lambda n: uniform(n, 1.0, 0.0)), ("flow_heun", sd3_shift),
])
def test_convergence_order_matches_registry(name, grid):
    order, errs = measured_order(name, grid)
    assert abs(order - SOLVERS[name].order) <= 0.3, (name, order, errs)


@pytest.mark.parametrize("name", ["plms", "pndm", "ipndm"])
def test_fixed_adams_bashforth_weights_are_second_order_on_nonuniform_grids(name):
    """On a Karras grid the equal-step AB weights are only consistent to 2nd order (pndm.py doc),
    so the registry order is tied to the uniform-in-sigma grid."""
    order, errs = measured_order(name, KARRAS)
    assert abs(order - 2) <= 0.3, (name, order, errs)


def cubic(s):
    return 1.0 + 2.0 * s - 0.5 * s**2 + 0.3 * s**3


def cubic_integral(s):
    return s + s**2 - s**3 / 6 + 0.075 * s**4


@pytest.mark.parametrize("name", ["plms", "pndm", "ipndm"])
def test_adams_bashforth_phase_is_exact_for_cubic_eps_on_equal_steps(name):
    """With eps = p(sigma) a cubic independent of x (D = x - sigma p), dx/dsigma = p has no error
    propagation, so every step's local error simply adds up. The 4-step AB weights (Liu et al.
    eq. 12) integrate cubics exactly on equal steps: all error comes from the 3 warm-up steps,
    i.e. running 12 steps leaves the same error as running only the first 3. The pseudo-RK4
    warm-up (Simpson's rule here) is itself exact."""
    info = SOLVERS[name]
    model = lambda x, s: x - s.reshape(-1, 1) * cubic(s).reshape(-1, 1)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(14), dtype=F64)

    def error(sig):
        out = info.fn(model, x, sig, disable=True, **info.kwargs)
        return out - (x + cubic_integral(sig[-1]) - cubic_integral(sig[0]))

    grid = uniform(12, 2.0, 0.2)
    torch.testing.assert_close(error(grid), error(grid[:4]), rtol=0, atol=1e-12)
    if name == "pndm":
        torch.testing.assert_close(error(grid), torch.zeros_like(x), rtol=0, atol=1e-12)
    else:  # the lower-order warm-up is not exact for a cubic (the test can fail)
        assert error(grid[:4]).abs().max() > 1e-6


# ---- identities --------------------------------------------------------------------------------

def test_ddim_eta0_equals_euler():
    euler = pytest.importorskip("fastdiff.reference.solvers.euler")
    x = gauss_marginal(8, 10.0, torch.Generator().manual_seed(2))
    sig = torch.cat([karras(12, 10.0, 0.05), torch.zeros(1, dtype=F64)])
    out = ddim.sample_ddim(gauss_denoiser, x, sig, disable=True, eta=0.0)
    ref = euler.sample_euler(gauss_denoiser, x, sig, disable=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_zero", [False, True])
def test_ddim_eta1_equals_ddpm_posterior(with_zero):
    """Song et al. 2021 Sec. 4.1: eta = 1 gives DDPM's posterior; checked with the same noise."""
    x = gauss_marginal(8, 10.0, torch.Generator().manual_seed(3))
    sig = karras(9, 10.0, 0.05)
    if with_zero:
        sig = torch.cat([sig, torch.zeros(1, dtype=F64)])
    outs = []
    for fn, kw in [(ddim.sample_ddim, {"eta": 1.0}), (ddim.sample_ddpm, {})]:
        ns = default_noise_sampler(x, generator=torch.Generator().manual_seed(4))
        outs.append(fn(gauss_denoiser, x, sig, disable=True, noise_sampler=ns, **kw))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


# ---- final distributions of the stochastic samplers -------------------------------------------

def assert_moments_match_data(samples):
    """Mean and variance per dimension within 5 standard errors of the Gaussian data's."""
    n = samples.shape[0]
    var = S**2
    se_mean = torch.sqrt(var / n)
    se_var = var * math.sqrt(2 / (n - 1))
    assert ((samples.mean(0) - M).abs() <= 5 * se_mean).all(), (samples.mean(0), M)
    assert ((samples.var(0) - var).abs() <= 5 * se_var).all(), (samples.var(0), var)


def test_ddpm_final_distribution():
    """Ho et al.'s own schedule (linear betas 1e-4..0.02, T = 1000). Even with the exact
    denoiser, DDPM's beta_tilde reverse variance is biased by O(1/T); for this data and schedule
    the bias, computed from the linear-Gaussian recursion, is -0.9% of Var, below one standard
    error (1%) at n = 20000."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    abar = torch.cumprod(1 - betas, 0)
    sig = torch.cat([((1 - abar) / abar).sqrt().flip(0), torch.zeros(1, dtype=F64)])
    gen = torch.Generator().manual_seed(5)
    x = gauss_marginal(20000, sig[0], gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 3000 tiny ops: on a busy 2-core box OpenMP waits cost 10x
    try:
        out = ddim.sample_ddpm(gauss_denoiser, x, sig, disable=True,
                               noise_sampler=default_noise_sampler(x, generator=gen))
    finally:
        torch.set_num_threads(threads)
    assert_moments_match_data(out)


def test_lcm_final_distribution_and_last_step_is_denoised():
    """With the exact consistency function, multistep consistency sampling is exact in
    distribution for any number of steps (f maps N(M, S^2 + sigma^2) onto N(M, S^2))."""
    sig = torch.cat([karras(4, 80.0, 0.5), torch.zeros(1, dtype=F64)])
    gen = torch.Generator().manual_seed(6)
    x = gauss_marginal(20000, sig[0], gen)
    seen = []
    out = ddim.sample_lcm(gauss_consistency, x, sig, disable=True,
                          noise_sampler=default_noise_sampler(x, generator=gen),
                          callback=lambda d: seen.append(d["denoised"]))
    assert len(seen) == len(sig) - 1
    assert torch.equal(out, seen[-1])
    assert_moments_match_data(out)


# ---- parity with diffusers on the same inputs ---------------------------------------------------

def _vp_eps_model(alphas_cumprod):
    """A diffusers eps-prediction model made from the exact VE denoiser."""
    def eps_model(x_vp, t):
        ab = alphas_cumprod[int(t)]
        sigma = ((1 - ab) / ab).sqrt()
        x = x_vp / ab.sqrt()
        return (x - gauss_denoiser(x, sigma.expand(x.shape[0]))) / sigma
    return eps_model


def _diffusers_sigmas(sched):
    ab = sched.alphas_cumprod[torch.as_tensor(sorted(set(sched.timesteps.tolist()), reverse=True))]
    return torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=F64)])


def _run_diffusers(sched, x, step_kwargs=lambda i: {}):
    eps_model = _vp_eps_model(sched.alphas_cumprod)
    x_vp = x * sched.alphas_cumprod[int(sched.timesteps[0])].sqrt()
    for i, t in enumerate(sched.timesteps):
        x_vp = sched.step(eps_model(x_vp, t), t, x_vp, **step_kwargs(i)).prev_sample
    return x_vp  # the last step ends at abar = 1, where VP and VE samples coincide


def test_plms_matches_diffusers_pndm_skip_prk():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=True)
    sched.set_timesteps(12)
    sched.alphas_cumprod = sched.alphas_cumprod.to(F64)  # compare the maths, not fp32 rounding
    sig = _diffusers_sigmas(sched)
    x = gauss_marginal(8, sig[0], torch.Generator().manual_seed(7))
    out = pndm.sample_pndm(gauss_denoiser, x, sig, disable=True, warmup="plms")
    torch.testing.assert_close(out, _run_diffusers(sched, x), rtol=1e-10, atol=1e-10)


def test_ddim_matches_diffusers_with_eta():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(10)
    sched.alphas_cumprod = sched.alphas_cumprod.to(F64)
    sig = _diffusers_sigmas(sched)
    x = gauss_marginal(8, sig[0], torch.Generator().manual_seed(8))
    noise = torch.randn(10, *x.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    it = iter(noise)
    out = ddim.sample_ddim(gauss_denoiser, x, sig, disable=True, eta=0.5,
                           noise_sampler=lambda s, s_next: next(it))
    ref = _run_diffusers(sched, x, lambda i: {"eta": 0.5, "variance_noise": noise[i]})
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_ddpm_matches_diffusers_fixed_small():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small")
    sched.set_timesteps(10)
    sched.alphas_cumprod = sched.alphas_cumprod.to(F64)
    sig = _diffusers_sigmas(sched)
    x = gauss_marginal(8, sig[0], torch.Generator().manual_seed(10))
    ns = default_noise_sampler(x, generator=torch.Generator().manual_seed(11))
    out = ddim.sample_ddpm(gauss_denoiser, x, sig, disable=True, noise_sampler=ns)
    gen = torch.Generator().manual_seed(11)  # diffusers draws the same N(0, I) in the same order
    ref = _run_diffusers(sched, x, lambda i: {"generator": gen})
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_flow_euler_matches_diffusers_flow_match_euler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    sig = sched.sigmas.to(F64)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    out = flow.sample_flow_euler(flow_gauss_denoiser, x, sig, disable=True)
    ref = x
    for i, t in enumerate(sched.timesteps):  # the network predicts the velocity v = (x - D) / s
        v = (ref - flow_gauss_denoiser(ref, sig[i].expand(8))) / sig[i]
        ref = sched.step(v, t, ref).prev_sample
    # diffusers upcasts the sample to float32 inside `step`: compare at fp32 tolerance.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- API contract ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dtype_no_inplace_and_callback(name, dtype):
    info = SOLVERS[name]
    if info.param == "flow":
        sig, model = sd3_shift(6).to(dtype), flow_gauss_denoiser
    else:
        sig, model = torch.cat([karras(6, 10.0, 0.05), torch.zeros(1, dtype=F64)]).to(dtype), \
            gauss_denoiser
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(13), dtype=F64).to(dtype)
    x_copy = x.clone()
    calls = []
    out = info.fn(lambda x_, s_: model(x_.to(F64), s_.to(F64)).to(dtype), x, sig, disable=True,
                  callback=calls.append, **info.kwargs)
    assert torch.equal(x, x_copy)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    assert [c["i"] for c in calls] == list(range(len(sig) - 1))
    assert set(calls[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


def test_bad_arguments_raise():
    x = torch.zeros(2, 2, dtype=F64)
    sig = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    with pytest.raises(ValueError, match="eta"):
        ddim.sample_ddim(gauss_denoiser, x, sig, disable=True, eta=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        pndm.sample_pndm(gauss_denoiser, x, sig, disable=True, warmup="rk")
    with pytest.raises(ValueError, match="max_order"):
        pndm.sample_ipndm(gauss_denoiser, x, sig, disable=True, max_order=5)
    with pytest.raises(ValueError, match="sigmas"):
        flow.sample_flow_euler(flow_gauss_denoiser, x, torch.tensor([2.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match="sigmas"):
        ddim.sample_ddpm(gauss_denoiser, x, torch.tensor([1.0, 0.0, 0.0]), disable=True)
