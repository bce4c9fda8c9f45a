"""CFG++ on flow models (ComfyUI's CONST branch of euler_cfg_pp / euler_ancestral_cfg_pp):
registry entries euler_cfg_pp_flow and euler_ancestral_cfg_pp_flow. Checked by mathematics:
- change of variables: on x = (1 - s) x0 + s eps, y = x / (1 - s) = x0 + v eps with VE noise
  v = s / (1 - s), and the step is the VE CFG++ ancestral step on y; so the flow sampler equals
  the VE sampler (tests/test_cfg_pp.py) run on y, v with the same model and noise;
- golden values worked out by hand from s = 1 (a = 1 - s = 0, v = inf: the limit branch);
- with equal halves euler_cfg_pp_flow is Euler on the flow ODE (flow_euler);
- the fused plans equal the reference on every backend (golden values; guided mixture in
  tests/test_comfyui_backends.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_sampler import DEVICE, GMM, PARITY_BACKENDS, rel_err

from fastdiff.denoisers import CFGDenoiser
from fastdiff.reference.solvers import SOLVERS
from fastdiff.sampler import Sampler

F64 = torch.float64
NAMES = ["euler_cfg_pp_flow", "euler_ancestral_cfg_pp_flow"]


def _b(t, x):
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def flow_halves(x, s, cond):
    """A flow denoiser whose guidance halves differ: the mixture's D shifted by cond."""
    return GMM.flow_denoiser(x, s) + _b(cond, x)


def ve_halves(y, v, cond):
    """The same model seen in VE variables: y = x / (1 - s), v = s / (1 - s)."""
    return flow_halves(y / (1 + _b(v, y)), v / (1 + v), cond)


def noise(x, seed=3):
    g = torch.Generator(DEVICE).manual_seed(seed)
    return lambda *args: torch.randn(x.shape, generator=g, dtype=x.dtype, device=DEVICE)


def test_the_entries_are_options_of_the_ve_ones():
    for name in NAMES:  # an option of the VE entry's reference, never a copy
        assert SOLVERS[name].fn is SOLVERS[name[:-len("_flow")]].fn
        assert SOLVERS[name].param == "flow"


@pytest.mark.parametrize("end", [0.0, 0.05])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.6])
def test_it_is_the_ve_cfg_pp_step_in_ve_variables(eta, end):
    g = torch.Generator().manual_seed(0)
    s = torch.linspace(0.97, end, 7, dtype=F64)
    x = torch.randn(4, 2, 3, generator=g, dtype=F64).to(DEVICE)
    cond = dict(cond=torch.full((4,), 0.5, device=DEVICE), uncond=torch.zeros(4, device=DEVICE))
    fn = SOLVERS["euler_ancestral"].fn
    got = fn(CFGDenoiser(flow_halves, 3.0), x, s.to(DEVICE), disable=True, extra_args=cond,
             eta=eta, cfg_pp=True, model_kind="flow", noise_sampler=noise(x))
    v = s / (1 - s)
    y = fn(CFGDenoiser(ve_halves, 3.0), x / (1 - s[0]), v.to(DEVICE), disable=True,
           extra_args=cond, eta=eta, cfg_pp=True, noise_sampler=noise(x))
    assert rel_err(got, (1 - s[-1]) * y) < 1e-12
    # the test can fail: the flow _RF split (euler_ancestral_RF) is another sampler
    if eta:
        rf = fn(CFGDenoiser(flow_halves, 3.0), x, s.to(DEVICE), disable=True, extra_args=cond,
                eta=eta, model_kind="flow", noise_sampler=noise(x))
        assert rel_err(rf, got) > 1e-3


# Golden values: halves D_c = 1, D_u = 0.5, guidance 3, so D = 2 and D_u = 0.5 at every call;
# x0 = 4 on flow times (1, 0.5, 0.25), a = 1 - s, v = s / (1 - s).
#   eta = 0 (euler_cfg_pp_flow): x' = a' D + s' (x - a D_u) / s
#     x1 = 0.5 * 2 + 0.5 * (4 - 0) / 1 = 3;  x2 = 0.75 * 2 + 0.25 * (3 - 0.25) / 0.5 = 2.875.
#   eta = 1, every noise draw z = 1: step 1 from s = 1 (v = inf) is all renoising,
#     x1 = a' D + a' v' z = 1 + 0.5 = 1.5; step 2: v = 1, v' = 1/3,
#     v_up = sqrt(v'^2 (v^2 - v'^2) / v^2) = 2 sqrt(2) / 9, v_down = sqrt(v'^2 - v_up^2) = 1/9,
#     d = (x1 - a D_u) / s = 2.5, x2 = 0.75 * 2 + 0.75 (1/9) 2.5 + 0.75 (2 sqrt(2) / 9)
#        = 1.5 + 5/24 + sqrt(2)/6.
GOLDEN = {"euler_cfg_pp_flow": 2.875,
          "euler_ancestral_cfg_pp_flow": 1.5 + 5 / 24 + math.sqrt(2) / 6}


def constant_halves(x, s, cond):
    return torch.zeros_like(x) + _b(cond, x)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_golden_values(name, backend):
    cfg = CFGDenoiser(constant_halves, 3.0)
    halves = dict(cond=torch.ones(2, device=DEVICE), uncond=torch.full((2,), 0.5, device=DEVICE))
    x = torch.full((2, 3), 4.0, dtype=F64, device=DEVICE)
    sigmas = torch.tensor([1.0, 0.5, 0.25], dtype=F64)
    ones = lambda *args: torch.ones_like(x)  # noqa: E731
    want = torch.full_like(x, GOLDEN[name])
    drawn = {"noise_sampler": ones} if SOLVERS[name].stochastic else {}
    ref = SOLVERS[name].fn(cfg, x, sigmas.to(DEVICE), disable=True, extra_args=halves,
                           **drawn, **SOLVERS[name].kwargs)
    assert torch.allclose(ref, want, rtol=1e-14, atol=0)
    sampler = Sampler(cfg, name, sigmas, backend=backend, noise="generator", **drawn)
    assert torch.allclose(sampler(x, **halves), want, rtol=1e-13, atol=0)


def test_equal_halves_give_euler_on_the_flow_ode():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, generator=g, dtype=F64).to(DEVICE)
    s = torch.linspace(1, 0, 9, dtype=F64).to(DEVICE)
    same = dict(cond=torch.full((4,), 0.2, device=DEVICE), uncond=torch.full((4,), 0.2,
                                                                              device=DEVICE))
    cfg = CFGDenoiser(flow_halves, 3.0)
    got = SOLVERS["euler_cfg_pp_flow"].fn(cfg, x, s, disable=True, extra_args=same,
                                          **SOLVERS["euler_cfg_pp_flow"].kwargs)
    want = SOLVERS["flow_euler"].fn(cfg, x, s, disable=True, extra_args=same)
    assert rel_err(got, want) < 1e-12
