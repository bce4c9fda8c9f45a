"""The exponential SDE samplers (er_sde, seeds_2, seeds_3, exp_heun_2_x0_sde; VE and flow
kinds) by mathematics, beyond the registry-wide tests (fused = reference in
tests/test_sampler.py, the mixture distribution in tests/test_stochastic.py, ODE orders in
tests/test_convergence.py):
- data that is a point mass c has the exact denoiser D = c, and then every one of these solvers
  integrates its linear SDE exactly: from the marginal at the first level the samples must have
  the exact marginal at the last level (mean alpha c, std sigma), in both model kinds;
- in ODE mode they move a point exactly along the ODE of D = c (golden values by hand);
- negative controls: dropping or halving the noise is detected by the same statistics, and on
  the mixture by tests/test_stochastic.py's test.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_stochastic import statistic

from fastdiff.reference.solvers import SOLVERS
from fastdiff.reference.solvers._utils import default_noise_sampler
from fastdiff.reference.solvers.sde import ode_noise_scaler

NAMES = ["er_sde", "seeds_2", "seeds_3", "exp_heun_2_x0_sde"]
KINDS = {"ve": "", "flow": "_flow"}
C = 1.5
N = 40_000


def point_mass(x, sigma, **kwargs):
    return torch.full_like(x, C)


def grid(kind: str) -> tuple[torch.Tensor, float, float]:
    """(sigmas, alpha, sigma) of the last level: 12 steps, ending above 0."""
    if kind == "flow":
        s = torch.linspace(0.8, 0.3, 13, dtype=torch.float64)
        return s, 1 - 0.3, 0.3
    s = torch.exp(torch.linspace(math.log(20.0), math.log(0.3), 13, dtype=torch.float64))
    return s, 1.0, 0.3


def run(name: str, kind: str, n: int = N, **options) -> torch.Tensor:
    info = SOLVERS[name + KINDS[kind]]
    sigmas, _, _ = grid(kind)
    gen = torch.Generator().manual_seed(3)
    alpha0 = 1 - float(sigmas[0]) if kind == "flow" else 1.0
    x = alpha0 * C + float(sigmas[0]) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    ns = default_noise_sampler(x, torch.Generator().manual_seed(4))
    return info.fn(point_mass, x, sigmas, disable=True, noise_sampler=ns,
                   **{**info.kwargs, **options})


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_point_mass_marginal_is_exact(name, kind):
    _, alpha, sigma = grid(kind)
    out = run(name, kind)
    # standard errors: mean sigma/sqrt(N) ~ 1.5e-3, std sigma/sqrt(2N) ~ 1e-3; 6 of them
    assert abs(float(out.mean()) - alpha * C) < 6 * sigma / math.sqrt(N)
    assert abs(float(out.std()) - sigma) < 6 * sigma / math.sqrt(2 * N)
    # negative control: half the noise is far outside the same bounds
    weak = run(name, kind, s_noise=0.5)
    assert abs(float(weak.std()) - sigma) > 20 * sigma / math.sqrt(2 * N)


# D = c moves x along the ODE exactly: VE x' = c + (sigma'/sigma)(x - c); flow (alpha = 1 - s)
# eps = (x - (1 - s) c) / s, x' = (1 - s') c + s' eps. By hand, x = 4, c = 1.5:
#   VE 2 -> 1:     1.5 + 0.5 * 2.5 = 2.75;
#   flow 0.8 -> 0.4: eps = (4 - 0.3) / 0.8 = 4.625, x' = 0.9 + 1.85 = 2.75.
ODE_GOLDEN = {"ve": ([2.0, 1.0], 2.75), "flow": ([0.8, 0.4], 2.75)}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_ode_mode_golden_values(name, kind):
    info = SOLVERS[name + KINDS[kind]]
    sigmas, want = ODE_GOLDEN[kind]
    ode = ({"noise_scaler": ode_noise_scaler, "s_noise": 0.0, "integral": "exact"}
           if name == "er_sde" else {"eta": 0.0})
    x = torch.full((3, 2), 4.0, dtype=torch.float64)
    out = info.fn(point_mass, x, torch.tensor(sigmas, dtype=torch.float64), disable=True,
                  **{**info.kwargs, **ode})
    assert torch.allclose(out, torch.full_like(x, want), rtol=1e-12, atol=0)


def test_flow_kind_moves_a_first_time_of_one():
    """lambda(1) = -inf: the first flow time 1 becomes first_sigma, where the model is called
    (ComfyUI's offset_first_sigma_for_snr)."""
    seen = []

    def model(x, s, **kwargs):
        seen.append(float(s[0]))
        return torch.zeros_like(x)

    x = torch.randn(2, 2, dtype=torch.float64)
    for name in ("er_sde_flow", "seeds_3_flow"):
        seen.clear()
        SOLVERS[name].fn(model, x, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64),
                         disable=True, model_kind="flow", first_sigma=0.99)
        assert seen[0] == 0.99


@pytest.mark.parametrize("name", ["er_sde", "seeds_2"])
def test_negative_control_missing_noise_is_rejected_on_the_mixture(name):
    """The SDE drift without its noise samples a sharpened mixture."""
    stat, threshold = statistic(_no_noise(name))
    assert stat > threshold, f"{name} without noise not rejected: {stat:.4f} <= {threshold:.4f}"


def _no_noise(name):
    from test_stochastic import _gmm, karras_sigmas

    info = SOLVERS[name]
    gen = torch.Generator().manual_seed(0)
    x = _gmm().sample(2000, generator=gen, sigma=80.0)
    return info.fn(_gmm(), x, karras_sigmas(50), disable=True, s_noise=0.0, **info.kwargs)


def test_bad_options_are_clear_errors():
    x = torch.randn(2, 2, dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    fn = SOLVERS["er_sde"].fn
    with pytest.raises(ValueError, match="model_kind"):
        fn(point_mass, x, sigmas, disable=True, model_kind="eps")
    with pytest.raises(ValueError, match="max_stage"):
        fn(point_mass, x, sigmas, disable=True, max_stage=4)
    with pytest.raises(ValueError, match="integral"):
        fn(point_mass, x, sigmas, disable=True, integral="simpson")
    with pytest.raises(ValueError, match="solver_type"):
        SOLVERS["seeds_2"].fn(point_mass, x, sigmas, disable=True, solver_type="phi_3")
    with pytest.raises(ValueError, match="flow times"):
        SOLVERS["seeds_3_flow"].fn(point_mass, x, sigmas * 2, disable=True, model_kind="flow")
    # s = 1 is moved to first_sigma = 1 - 1e-4, which must still lie above the next time
    close = torch.tensor([1.0, 0.99995, 0.5, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        SOLVERS["seeds_3_flow"].fn(point_mass, x, close, disable=True, model_kind="flow")
    with pytest.raises(ValueError, match="eta"):
        SOLVERS["seeds_3"].fn(point_mass, x, sigmas, disable=True, eta=-0.5)
