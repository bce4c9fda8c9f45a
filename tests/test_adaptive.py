"""fastdiff.adaptive.sample_dpm_adaptive (every attempted step as fused lincomb launches) against
k-diffusion's own sample_dpm_adaptive on the same model, x, noise and arguments.

The model is the exact 6-D Gaussian-mixture denoiser, x = 20 z, sigma from 20 to 0.03 as Python
floats (k-diffusion's lambdas are then float32 0-d tensors; the fused path computes its
coefficients with the same float32 scalar operations). Checked on the lincomb backends that run
on CPU (reference, the C++ kernels, Triton's interpreter), orders 2 and 3, eta 0 and 0.5: the
sample to 1e-10 (float64) / 1e-5 (float32) relative to its largest entry, the step counts
(steps, nfe, n_accept, n_reject) equal, the same noise requested at the same sigmas (none at
eta = 0, where k-diffusion's draws are multiplied by 0), x untouched.
"""

from __future__ import annotations

import math

import pytest
import torch
from _kdiffusion_ref import load_kdiffusion_sampling

import fastdiff.adaptive as adaptive
from fastdiff import comfyui
from fastdiff import k_diffusion as F
from fastdiff.models.gmm import GaussianMixture
from fastdiff.ops import resolve, unavailable_reason
from fastdiff.reference.solvers._utils import default_noise_sampler
from fastdiff.sampler import NonFiniteError

K = load_kdiffusion_sampling()
needs_k = pytest.mark.skipif(K is None, reason="k-diffusion (or scipy/torchsde) not installed")
GMM = GaussianMixture.default(d=6)
CPU = torch.device("cpu")
BACKENDS = ["reference"] + [b for b in ("cpu", "triton") if not unavailable_reason(b, CPU)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class RecordingNoise:
    """Seeded N(0, I) draws (float64, rounded to x's dtype) recording the sigmas asked for."""

    def __init__(self, x, seed=5):
        self.inner = default_noise_sampler(x, torch.Generator().manual_seed(seed))
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.inner(sigma, sigma_next)


def _x(dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 2, 3, generator=g, dtype=torch.float64) * 20).to(dtype)


