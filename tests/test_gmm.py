"""The exact Gaussian-mixture model is exact: every quantity is checked against an independent
route (autograd of the density, importance sampling, quadrature, sample moments with standard-error
bounds, closed-form single-Gaussian ODE solutions)."""

import math

import pytest
import torch

from fastdiff.models.gmm import GaussianMixture

F64 = torch.float64


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.default(2)


def _points(n=32, scale=3.0, seed=0, d=2):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g, dtype=F64)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 4.0, 30.0])
def test_denoiser_is_tweedie_of_log_prob(gmm, sigma):
    # Tweedie: E[x0 | x] = x + sigma^2 grad log p_sigma(x); the gradient comes from autograd of the
    # log-sum-exp density, a different code path from the closed-form posterior mean.
    x = _points(scale=1.0 + sigma).requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    x = x.detach()
    torch.testing.assert_close(gmm.denoiser(x, sigma), x + sigma**2 * grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gmm.score(x, sigma), grad, atol=1e-12, rtol=1e-10)


def test_score_at_sigma_zero_is_grad_log_prob(gmm):
    x = _points().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x).sum(), x)
    torch.testing.assert_close(gmm.score(x.detach(), 0.0), grad, atol=1e-12, rtol=1e-10)


def test_denoiser_matches_importance_sampling(gmm):
    # E[x0 | x] = E_p0[x0 N(x; x0, sigma^2)] / E_p0[N(x; x0, sigma^2)], estimated by self-normalised
    # importance sampling from exact prior samples; the bound is 5 delta-method standard errors.
    sigma, n = 0.8, 400_000
    x0 = gmm.sample(n, generator=torch.Generator().manual_seed(1))
    x = torch.tensor([[-1.0, -0.5], [1.0, 0.0], [0.5, 1.8]], dtype=F64)
    for xi, di in zip(x, gmm.denoiser(x, sigma), strict=True):
        logw = -((x0 - xi) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        est = (w[:, None] * x0).sum(0)
        se = torch.sqrt((w[:, None] ** 2 * (x0 - est) ** 2).sum(0))
        assert bool(((est - di).abs() <= 5 * se).all()), (est, di, se)
        assert float(1 / (w**2).sum()) > 1000  # enough effective samples for the bound to mean much


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_log_prob_integrates_to_one_1d(sigma):
    from scipy.integrate import quad

    g = GaussianMixture.default(1)
    f = lambda t: math.exp(float(g.log_prob(torch.tensor([[t]], dtype=F64), sigma)))
    total = sum(quad(f, a, b, epsabs=1e-13, epsrel=1e-12, limit=200)[0]
                for a, b in [(-math.inf, -1.0), (-1.0, 1.0), (1.0, math.inf)])
    assert abs(total - 1.0) < 1e-9


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_log_prob_integrates_to_one_2d(gmm, sigma):
    # Trapezoid on a fine grid is spectrally accurate for smooth, rapidly decaying integrands.
    t = torch.linspace(-10, 10, 1001, dtype=F64)
    h = float(t[1] - t[0])
    xx, yy = torch.meshgrid(t, t, indexing="ij")
    p = gmm.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1), sigma).exp()
    assert abs(float(p.sum()) * h * h - 1.0) < 1e-9


def test_log_prob_is_the_convolution_1d():
    # p_sigma(x) = int p0(y) N(x - y; 0, sigma^2) dy by quadrature, against the closed form.
    from scipy.integrate import quad

    g, sigma = GaussianMixture.default(1), 0.9
    p0 = lambda y: math.exp(float(g.log_prob(torch.tensor([[y]], dtype=F64))))
    for x in [-3.0, 0.2, 2.5]:
        integrand = lambda y, x=x: p0(y) * math.exp(-((x - y) ** 2) / (2 * sigma**2)) / math.sqrt(
            2 * math.pi * sigma**2)
        val = quad(integrand, -20, 20, points=[x], epsabs=1e-14, limit=200)[0]
        closed = math.exp(float(g.log_prob(torch.tensor([[x]], dtype=F64), sigma)))
        assert abs(val - closed) < 1e-10 * max(1.0, closed)


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_sample_moments(gmm, sigma):
    n = 200_000
    x = gmm.sample(n, generator=torch.Generator().manual_seed(2), sigma=sigma)
    mean, cov = gmm.mean, gmm.covariance(sigma)
    m_hat = x.mean(0)
    se_mean = torch.sqrt(torch.diag(cov) / n)
    assert bool(((m_hat - mean).abs() <= 5 * se_mean).all())
    c = x - m_hat
    prods = c[:, :, None] * c[:, None, :]  # [n, d, d]
    se_cov = prods.std(0) / math.sqrt(n)
    assert bool(((prods.mean(0) - cov).abs() <= 5 * se_cov).all())


