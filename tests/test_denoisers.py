"""Parameterisation wrappers: each recovers the exact denoiser when its network is the exact one
for the Gaussian mixture (built from the definition of its target, in its own space), matches
diffusers' and k-diffusion's conversions on the same inputs, and CFG batches into one call."""

import importlib.util
import math
from functools import cache
from pathlib import Path

import pytest
import torch

from fastdiff.denoisers import (
    CFGDenoiser,
    Denoiser,
    EDMDenoiser,
    EpsDenoiser,
    FlowDenoiser,
    VDenoiser,
    X0Denoiser,
    flow_to_ve,
    ve_to_flow,
)
from fastdiff.models.gmm import GaussianMixture
from fastdiff.schedules import DiscreteVPSchedule, FlowSchedule

F64 = torch.float64
GMM = GaussianMixture.default(2)
SIGMAS = torch.tensor([0.0, 0.02, 0.3, 1.0, 2.5, 14.0, 80.0], dtype=F64)


def _batch(sigmas=SIGMAS, seed=0):
    """Noisy points x = x0 + sigma * eps drawn from the model itself, one sigma per row."""
    g = torch.Generator().manual_seed(seed)
    x0 = GMM.sample(len(sigmas), generator=g)
    return x0 + sigmas[:, None] * torch.randn(x0.shape, generator=g, dtype=F64), sigmas


def _col(v):
    return torch.as_tensor(v, dtype=F64).reshape(-1, 1)


# ---- exact networks, each written in its own space from its target's definition --------------
# VP space: x_t = a x0 + b eps with a = 1/sqrt(1 + sigma^2), b = sigma a (the time input is the
# VE sigma here; discrete networks below recover sigma from their timestep).

def _vp_parts(x_t, sigma):
    sigma = torch.as_tensor(sigma, dtype=F64).expand(x_t.shape[0])
    a = 1 / torch.sqrt(1 + sigma**2)
    x0 = GMM.posterior_mean(x_t, a, a * sigma)
    b = _col(a * sigma)
    eps = (x_t - _col(a) * x0) / torch.where(b > 0, b, 1.0)  # b = 0 only at sigma = 0
    return _col(a), b, x0, eps


def eps_net(x_t, sigma):
    return _vp_parts(x_t, sigma)[3]


def v_net(x_t, sigma):  # Salimans & Ho 2022, Sec. 4: v = alpha eps - sigma x0
    a, b, x0, eps = _vp_parts(x_t, sigma)
    return a * eps - b * x0


def x0_net(x_t, sigma):
    return _vp_parts(x_t, sigma)[2]


def flow_net(x_s, s):  # velocity E[eps - x0 | x_s] of rectified flow
    return GMM.flow_velocity(x_s, s)


def edm_net(x_in, c_noise, sigma_data=0.5):
    # EDM training target F = (x0 - c_skip x) / c_out (Karras et al. 2022, Eq. 8), Table 1
    # coefficients typed from the paper; sigma and x are recovered from the network's inputs.
    sigma = torch.exp(4 * c_noise)
    s2, d2 = _col(sigma) ** 2, sigma_data**2
    x = x_in * torch.sqrt(s2 + d2)
    c_skip, c_out = d2 / (s2 + d2), _col(sigma) * sigma_data / torch.sqrt(s2 + d2)
    return (GMM.denoiser(x, sigma) - c_skip * x) / c_out


@pytest.mark.parametrize("wrapper,net", [(EpsDenoiser, eps_net), (VDenoiser, v_net),
                                         (X0Denoiser, x0_net), (FlowDenoiser, flow_net)])
def test_exact_network_recovers_exact_denoiser(wrapper, net):
    x, sigma = _batch()
    got = wrapper(net)(x, sigma)
    torch.testing.assert_close(got, GMM.denoiser(x, sigma), atol=1e-11, rtol=1e-10)


