"""fastdiff.comfyui's samplers: ComfyUI's names, the model kind, golden values derived from the
mathematics (not from the code under test), and the fused plans behind them.

ComfyUI itself is not needed: its numbers were checked by hand against comfy/k_diffusion/
sampling.py (README, "ComfyUI parity"); here every expected value comes from an exact solution:
for a point-mass data distribution the denoiser is the constant c, the probability-flow ODE is
solved exactly by x(sigma) = c + (sigma / sigma_0) (x_0 - c) (VE) or
x(s) = (1 - s) c + (s / s_0) (x_0 - (1 - s_0) c) (flow), and exponential integrators (UniPC, the
DPM-Solver++ family) are exact on it.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import comfyui
from fastdiff.models.gmm import GaussianMixture
from fastdiff.reference.solvers._utils import default_noise_sampler
from fastdiff.sampler import Sampler

F64 = torch.float64
GMM = GaussianMixture.default(d=6)
C = torch.linspace(-1, 1, 6, dtype=F64).reshape(1, 2, 3)

# ComfyUI's SAMPLER_NAMES (comfy/samplers.py: KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2)
COMFY_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde",
    "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
    "ddim", "uni_pc", "uni_pc_bh2"]


def constant(x, sigma, **kw):
    return C.expand_as(x).clone()


class Guided:
    """`inner` as a guided denoiser whose unconditional half is D - shift (CFG++ reads D_u:
    fastdiff.comfyui refuses a model without it); shift 0: halves equal, CFG++ is its base."""

    def __init__(self, inner, shift=0.0):
        self.inner, self.shift = inner, shift

    def __call__(self, x, sigma, **kw):
        return self.denoise_with_uncond(x, sigma, **kw)[0]

    def denoise_with_uncond(self, x, sigma, **kw):
        d = self.inner(x, sigma, **kw)
        return d, d - self.shift


def problem(kind, steps=6):
    g = torch.Generator().manual_seed(0)
    if kind == "flow":
        return GMM.flow_denoiser, torch.randn(3, 2, 3, generator=g, dtype=F64), \
            torch.linspace(1, 0, steps + 1, dtype=F64)
    ramp = torch.linspace(0, 1, steps, dtype=F64)
    s = (20 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 20 ** (1 / 7))) ** 7
    return GMM, torch.randn(3, 2, 3, generator=g, dtype=F64) * 20, torch.cat([s, s.new_zeros(1)])


def test_names_are_comfyuis_in_comfyuis_order():
    assert comfyui.SAMPLER_NAMES == COMFY_NAMES  # every name, in ComfyUI's order
    for name in comfyui.SAMPLER_NAMES:
        assert callable(getattr(comfyui, f"sample_{name}"))
    with pytest.raises(AttributeError):
        comfyui.sample_not_a_sampler  # noqa: B018


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("name", comfyui.SAMPLER_NAMES)
def test_every_sampler_runs_on_both_kinds(name, kind):
    model, x, sigmas = problem(kind)
    if "cfg_pp" in name:
        model = Guided(model, 0.1)
    fn = getattr(comfyui, f"sample_{name}")
    kw = {"noise_sampler": default_noise_sampler(x, torch.Generator().manual_seed(1))} \
        if "ancestral" in name or "sde" in name or name in ("ddpm", "lcm", "seeds_2", "seeds_3")\
        else {}
    before = x.clone()
    out = fn(model, x, sigmas, disable=True, model_kind=kind, **kw)
    assert torch.equal(x, before) and out.shape == x.shape and bool(out.isfinite().all())


@pytest.mark.parametrize("name", [n for n in comfyui.SAMPLER_NAMES if "cfg_pp" in n])
def test_cfg_pp_names_refuse_a_model_without_its_unconditional_output(name):
    """Without D_u the reference takes D_u = D, i.e. the base sampler: fastdiff.comfyui must not
    do that silently under a CFG++ name (the fastdiff.k_diffusion adapter refuses too)."""
    model, x, sigmas = problem("ve")
    fn = getattr(comfyui, f"sample_{name}")
    with pytest.raises(TypeError, match=f"model: sample_{name} renoises with the unconditional "
                       r"prediction; .*denoise_with_uncond.*got GaussianMixture without one"):
        fn(model, x, sigmas, disable=True)
    guided = fn(Guided(model, 0.1), x, sigmas, disable=True, extra_args={"seed": 1})
    base = fn(Guided(model), x, sigmas, disable=True, extra_args={"seed": 1})  # the base sampler
    assert bool(guided.isfinite().all()) and not torch.allclose(guided, base)


def test_model_kind_resolution():
    class Sampling:
        kind = "flow"

    class CONST:  # a ComfyUI model_sampling is recognised by its class name
        pass

    r = comfyui.resolve_model_kind
    assert r(GMM) == "ve" and r(GMM, "const") == "flow" and r(GMM, "EPS") == "ve"
    assert r(type("M", (), {"model_kind": "flow"})()) == "flow"
    assert r(type("M", (), {"model_sampling": Sampling()})()) == "flow"
    assert r(type("M", (), {"model_sampling": CONST()})()) == "flow"
    with pytest.raises(ValueError, match="model_kind"):
        r(GMM, "vp")


def test_flow_ancestral_steps_keep_the_flow_marginal():
    # Point mass at c, x at s_0 = (1 - s_0) c + s_0 e: one ancestral step must give
    # (1 - s_1) c + a e + b z with a^2 + b^2 = s_1^2 (the flow marginal at s_1), whatever eta.
    s0, s1 = 0.8, 0.5
    sigmas = torch.tensor([s0, s1], dtype=F64)
    e, z = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = (1 - s0) * C + s0 * e
    for name in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                 "euler_ancestral_cfg_pp"):
        fn = getattr(comfyui, f"sample_{name}")
        model = Guided(constant) if "cfg_pp" in name else constant  # D_u = D = c
        for eta in (0.5, 1.0):
            quiet = fn(model, x, sigmas, disable=True, eta=eta, model_kind="flow",
                       noise_sampler=lambda a, b: torch.zeros_like(x))
            noisy = fn(model, x, sigmas, disable=True, eta=eta, model_kind="flow",
                       noise_sampler=lambda a, b: z)
            a = ((quiet - (1 - s1) * C) / e).flatten()
            b = ((noisy - quiet) / z).flatten()
            assert torch.allclose(a, a[0].expand_as(a), atol=1e-12), name
            assert torch.allclose(b, b[0].expand_as(b), atol=1e-12), name
            assert abs(float(a[0] ** 2 + b[0] ** 2) - s1**2) < 1e-12, (name, eta)
            assert float(b[0]) > 0.01, (name, eta)  # eta > 0 renoises


def test_uni_pc_ends_at_sigma_0_001_as_comfyui():
    # Exponential integrators are exact for a constant denoiser: ComfyUI's UniPC replaces a
    # final sigma 0 by 0.001 and returns the sample there, c + (0.001 / sigma_0) (x_0 - c).
    _, x, sigmas = problem("ve", steps=8)
    for name in ("uni_pc", "uni_pc_bh2"):
        out = getattr(comfyui, f"sample_{name}")(constant, x, sigmas, disable=True)
        want = C + (0.001 / float(sigmas[0])) * (x - C)
        assert torch.allclose(out, want, rtol=1e-12, atol=1e-12), name
    assert float(sigmas[-1]) == 0  # the caller's sigmas are not modified (ComfyUI's are)


def test_flow_sdes_offset_a_first_sigma_of_one():
    # eta = 0 on a flow model from s = 1: ComfyUI calls the model at 1 - 1e-4 and steps from
    # there, so the exact answer is that of the ODE started at s_0 = 1 - 1e-4 from x.
    _, x, _ = problem("flow")
    sigmas = torch.linspace(1, 0.05, 7, dtype=F64)
    s0, s_end = 1 - 1e-4, 0.05
    want = (1 - s_end) * C + (s_end / s0) * (x - (1 - s0) * C)
    for name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde",
                 "exp_heun_2_x0"):
        kw = {} if name == "exp_heun_2_x0" else {"eta": 0.0}
        out = getattr(comfyui, f"sample_{name}")(constant, x, sigmas, disable=True,
                                                 model_kind="flow", **kw)
        assert torch.allclose(out, want, rtol=1e-12, atol=1e-12), name
        # a model_sampling with percent_to_sigma (ComfyUI's shift) moves it elsewhere
        ms = type("MS", (), {"percent_to_sigma": staticmethod(lambda p: 0.9)})()
        m = type("M", (), {"model_sampling": ms, "__call__": lambda self, x, s: constant(x, s)})()
        out = getattr(comfyui, f"sample_{name}")(m, x, sigmas, disable=True,
                                                 model_kind="flow", **kw)
        other = (1 - s_end) * C + (s_end / 0.9) * (x - 0.1 * C)
        assert torch.allclose(out, other, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("name", ["lms", "ipndm", "ipndm_v"])
def test_last_step_into_zero_is_the_denoised_output(name):
    # ComfyUI's lms / ipndm / ipndm_v: x = D at the step into sigma = 0
    model, x, sigmas = problem("ve")
    seen = []

    def recording(x_, s):
        seen.append(x_.clone())
        return model(x_, s)

    out = getattr(comfyui, f"sample_{name}")(recording, x, sigmas, disable=True)
    assert torch.allclose(out, model(seen[-1], sigmas[-2].expand(3)), rtol=0, atol=1e-14)


def test_seed_seeds_the_default_noise_and_is_not_passed_to_the_model():
    model, x, sigmas = problem("ve")

    def strict(x_, s):  # no **kwargs: a stray seed= would raise
        return model(x_, s)

    a = comfyui.sample_euler_ancestral(strict, x, sigmas, extra_args={"seed": 4}, disable=True)
    b = comfyui.sample_euler_ancestral(strict, x, sigmas, extra_args={"seed": 4}, disable=True)
    c = comfyui.sample_euler_ancestral(strict, x, sigmas, extra_args={"seed": 5}, disable=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ComfyUI name -> registry entry of its fused plan, per model kind
FUSED = {"euler_ancestral": ("euler_ancestral", "euler_ancestral_RF"),
         "euler_cfg_pp": ("euler_cfg_pp", "euler_cfg_pp_flow"),
         "euler_ancestral_cfg_pp": ("euler_ancestral_cfg_pp", "euler_ancestral_cfg_pp_flow"),
         "dpm_2_ancestral": ("dpm_2_ancestral", "dpm_2_ancestral_RF"),
         "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral_RF"),
         "dpmpp_2m_sde": ("dpmpp_2m_sde", "dpmpp_2m_sde_flow"),
         "dpmpp_3m_sde": ("dpmpp_3m_sde", "dpmpp_3m_sde_flow"),
         "lcm": ("lcm", "lcm_flow"),
         "exp_heun_2_x0": ("exp_heun_2_x0", "exp_heun_2_x0_flow"),
         "res_multistep": ("res_multistep", "res_multistep"),
         "gradient_estimation": ("gradient_estimation", "gradient_estimation"),
         "heunpp2": ("heunpp2", "heunpp2")}


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_the_fused_plan_gives_comfyuis_numbers(name, kind):
    model, x, sigmas = problem(kind)
    if kind == "flow" and name in ("res_multistep", "gradient_estimation", "heunpp2"):
        sigmas = torch.linspace(0.98, 0, 7, dtype=F64)  # kind-independent: VE sigmas < 1 too
    if "cfg_pp" in name:  # halves equal (differing ones: tests/test_comfyui_backends.py)
        model = Guided(model)
    noise = lambda: default_noise_sampler(x, torch.Generator().manual_seed(2))  # noqa: E731
    want = getattr(comfyui, f"sample_{name}")(model, x, sigmas, disable=True, model_kind=kind,
                                              **({"noise_sampler": noise()} if "sde" in name
                                                 or "ancestral" in name or name == "lcm"
                                                 else {}))
    sampler = Sampler(model, FUSED[name][kind == "flow"], sigmas, backend="cpu",
                      noise="generator")
    sampler.noise_sampler = noise()
    got = sampler(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10
