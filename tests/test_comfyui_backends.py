"""Every fastdiff.comfyui sampler as a fused plan on every backend gives the adapter's numbers.

For each name of ComfyUI's SAMPLER_NAMES the table below gives the registry entry that carries
it on EPS and on flow (CONST) models plus the options fastdiff.comfyui passes for ComfyUI's
numbers; `Sampler(model, entry, sigmas, backend=..., **options)` must equal
`fastdiff.comfyui.sample_<name>` (which runs the pure-PyTorch reference solver) to 1e-10 in
float64 and 1e-5 in float32 (the tolerances of tests/test_sampler.py) on the plan's reference
backend, the C++ kernels and Triton (its interpreter on CPU), with the same noise. The CFG++
names run on a guided denoiser whose halves differ, so D_u != D is read from the first guidance
half in the kernel. dpm_adaptive (data-dependent steps, no plan: its fused launches are in
tests/test_adaptive.py) and sa_solver / sa_solver_pece (tests/test_sa_solver.py) are not here.
"""

from __future__ import annotations

import pytest
import torch
from test_cfg_pp import conditional_gmm

from fastdiff import comfyui
from fastdiff.denoisers import CFGDenoiser
from fastdiff.models.gmm import GaussianMixture
from fastdiff.ops import unavailable_reason
from fastdiff.reference.solvers import SOLVERS
from fastdiff.sampler import Sampler

F64 = torch.float64
GMM = GaussianMixture.default(d=6)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["reference"] + [b for b in ("cpu", "cuda", "triton")
                            if not unavailable_reason(b, DEVICE)]

_UNIPC = {"order": 3, "lower_order_final": "always"}  # ComfyUI's, for more than 3 steps
# ComfyUI name -> (entry on EPS models, entry on flow models, Sampler options)
PLANS = {
    "euler": ("euler", "euler", {}),
    "euler_cfg_pp": ("euler_cfg_pp", "euler_cfg_pp_flow", {}),
    "euler_ancestral": ("euler_ancestral", "euler_ancestral_RF", {}),
    "euler_ancestral_cfg_pp": ("euler_ancestral_cfg_pp", "euler_ancestral_cfg_pp_flow", {}),
    "heun": ("heun", "heun", {}),
    "heunpp2": ("heunpp2", "heunpp2", {}),
    "exp_heun_2_x0": ("exp_heun_2_x0", "exp_heun_2_x0_flow", {}),
    "exp_heun_2_x0_sde": ("exp_heun_2_x0_sde", "exp_heun_2_x0_sde_flow", {}),
    "dpm_2": ("dpm_2", "dpm_2", {}),
    "dpm_2_ancestral": ("dpm_2_ancestral", "dpm_2_ancestral_RF", {}),
    "lms": ("lms", "lms", {"denoise_final": True}),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral_RF", {}),
    "dpmpp_2s_ancestral_cfg_pp": ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral",
                                  {"cfg_pp": "comfyui"}),
    "dpmpp_sde": ("dpmpp_sde", "dpmpp_sde_flow", {}),
    "dpmpp_sde_gpu": ("dpmpp_sde", "dpmpp_sde_flow", {}),
    "dpmpp_2m": ("dpmpp_2m", "dpmpp_2m", {}),
    "dpmpp_2m_cfg_pp": ("dpmpp_2m_cfg_pp", "dpmpp_2m_cfg_pp", {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", "dpmpp_2m_sde_flow", {}),
    "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", "dpmpp_2m_sde_flow", {}),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_flow", {}),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_flow", {}),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", "dpmpp_3m_sde_flow", {}),
    "dpmpp_3m_sde_gpu": ("dpmpp_3m_sde", "dpmpp_3m_sde_flow", {}),
    "ddpm": ("ddpm", "ddpm", {}),
    "lcm": ("lcm", "lcm_flow", {}),
    "ipndm": ("ipndm", "ipndm", {"denoise_final": True}),
    "ipndm_v": ("ipndm_v_comfyui", "ipndm_v_comfyui", {"denoise_final": True}),
    "deis": ("deis_tab", "deis_tab", {}),
    "res_multistep": ("res_multistep", "res_multistep", {}),
    "res_multistep_cfg_pp": ("res_multistep_cfg_pp", "res_multistep_cfg_pp", {}),
    "res_multistep_ancestral": ("res_multistep_ancestral", "res_multistep_ancestral", {}),
    "res_multistep_ancestral_cfg_pp": ("res_multistep_ancestral_cfg_pp",
                                       "res_multistep_ancestral_cfg_pp", {}),
    "gradient_estimation": ("gradient_estimation", "gradient_estimation", {}),
    "gradient_estimation_cfg_pp": ("gradient_estimation_cfg_pp", "gradient_estimation_cfg_pp",
                                   {}),
    "er_sde": ("er_sde", "er_sde_flow", {}),
    "seeds_2": ("seeds_2", "seeds_2_flow", {}),
    "seeds_3": ("seeds_3", "seeds_3_flow", {}),
    "dpm_fast": ("dpm_fast", "dpm_fast", {}),  # no flow branch in ComfyUI
    "ddim": ("euler", "euler", {}),
    "uni_pc": ("unipc_bh1_3", "unipc_bh1_3", _UNIPC),
    "uni_pc_bh2": ("unipc_bh2_3", "unipc_bh2_3", _UNIPC),
}
NOT_HERE = {"dpm_adaptive", "sa_solver", "sa_solver_pece"}
CASES = [(n, k) for n in PLANS for k in ("ve", "flow")]


