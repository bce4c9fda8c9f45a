"""SA-Solver (sa_solver, sa_solver_pece; VE and flow kinds) by mathematics, beyond the
registry-wide tests (fused = reference in tests/test_sampler.py, the mixture distribution in
tests/test_stochastic.py, the VE ODE order of the defaults in tests/test_convergence.py):
- the Adams weights against closed forms (uniform grid, orders 1 and 2, derived by hand below)
  and against numerical quadrature of the Lagrange basis (scipy), not against the code's moments;
- ODE orders min(s_p + 1, s_c) for several (predictor, corrector) orders, on the exact mixture,
  in both model kinds;
- data that is a point mass c has D = c, which every Adams weight set integrates exactly: the
  samples then have the exact marginal (mean alpha c, std sigma) in both kinds, and half the
  noise is detected (negative control); in ODE mode a golden value by hand;
- ComfyUI's step logic: model calls, noise draws, the lowered final orders, the final sample;
- fastdiff.comfyui's window from the model's own schedule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from test_convergence import _gmm as _conv_gmm
from test_convergence import _grid, _problem
from test_stochastic import _gmm, karras_sigmas, statistic

from fastdiff import comfyui
from fastdiff.ops import unavailable_reason
from fastdiff.reference.solvers import SOLVERS
from fastdiff.reference.solvers._utils import default_noise_sampler
from fastdiff.reference.solvers.sa_solver import (
    _moments,
    sa_weights,
    sample_sa_solver,
    sample_sa_solver_pece,
)
from fastdiff.sampler import Sampler

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


# --- the weights --------------------------------------------------------------------------------

def quad_weights(nodes, lam_s, lam_t, tau):
    """int c e^(-c (lam_t - l)) L_j(l) dl by adaptive quadrature of each Lagrange basis
    polynomial (numpy's fromroots), an independent derivation of the Adams weights. The basis
    is written in r = (l - lam_s) / h (in raw lambda its values cancel to ~1e-10 for small h)."""
    c, h = 1 + tau * tau, lam_t - lam_s
    r_nodes = [(v - lam_s) / h for v in nodes]
    out = []
    for j, rj in enumerate(r_nodes):
        others = [v for m, v in enumerate(r_nodes) if m != j]
        basis = np.polynomial.Polynomial.fromroots(others) / np.prod([rj - v for v in others])
        val, _ = integrate.quad(lambda r, b=basis: c * h * math.exp(-c * h * (1 - r)) * b(r), 0, 1,
                                epsabs=1e-16, epsrel=1e-13)
        out.append(val)
    return out


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_weights_closed_forms_on_a_uniform_grid(tau):
    # c = 1 + tau^2, step h, X = c h. Order 1: int_0^h c e^(-cv) dv = 1 - e^-X.
    # Order 2 predictor, nodes lam_s and lam_s - h; in v = lam_t - l they sit at v = h, 2h:
    # L_s = (2h - v)/h, L_prev = (v - h)/h. With M0 = 1 - e^-X and
    # M1 = int_0^h c e^(-cv) v/h dv = (1 - e^-X (1 + X)) / X:  w_s = 2 M0 - M1, w_prev = M1 - M0.
    # Order 2 corrector, nodes lam_t (v = 0) and lam_s (v = h): w_t = M0 - M1, w_s = M1.
    h, lam_s = 0.3, 1.7
    lam_t, c = lam_s + h, 1 + tau * tau
    X = c * h
    m0, m1 = -math.expm1(-X), (1 - math.exp(-X) * (1 + X)) / X
    assert sa_weights([lam_s], lam_s, lam_t, tau) == pytest.approx([m0], rel=1e-14)
    assert sa_weights([lam_s - h, lam_s], lam_s, lam_t, tau) == \
        pytest.approx([m1 - m0, 2 * m0 - m1], rel=1e-13)
    assert sa_weights([lam_s, lam_t], lam_s, lam_t, tau) == pytest.approx([m1, m0 - m1],
                                                                           rel=1e-13)


@pytest.mark.parametrize("h", [1e-3, 0.1, 0.8, 3.0])
@pytest.mark.parametrize("tau", [0.0, 0.7, 3.0])
@pytest.mark.parametrize("shape", ["predictor3", "corrector4", "nonuniform6"])
def test_weights_equal_quadrature_of_the_lagrange_basis(shape, tau, h):
    lam_s = -2.0
    lam_t = lam_s + h
    nodes = {"predictor3": [lam_s - 2 * h, lam_s - h, lam_s],
             "corrector4": [lam_s - 2 * h, lam_s - h, lam_s, lam_t],
             "nonuniform6": [lam_s - 2.9 * h, lam_s - 2.1 * h, lam_s - 1.5 * h, lam_s - 0.6 * h,
                             lam_s, lam_t]}[shape]
    want = quad_weights(nodes, lam_s, lam_t, tau)
    got = sa_weights(nodes, lam_s, lam_t, tau)
    scale = max(map(abs, want))
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-11 * scale, (got, want)
    assert sum(got) == pytest.approx(-math.expm1(-(1 + tau * tau) * h), rel=1e-12)


def _schoolbook_weights(nodes, lam_s, lam_t, tau):
    """sa_weights with the general polynomial product (out[i + j] += a_i b_j): the numbers the
    plans were built from before the product was specialised to linear factors (issue 14)."""
    h = lam_t - lam_s
    u = [(lam_t - lam) / h for lam in nodes]
    moments = _moments((1.0 + tau * tau) * h, len(u))
    weights = []
    for j, uj in enumerate(u):
        basis = [1.0]
        for m, um in enumerate(u):
            if m != j:
                factor = [-um / (uj - um), 1.0 / (uj - um)]
                out = [0.0] * (len(basis) + 1)
                for i, a in enumerate(basis):
                    for k, b in enumerate(factor):
                        out[i + k] += a * b
                basis = out
        weights.append(sum(b * mp for b, mp in zip(basis, moments)))
    return weights


def test_weights_are_bitwise_the_general_polynomial_product():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        k = int(rng.integers(1, 7))
        lam_s, h = float(rng.uniform(-5, 5)), float(10 ** rng.uniform(-4, 1))
        lam_t = lam_s + h
        nodes = [lam_s - h * (j + float(rng.uniform(0, 0.5))) for j in range(k - 1, -1, -1)]
        if rng.random() < 0.5:  # a corrector: lambda_t is a node (u = 0, zero coefficients)
            nodes[-1] = lam_t
        tau = float(rng.choice([0.0, 1.0, rng.random()]))
        got, want = sa_weights(nodes, lam_s, lam_t, tau), _schoolbook_weights(nodes, lam_s,
                                                                             lam_t, tau)
        assert [math.copysign(1, w) for w in got] == [math.copysign(1, w) for w in want]
        assert got == want


# --- ODE orders ---------------------------------------------------------------------------------

def _flow_lambda_problem(n_max_batch=16):
    """Flow ODE from s = 0.999 to 0.05 on grids uniform in the flow half log-SNR: exact samples
    of the marginal at 0.999 (x_s = (1 - s) x_ve at VE sigma s / (1 - s))."""
    g = _conv_gmm()
    s0, s1 = 0.999, 0.05
    x = g.sample(n_max_batch, generator=torch.Generator().manual_seed(0), sigma=s0 / (1 - s0))
    x = x * (1 - s0)
    return g.flow_denoiser, x, g.flow_ode_solution(x, s0, s1), (s0, s1)


def _flow_grid(n, s0, s1):
    lam = torch.linspace(math.log((1 - s0) / s0), math.log((1 - s1) / s1), n + 1, dtype=F64)
    return torch.sigmoid(-lam)


# (registry name, options, theory order min(s_p + 1, s_c) or s_p without corrector, ladder)
ORDERS = [
    ("sa_solver", {"corrector_order": 0}, 3, (128, 256, 512)),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 3}, 3, (128, 256, 512)),
    ("sa_solver", {"predictor_order": 1, "corrector_order": 2}, 2, (64, 128, 256)),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True}, 2,
     (64, 128, 256)),
    ("sa_solver_pece", {"predictor_order": 1, "corrector_order": 2}, 2, (64, 128, 256)),
    ("sa_solver_flow", {}, 4, (256, 512, 1024)),
    ("sa_solver_pece_flow", {}, 4, (256, 512, 768)),
]


@pytest.mark.parametrize(("name", "options", "order", "ladder"), ORDERS)
def test_ode_order(name, options, order, ladder):
    info = SOLVERS[name]
    if info.param == "flow":
        model, x, exact, ends = _flow_lambda_problem()
        grid = lambda n: _flow_grid(n, *ends)  # noqa: E731
    else:
        model, x, exact = _problem("lambda")
        grid = lambda n: _grid("lambda", n)  # noqa: E731
    errors = []
    for n in ladder:
        out = info.fn(model, x.clone(), grid(n), disable=True,
                      **{**info.kwargs, "eta": 0.0, **options})
        errors.append(float((out - exact).pow(2).mean().sqrt()))
    log_n, log_e = np.log(ladder), np.log(errors)
    slope = -np.polyfit(log_n, log_e, 1)[0]
    assert min(errors) > 1e-9 and abs(slope - order) <= 0.3, (name, options, errors, slope)


# --- point mass: exact marginals and golden values ----------------------------------------------

C = 1.5
N = 40_000
KINDS = {"ve": "", "flow": "_flow"}


def point_mass(x, sigma, **kwargs):
    return torch.full_like(x, C)


def _point_mass_run(name, kind, **options):
    info = SOLVERS[name + KINDS[kind]]
    if kind == "flow":
        sigmas, alpha_end = torch.linspace(0.8, 0.3, 13, dtype=F64), 0.7
    else:
        sigmas, alpha_end = torch.exp(torch.linspace(math.log(20.0), math.log(0.3), 13,
                                                     dtype=F64)), 1.0
    gen = torch.Generator().manual_seed(3)
    alpha0 = 1 - float(sigmas[0]) if kind == "flow" else 1.0
    x = alpha0 * C + float(sigmas[0]) * torch.randn(N, 1, generator=gen, dtype=F64)
    ns = default_noise_sampler(x, torch.Generator().manual_seed(4))
    out = info.fn(point_mass, x, sigmas, disable=True, noise_sampler=ns,
                  **{**info.kwargs, **options})
    return out, alpha_end, 0.3


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_point_mass_marginal_is_exact(name, kind):
    out, alpha, sigma = _point_mass_run(name, kind, eta=1.3)
    # standard errors: mean sigma / sqrt(N), std sigma / sqrt(2N); 6 of them
    assert abs(float(out.mean()) - alpha * C) < 6 * sigma / math.sqrt(N)
    assert abs(float(out.std()) - sigma) < 6 * sigma / math.sqrt(2 * N)
    weak, _, _ = _point_mass_run(name, kind, eta=1.3, s_noise=0.5)  # negative control
    assert abs(float(weak.std()) - sigma) > 20 * sigma / math.sqrt(2 * N)


# D = c moves x along the ODE exactly (Adams weights sum to the exact integral). By hand,
# x = 4, c = 1.5, VE 2 -> 1 -> 0.5: 1.5 + 0.25 * 2.5 = 2.125; flow 0.8 -> 0.6 -> 0.4:
# eps = (4 - 0.2 * 1.5) / 0.8 = 4.625, x' = 0.6 * 1.5 + 0.4 * 4.625 = 2.75.
@pytest.mark.parametrize(("kind", "sigmas", "want"), [("ve", [2.0, 1.0, 0.5], 2.125),
                                                      ("flow", [0.8, 0.6, 0.4], 2.75)])
@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_ode_mode_golden_values(name, kind, sigmas, want):
    info = SOLVERS[name + KINDS[kind]]
    x = torch.full((3, 2), 4.0, dtype=F64)
    for options in ({"eta": 0.0}, {"tau_func": lambda s: 0.0}):
        out = info.fn(point_mass, x, torch.tensor(sigmas, dtype=F64), disable=True,
                      **{**info.kwargs, **options})
        assert torch.allclose(out, torch.full_like(x, want), rtol=1e-13, atol=0)


def test_negative_control_missing_noise_is_rejected_on_the_mixture():
    """The tau = 1 drift without its noise samples a sharpened mixture."""
    x = _gmm().sample(2000, generator=torch.Generator().manual_seed(0), sigma=80.0)
    out = sample_sa_solver(_gmm(), x, karras_sigmas(50), disable=True, s_noise=0.0)
    stat, threshold = statistic(out)
    assert stat > threshold, f"sa_solver without noise not rejected: {stat:.4f} <= {threshold:.4f}"


# --- ComfyUI's step logic ------------------------------------------------------------------------

class Recorder:
    """The mixture's denoiser, recording the inputs and noise levels of its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, **kwargs):
        self.calls.append((x.clone(), float(sigma.flatten()[0])))
        return _gmm()(x, sigma)


def _small(into_zero=True):
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 20
    ramp = torch.linspace(0, 1, 8, dtype=F64)
    s = (20 ** (1 / 7) + ramp * (0.05 ** (1 / 7) - 20 ** (1 / 7))) ** 7
    return x, (torch.cat([s, s.new_zeros(1)]) if into_zero else s)


@pytest.mark.parametrize("use_pece", [False, True])
def test_model_calls_and_the_last_step_into_zero(use_pece):
    x, sigmas = _small()
    model = Recorder()
    out = sample_sa_solver(model, x, sigmas, disable=True, use_pece=use_pece, eta=0.0)
    n = len(sigmas) - 1
    # one call a step; PECE re-evaluates each corrected state (none at the first step), and
    # into sigma = 0 returns D of the last call
    assert len(model.calls) == (2 * n - 1 if use_pece else n)
    last_x, last_sigma = model.calls[-1]
    assert last_sigma == float(sigmas[-2])
    assert torch.equal(out, _gmm()(last_x, sigmas[-2].expand(4)))


def test_noise_is_drawn_once_per_stochastic_step_as_comfyui_draws():
    # tau = eta on [end, start] at the predictor's target sigma_{i+1}; no draw elsewhere or
    # into 0, so a seeded generator is left where ComfyUI leaves it.
    x, sigmas = _small()
    start, end = 5.0, 0.3
    draws = []

    def ns(a, b):
        draws.append((float(a), float(b)))
        return torch.zeros_like(x)

    sample_sa_solver(_gmm(), x, sigmas, disable=True, noise_sampler=ns, sde_start_sigma=start,
                     sde_end_sigma=end)
    want = [(float(a), float(b)) for a, b in zip(sigmas[:-1], sigmas[1:])
            if start >= float(b) >= end and float(b) > 0]
    assert draws == want and 0 < len(want) < len(sigmas) - 2


def test_final_sample_above_zero():
    # ComfyUI's loop ends after the last correction: final="corrector" returns the corrected
    # sample at sigma_{N-1}; the default returns the predicted sample at sigma_N.
    x = _small()[0]
    sigmas = torch.exp(torch.linspace(math.log(20.0), math.log(0.5), 41, dtype=F64))
    pred = sample_sa_solver(_gmm(), x, sigmas, disable=True, eta=0.0)
    corr = sample_sa_solver(_gmm(), x, sigmas, disable=True, eta=0.0, final="corrector")
    exact = _gmm().ode_solution(x, float(sigmas[0]), float(sigmas[-1]))
    exact_before = _gmm().ode_solution(x, float(sigmas[0]), float(sigmas[-2]))
    assert float((pred - exact).abs().max()) < 0.05 * float((corr - exact).abs().max())
    assert float((corr - exact_before).abs().max()) < 0.05 * float((corr - exact).abs().max())


def test_bad_options_are_clear_errors():
    x, sigmas = _small()
    for kw, match in [({"predictor_order": 0}, "predictor_order"),
                      ({"corrector_order": -1}, "corrector_order"),
                      ({"predictor_order": 2.0}, "predictor_order"),
                      ({"final": "both"}, "final"), ({"eta": -1.0}, "eta"),
                      ({"model_kind": "eps"}, "model_kind")]:
        with pytest.raises(ValueError, match=match):
            sample_sa_solver(point_mass, x, sigmas, disable=True, **kw)
    with pytest.raises(TypeError, match="tau_func"):
        sample_sa_solver(point_mass, x, sigmas, disable=True, tau_func=0.5)
    with pytest.raises(TypeError, match="use_pece"):
        comfyui.sample_sa_solver_pece(point_mass, x, sigmas, disable=True, use_pece=False)
    with pytest.raises(TypeError, match="use_pece"):
        sample_sa_solver_pece(point_mass, x, sigmas, disable=True, use_pece=False)


# --- fastdiff.comfyui: the window from the model's own schedule ---------------------------------

def test_comfyui_window_comes_from_the_models_percent_to_sigma():
    x, sigmas = _small()
    seen = []

    class Sampling:
        def percent_to_sigma(self, p):
            seen.append(p)
            return {0.2: 5.0, 0.8: 0.3, 1e-4: 0.9999}[p]

    class Model:
        model_sampling = Sampling()

        def __call__(self, x, sigma, **kwargs):
            return _gmm()(x, sigma)

    ns = default_noise_sampler(x, torch.Generator().manual_seed(2))
    got = comfyui.sample_sa_solver(Model(), x, sigmas, disable=True, noise_sampler=ns)
    ns = default_noise_sampler(x, torch.Generator().manual_seed(2))
    want = sample_sa_solver(_gmm(), x, sigmas, disable=True, noise_sampler=ns,
                            sde_start_sigma=5.0, sde_end_sigma=0.3)
    assert seen == [0.2, 0.8] and torch.equal(got, want)
    # SamplerSASolver's option names: another interval, eta
    seen.clear()
    Sampling.percent_to_sigma = lambda self, p: {0.1: 8.0, 0.5: 1.0}[p]
    ns = default_noise_sampler(x, torch.Generator().manual_seed(2))
    got = comfyui.sample_sa_solver(Model(), x, sigmas, disable=True, noise_sampler=ns,
                                   sde_start_percent=0.1, sde_end_percent=0.5, eta=0.7)
    ns = default_noise_sampler(x, torch.Generator().manual_seed(2))
    want = sample_sa_solver(_gmm(), x, sigmas, disable=True, noise_sampler=ns,
                            sde_start_sigma=8.0, sde_end_sigma=1.0, eta=0.7)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_the_fused_plan_gives_the_adapters_numbers(name, kind):
    """fastdiff.Sampler on the registry entry with the options fastdiff.comfyui derives from the
    model (its default window) gives the adapter's samples."""
    x, sigmas = _small()
    model = _gmm()
    if kind == "flow":
        x, sigmas, model = x / 20, torch.linspace(1, 0, 9, dtype=F64), model.flow_denoiser
    ns = lambda: default_noise_sampler(x, torch.Generator().manual_seed(6))  # noqa: E731
    want = getattr(comfyui, f"sample_{name}")(model, x, sigmas, disable=True, model_kind=kind,
                                              noise_sampler=ns())
    window = {"sde_start_sigma": comfyui.percent_to_sigma(model, 0.2, kind),
              "sde_end_sigma": comfyui.percent_to_sigma(model, 0.8, kind)}
    assert 0 < window["sde_end_sigma"] < window["sde_start_sigma"] < float(sigmas[0])
    sampler = Sampler(model, name + ("_flow" if kind == "flow" else ""), sigmas, backend="cpu",
                      noise="generator", **window)
    sampler.noise_sampler = ns()
    got = sampler(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10


def test_percent_to_sigma_of_fastdiff_schedules():
    from fastdiff.schedules.model import DiscreteVPSchedule
    from fastdiff.schedules.model_sampling import ModelSampling

    def with_sampling(ms):
        return type("M", (), {"model_sampling": ms})()

    # ComfyUI's classes, by hand: flow shift 3 at p: 3 (1 - p) / (1 + 2 (1 - p));
    # EDM: exp(log 0.002 + (1 - p) log(80 / 0.002)); SD1.x discrete: sigma at timestep
    # (1 - p) 999, log-linear between the table's entries.
    p2s = comfyui.percent_to_sigma
    flow = with_sampling(ModelSampling.discrete_flow(3.0))
    assert p2s(flow, 0.2, "flow") == pytest.approx(2.4 / 2.6, rel=1e-12)
    edm = with_sampling(ModelSampling.continuous_edm(0.002, 80.0))
    assert p2s(edm, 0.3, "ve") == pytest.approx(0.002 * (80 / 0.002) ** 0.7, rel=1e-9)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    log_sigmas = ((1 - torch.cumprod(1 - betas, 0)) / torch.cumprod(1 - betas, 0)).sqrt().log()
    t = 0.8 * 999  # p = 0.2: 799.2
    want = math.exp(0.8 * float(log_sigmas[799]) + 0.2 * float(log_sigmas[800]))
    sd1 = with_sampling(ModelSampling.discrete(DiscreteVPSchedule.from_betas(
        "scaled_linear", 1000, 0.00085, 0.012)))
    assert abs(t - 799.2) < 1e-12
    assert p2s(sd1, 0.2, "ve") == pytest.approx(want, rel=1e-6)  # fp32 betas in the table
    assert p2s(point_mass, 0.2, "ve") == p2s(sd1, 0.2, "ve")  # ComfyUI's default sampling
    assert p2s(point_mass, 0.2, "flow") == 0.8
    assert p2s(sd1, 0.0, "ve") == 999999999.9 and p2s(flow, 1.0, "flow") == 0.0

    # the flow SDE samplers' first time (ComfyUI: percent_to_sigma(1e-4)) follows the shift too
    seen = []

    class Shifted:
        model_sampling = ModelSampling.discrete_flow(3.0)

        def __call__(self, x, sigma, **kwargs):
            seen.append(float(sigma.flatten()[0]))
            return torch.zeros_like(x)

    x = torch.randn(2, 2, dtype=F64)
    for name in ("sa_solver", "er_sde", "dpmpp_2m_sde"):
        seen.clear()
        getattr(comfyui, f"sample_{name}")(Shifted(), x, torch.tensor([1.0, 0.5, 0.0],
                                           dtype=F64), disable=True, model_kind="flow")
        assert seen[0] == pytest.approx(3 * (1 - 1e-4) / (1 + 2 * (1 - 1e-4)), rel=1e-12)


# --- fused plans ---------------------------------------------------------------------------------

NAMES = ["sa_solver", "sa_solver_pece", "sa_solver_flow", "sa_solver_pece_flow"]


def _fused_problem(name, dtype):
    g = torch.Generator().manual_seed(0)
    model = _gmm()
    if SOLVERS[name].param == "flow":
        return model.flow_denoiser, torch.randn(3, 2, generator=g, dtype=F64).to(dtype), \
            torch.linspace(1, 0, 9, dtype=F64)
    return model, (torch.randn(3, 2, generator=g, dtype=F64) * 20).to(dtype), _small()[1]


@pytest.mark.skipif(bool(unavailable_reason("triton", torch.device("cpu"))),
                    reason="triton (interpreter) unavailable")
@pytest.mark.parametrize("name", NAMES)
def test_triton_plan_equals_the_reference(name):
    model, x, sigmas = _fused_problem(name, torch.float32)
    ns = lambda: default_noise_sampler(x, torch.Generator().manual_seed(5))  # noqa: E731
    want = SOLVERS[name].fn(model, x, sigmas.to(x.dtype), disable=True, noise_sampler=ns(),
                            **SOLVERS[name].kwargs)
    sampler = Sampler(model, name, sigmas, backend="triton", noise="generator")
    sampler.noise_sampler = ns()
    got = sampler(x)
    assert float((got.double() - want.double()).abs().max() / want.double().abs().max()) <= 1e-5


GUIDED_BACKENDS = ["reference", "cpu"] + ([] if unavailable_reason("triton", torch.device("cpu"))
                                         else ["triton"])


@pytest.mark.parametrize("backend", GUIDED_BACKENDS)
@pytest.mark.parametrize("noise", ["philox", "generator"])
@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_a_guided_epsilon_network_lowers(name, noise, backend):
    """The widest case of tests/test_sampler.py. With Philox noise every stage of the default
    orders (3, 4) fits the kernel's 6 inputs. With drawn noise tensors sa_solver's stage after a
    call reads 7 (F, the two guidance halves, 3 past D, the noise): the lowering splits it in two
    launches (a partial sum of the past inputs first), and the samples are the reference's."""
    from test_sampler import eps_network, philox_noise_sampler, problem, seeded_noise

    from fastdiff.denoisers import CFGDenoiser, Denoiser

    _, x, sigmas = problem(name, batch=2)
    cfg = CFGDenoiser(Denoiser(eps_network(), "epsilon"), 2.0)
    cond = dict(cond=torch.zeros(2), uncond=torch.ones(2))
    seeds = torch.arange(100, 102)
    ns = philox_noise_sampler(x, seeds) if noise == "philox" else seeded_noise(x, 1)
    want = SOLVERS[name].fn(cfg, x, sigmas, disable=True, extra_args=cond, noise_sampler=ns,
                            **SOLVERS[name].kwargs)
    sampler = Sampler(cfg, name, sigmas, backend=backend, noise=noise)
    if noise == "generator":
        sampler.noise_sampler = seeded_noise(x, 1)
    got = sampler(x, **({"seeds": seeds} if noise == "philox" else {}), **cond)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10
    assert max(len(la.inputs) for la in sampler.launches) <= 6
    partials = [la for la in sampler.launches if la.outputs[0][0] == "T"]
    assert bool(partials) == (name == "sa_solver" and noise == "generator"), partials