def test_edm_exact_network_recovers_exact_denoiser():
    x, sigma = _batch(SIGMAS[1:])  # c_out = 0 at sigma = 0 makes F undefined there
    torch.testing.assert_close(EDMDenoiser(edm_net)(x, sigma), GMM.denoiser(x, sigma),
                               atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("prediction", ["v", "edm"])
def test_preconditioning_has_unit_variance(prediction):
    # Karras et al. 2022, Appendix B.6: for data of std sigma_data, c_in gives a unit-variance
    # network input and (c_skip, c_out) a unit-variance training target (x0 - c_skip x) / c_out.
    sd = 0.7
    c_skip, c_out, c_in = Denoiser(eps_net, prediction, sigma_data=sd).scalings(SIGMAS[1:])
    s2 = SIGMAS[1:] ** 2
    torch.testing.assert_close(c_in**2 * (sd**2 + s2), torch.ones_like(s2))
    torch.testing.assert_close(((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s2) / c_out**2,
                               torch.ones_like(s2))


def test_scalings_are_float64_and_finite_at_the_ends():
    for prediction in ("epsilon", "v", "x0", "edm", "flow"):
        den = Denoiser(eps_net, prediction)
        coeffs = den.scalings(torch.tensor([0.0, 1e-8, 1.0, 1e4], dtype=torch.float32))
        assert all(c.dtype == F64 and bool(torch.isfinite(c).all()) for c in coeffs)
        assert bool(torch.isfinite(den.time_input(torch.tensor([0.0, 1e4]))).all())
        # at sigma = 0 the input passes through (x0 prediction: the network returns it)
        want = (0.0, 1.0) if prediction == "x0" else (1.0, 0.0)
        assert (float(coeffs[0][0]), abs(float(coeffs[1][0]))) == want


def test_flow_space_forward_and_coordinate_changes():
    g = torch.Generator().manual_seed(1)
    x_s = torch.randn(6, 2, generator=g, dtype=F64)
    s = torch.tensor([0.0, 0.1, 0.5, 0.8, 0.99, 1.0], dtype=F64)
    want = GMM.flow_denoiser(x_s, s)
    torch.testing.assert_close(FlowDenoiser(flow_net).flow_forward(x_s, s), want,
                               atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ve_to_flow(GMM)(x_s[:-1], s[:-1]), want[:-1],
                               atol=1e-11, rtol=1e-10)
    x, sigma = _batch()
    torch.testing.assert_close(flow_to_ve(GMM.flow_denoiser)(x, sigma), GMM.denoiser(x, sigma),
                               atol=1e-11, rtol=1e-10)
    # a VP epsilon network used by a flow solver: D_f(x_s, s) = D(x_s / (1 - s), s / (1 - s))
    torch.testing.assert_close(EpsDenoiser(eps_net).flow_forward(x_s[:-1], s[:-1]), want[:-1],
                               atol=1e-11, rtol=1e-10)


# ---- discrete-timestep networks (DDPM tables) --------------------------------------------------

def _ddpm(prediction="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                         prediction_type=prediction, clip_sample=False)


@pytest.mark.parametrize("prediction,net", [("epsilon", eps_net), ("v", v_net), ("x0", x0_net)])
def test_discrete_timestep_network_recovers_exact_denoiser(prediction, net):
    abar = _ddpm().alphas_cumprod.double()
    sched = DiscreteVPSchedule(abar)
    seen = []

    def discrete_net(x_t, t):  # a network that only knows its timestep, as diffusers' UNets
        seen.append(t)
        return net(x_t, sched.sigma(t))

    x, sigma = _batch(torch.tensor([sched.sigma_min, 0.3, 1.0, 7.5, sched.sigma_max], dtype=F64))
    den = Denoiser.from_alphas_cumprod(discrete_net, abar, prediction)
    torch.testing.assert_close(den(x, sigma), GMM.denoiser(x, sigma), atol=1e-10, rtol=1e-9)
    assert seen[0][0] == 0 and seen[0][-1] == 999  # the table's ends are timesteps 0 and N - 1


@pytest.mark.parametrize("prediction,net", [("epsilon", "epsilon"), ("v_prediction", "v"),
                                            ("sample", "x0")])
def test_matches_diffusers_ddpm_pred_original_sample(prediction, net):
    sched = _ddpm(prediction)
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # both sides then do float64 arithmetic
    g = torch.Generator().manual_seed(2)
    for t in (0, 10, 500, 999):
        sample = torch.randn(4, 3, 2, generator=g, dtype=F64)
        out = torch.randn(4, 3, 2, generator=g, dtype=F64)
        want = sched.step(out, t, sample, generator=g).pred_original_sample
        abar = sched.alphas_cumprod[t]
        sigma = torch.sqrt((1 - abar) / abar)
        den = Denoiser.from_alphas_cumprod(lambda x_t, time, out=out: out, sched.alphas_cumprod,
                                           net)
        got = den(sample / abar.sqrt(), sigma.expand(4))  # VE x = x_t / sqrt(abar)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(den.time_input(sigma), torch.tensor(float(t), dtype=F64),
                                   atol=1e-9, rtol=0)


def test_flow_matches_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(8)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, generator=g, dtype=torch.float32)
    timesteps = []
    den = FlowDenoiser(lambda x_s, t: (timesteps.append(t), flow_net(x_s, t / 1000))[1],
                       schedule=FlowSchedule(1000))
    for i, t in enumerate(sched.timesteps):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        d = den.flow_forward(x, torch.full((3,), s))
        ours = x + (s_next - s) * (x - d) / s  # Euler on dx/ds = (x - D) / s
        v = flow_net(x, torch.full((3,), s, dtype=F64)).float()
        x = sched.step(v, t, x).prev_sample
        torch.testing.assert_close(ours, x, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(timesteps[-1], t.expand(3), atol=1e-3, rtol=0)


@cache
def _kdiffusion_external():
    from _kdiffusion_ref import _PKG, load_kdiffusion_sampling

    if load_kdiffusion_sampling() is None:
        return None
    path = Path(importlib.util.find_spec("k_diffusion").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(f"{_PKG}.external", path / "external.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("prediction,quantize", [("epsilon", False), ("epsilon", True),
                                                 ("v", False)])
def test_matches_kdiffusion_discrete_wrappers(prediction, quantize):
    ext = _kdiffusion_external()
    if ext is None:
        pytest.skip("k-diffusion not installed")
    abar = _ddpm().alphas_cumprod.double()
    # t-dependent and nonlinear; k-diffusion passes an integer t when quantizing, hence .double()
    net = lambda x, t: torch.sin(3 * x) * torch.cos(t[:, None].double() / 100)
    cls = ext.DiscreteEpsDDPMDenoiser if prediction == "epsilon" else ext.DiscreteVDDPMDenoiser
    theirs = cls(net, abar, quantize=quantize)
    ours = Denoiser.from_alphas_cumprod(net, abar, prediction, quantize=quantize)
    x, _ = _batch()
    sigma = torch.tensor([0.03, 0.1, 0.5, 1.0, 3.3, 20.0, 150.0], dtype=F64)
    torch.testing.assert_close(ours.time_input(sigma), theirs.sigma_to_t(sigma).double())
    torch.testing.assert_close(ours(x, sigma), theirs(x, sigma), atol=1e-12, rtol=1e-12)


# ---- classifier-free guidance -------------------------------------------------------------------

class CountingNet(torch.nn.Module):
    """Exact eps network of the mixture shifted by the conditioning vector, counting calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x_t, sigma, cond):
        self.calls += 1
        a = 1 / torch.sqrt(1 + _col(sigma) ** 2)
        return eps_net(x_t - a * cond, sigma)  # x0 = y + cond with y from the mixture


def _shifted_denoiser(x, sigma, cond):
    return GMM.denoiser(x - cond, sigma) + cond


def test_cfg_batches_one_call_and_guides_linearly():
    net = CountingNet()
    cfg = CFGDenoiser(EpsDenoiser(net), scale=3.0)
    x, sigma = _batch(SIGMAS[1:])
    cond = torch.tensor([[1.0, -0.5]], dtype=F64).expand_as(x)
    uncond = torch.zeros_like(x)
    out = cfg(x, sigma, cond=cond, uncond=uncond)
    assert net.calls == 1
    d_c, d_u = _shifted_denoiser(x, sigma, cond), _shifted_denoiser(x, sigma, uncond)
    torch.testing.assert_close(out, d_u + 3.0 * (d_c - d_u), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cfg(x, 0.5, cond=cond, uncond=uncond),  # scalar sigma too
                               d_u[:0].new_tensor(0) + _cfg_ref(x, 0.5, cond, uncond, 3.0),
                               atol=1e-10, rtol=1e-10)
    assert cfg.weights() == (-2.0, 3.0)


def _cfg_ref(x, sigma, cond, uncond, w):
    d_c, d_u = _shifted_denoiser(x, sigma, cond), _shifted_denoiser(x, sigma, uncond)
    return d_u + w * (d_c - d_u)


def test_cfg_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    x, sigma = _batch(SIGMAS[1:])
    cond = torch.tensor([[1.0, -0.5]], dtype=F64).expand_as(x)
    uncond = torch.zeros_like(x)
    den = EpsDenoiser(CountingNet())
    torch.testing.assert_close(CFGDenoiser(den, 1.0)(x, sigma, cond=cond, uncond=uncond),
                               den(x, sigma, cond=cond), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(CFGDenoiser(den, 0.0)(x, sigma, cond=cond, uncond=uncond),
                               den(x, sigma, cond=uncond), atol=1e-12, rtol=1e-12)


def test_cfg_dict_conditioning_and_missing_arguments():
    seen = {}

    def inner(x, sigma, cond):
        seen.update(cond)
        return x * cond["scale"]

    cfg = CFGDenoiser(inner, 2.0)
    x = torch.ones(2, 3)
    out = cfg(x, torch.ones(2), cond={"scale": torch.full((2, 1), 3.0)},
              uncond={"scale": torch.ones(2, 1)})
    assert seen["scale"].shape == (4, 1)
    torch.testing.assert_close(out, torch.full((2, 3), 1.0 + 2.0 * (3.0 - 1.0)))
    with pytest.raises(ValueError, match="cond="):
        cfg(x, torch.ones(2), uncond=torch.ones(2, 1))
    with pytest.raises(ValueError, match="uncond="):
        cfg(x, torch.ones(2), cond=torch.ones(2, 1))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="prediction"):
        Denoiser(eps_net, "score")
    with pytest.raises(TypeError, match="network"):
        Denoiser(3, "epsilon")
    with pytest.raises(ValueError, match="schedule"):
        Denoiser(eps_net, "edm", schedule=FlowSchedule())
    with pytest.raises(ValueError, match="sigma"):
        EpsDenoiser(eps_net)(torch.zeros(3, 2, dtype=F64), torch.ones(2, dtype=F64))


def test_dtype_is_preserved_and_fp32_matches_fp64():
    x, sigma = _batch(SIGMAS[1:])
    den = VDenoiser(lambda x_t, t: v_net(x_t.double(), t.double()).to(x_t.dtype))
    d32 = den(x.float(), sigma.float())
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), GMM.denoiser(x.float().double(), sigma.float()),
                               atol=1e-5, rtol=1e-5)
    assert math.isfinite(float(d32.abs().max()))


def test_scalar_sigma_gives_the_network_one_time_per_sample():
    seen = []
    den = EpsDenoiser(lambda x_t, t: (seen.append(t), eps_net(x_t, t))[1])
    x, _ = _batch(SIGMAS[1:])
    torch.testing.assert_close(den(x, 0.5), den(x, torch.full((len(x),), 0.5, dtype=F64)),
                               atol=0, rtol=0)
    assert seen[0].shape == (len(x),)


def test_dynamic_thresholding_equals_diffusers_and_runs_fused():
    from diffusers import DDPMScheduler

    from fastdiff.denoisers import ThresholdedDenoiser
    from fastdiff.sampler import Sampler

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 6, generator=g) * 2.5
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    wrapped = ThresholdedDenoiser(lambda x, s: x0, dynamic_ratio=0.9, max_value=2.0)
    torch.testing.assert_close(wrapped(x0, 1.0), sched._threshold_sample(x0.clone()),
                               rtol=0, atol=0)
    assert wrapped(x0, 1.0).abs().max() <= 1.0 + 1e-6
    clipped = ThresholdedDenoiser(lambda x, s: x0, dynamic_ratio=None, clip=1.0)(x0, 1.0)
    assert torch.equal(clipped, x0.clamp(-1, 1))
    # a nonlinear wrapper is just a model to the engine: same result as the reference solver
    gmm = GaussianMixture.default(d=6)
    model = ThresholdedDenoiser(gmm, dynamic_ratio=0.95, max_value=1.5)
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    noise = torch.randn(4, 6, generator=g, dtype=torch.float64) * 10
    from fastdiff.reference.solvers import sample_dpmpp_2m

    want = sample_dpmpp_2m(model, noise, sigmas, disable=True)
    got = Sampler(model, "dpmpp_2m", sigmas)(noise)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="dynamic_ratio"):
        ThresholdedDenoiser(gmm, dynamic_ratio=1.5)
