"""fastdiff.k_diffusion against k-diffusion's own sampling.py on identical inputs.

Every k-diffusion sampler is run twice, by k-diffusion and by fastdiff, on the same denoiser
(the exact Gaussian-mixture posterior mean, plus an `extra_args` shift so that extra_args must
be forwarded), the same float64 sigmas and initial x, and the same noise: each run gets a fresh
noise sampler built from an identically seeded generator, or the global RNG is reseeded (for
k-diffusion's default Brownian-tree path, whose seed comes from the global RNG). The outputs must
agree to float64 round-off. Also checked for every public sampler: callbacks, `disable`, no
in-place change of `x`, and rejection of bad `sigmas`.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from _kdiffusion_ref import load_kdiffusion_sampling

from fastdiff import k_diffusion as F
from fastdiff.reference.solvers import _utils, dpm_solver, lms

K = load_kdiffusion_sampling()
needs_k = pytest.mark.skipif(K is None, reason="k-diffusion (or scipy/torchsde) not installed")

SHAPE = (3, 2, 3)  # batch 3, a 6-dim mixture seen as [2, 3] images: exercises append_dims
DTYPE = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


def _gmm():
    try:
        from fastdiff.models.gmm import GaussianMixture
    except ImportError:
        return None
    return GaussianMixture.default(d=math.prod(SHAPE[1:]))


_MIXTURE = _gmm()


def model(x, sigma, shift=0.0):
    """Exact denoiser of a Gaussian mixture (or, without fastdiff.models.gmm, of N(0.3, 0.5^2 I)),
    shifted by an extra_args value."""
    if _MIXTURE is not None:
        return _MIXTURE(x, sigma) + shift
    s2 = _utils.append_dims(sigma, x.ndim) ** 2
    return 0.3 + 0.25 / (0.25 + s2) * (x - 0.3) + shift


EXTRA = {"shift": 0.01}


def _sigmas(n=7, final_zero=True):
    s = torch.tensor([(20.0 ** (1 / 7) + k / (n - 1) * (0.03 ** (1 / 7) - 20.0 ** (1 / 7))) ** 7
                      for k in range(n)], dtype=DTYPE)  # Karras et al. 2022 eq. 5, rho = 7
    return torch.cat([s, s.new_zeros(1)]) if final_zero else s


def _x0():
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g, dtype=DTYPE) * 20.0


class RecordingNoise:
    """Seeded N(0, I) noise sampler that records the (sigma, sigma_next) it was asked for."""

    def __init__(self, x, seed=123):
        self.inner = _utils.default_noise_sampler(x, torch.Generator().manual_seed(seed))
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.inner(sigma, sigma_next)


# (sampler name, kwargs, noise): noise is None (deterministic), "sampler" (a seeded
# noise_sampler), "global" (global RNG reseeded before each run: s_churn draws, Brownian tree).
CASES = [
    ("sample_euler", {}, None),
    ("sample_euler", {"s_churn": 4.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.003}, "global"),
    ("sample_heun", {}, None),
    ("sample_heun", {"s_churn": 2.0}, "global"),
    ("sample_dpm_2", {}, None),
    ("sample_dpm_2", {"s_churn": 2.0, "s_tmax": 5.0}, "global"),
    ("sample_euler_ancestral", {}, "sampler"),
    ("sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}, "sampler"),
    ("sample_dpm_2_ancestral", {}, "sampler"),
    ("sample_dpm_2_ancestral", {"eta": 0.7}, "sampler"),
    ("sample_lms", {"order": 1}, None),
    ("sample_lms", {"order": 2}, None),
    ("sample_lms", {"order": 3}, None),
    ("sample_lms", {}, None),
    ("sample_dpmpp_2s_ancestral", {}, "sampler"),
    ("sample_dpmpp_2s_ancestral", {"eta": 0.0}, None),
    ("sample_dpmpp_sde", {}, "sampler"),
    ("sample_dpmpp_sde", {"eta": 0.6, "r": 0.4}, "global"),
    ("sample_dpmpp_2m", {}, None),
    ("sample_dpmpp_2m_sde", {}, "sampler"),
    ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.8}, "global"),
    ("sample_dpmpp_2m_sde", {"eta": 0.0}, None),
    ("sample_dpmpp_3m_sde", {}, "sampler"),
    ("sample_dpmpp_3m_sde", {"s_noise": 0.9}, "global"),
    ("sample_dpmpp_3m_sde", {"eta": 0.0}, None),
]
# sample_dpm_fast / sample_dpm_adaptive take (sigma_min, sigma_max, ...) instead of sigmas.
RANGE_CASES = [
    ("sample_dpm_fast", {"n": 10}, None),  # orders 3, 3, 2, 1
    ("sample_dpm_fast", {"n": 11}, None),  # orders 3, 3, 3, 2
    ("sample_dpm_fast", {"n": 7, "eta": 1.0}, "sampler"),
    ("sample_dpm_adaptive", {"return_info": True}, None),
    ("sample_dpm_adaptive", {"order": 2, "rtol": 0.02, "return_info": True}, None),
    ("sample_dpm_adaptive", {"eta": 0.5, "return_info": True}, "sampler"),
]


def _fastdiff(name):
    try:
        return getattr(F, name)
    except (AttributeError, ImportError):
        return None


def _run_pair(name, kwargs, noise, args):
    """Runs k-diffusion's and fastdiff's `name` on identical inputs; returns both results."""
    fd = _fastdiff(name)
    if fd is None:
        pytest.skip(f"fastdiff.k_diffusion.{name} does not exist yet")
    x = _x0()
    x_copy = x.clone()
    results, noise_calls = [], []
    for fn in (getattr(K, name), fd):
        kw = dict(kwargs)
        if noise == "sampler":
            kw["noise_sampler"] = RecordingNoise(x)
        torch.manual_seed(7)
        results.append(fn(model, x, *args, extra_args=EXTRA, disable=True, **kw))
        if noise == "sampler":
            noise_calls.append(kw["noise_sampler"].calls)
    assert torch.equal(x, x_copy), f"{name} modified x in place"
    if noise == "sampler":  # the same noise requested at the same sigmas
        flat = [[v for call in calls for v in call] for calls in noise_calls]
        assert len(flat[0]) > 0 and flat[0] == pytest.approx(flat[1], rel=1e-12)
    return results


@needs_k
@pytest.mark.parametrize("final_zero", [True, False], ids=["to_zero", "to_sigma_min"])
@pytest.mark.parametrize(("name", "kwargs", "noise"), CASES,
                         ids=[f"{c[0][7:]}-{i}" for i, c in enumerate(CASES)])
def test_parity_with_kdiffusion(name, kwargs, noise, final_zero):
    ref, out = _run_pair(name, kwargs, noise, (_sigmas(final_zero=final_zero),))
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.allclose(out, ref, **TOL), (out - ref).abs().max()


@needs_k
@pytest.mark.parametrize(("name", "kwargs", "noise"), RANGE_CASES,
                         ids=[f"{c[0][7:]}-{i}" for i, c in enumerate(RANGE_CASES)])
def test_parity_dpm_fast_adaptive(name, kwargs, noise):
    ref, out = _run_pair(name, kwargs, noise, (0.03, 20.0))
    if kwargs.get("return_info"):
        (ref, ref_info), (out, out_info) = ref, out
        assert out_info == ref_info and out_info["n_accept"] > 2
    assert torch.allclose(out, ref, **TOL), (out - ref).abs().max()


def _plan_backends():
    from fastdiff.ops import unavailable_reason

    cpu = torch.device("cpu")
    return ["reference"] + [b for b in ("cpu", "triton") if not unavailable_reason(b, cpu)]


@needs_k
@pytest.mark.parametrize("backend", _plan_backends())
@pytest.mark.parametrize("n", [10, 11, 12], ids=["orders-3321", "orders-3332", "orders-33321"])
def test_dpm_fast_plan_matches_kdiffusion(n, backend):
    """The fused plan of the registry entry "dpm_fast" on sigmas (n + 1 of them, the last 0)
    is k-diffusion's sample_dpm_fast(sigma_min = sigmas[-2], sigma_max = sigmas[0], n): the
    same float32 lambda grid (torch.linspace's default dtype) and per-step orders."""
    from fastdiff.sampler import Sampler

    sig = _sigmas(n=n)  # n positive sigmas and a final 0: n intervals, n model calls
    x = _x0()
    ref = K.sample_dpm_fast(model, x, sig[-2].clone(), sig[0].clone(), n, extra_args=EXTRA,
                            disable=True)
    got = Sampler(model, "dpm_fast", sig, backend=backend)(x, **EXTRA)
    assert torch.allclose(got, ref, **TOL), (got - ref).abs().max()


@needs_k
@pytest.mark.parametrize("backend", _plan_backends())
def test_dpm_fast_plan_with_eta(backend):
    """eta > 0: the plan is fastdiff's reference (same noise requested, at the unclamped next
    sigma, but for the last step's draw of std 0, which the plan does not make), and finite
    where k-diffusion's is not: with float64 end points (as a plan's sigmas always are) the
    float32 grid's last t lies above t_end, the clamp to t_end leaves
    sigma(t_next)^2 - sigma(t_end)^2 = -1.5e-11 and k-diffusion's sqrt of it is NaN
    (dpm_solver.DPMSolver._ancestral takes 0). With float end points fastdiff's numbers are
    k-diffusion's (test_parity_dpm_fast_adaptive)."""
    from fastdiff.sampler import Sampler

    sig, x, n = _sigmas(n=7), _x0(), 7
    args = (model, x, sig[-2].clone(), sig[0].clone(), n)
    assert not torch.isfinite(K.sample_dpm_fast(*args, extra_args=EXTRA, disable=True, eta=1.0,
                                                noise_sampler=RecordingNoise(x))).all()
    calls = RecordingNoise(x)
    ref = F.sample_dpm_fast(*args, extra_args=EXTRA, disable=True, eta=1.0, noise_sampler=calls)
    sampler = Sampler(model, "dpm_fast", sig, backend=backend, noise="generator", eta=1.0)
    sampler.noise_sampler = RecordingNoise(x)
    got = sampler(x, **EXTRA)
    assert torch.isfinite(ref).all() and torch.allclose(got, ref, **TOL), (got - ref).abs().max()
    assert len(calls.calls) == n // 3 + 1  # one draw per step
    flat = [[v for call in c.calls for v in call] for c in (sampler.noise_sampler, calls)]
    assert flat[0] == pytest.approx(flat[1][:-2], rel=1e-12)


def test_dpm_fast_sigmas_needs_a_positive_end():
    sig = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)  # no positive sigma before the final 0
    with pytest.raises(ValueError, match="sigmas: dpm_fast ends at the last positive sigma"):
        dpm_solver.sample_dpm_fast_sigmas(model, _x0(), sig, disable=True)