def test_sample_is_seeded_and_typed(gmm):
    a = gmm.sample(100, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    b = gmm.sample(100, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert a.dtype == torch.float32 and a.shape == (100, 2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.7, 0.95])
def test_flow_denoiser_is_ve_denoiser_under_change_of_variables(gmm, s):
    # x_s = (1 - s) x0 + s eps  <=>  x_s / (1 - s) = x0 + s/(1 - s) eps: VE with sigma = s/(1-s).
    x = _points(scale=1.0)
    ve = gmm.denoiser(x / (1 - s), s / (1 - s))
    torch.testing.assert_close(gmm.flow_denoiser(x, s), ve, atol=1e-12, rtol=1e-10)
    if s > 0:  # velocity E[eps - x0 | x_s] = (x - D) / s
        v = (x - gmm.flow_denoiser(x, s)) / s
        torch.testing.assert_close(gmm.flow_velocity(x, s), v, atol=1e-11, rtol=1e-10)


def test_vp_denoiser_is_ve_denoiser_under_change_of_variables(gmm):
    x, sigma = _points(), torch.tensor([0.1, 1.0, 5.0, 80.0], dtype=F64).repeat(8)
    x_vp = x / torch.sqrt(1 + sigma**2)[:, None]
    torch.testing.assert_close(gmm.vp_denoiser(x_vp, sigma), gmm.denoiser(x, sigma),
                               atol=1e-12, rtol=1e-10)


def test_eps_is_noise_prediction(gmm):
    x, sigma = _points(), 0.6
    torch.testing.assert_close(gmm.eps(x, sigma), (x - gmm.denoiser(x, sigma)) / sigma,
                               atol=1e-12, rtol=1e-10)


def test_batched_sigma_equals_rowwise(gmm):
    x = _points(n=6)
    sigma = torch.tensor([0.0, 0.01, 0.5, 2.0, 50.0, 1e4], dtype=F64)
    rows = torch.cat([gmm.denoiser(x[i:i + 1], float(sigma[i])) for i in range(6)])
    torch.testing.assert_close(gmm.denoiser(x, sigma), rows, atol=0, rtol=0)
    torch.testing.assert_close(gmm(x, sigma, cond="ignored"), rows, atol=0, rtol=0)


def test_extremes_are_finite_and_exact(gmm):
    x = _points(scale=5.0)
    assert torch.equal(gmm.denoiser(x, 0.0), x)
    assert torch.equal(gmm.flow_denoiser(x, 0.0), x)
    xb = 1e4 * _points(scale=1.0)  # typical points at sigma = 1e4
    big = gmm.denoiser(xb, 1e4)
    assert torch.isfinite(big).all()
    # As sigma -> inf the posterior tends to the prior: to first order in x / sigma^2,
    # D = mean + Cov0 (x - mean) / sigma^2; the next term is O(|x|^2 / sigma^4) ~ 1e-7 here.
    first_order = gmm.mean + (xb - gmm.mean) @ gmm.covariance() / 1e8
    torch.testing.assert_close(big, first_order, atol=1e-6, rtol=0)
    torch.testing.assert_close(gmm.flow_denoiser(x, 1.0), gmm.mean.expand_as(x),
                               atol=1e-14, rtol=0)
    for val in (gmm.score(x, 0.0), gmm.score(x, 1e4), gmm.log_prob(x, 0.0), gmm.log_prob(x, 1e4),
                gmm.eps(x, 0.0), gmm.flow_velocity(x, 0.0), gmm.flow_velocity(x, 1.0)):
        assert torch.isfinite(val).all()
    # float32 input keeps its dtype and agrees with the float64 computation
    d32 = gmm.denoiser(x.float(), 0.3)
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), gmm.denoiser(x.float().double(), 0.3))


def test_trailing_dims_are_flattened():
    g = GaussianMixture.default(4)
    x = _points(n=5, d=4)
    torch.testing.assert_close(g.denoiser(x.reshape(5, 1, 2, 2), 0.4).reshape(5, 4),
                               g.denoiser(x, 0.4), atol=0, rtol=0)


def test_bad_inputs_raise(gmm):
    with pytest.raises(ValueError, match="x must"):
        gmm.denoiser(torch.zeros(3, 5, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        gmm.denoiser(torch.zeros(3, 2, dtype=F64), torch.ones(2))
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(2), 1.0)


def test_ode_solution_single_gaussian_closed_form():
    # For x0 ~ N(mu, s^2 I) the PF-ODE is linear: x(sigma) - mu scales with sqrt(s^2 + sigma^2).
    mu, s = torch.tensor([[0.5, -1.0]], dtype=F64), 0.7
    g = GaussianMixture(mu, s)
    x = _points(n=8, scale=10.0)
    got = g.ode_solution(x, 20.0, 0.05)
    want = mu + (x - mu) * math.sqrt(s**2 + 0.05**2) / math.sqrt(s**2 + 20.0**2)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # down to sigma = 0 exactly (the -sigma * score form has no 0/0)
    want0 = mu + (x - mu) * s / math.sqrt(s**2 + 20.0**2)
    torch.testing.assert_close(g.ode_solution(x, 20.0, 0.0), want0, atol=1e-10, rtol=1e-10)


def test_flow_ode_solution_single_gaussian_closed_form():
    # x_s ~ N((1-s) mu, ((1-s)^2 s0^2 + s^2) I); the ODE map is affine between the marginals.
    mu, s0 = torch.tensor([[0.5, -1.0]], dtype=F64), 0.7
    g = GaussianMixture(mu, s0)
    std = lambda s: math.sqrt((1 - s) ** 2 * s0**2 + s**2)
    x = _points(n=8, scale=1.0)
    got = g.flow_ode_solution(x, 1.0, 0.0)
    want = mu + x * std(0.0) / std(1.0)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