def _rel(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def _pair(dtype, backend, **kw):
    """(k-diffusion's (x, info), fastdiff's (x, info), their noise calls)."""
    x = _x(dtype)
    keep = x.clone()
    runs, calls = [], []
    for fn, extra in ((K.sample_dpm_adaptive, {}), (adaptive.sample_dpm_adaptive,
                                                     {"backend": backend})):
        noise = RecordingNoise(x)
        runs.append(fn(GMM, x, 0.03, 20.0, disable=True, return_info=True, noise_sampler=noise,
                       **kw, **extra))
        calls.append(noise.calls)
    assert torch.equal(x, keep), "x modified in place"
    return runs[0], runs[1], calls


# float32: from the default h_init = 0.05 at sigma 20 the first error estimate is 2e-6, at
# float32's round-off in x_low - x_high (1e-7 |x| / (rtol |x|)), so any two float32 runs take
# different second steps (k-diffusion's own float32 run is 1.7e-5 from its float64 one); from
# h_init = 0.5 every error estimate is far above round-off.
@needs_k
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_kdiffusion(dtype, order, eta, backend):
    kw = {"order": order, "eta": eta, **({"h_init": 0.5} if dtype == torch.float32 else {})}
    (want, want_info), (got, got_info), (want_calls, got_calls) = _pair(dtype, backend, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    assert got_info == want_info
    assert want_info["n_accept"] > 2 and want_info["n_reject"] > 0  # the controller did work
    assert _rel(got, want) <= TOL[dtype], _rel(got, want)
    assert len(want_calls) == want_info["n_accept"]
    if eta:
        flat = [[v for call in calls for v in call] for calls in (want_calls, got_calls)]
        # float32: the step sizes follow float32 error estimates (sigmas up to 3.7e-5 apart
        # here, order 3, though the samples agree to 4e-6)
        assert flat[1] == pytest.approx(flat[0], rel=1e-12 if dtype == torch.float64 else 1e-4)
    else:  # k-diffusion draws at every accepted step and multiplies by su = 0; fastdiff does not
        assert got_calls == []


@needs_k
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_end_points_and_options(backend):
    """float64 tensor sigma_min / sigma_max (lambdas in float64) and non-default controller
    options (PID coefficients, tolerances, s_noise)."""
    x = _x(torch.float64)
    lo, hi = torch.tensor(0.05, dtype=torch.float64), torch.tensor(15.0, dtype=torch.float64)
    kw = dict(order=3, rtol=0.02, atol=0.01, h_init=0.1, pcoeff=0.3, icoeff=0.9, dcoeff=0.1,
              accept_safety=0.9, eta=0.8, s_noise=0.9, disable=True, return_info=True)
    want, want_info = K.sample_dpm_adaptive(GMM, x, lo, hi, noise_sampler=RecordingNoise(x), **kw)
    got, got_info = adaptive.sample_dpm_adaptive(GMM, x, lo, hi, noise_sampler=RecordingNoise(x),
                                                 backend=backend, **kw)
    assert got_info == want_info and want_info["n_reject"] > 0
    assert _rel(got, want) <= 1e-10, _rel(got, want)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_every_attempt_runs_as_lincomb_launches(order, eta, monkeypatch):
    """order launches per attempted step (order - 1 after the model calls but the last, plus
    none for the error), one more per accepted step with eta > 0; both adapters route here."""
    launches = []
    real = adaptive.lincomb

    def counting(*args, **kwargs):
        launches.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(adaptive, "lincomb", counting)
    x = _x(torch.float64)
    sigmas = torch.tensor([20.0, 5.0, 1.0, 0.03, 0.0], dtype=torch.float64)
    out = comfyui.sample_dpm_adaptive(GMM, x, sigmas, disable=True, order=order, eta=eta,
                                      backend="reference", return_info=True,
                                      noise_sampler=RecordingNoise(x))
    _, info = out
    assert launches and set(launches) == {"reference"}
    want = order * info["steps"] + (info["n_accept"] if eta else 0)
    assert len(launches) == want
    launches.clear()
    F.sample_dpm_adaptive(GMM, x, 0.03, 20.0, disable=True, order=order, eta=eta,
                          noise_sampler=RecordingNoise(x))
    assert len(launches) > 0 and set(launches) == {resolve("auto", CPU)}


@needs_k
def test_comfyui_name_takes_its_sigma_range_from_sigmas():
    """ComfyUI's wrapper: sigma_min = the last positive sigma, sigma_max = sigmas[0]."""
    x = _x(torch.float64)
    sigmas = torch.tensor([20.0, 5.0, 1.0, 0.03, 0.0], dtype=torch.float64)
    got = comfyui.sample_dpm_adaptive(GMM, x, sigmas, disable=True, backend="cpu"
                                      if "cpu" in BACKENDS else "reference")
    want = K.sample_dpm_adaptive(GMM, x, sigmas[-2], sigmas[0], disable=True)
    assert _rel(got, want) <= 1e-10


@pytest.mark.parametrize(("options", "name"), [
    ({"order": 1}, "order"), ({"order": 4}, "order"), ({"order": True}, "order"),
    ({"rtol": 0.0}, "rtol"), ({"rtol": -0.05}, "rtol"), ({"rtol": math.nan}, "rtol"),
    ({"atol": -1.0}, "atol"), ({"h_init": 0.0}, "h_init"), ({"backend": "gpu"}, "backend"),
])
def test_bad_options_raise_naming_them(options, name):
    x = _x(torch.float64)
    keep = x.clone()
    with pytest.raises(ValueError, match=name):
        adaptive.sample_dpm_adaptive(GMM, x, 0.03, 20.0, disable=True, **options)
    assert torch.equal(x, keep)


def test_non_finite_error_estimate_raises():
    """A NaN from the model: k-diffusion's controller would reject forever (h becomes NaN)."""
    def broken(x, sigma):
        return GMM(x, sigma) * (math.nan if float(sigma[0]) < 5 else 1.0)

    with pytest.raises(NonFiniteError, match="error estimate"):
        adaptive.sample_dpm_adaptive(broken, _x(torch.float64), 0.03, 20.0, disable=True,
                                     backend="reference")


@needs_k
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [2, 3])
def test_reverse_direction_matches_kdiffusion(order, backend):
    """sigma_min > sigma_max integrates the ODE towards noise (k-diffusion's `forward` False:
    negative step sizes, lambdas decreasing); eta > 0 is refused there, naming eta."""
    x = _x(torch.float64) / 40
    want, want_info = K.sample_dpm_adaptive(GMM, x, 10.0, 0.1, order=order, disable=True,
                                            return_info=True)
    got, got_info = adaptive.sample_dpm_adaptive(GMM, x, 10.0, 0.1, order=order, disable=True,
                                                 return_info=True, backend=backend)
    assert got_info == want_info and want_info["n_accept"] > 2
    assert _rel(got, want) <= 1e-10, _rel(got, want)
    with pytest.raises(ValueError, match="eta"):
        adaptive.sample_dpm_adaptive(GMM, x, 10.0, 0.1, eta=0.5, disable=True, backend=backend)