@needs_k
def test_brownian_tree_noise_sampler_matches_kdiffusion():
    x = _x0()
    sig = _sigmas()
    for seed in (3, [3, 4, 5]):
        a = K.BrownianTreeNoiseSampler(x, sig[-2], sig[0], seed=seed)
        b = F.BrownianTreeNoiseSampler(x, sig[-2], sig[0], seed=seed)
        c = F.BrownianTreeNoiseSampler(x, sig[-2], sig[0], seed=seed, cpu=True)
        for s, s_next in zip(sig[:-2], sig[1:-1], strict=True):
            want = a(s, s_next)
            assert want.shape == x.shape and want.dtype == x.dtype
            assert torch.equal(b(s, s_next), want) and torch.equal(c(s, s_next), want)


@needs_k
def test_helpers_match_kdiffusion():
    sig = _sigmas()
    t = sig.numpy()
    coeffs = lms.lms_coefficients(sig.tolist(), 4)
    for i in range(len(t) - 1):
        for j in range(min(i + 1, 4)):
            want = K.linear_multistep_coeff(min(i + 1, 4), t, i, j)  # scipy.quad
            assert coeffs[i][j] == pytest.approx(want, rel=1e-12, abs=1e-12)
    for s, s_next, eta in [(5.0, 2.0, 1.0), (5.0, 2.0, 0.3), (5.0, 0.0, 1.0), (1.0, 0.9, 0.0)]:
        assert _utils.get_ancestral_step(s, s_next, eta) == pytest.approx(
            K.get_ancestral_step(s, s_next, eta))
        got = _utils.get_ancestral_step(torch.tensor(s), torch.tensor(s_next), eta)
        want = K.get_ancestral_step(torch.tensor(s), torch.tensor(s_next), eta)
        assert [float(v) for v in got] == pytest.approx([float(v) for v in want])
    x = _x0()
    d = model(x, sig[1])
    assert torch.equal(_utils.to_d(x, sig[1], d), K.to_d(x, sig[1], d))
    assert torch.equal(F.append_zero(sig), K.append_zero(sig))


