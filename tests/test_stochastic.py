"""Distribution tests for every stochastic solver in the registry (default stochastic kwargs).

Each solver turns exact samples of the mixture's noisy marginal at sigma_max into samples that
are compared with exact samples of the data distribution by the sliced Wasserstein-1 distance
(SW1, 32 directions; exact 1-D W1 between empirical distributions).
Everything runs on one CPU thread (a module fixture): on small tensors torch's intra-op threads
only add synchronisation cost.

Threshold, derived from the sample sizes rather than tuned:
- null: the statistic between N_SAMPLES exact samples and the same exact reference set, over
  N_NULL independent draws; threshold = null mean + 4 null standard deviations (per-solver
  false-rejection chance ~3e-5 under a normal approximation of the null);
- plus BIAS_ALLOWANCE for the discretisation bias at the step counts used, measured by
  `measure_bias` (50,000 solver samples against 200,000 exact ones; three exact sets of 50,000
  give 0.008-0.015, the noise included in these figures): euler_ancestral = ddpm = ddim_eta
  (the same VE ancestral step) at 200 steps 0.0135 (25 steps: 0.1375, first order in 1/N);
  at 50 steps dpm_2_ancestral 0.0124, dpmpp_2s_ancestral 0.0111, dpmpp_sde 0.0106,
  dpmpp_2m_sde 0.0186, dpmpp_2m_sde_heun 0.0223, dpmpp_3m_sde 0.0124; LCM with its exact
  consistency function 0.0045 (no discretisation bias). BIAS_ALLOWANCE = 0.025 bounds them all.
  With N_SAMPLES = 2000 the threshold is ~0.12 (null mean ~0.044, std ~0.013).
Negative controls show the test rejects: samples of a different mixture (0.1 of the mass moved
between two modes), a first-order sampler with too few steps (its measured bias) and LCM driven
by the posterior mean instead of a consistency function (it samples a sharpened distribution).
Resolution at this sample size: a 15% error in the component widths alone (SW1 ~0.05) is NOT
detected; that needs ~10x more samples than the time budget allows.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch

from fastdiff.models.gmm import GaussianMixture
from fastdiff.reference.solvers import SOLVERS

F64 = torch.float64
N_SAMPLES = 2000
N_REFERENCE = 20000
N_NULL = 40
N_DIRECTIONS = 32
NULL_SIGMAS = 4.0
BIAS_ALLOWANCE = 0.025
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002  # EDM's sampling range (Karras et al. 2022, Sec. 5)
# step counts at which the bias was measured (module docstring): first-order samplers need more
STEPS = {1: 200, "default": 50}
LCM_STEPS = 2  # each step is an exact ODE solve (slow); 2 steps exercise the re-noising


def sorted_projections(x: torch.Tensor) -> torch.Tensor:
    """[D, n]: the samples projected on N_DIRECTIONS unit vectors, each row sorted."""
    angles = torch.arange(N_DIRECTIONS, dtype=F64) * math.pi / N_DIRECTIONS
    u = torch.stack([angles.cos(), angles.sin()], 1)  # [D, 2]
    return (u @ x.double().T).sort(-1).values


def w1_sorted(qa: torch.Tensor, qb: torch.Tensor) -> float:
    """Sliced W1 from two `sorted_projections`, [D, n] and [D, k n].

    In 1-D, W1 = int_0^1 |Q_a(u) - Q_b(u)| du (quantile functions); when len(b) = k len(a) both
    are constant on the intervals of width 1 / len(b), so the integral is exactly the mean of
    |sorted(a) repeated k times - sorted(b)|.
    """
    if qb.shape[1] % qa.shape[1]:
        raise ValueError(f"len(b)={qb.shape[1]} must be a multiple of len(a)={qa.shape[1]}")
    return float((qa.repeat_interleave(qb.shape[1] // qa.shape[1], -1) - qb).abs().mean())


def sliced_w1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sliced Wasserstein-1 distance between two sample sets in 2-D (len(b) a multiple)."""
    return w1_sorted(sorted_projections(a), sorted_projections(b))


