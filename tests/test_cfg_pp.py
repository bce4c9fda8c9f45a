"""CFG++ (Chung et al. 2024, arXiv:2406.08070): the samplers renoise with the unconditional
denoised output D_u of the guided call. Checked by mathematics:
- with equal halves (cond == uncond) D_u = D, so each CFG++ sampler is its base sampler;
- golden values worked out by hand for a network with constant answers (below);
- the fused plan (D_u read from the first guidance half in the step kernel, U kept as the
  history where the multistep correction needs it) equals the reference on every backend,
  with a network parameterisation and with thresholding.
"""

from __future__ import annotations

import pytest
import torch
from test_sampler import (
    BACKENDS,
    DEVICE,
    GMM,
    eps_network,
    problem,
    rel_err,
    run_reference,
    seeded_noise,
)

from fastdiff.denoisers import CFGDenoiser, Denoiser, ThresholdedDenoiser
from fastdiff.reference.solvers import SOLVERS
from fastdiff.sampler import Sampler

BASES = {"euler_cfg_pp": "euler", "euler_ancestral_cfg_pp": "euler_ancestral",
         "dpmpp_2m_cfg_pp": "dpmpp_2m", "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral",
         "res_multistep_cfg_pp": "res_multistep",
         "res_multistep_ancestral_cfg_pp": "res_multistep_ancestral",
         "gradient_estimation_cfg_pp": "gradient_estimation"}
# the flow-model entries (euler(_ancestral)_cfg_pp_flow): tests/test_cfg_pp_flow.py
CFG_PP = [n for n in SOLVERS if SOLVERS[n].kwargs.get("cfg_pp") and SOLVERS[n].param != "flow"]


def conditional_gmm(x, sigma, cond):
    """A denoiser whose halves differ: the mixture's D shifted by the conditioning value."""
    return GMM(x, sigma) + cond.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def constant_network(x, sigma, cond):
    """Answers its conditioning value everywhere (a denoiser: D = value)."""
    return torch.zeros_like(x) + cond.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def test_every_cfg_pp_sampler_has_a_base():
    assert sorted(CFG_PP) == sorted(n for n in BASES if n in SOLVERS)
    for name in CFG_PP:
        assert SOLVERS[name].fn is SOLVERS[BASES[name]].fn  # an option, never a copy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CFG_PP)
def test_equal_halves_give_the_base_sampler(name, backend):
    _, x, sigmas = problem(name)
    cfg = CFGDenoiser(conditional_gmm, 4.0)
    same = dict(cond=torch.full((x.shape[0],), 0.3, device=DEVICE),
                uncond=torch.full((x.shape[0],), 0.3, device=DEVICE))
    base = run_reference(BASES[name], cfg, x, sigmas, extra_args=same)
    assert rel_err(run_reference(name, cfg, x, sigmas, extra_args=same), base) < 1e-12
    sampler = Sampler(cfg, name, sigmas, backend=backend, noise="generator")
    if SOLVERS[name].stochastic:
        sampler.noise_sampler = seeded_noise(x, 1)
    torch.manual_seed(1)
    assert rel_err(sampler(x, **same), base) < 1e-10
    # and with different halves CFG++ is not the base sampler (the test can fail)
    other = dict(cond=same["cond"], uncond=torch.zeros_like(same["uncond"]))
    assert rel_err(run_reference(name, cfg, x, sigmas, extra_args=other),
                   run_reference(BASES[name], cfg, x, sigmas, extra_args=other)) > 1e-3