def test_the_table_covers_every_comfyui_name():
    assert set(PLANS) | NOT_HERE == set(comfyui.SAMPLER_NAMES)


def noise(x):
    """Standard normal draws made in float64 and rounded to x's dtype, one per call."""
    g = torch.Generator(DEVICE).manual_seed(2)
    return lambda *args: torch.randn(x.shape, generator=g, dtype=F64, device=DEVICE).to(x.dtype)


def problem(name, kind, dtype):
    """(model, x, sigmas, extra_args): the exact mixture, 5 steps. Samplers without a flow
    branch run on flow sigmas below 1 (ComfyUI calls them with whatever sigmas it has)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 3, generator=g, dtype=F64)
    if kind == "flow":
        model = GMM.flow_denoiser
        top = 1.0 if PLANS[name][1] != PLANS[name][0] else 0.98
        sigmas = torch.linspace(top, 0, 6, dtype=F64)
    else:
        model, x = GMM, x * 20
        ramp = torch.linspace(0, 1, 5, dtype=F64)
        s = (20 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 20 ** (1 / 7))) ** 7
        sigmas = torch.cat([s, s.new_zeros(1)])
    extra = {}
    if "cfg_pp" in name:  # halves that differ: CFG++ is not its base sampler here
        model = CFGDenoiser(conditional_gmm, 3.0)
        extra = dict(cond=torch.full((3,), 0.4, device=DEVICE), uncond=torch.zeros(3,
                                                                                    device=DEVICE))
    return model, x.to(DEVICE, dtype), sigmas, extra


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(("name", "kind"), CASES)
def test_the_fused_plan_gives_the_adapters_numbers(name, kind, dtype, backend):
    model, x, sigmas, extra = problem(name, kind, dtype)
    entry, options = PLANS[name][kind == "flow"], PLANS[name][2]
    drawn = SOLVERS[entry].stochastic
    # float64 sigmas: the reference's coefficients in float64, as the plan's (host float64).
    # With float32 sigmas the reference's flow lambda = log((1 - s)/s) at ComfyUI's first
    # s = 1 - 1e-4 alone is 5.6e-5 off in dpmpp_sde (the fp32 plan: 8.5e-8 from float64).
    want = getattr(comfyui, f"sample_{name}")(model, x, sigmas.to(DEVICE), disable=True,
                                              model_kind=kind, extra_args=dict(extra),
                                              **({"noise_sampler": noise(x)} if drawn else {}))
    if name.startswith("uni_pc"):  # ComfyUI's UniPC ends at 0.001 instead of 0
        sigmas = torch.cat([sigmas[:-1], sigmas.new_full((1,), 0.001)])
    sampler = Sampler(model, entry, sigmas, backend=backend, noise="generator", **options)
    if drawn:
        sampler.noise_sampler = noise(x)
    got = sampler(x, **extra)
    assert got.dtype == dtype
    err = float((got.double() - want.double()).abs().max() / want.double().abs().max())
    assert err <= (1e-10 if dtype == torch.float64 else 1e-5), err