@needs_k
def test_dpm_solver_singlestep_equals_kdiffusion_steps():
    """Fixed-step DPM-Solver-k is k-diffusion's DPMSolver.dpm_solver_k_step on every interval
    (float64 lambdas), with the step into sigma = 0 giving the denoised output."""
    sig = _sigmas(n=5)
    for order in (1, 2, 3):
        solver = K.DPMSolver(model, EXTRA)
        step = getattr(solver, f"dpm_solver_{order}_step")
        x = want = _x0()
        for s, s_next in zip(sig[:-2], sig[1:-1], strict=True):
            want = step(want, solver.t(s), solver.t(s_next))[0]
        want = model(want, sig[-2] * want.new_ones(SHAPE[0]), **EXTRA)
        got = dpm_solver.sample_dpm_solver_singlestep(model, x, sig, EXTRA, disable=True,
                                                      order=order)
        assert torch.allclose(got, want, **TOL), (order, (got - want).abs().max())


def test_dpm_solver_multistep_order_3_converges_with_order_3():
    """The third-order multistep update (2 * phi_3 weight on the second difference) converges
    with slope ~3 against the exact mixture ODE; the official phi_3 weight gives ~2.1 here."""
    if _MIXTURE is None:
        pytest.skip("needs fastdiff.models.gmm")
    from fastdiff.models.gmm import GaussianMixture

    x = torch.tensor([[3.0, -4.0], [10.0, 2.0], [-6.0, 1.0]], dtype=DTYPE)
    gm = GaussianMixture.default(d=2)
    exact = gm.ode_solution(x, 20.0, 0.1, rtol=1e-10, atol=1e-10)
    errs = []
    for n in (48, 96):
        sig = torch.exp(torch.linspace(math.log(20.0), math.log(0.1), n + 1, dtype=DTYPE))
        out = dpm_solver.sample_dpm_solver_multistep(gm, x, sig, disable=True, order=3)
        errs.append((out - exact).abs().max().item())
    assert math.log2(errs[0] / errs[1]) > 2.7, errs