# Golden values: D_c = 1, D_u = 0, guidance 3, so D = 3 and D_u = 0 at every call; x0 = 4 on
# sigmas (2, 1, 0.5).
#   euler_cfg_pp (x' = D + sigma'/sigma (x - D_u)): x1 = 3 + 4/2 = 5, x2 = 3 + 5/2 = 5.5.
#   dpmpp_2m_cfg_pp (x' = D + sigma'/sigma (x - D_u) - expm1(-h)/(2r) (D - D_u,prev)), h = ln 2:
#     x1 = 5 (first order), then r = 1: x2 = 3 + 5/2 - (-1/2)/2 * (3 - 0) = 6.25.
#   gradient_estimation_cfg_pp (d = (x - D_u)/sigma, x' = D + sigma' d + (gamma - 1)(d - d_prev)
#     (sigma' - sigma), gamma = 2): x1 = 3 + 2 = 5, then d = 5: x2 = 3 + 2.5 + 3 * (-0.5) = 4.
#   res_multistep_cfg_pp: x1 = 5 (Euler as above), then x2 = e^-h (x1 + D - D_u)
#     + h (b1 D_u + b2 D_u,prev) = 8 / 2 + 0 = 4 (with D in place of D_u the nodes would add
#     h b1 D = 2.34).
#   The base samplers pull x towards D = 3 instead (euler: 3.5, then 3.25).
GOLDEN = {"euler_cfg_pp": 5.5, "dpmpp_2m_cfg_pp": 6.25, "euler": 3.25,
          "gradient_estimation_cfg_pp": 4.0, "res_multistep_cfg_pp": 4.0}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_values(name, backend):
    cfg = CFGDenoiser(constant_network, 3.0)
    halves = dict(cond=torch.ones(2, device=DEVICE), uncond=torch.zeros(2, device=DEVICE))
    x = torch.full((2, 3), 4.0, dtype=torch.float64, device=DEVICE)
    sigmas = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    want = torch.full_like(x, GOLDEN[name])
    ref = SOLVERS[name].fn(cfg, x, sigmas.to(DEVICE), disable=True, extra_args=halves,
                           **SOLVERS[name].kwargs)
    assert torch.allclose(ref, want, rtol=1e-14, atol=0)
    got = Sampler(cfg, name, sigmas, backend=backend)(x, **halves)
    assert torch.allclose(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CFG_PP)
def test_fused_with_a_network_and_guidance_equals_the_reference(name, backend):
    model, x, sigmas = problem(name)
    cfg = CFGDenoiser(Denoiser(eps_network(), "epsilon"), 2.5)
    cond = dict(cond=torch.zeros(x.shape[0], device=DEVICE),
                uncond=torch.ones(x.shape[0], device=DEVICE))
    want = run_reference(name, cfg, x, sigmas, extra_args=cond)
    sampler = Sampler(cfg, name, sigmas, backend=backend, noise="generator")
    if SOLVERS[name].stochastic:
        sampler.noise_sampler = seeded_noise(x, 1)
    torch.manual_seed(1)
    got = sampler(x, **cond)
    assert rel_err(got, want) < 1e-10
    if name == "dpmpp_2m_cfg_pp":  # its correction reads the previous D_u: kept as history
        assert sampler.plan.uncond_history
        assert any("HU" in la.outputs for la in sampler.launches)
        assert any(r.kind == "U" for la in sampler.launches for r in la.inputs)


@pytest.mark.parametrize("name", CFG_PP)
def test_thresholding_applies_to_the_guided_prediction_only(name):
    model, x, sigmas = problem(name)
    th = ThresholdedDenoiser(CFGDenoiser(conditional_gmm, 3.0), dynamic_ratio=0.9,
                             max_value=2.0)
    cond = dict(cond=torch.full((x.shape[0],), 0.5, device=DEVICE),
                uncond=torch.zeros(x.shape[0], device=DEVICE))
    want = run_reference(name, th, x, sigmas, extra_args=cond)
    sampler = Sampler(th, name, sigmas, backend=BACKENDS[-1], noise="generator")
    if SOLVERS[name].stochastic:
        sampler.noise_sampler = seeded_noise(x, 1)
    torch.manual_seed(1)
    assert rel_err(sampler(x, **cond), want) < 1e-10


def test_comfyuis_dpmpp_2s_ancestral_cfg_pp_is_not_its_base_with_equal_halves():
    """cfg_pp="comfyui" corrects the final update with the midpoint call's D_u (ComfyUI's
    post-CFG hook keeps the latest one): with equal halves it is not DPM++(2S) ancestral."""
    _, x, sigmas = problem("dpmpp_2s_ancestral")
    cfg = CFGDenoiser(conditional_gmm, 4.0)
    same = dict(cond=torch.full((x.shape[0],), 0.3, device=DEVICE),
                uncond=torch.full((x.shape[0],), 0.3, device=DEVICE))
    fn = SOLVERS["dpmpp_2s_ancestral"].fn
    base = fn(cfg, x, sigmas, disable=True, extra_args=same, eta=0.0)
    paper = fn(cfg, x, sigmas, disable=True, extra_args=same, eta=0.0, cfg_pp=True)
    comfy = fn(cfg, x, sigmas, disable=True, extra_args=same, eta=0.0, cfg_pp="comfyui")
    assert rel_err(paper, base) < 1e-12 and rel_err(comfy, base) > 1e-3
