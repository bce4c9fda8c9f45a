"""fastdiff.k_diffusion's samplers with ComfyUI's names that k-diffusion has no function for
(heunpp2, ..., sa_solver, the CFG++ family): k-diffusion's calling convention on fastdiff's
registry entry of the name.

Checked on the exact 6-D mixture (and its flow-model denoiser), float64, with one seeded noise
sampler per run: each equals `fastdiff.comfyui.sample_<name>` given the same model, sigmas and
noise wherever the two define the same numbers (<= 1e-10), in both model kinds where the
sampler branches on the kind, and the fused plan `fastdiff.Sampler(model, name, sigmas)`; the
two documented differences from fastdiff.comfyui (ipndm_v's weights, dpmpp_2s_ancestral_cfg_pp's
final correction) are checked to be differences; the options a name fixes are rejected.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from _kdiffusion_ref import load_kdiffusion_sampling
from test_comfyui_samplers import problem

from fastdiff import comfyui
from fastdiff import k_diffusion as K
from fastdiff.comfyui.samplers import _SPECS
from fastdiff.denoisers import CFGDenoiser
from fastdiff.reference.solvers import SOLVERS
from fastdiff.reference.solvers._utils import default_noise_sampler
from fastdiff.sampler import Sampler

F64 = torch.float64
NAMES = K._COMFYUI_NAMES
# ComfyUI names fastdiff.k_diffusion leaves out on purpose (its module docstring says why)
ALIASES = {"dpmpp_sde_gpu", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
           "dpmpp_3m_sde_gpu", "uni_pc", "uni_pc_bh2"}
# where fastdiff.k_diffusion (the registry entry) and fastdiff.comfyui differ by design
DIFFERENT = {"ipndm_v", "dpmpp_2s_ancestral_cfg_pp"}
# samplers that branch on the model kind (fastdiff.comfyui passes it on), tested in both kinds
BY_KIND = [n for n in NAMES if _SPECS[n][3] is True]


def guided(model, x):
    """A CFG denoiser whose halves differ (D_c = D + 0.2, D_u = D - 0.1, guidance 2.5), and its
    extra_args: CFG++ renoises with D_u, so with it CFG++ is not its base sampler."""
    def inner(x, sigma, cond):
        return model(x, sigma) + cond.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)

    n = x.shape[0]
    return CFGDenoiser(inner, 2.5), {"cond": torch.full((n,), 0.2, dtype=F64),
                                     "uncond": torch.full((n,), -0.1, dtype=F64)}


def run(fn, name, model, x, sigmas, **kw):
    """`fn` on (model, x, sigmas) with a fresh seeded noise sampler where it takes one."""
    extra = {}
    if "cfg_pp" in name:
        model, extra = guided(model, x)
    if "noise_sampler" in inspect.signature(getattr(K, f"sample_{name}")).parameters:
        kw["noise_sampler"] = default_noise_sampler(x, torch.Generator().manual_seed(5))
    torch.manual_seed(3)
    return fn(model, x, sigmas, extra_args=extra, disable=True, **kw)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_names_are_comfyuis_minus_what_k_diffusion_has_and_the_aliases():
    missing = {n for n in comfyui.SAMPLER_NAMES if f"sample_{n}" not in K.__all__}
    assert missing == ALIASES
    assert set(NAMES) <= set(SOLVERS) and set(NAMES) <= set(comfyui.SAMPLER_NAMES)
    kd = load_kdiffusion_sampling()
    if kd is not None:  # "where k-diffusion has no conflicting one"
        assert not {f"sample_{n}" for n in NAMES} & set(dir(kd))
    for name in NAMES:  # callable as k-diffusion's samplers are
        params = list(inspect.signature(getattr(K, f"sample_{name}")).parameters)
        assert params[:6] == ["model", "x", "sigmas", "extra_args", "callback", "disable"]


def _comfyui_options(name, model, kind):
    """The options that give fastdiff.k_diffusion's sampler fastdiff.comfyui's numbers."""
    if not name.startswith("sa_solver"):
        return {}
    # ComfyUI: tau = 1 from the model's percent 0.2 down to 0.8 of its schedule
    return {"sde_start_sigma": comfyui.percent_to_sigma(model, 0.2, kind),
            "sde_end_sigma": comfyui.percent_to_sigma(model, 0.8, kind), "final": "corrector"}


CASES = [(n, "ve") for n in NAMES if n not in DIFFERENT] + [(n, "flow") for n in BY_KIND]


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_equals_comfyuis_sampler(name, kind):
    model, x, sigmas = problem(kind)
    before = x.clone()
    kw = {"model_kind": kind} if kind == "flow" else {}
    got = run(getattr(K, f"sample_{name}"), name, model, x, sigmas,
              **_comfyui_options(name, model, kind), **kw)
    want = run(getattr(comfyui, f"sample_{name}"), name, model, x, sigmas, **kw)
    assert torch.equal(x, before) and got.dtype == F64 and got.shape == x.shape
    assert rel(got, want) < 1e-10
    if kind == "flow":  # the kind is an input: the VE branch gives other numbers
        ve = run(getattr(K, f"sample_{name}"), name, model, x, sigmas,
                 **_comfyui_options(name, model, kind))
        assert rel(ve, want) > 1e-3


FUSED = [(n, "ve") for n in NAMES] + [(n, "flow") for n in BY_KIND]


@pytest.mark.parametrize(("name", "kind"), FUSED, ids=[f"{n}-{k}" for n, k in FUSED])
def test_equals_the_fused_plan_of_its_registry_entry(name, kind):
    model, x, sigmas = problem(kind)
    entry = f"{name}_flow" if kind == "flow" else name  # the registry's flow twin
    kw = {"model_kind": "flow"} if kind == "flow" else {}
    got = run(getattr(K, f"sample_{name}"), name, model, x, sigmas, **kw)
    extra = {}
    if "cfg_pp" in name:
        model, extra = guided(model, x)
    sampler = Sampler(model, entry, sigmas, backend="cpu", noise="generator",
                      noise_sampler=default_noise_sampler(x, torch.Generator().manual_seed(5)))
    torch.manual_seed(3)
    assert rel(got, sampler(x, **extra)) < 1e-10


def test_documented_differences_from_comfyui_are_differences():
    model, x, sigmas = problem("ve", steps=12)
    # ipndm_v: the exact variable-step Adams-Bashforth weights, not diff-sampler's closed form
    # (ComfyUI's), and the polynomial integrated into sigma = 0 (ComfyUI: x = D there)
    got = run(K.sample_ipndm_v, "ipndm_v", model, x, sigmas)
    assert rel(got, run(comfyui.sample_ipndm_v, "ipndm_v", model, x, sigmas)) > 1e-6
    # dpmpp_2s_ancestral_cfg_pp: the paper's update, not ComfyUI's midpoint-D_u correction
    name = "dpmpp_2s_ancestral_cfg_pp"
    got = run(K.sample_dpmpp_2s_ancestral_cfg_pp, name, model, x, sigmas)
    assert rel(got, run(comfyui.sample_dpmpp_2s_ancestral_cfg_pp, name, model, x, sigmas)) > 1e-6
    # sa_solver: tau = 1 at every sigma unless told (ComfyUI: from the model's schedule)
    for name in ("sa_solver", "sa_solver_pece"):
        got = run(getattr(K, f"sample_{name}"), name, model, x, sigmas)
        assert rel(got, run(getattr(comfyui, f"sample_{name}"), name, model, x, sigmas)) > 1e-3