@needs_k
@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpm_2_ancestral"])
def test_eta_zero_ancestral_is_the_ode_solver(name):
    sig = _sigmas()
    x = _x0()
    ode = getattr(F, name.replace("_ancestral", ""))(model, x, sig, EXTRA, disable=True)
    anc = getattr(F, name)(model, x, sig, EXTRA, disable=True, eta=0.0)
    assert torch.equal(anc, ode)
    assert torch.allclose(anc, getattr(K, name)(model, x, sig, EXTRA, disable=True, eta=0.0),
                          **TOL)


def _sigma_samplers():
    names = [n for n in F.__all__ if n.startswith("sample_")
             and n not in ("sample_dpm_fast", "sample_dpm_adaptive")]
    return names


class Guided:
    """`model` as a guided denoiser, halves D +- 0.1: the CFG++ samplers need D_u."""

    def __call__(self, x, sigma, **kwargs):
        return self.denoise_with_uncond(x, sigma, **kwargs)[0]

    def denoise_with_uncond(self, x, sigma, **kwargs):
        d = model(x, sigma, **kwargs)
        return d + 0.1, d - 0.1


def _model_for(name):
    return Guided() if "cfg_pp" in name else model


def _call(name, x, sigmas, **kw):
    fn = _fastdiff(name)
    if fn is None:
        pytest.skip(f"fastdiff.k_diffusion.{name} does not exist yet")
    if name in ("sample_dpm_fast", "sample_dpm_adaptive"):
        return fn(model, x, 0.03, 20.0, *(() if name.endswith("adaptive") else (6,)), **kw)
    return fn(_model_for(name), x, sigmas, **kw)