def karras_sigmas(n: int) -> torch.Tensor:
    """Karras et al. 2022 Eq. 5 (rho = 7) from SIGMA_MAX to SIGMA_MIN, then 0."""
    rho = 7.0
    r = torch.linspace(0, 1, n, dtype=F64)
    s = (SIGMA_MAX ** (1 / rho) + r * (SIGMA_MIN ** (1 / rho) - SIGMA_MAX ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


@cache
def _gmm() -> GaussianMixture:
    return GaussianMixture.default(2)


@cache
def _reference_and_threshold() -> tuple[torch.Tensor, float, list[float]]:
    """(sorted projections of the exact reference set, threshold, null statistics)."""
    g = _gmm()
    gen = torch.Generator().manual_seed(2024)
    ref = sorted_projections(g.sample(N_REFERENCE, generator=gen))
    null = torch.tensor([w1_sorted(sorted_projections(g.sample(N_SAMPLES, generator=gen)), ref)
                         for _ in range(N_NULL)], dtype=F64)
    threshold = float(null.mean() + NULL_SIGMAS * null.std()) + BIAS_ALLOWANCE
    return ref, threshold, null.tolist()


def statistic(samples: torch.Tensor) -> tuple[float, float]:
    """(SW1 of the samples to the exact reference set, the rejection threshold)."""
    ref, threshold, _ = _reference_and_threshold()
    return w1_sorted(sorted_projections(samples), ref), threshold


def _stochastic_entries():
    return [name for name, info in SOLVERS.items() if info.stochastic]


def exact_consistency_function(x: torch.Tensor, sigma) -> torch.Tensor:
    """f(x, sigma) = the PF-ODE solution at sigma = 0 (Song et al. 2023, consistency models);
    its 1e-6 tolerance is far below the statistic's resolution."""
    sigma = float(torch.as_tensor(sigma).flatten()[0])
    return _gmm().ode_solution(x, sigma, 0.0, rtol=1e-6, atol=1e-6)


def exact_flow_consistency_function(x: torch.Tensor, s) -> torch.Tensor:
    """The flow-space consistency function: the rectified-flow ODE solved from s to 0."""
    s = float(torch.as_tensor(s).flatten()[0])
    return _gmm().flow_ode_solution(x, s, 0.0, rtol=1e-6, atol=1e-6)


def default_steps(name: str) -> int:
    info = SOLVERS[name]
    if info.fn.__name__ == "sample_lcm":
        return LCM_STEPS
    return STEPS.get(info.order, STEPS["default"])


def run_solver(name: str, steps: int | None = None, model=None, seed: int = 0,
               n: int = N_SAMPLES) -> torch.Tensor:
    """n draws from the solver, started at exact samples of the marginal at the first level."""
    info = SOLVERS[name]
    g = _gmm()
    gen = torch.Generator().manual_seed(seed)
    steps = default_steps(name) if steps is None else steps
    if info.param == "flow":
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
        x = torch.randn(n, 2, generator=gen, dtype=F64)  # s = 1 is pure noise
        if model is None:
            model = exact_flow_consistency_function if info.fn.__name__ == "sample_lcm" \
                else g.flow_denoiser
    else:
        sigmas = karras_sigmas(steps)
        x = g.sample(n, generator=gen, sigma=SIGMA_MAX)
        if model is None:  # LCM's model is a consistency function, not a denoiser
            model = exact_consistency_function if info.fn.__name__ == "sample_lcm" else g
    torch.manual_seed(seed + 1)  # the solvers' noise (default samplers use the global RNG)
    return info.fn(model, x, sigmas, disable=True, **info.kwargs)


@pytest.mark.parametrize("name", _stochastic_entries())
def test_stochastic_solver_samples_the_mixture(name):
    out = run_solver(name)
    assert out.shape == (N_SAMPLES, 2) and bool(torch.isfinite(out).all())
    stat, threshold = statistic(out)
    null = _reference_and_threshold()[2]
    assert stat <= threshold, (f"{name} ({default_steps(name)} steps): SW1 = {stat:.4f} > "
                               f"threshold {threshold:.4f} (null mean {sum(null) / len(null):.4f})")


def test_runs_are_seeded_and_deterministic():
    name = next(iter(_stochastic_entries()), None)
    if name is None:
        pytest.skip("no stochastic solver registered")
    assert torch.equal(run_solver(name, steps=5, n=100), run_solver(name, steps=5, n=100))


def test_negative_control_wrong_mixture_is_rejected():
    # Two modes 4 apart exchange 0.1 of their weight (SW1 ~0.3), widths 15% too large.
    g = _gmm()
    wrong = GaussianMixture(g.means, g.stds * 1.15, g.weights[[1, 0, 2, 3]])
    stat, threshold = statistic(wrong.sample(N_SAMPLES, generator=torch.Generator().manual_seed(7)))
    assert stat > threshold, f"wrong mixture not rejected: {stat:.4f} <= {threshold:.4f}"


def test_negative_control_known_bias_is_rejected():
    # Ancestral Euler with 25 steps: its measured bias (0.14, module docstring) must be detected.
    if "euler_ancestral" not in SOLVERS:
        pytest.skip("euler_ancestral not registered")
    stat, threshold = statistic(run_solver("euler_ancestral", steps=25))
    assert stat > threshold, f"25-step ancestral Euler not rejected: {stat:.4f} <= {threshold:.4f}"


def test_negative_control_lcm_with_a_denoiser_is_rejected():
    # Re-noising the posterior mean (not the ODE endpoint) loses variance at every step.
    if "lcm" not in SOLVERS:
        pytest.skip("lcm not registered")
    stat, threshold = statistic(run_solver("lcm", steps=25, model=_gmm()))
    assert stat > threshold, f"LCM driven by the posterior mean not rejected: {stat:.4f}"


def test_negative_control_lcm_flow_with_ve_renoising_is_rejected():
    # ComfyUI's flow LCM renoises as s z + (1 - s) x0; the VE form x0 + s z is off-marginal.
    if "lcm_flow" not in SOLVERS:
        pytest.skip("lcm_flow not registered")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N_SAMPLES, 2, generator=gen, dtype=F64)
    torch.manual_seed(4)
    out = SOLVERS["lcm"].fn(exact_flow_consistency_function, x,
                            torch.linspace(1.0, 0.0, LCM_STEPS + 1, dtype=F64), disable=True)
    stat, threshold = statistic(out)
    assert stat > threshold, f"flow LCM with VE renoising not rejected: {stat:.4f}"


def measure_bias(name: str, steps: int, n: int = 50_000) -> float:
    """The bias measurement of the module docstring (slow; run by hand from tests/):
    python -c "import test_stochastic as t; print(t.measure_bias('dpmpp_sde', 50))"
    """
    out = run_solver(name, steps=steps, n=n)
    return sliced_w1(out, _gmm().sample(4 * n, generator=torch.Generator().manual_seed(5)))