@pytest.mark.parametrize("name", _sigma_samplers() + ["sample_dpm_fast", "sample_dpm_adaptive"])
def test_callback_disable_and_no_inplace(name, capsys):
    x = _x0()
    x_copy = x.clone()
    sig = _sigmas(n=5)
    infos = []
    torch.manual_seed(0)
    out = _call(name, x, sig, callback=infos.append, disable=True)
    assert torch.equal(x, x_copy), f"{name} modified x in place"
    assert torch.isfinite(out).all() and out.shape == x.shape
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == "", "disable=True must print no progress bar"
    assert infos, "callback never called"
    for k, info in enumerate(infos):
        assert {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(info), set(info)
        assert info["i"] == k and info["denoised"].shape == x.shape
    if name not in ("sample_dpm_fast", "sample_dpm_adaptive"):
        assert len(infos) == len(sig) - 1
        assert [float(i["sigma"]) for i in infos] == pytest.approx(sig[:-1].tolist())
    if K is not None and hasattr(K, name):  # same callback keys as k-diffusion
        ref = []
        torch.manual_seed(0)
        fn = getattr(K, name)
        if name in ("sample_dpm_fast", "sample_dpm_adaptive"):
            fn(model, x, 0.03, 20.0, *(() if name.endswith("adaptive") else (6,)),
               callback=ref.append, disable=True)
        else:
            fn(model, x, sig, callback=ref.append, disable=True)
        assert [set(i) for i in infos] == [set(i) for i in ref]
    _call(name, x, sig, disable=False)  # the bar is on by default: the check above means something
    assert capsys.readouterr().err != ""


BAD_SIGMAS = {
    "2-D": torch.ones(2, 3, dtype=DTYPE),
    "too short": torch.tensor([1.0], dtype=DTYPE),
    "increasing": torch.tensor([1.0, 2.0, 0.0], dtype=DTYPE),
    "negative": torch.tensor([2.0, 1.0, -0.5], dtype=DTYPE),
    "nan": torch.tensor([2.0, float("nan"), 0.0], dtype=DTYPE),
    "inf": torch.tensor([float("inf"), 1.0, 0.0], dtype=DTYPE),
}


@pytest.mark.parametrize("name", _sigma_samplers())
def test_bad_sigmas_raise(name):
    fn = _fastdiff(name)
    if fn is None:
        pytest.skip(f"fastdiff.k_diffusion.{name} does not exist yet")
    assert "sigmas" in inspect.signature(fn).parameters
    for case, sigmas in BAD_SIGMAS.items():
        with pytest.raises(ValueError, match="sigmas"):
            fn(_model_for(name), _x0(), sigmas, disable=True)
            pytest.fail(f"{name} accepted {case} sigmas")


@pytest.mark.parametrize("name", ["sample_dpm_fast", "sample_dpm_adaptive"])
def test_dpm_fast_adaptive_reject_zero_sigma(name):
    fn = getattr(F, name)
    args = (6,) if name == "sample_dpm_fast" else ()
    with pytest.raises(ValueError, match="sigma_min"):
        fn(model, _x0(), 0.0, 20.0, *args, disable=True)


def test_k_diffusion_module_is_light_and_complete():
    import subprocess
    import sys

    code = ("import sys, fastdiff.k_diffusion as K; "
            "assert not {'scipy', 'torchsde', 'k_diffusion'} & set(sys.modules), sys.modules; "
            "[getattr(K, n) for n in K.__all__]")
    subprocess.run([sys.executable, "-c", code], check=True)
    if K is not None:  # every public k-diffusion sampler and helper has a fastdiff twin
        wanted = {n for n in dir(K) if n.startswith(("sample_", "get_sigmas_"))}
        wanted |= {"to_d", "get_ancestral_step", "append_zero", "default_noise_sampler",
                   "BrownianTreeNoiseSampler", "linear_multistep_coeff"}
        assert wanted <= set(F.__all__), wanted - set(F.__all__)
