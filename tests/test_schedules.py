"""Noise schedules and spacings (the fastdiff/schedules/ package).

References: diffusers' schedulers and k-diffusion's sampling.py / external.py on the same inputs,
scipy for the Beta quantile, and the defining identities of each schedule. diffusers and
k-diffusion compute in float32 and fastdiff in float64, so comparisons use tolerances derived
from float32 rounding: U = 2**-24 is float32's unit roundoff (half an ulp of 1).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from fastdiff import schedules as S
from fastdiff import spacings as P

# diffusers passes torch tensors to np.array(copy=False); numpy 2 warns on every set_timesteps
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

U = 2.0**-24  # float32 unit roundoff
F64 = torch.float64

try:
    from _kdiffusion_ref import load_kdiffusion_sampling
except ImportError:  # helper "kdiff"'s loader not there: the same idea in a few lines
    import sys
    import types

    def load_kdiffusion_sampling():
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            return None
        pkg = types.ModuleType("_kd_sched_ref")
        pkg.__path__ = []
        pkg.utils = types.ModuleType("_kd_sched_ref.utils")
        pkg.utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
        sys.modules.setdefault("_kd_sched_ref", pkg)
        sys.modules.setdefault("_kd_sched_ref.utils", pkg.utils)
        path = next(iter(spec.submodule_search_locations)) + "/sampling.py"
        mspec = importlib.util.spec_from_file_location("_kd_sched_ref.sampling", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        sys.modules["_kd_sched_ref.sampling"] = module
        return module


def _kd_sampling():
    kd = load_kdiffusion_sampling()
    if kd is None:
        pytest.skip("k-diffusion not installed")
    return kd


def _kd_external():
    """k-diffusion's external.py (DiscreteSchedule), loaded beside the fake-package sampling."""
    import sys
    from pathlib import Path

    kd = _kd_sampling()
    pkg = kd.__name__.rpartition(".")[0]
    if f"{pkg}.external" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            f"{pkg}.external", Path(kd.__file__).with_name("external.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[f"{pkg}.external"] = module
    return sys.modules[f"{pkg}.external"]


@pytest.fixture(scope="module")
def dschedulers():
    pytest.importorskip("diffusers")
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )
    return dict(ddpm=DDPMScheduler, ddim=DDIMScheduler, euler=EulerDiscreteScheduler,
                dpmsolver=DPMSolverMultistepScheduler, flow=FlowMatchEulerDiscreteScheduler)


def _beta_range(schedule):
    return (0.00085, 0.012) if schedule == "scaled_linear" else (0.0001, 0.02)


# ----------------------------------------------------------------------------------------------
# Beta tables vs diffusers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid",
                                      "laplace"])
def test_betas_and_alphas_cumprod_match_diffusers(dschedulers, schedule):
    start, end = _beta_range(schedule)
    for rescale in (False, True):
        ours = S.make_betas(schedule, 1000, start, end)
        if not rescale:
            # diffusers: one float32 linspace (a few ulps), squared for scaled_linear: <= 8 U.
            ref = dschedulers["ddpm"](beta_schedule=schedule, beta_start=start,
                                      beta_end=end).betas.double()
            torch.testing.assert_close(ours, ref, rtol=8 * U, atol=0)
        else:
            ours = S.rescale_zero_terminal_snr(ours)
            assert ours[-1] == 1
        acp = S.alphas_cumprod_from_betas(ours)
        for name in ("ddpm", "ddim"):
            try:
                sched = dschedulers[name](beta_schedule=schedule, beta_start=start, beta_end=end,
                                          rescale_betas_zero_snr=rescale)
            except NotImplementedError:
                continue  # DDIM has no sigmoid/laplace
            # float32 cumprod of 1000 factors: relative error <= 1000 U; Alg. 1 in float32
            # subtracts sqrt(abar_T) and squares: absolute error of a few ulps of 1 (16 U).
            torch.testing.assert_close(acp, sched.alphas_cumprod.double(), rtol=1000 * U,
                                       atol=16 * U)
        if rescale:
            assert acp[-1] == 0


def test_exp_betas_and_rescale_match_diffusers_functions():
    ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")
    for kind in ("cosine", "exp", "laplace"):
        ref = ddpm.betas_for_alpha_bar(1000, alpha_transform_type=kind).double()
        ours = S.betas_for_alpha_bar(1000, alpha_transform_type=kind)
        torch.testing.assert_close(ours, ref, rtol=U, atol=0)  # diffusers rounds once to float32
    # diffusers' Alg. 1 code is dtype-generic: in float64 it must agree to float64 rounding.
    for betas in (S.make_betas("scaled_linear", 1000, 0.00085, 0.012), S.make_betas("linear")):
        torch.testing.assert_close(S.rescale_zero_terminal_snr(betas),
                                   ddpm.rescale_zero_terminal_snr(betas.clone()),
                                   rtol=1e-12, atol=1e-15)


def test_trained_betas_and_bad_inputs():
    betas = torch.linspace(1e-4, 0.02, 50, dtype=F64)
    torch.testing.assert_close(S.make_betas(trained_betas=betas.tolist()), betas, rtol=0, atol=0)
    with pytest.raises(ValueError, match="beta_schedule"):
        S.make_betas("quadratic")
    with pytest.raises(ValueError, match="trained_betas"):
        S.make_betas(trained_betas=[0.1, 1.5])
    with pytest.raises(ValueError, match="num_train_timesteps"):
        S.make_betas("linear", 0)
    with pytest.raises(ValueError, match="kind"):
        S.sigma_to_alpha(1.0, "vpp")
    with pytest.raises(ValueError, match="final_sigma"):
        P.get_sigmas_karras(5, 0.1, 10, final_sigma="one")
    with pytest.raises(ValueError, match="sigma_min"):
        P.get_sigmas_exponential(5, 0.0, 10)
    with pytest.raises(ValueError, match="timestep_spacing"):
        P.diffusers_timesteps(10, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="shift"):
        P.time_shift(0.5, shift=2.0, mu=1.0)


# ----------------------------------------------------------------------------------------------
# diffusers timesteps and sigmas
# ----------------------------------------------------------------------------------------------
STEP_COUNTS = [1, 2, 3, 7, 10, 13, 25, 50, 99, 250, 333, 999, 1000]


@pytest.mark.parametrize("family", ["ddim", "euler", "dpmsolver"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timesteps_match_diffusers(dschedulers, family, spacing):
    for offset in (0, 1):
        sched = dschedulers[family](timestep_spacing=spacing, steps_offset=offset)
        for n in STEP_COUNTS:
            if family == "dpmsolver" and spacing == "leading" and n == 1000:
                continue  # diffusers: step ratio 1000 // 1001 = 0 (all timesteps equal)
            sched.set_timesteps(n)
            ours = P.diffusers_timesteps(n, 1000, spacing, offset, family)
            torch.testing.assert_close(ours, sched.timesteps.double(), rtol=0, atol=0)


def _t_tolerance(log_sigmas):
    # float32 sigmas carry ~ a few ulps of relative error (16 U in log sigma); a log-sigma error
    # e moves the interpolated t by e / (log-sigma step), largest at the smallest step.
    # (positive steps only: diffusers' zero-SNR clamp can make the last step negative)
    steps = torch.diff(log_sigmas)
    return 16 * U / float(steps[steps > 0].min())


@pytest.mark.parametrize("family", ["euler", "dpmsolver"])
@pytest.mark.parametrize("sigma_schedule", [None, "karras", "exponential", "beta"])
def test_sigmas_match_diffusers(dschedulers, family, sigma_schedule):
    cases = [("scaled_linear", False), ("scaled_linear", True), ("squaredcos_cap_v2", False)]
    if sigma_schedule is None:
        # "linear" rescaled to zero SNR: abar[-2] = 4.2e-9 < 2**-24, so diffusers' clamped table
        # is not monotone in its last step and t(sigma_max) depends on float32 rounding there
        # (995.3 or 999); plain interpolation at the timesteps is still well defined.
        cases.append(("linear", True))
    for beta_schedule, zero_snr in cases:
        for spacing in ("linspace", "leading", "trailing"):
            for final in ("zero", "sigma_min"):
                start, end = _beta_range(beta_schedule)
                kw = dict(beta_schedule=beta_schedule, beta_start=start, beta_end=end,
                          rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing,
                          steps_offset=1, final_sigmas_type=final)
                if sigma_schedule:
                    kw[f"use_{sigma_schedule}_sigmas"] = True
                sched = dschedulers[family](**kw)
                acp = sched.alphas_cumprod  # after diffusers' zero-SNR clamp to 2**-24
                log_sigmas = S.alphas_cumprod_to_sigma(acp).log()
                tol_t = _t_tolerance(log_sigmas)
                for n in (1, 4, 7, 20):
                    sched.set_timesteps(n)
                    sig, ts = P.diffusers_sigmas(
                        acp, n, family=family, timestep_spacing=spacing, steps_offset=1,
                        sigma_schedule=sigma_schedule, final_sigmas_type=final,
                        round_timesteps=beta_schedule != "squaredcos_cap_v2")
                    # diffusers: sqrt((1-a)/a) in float32 (<= 2 ulps) stored in float32.
                    torch.testing.assert_close(sig, sched.sigmas.double(), rtol=4 * U, atol=0)
                    ref_t = sched.timesteps.double()
                    if family == "euler" or sigma_schedule is None:
                        torch.testing.assert_close(ts, ref_t, rtol=0, atol=tol_t)
                        continue
                    # DPM-Solver rounds (karras) or truncates (.to(int64)) t(sigma): equal unless
                    # the exact t is within float32 noise of the rounding threshold.
                    raw = S.discrete_sigma_to_t(sig[:-1].clamp_min(1e-10), log_sigmas)
                    frac = raw - raw.floor()
                    rounds = sigma_schedule == "karras" and beta_schedule != "squaredcos_cap_v2"
                    tie = ((frac - 0.5).abs() < tol_t) if rounds else \
                        ((frac < tol_t) | (frac > 1 - tol_t))
                    assert bool(((ts - ref_t).abs() <= 1).all())
                    assert bool(((ts == ref_t) | tie).all()), (beta_schedule, spacing, n)


FLOW_CASES = [
    dict(shift=1.0), dict(shift=3.0), dict(shift=3.0, shift_terminal=0.1),
    dict(use_dynamic_shifting=True, time_shift_type="exponential"),
    dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(shift=3.0, use_karras_sigmas=True), dict(shift=2.0, use_exponential_sigmas=True),
    dict(shift=2.0, use_beta_sigmas=True),
]


@pytest.mark.parametrize("config", FLOW_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_flow_sigmas_match_diffusers(dschedulers, config):
    sched = dschedulers["flow"](**config)
    dynamic = config.get("use_dynamic_shifting", False)
    sigma_schedule = next((k for k in ("karras", "exponential", "beta")
                           if config.get(f"use_{k}_sigmas")), None)
    for n in (1, 2, 7, 28):
        if n == 1 and config.get("shift_terminal"):
            continue  # diffusers gives NaN (0/0); fastdiff raises, tested below
        for mu in ((P.calculate_shift(1024), P.calculate_shift(4096)) if dynamic else (None,)):
            sched.set_timesteps(n, mu=mu)
            s, t = P.diffusers_flow_sigmas(
                n, shift=config.get("shift", 1.0), use_dynamic_shifting=dynamic, mu=mu,
                time_shift_type=config.get("time_shift_type", "exponential"),
                shift_terminal=config.get("shift_terminal"), sigma_schedule=sigma_schedule)
            # s <= 1 from a few float32 operations: <= 4 U absolute; t = 1000 s.
            torch.testing.assert_close(s, sched.sigmas.double(), rtol=0, atol=4 * U)
            torch.testing.assert_close(t, sched.timesteps.double(), rtol=0, atol=4000 * U)
    with pytest.raises(ValueError, match="shift_terminal"):
        P.diffusers_flow_sigmas(1, shift=3.0, shift_terminal=0.1)


# ----------------------------------------------------------------------------------------------
# k-diffusion
# ----------------------------------------------------------------------------------------------
KD_RANGES = [(1, 0.03, 14.6), (7, 0.0292, 14.6146), (25, 0.002, 80.0), (100, 0.1, 10.0)]


def test_kdiffusion_spacings_match():
    kd = _kd_sampling()
    for n, lo, hi in KD_RANGES:
        for rho in (7.0, 3.0):
            ref = kd.get_sigmas_karras(n, lo, hi, rho=rho)
            ours = P.get_sigmas_karras(n, lo, hi, rho=rho)
            assert ours.dtype == ref.dtype == torch.get_default_dtype()
            # k-diffusion forms base = max^(1/rho) + ramp (min^(1/rho) - max^(1/rho)) in float32:
            # absolute error ~ 2 U max^(1/rho), relative 2 U max^(1/rho) / base, times rho after
            # the power; plus the final float32 rounding.
            ref, ours = ref.double()[:-1], ours.double()[:-1]
            base = ref ** (1 / rho)
            bound = rho * 4 * U * hi ** (1 / rho) / base + 4 * U
            assert bool(((ours - ref).abs() <= bound * ref).all())
        ref = kd.get_sigmas_exponential(n, lo, hi).double()
        # exp of a float32 log sigma: relative error ~ |log sigma| * 2 U (+ 2 U for exp).
        bound = 4 * U * (1 + ref.clamp_min(lo).log().abs())
        ours = P.get_sigmas_exponential(n, lo, hi, dtype=F64)
        assert bool(((ours - ref).abs() <= bound * ref).all())
        for rho in (0.5, 1.0, 2.0):
            ref = kd.get_sigmas_polyexponential(n, lo, hi, rho=rho).double()
            ours = P.get_sigmas_polyexponential(n, lo, hi, rho=rho, dtype=F64)
            bound = 4 * U * (1 + math.log(hi / lo) + ref.clamp_min(lo).log().abs())
            assert bool(((ours - ref).abs() <= bound * ref).all())
    for n in (1, 10, 50):
        for beta_d, beta_min in ((19.9, 0.1), (10.0, 0.5)):
            ref = kd.get_sigmas_vp(n, beta_d, beta_min).double()
            ours = P.get_sigmas_vp(n, beta_d, beta_min, dtype=F64)
            # k-diffusion forms x = beta_d t^2 / 2 + beta_min t in float32 (t, t^2, the sum:
            # |dx| <= 8 U x) and exp(x) - 1 (a few U of exp(x) = 1 + sigma^2), so
            # |d sigma^2| <= (1 + sigma^2)(4 U + 8 U x) and d sigma = d sigma^2 / (2 sigma).
            var = ref[:-1] ** 2
            bound = (1 + var) * (4 * U + 8 * U * torch.log1p(var)) / (2 * ref[:-1])
            assert bool(((ours[:-1] - ref[:-1]).abs() <= bound).all()) and ours[-1] == 0


def test_kdiffusion_discrete_schedule_matches():
    ext = _kd_external()
    sched = S.DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)
    ref = ext.DiscreteSchedule(sched.sigmas.clone(), quantize=False)
    # (not 0 itself: k-diffusion does -inf arithmetic there; fastdiff's t(0) is checked below)
    sigma = torch.tensor([1e-30, 1e-3, 0.0292, 0.05, 0.3, 1.0, 3.7, 14.6, 14.6146, 20.0],
                         dtype=F64)
    torch.testing.assert_close(sched.t(sigma), ref.sigma_to_t(sigma), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sched.t(sigma, quantize=True), ref.sigma_to_t(sigma, True).double())
    assert sched.t(torch.zeros(3)).eq(0).all()  # the endpoint, without log(0)
    t = torch.linspace(0, 999, 1234, dtype=torch.float32).double()  # k-diffusion casts t to f32
    torch.testing.assert_close(sched.sigma(t), ref.t_to_sigma(t), rtol=1e-12, atol=0)
    for n in (2, 10, 31):
        kd_sigmas = ref.get_sigmas(n)  # t = float32 linspace: t off by <= 2 ulps at [512, 1024)
        rtol = 2 * 2.0**-14 * float(torch.diff(sched.log_sigmas).max())
        torch.testing.assert_close(P.get_sigmas_time_uniform(sched, n), kd_sigmas,
                                   rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------
# Beta quantile
# ----------------------------------------------------------------------------------------------
def test_beta_ppf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    qs = np.concatenate([np.linspace(0, 1, 41), [1e-12, 1e-6, 1 - 1e-6, 1 - 1e-9]])
    for a, b in ((0.6, 0.6), (0.5, 0.5), (2.0, 5.0), (0.3, 3.0), (1.0, 1.0), (10.0, 0.7)):
        ours = np.array([P.beta_ppf(float(q), a, b) for q in qs])
        ref = stats.beta.ppf(qs, a, b)
        # relative to the distance from the nearer end of [0, 1], plus 2 ulps of 1
        assert np.all(np.abs(ours - ref) <= 1e-12 * np.minimum(ref, 1 - ref) + 4.5e-16), (a, b)
    with pytest.raises(ValueError, match="q"):
        P.beta_ppf(1.5, 0.6, 0.6)


# ----------------------------------------------------------------------------------------------
# Identities, round trips, ends
# ----------------------------------------------------------------------------------------------
def _schedules():
    return [
        S.DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012),
        S.DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012,
                                        rescale_betas_zero_snr=True),
        S.DiscreteVPSchedule.from_betas("squaredcos_cap_v2", 1000),
        S.VPSchedule(), S.VESchedule(), S.EDMSchedule(), S.FlowSchedule(),
    ]


@pytest.mark.parametrize("sched", _schedules(), ids=lambda s: type(s).__name__)
def test_round_trips(sched):
    t_hi = sched.t_max * (1 - 1e-3) if sched.kind == "flow" else sched.t_max
    t = torch.linspace(sched.t_min, t_hi, 777, dtype=F64)
    sigma = sched.sigma(t)
    assert sigma.dtype == F64 and bool(torch.isfinite(sigma).all())
    assert bool((torch.diff(sigma) > 0).all())
    torch.testing.assert_close(sched.t(sigma), t, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(sched.t_from_lambda(sched.lam(t)), t, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(S.lambda_to_sigma(S.sigma_to_lambda(sigma)), sigma, rtol=1e-14,
                               atol=0)
    alpha = sched.alpha(t)
    torch.testing.assert_close(alpha, sched.alpha_from_sigma(sigma), rtol=1e-13, atol=0)
    if sched.kind in ("vp", "flow"):
        torch.testing.assert_close(S.alpha_to_sigma(alpha, sched.kind), sigma, rtol=1e-10, atol=0)
    # t(sigma = 0) is the schedule's first time, finite: no log(0) leaks out
    assert float(sched.t(0.0)) <= sched.t_min + 1e-12 and bool(torch.isfinite(sched.t(0.0)))


def test_discrete_table_identities():
    betas = S.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    sched = S.DiscreteVPSchedule(S.alphas_cumprod_from_betas(betas))
    acp = torch.cumprod(1 - betas, 0)
    idx = torch.arange(1000, dtype=F64)
    torch.testing.assert_close(sched.sigma(idx), ((1 - acp) / acp).sqrt(), rtol=1e-13, atol=0)
    torch.testing.assert_close(sched.alpha(idx) ** 2, acp, rtol=1e-13, atol=0)
    vp = S.VPSchedule(beta_d=19.9, beta_min=0.1)  # Song et al.: log alpha = -t^2 bd/4 - t bm/2
    t = torch.linspace(1e-3, 1, 50, dtype=F64)
    torch.testing.assert_close(vp.alpha(t), torch.exp(-t**2 * 19.9 / 4 - t * 0.1 / 2))
    torch.testing.assert_close(vp.alpha(t), S.sigma_to_alpha(vp.sigma(t)), rtol=1e-13, atol=0)


def test_flow_convention():
    """x_flow = (1 - s) x0 + s eps  <=>  x_flow / (1 - s) = x0 + sigma eps, sigma = s / (1 - s)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    for s in (0.0, 0.1, 0.5, 0.97):
        sigma = S.flow_to_sigma(s)
        torch.testing.assert_close(((1 - s) * x0 + s * eps) / (1 - s), x0 + sigma * eps)
        torch.testing.assert_close(S.sigma_to_flow(sigma), torch.tensor(s, dtype=F64))
        torch.testing.assert_close(S.sigma_to_alpha(sigma, "flow"), torch.tensor(1 - s, dtype=F64))
    assert S.flow_to_sigma(1.0) == math.inf and S.sigma_to_flow(math.inf) == 1
    fl = S.FlowSchedule(1000)
    assert fl.sigma_max == math.inf and fl.alpha(1000.0) == 0 and fl.lam(1000.0) == -math.inf


def test_ends_are_finite_zero_snr_and_fp16():
    sched = S.DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012,
                                            rescale_betas_zero_snr=True)
    assert sched.alphas_cumprod[-1] == 0  # kept for DDIM-type solvers
    assert sched.sigma_max == math.sqrt((1 - 2.0**-24) / 2.0**-24)  # diffusers' clamp, ~4096
    assert bool(torch.isfinite(sched.sigmas.half()).all())
    assert S.sigma_to_lambda(0.0) == math.inf and S.sigma_to_alpha(0.0) == 1
    assert S.alphas_cumprod_to_sigma(0.0) == math.inf and S.sigma_to_alphas_cumprod(math.inf) == 0
    lo, hi = sched.sigma_min, sched.sigma_max
    tables = [
        P.get_sigmas_karras(10, lo, hi), P.get_sigmas_exponential(10, lo, hi),
        P.get_sigmas_polyexponential(10, lo, hi, rho=2.0), P.get_sigmas_vp(10),
        P.get_sigmas_beta(10, lo, hi), P.get_sigmas_flow(10, shift=3.0),
        P.get_sigmas_time_uniform(sched, 10), P.get_sigmas_time_quadratic(sched, 10),
        P.get_sigmas_logsnr(sched, 10), P.sigmas_from_timesteps(sched, [999, 500, 0]),
        P.diffusers_sigmas(S.sigma_to_alphas_cumprod(sched.sigmas), 10,
                           sigma_schedule="karras")[0],
    ]
    for table in tables:
        assert bool(torch.isfinite(table).all()) and bool(torch.isfinite(table.half()).all())
        assert table[-1] == 0 and bool((torch.diff(table) <= 0).all())
    karras = P.get_sigmas_karras(10, lo, hi, dtype=F64, final_sigma="sigma_min")
    assert karras.dtype == F64 and karras[-1] == karras[-2] == pytest.approx(lo, rel=1e-14)
    assert P.get_sigmas_karras(10, lo, hi, final_sigma="none").numel() == 10
    with pytest.raises(ValueError, match="flow"):
        P.get_sigmas_time_uniform(S.FlowSchedule(), 10)


def test_dpm_solver_skip_types():
    sched = S.DiscreteVPSchedule.from_betas("linear", 1000)
    n = 12
    logsnr = P.get_sigmas_logsnr(sched, n, final_sigma="none")
    torch.testing.assert_close(torch.diff(-logsnr.log()), torch.full((n - 1,), float(
        (sched.lam(sched.t_min) - sched.lam(sched.t_max)) / (n - 1)), dtype=F64))
    torch.testing.assert_close(logsnr, P.get_sigmas_exponential(
        n, sched.sigma_min, sched.sigma_max, dtype=F64, final_sigma="none"))
    uniform = P.get_sigmas_time_uniform(sched, n, final_sigma="none")
    torch.testing.assert_close(sched.t(uniform), torch.linspace(999, 0, n, dtype=F64))
    quad = P.get_sigmas_time_quadratic(S.VPSchedule(), n, final_sigma="none")
    torch.testing.assert_close(S.VPSchedule().t(quad).sqrt(),
                               torch.linspace(1, 1e-3**0.5, n, dtype=F64))
    # time-uniform on the continuous VP SDE is k-diffusion's get_sigmas_vp
    torch.testing.assert_close(P.get_sigmas_time_uniform(S.VPSchedule(), n),
                               P.get_sigmas_vp(n, dtype=F64))


def test_flow_shift_identities():
    s = torch.linspace(0, 1, 101, dtype=F64)
    for shift in (0.5, 1.0, 3.0):
        torch.testing.assert_close(P.time_shift(s, shift=shift),
                                   P.time_shift(s, mu=math.log(shift)))
    for kind in ("exponential", "linear"):
        shifted = P.time_shift(s, mu=1.15, time_shift_type=kind)
        assert shifted[0] == 0 and shifted[-1] == 1 and bool((torch.diff(shifted) > 0).all())
    assert P.calculate_shift(256) == pytest.approx(0.5) and P.calculate_shift(4096) == 1.15
    n = 8  # unshifted default: the uniform grid of [0, 1]
    torch.testing.assert_close(P.get_sigmas_flow(n), torch.linspace(1, 0, n + 1, dtype=F64))
    torch.testing.assert_close(P.get_sigmas_flow(n, 3.0)[:-1],
                               P.time_shift(torch.linspace(1, 1 / n, n, dtype=F64), shift=3.0))
    terminal = P.get_sigmas_flow(n, 3.0, shift_terminal=0.05)
    assert terminal[-2] == pytest.approx(0.05) and terminal[0] == 1


def test_user_sigmas_and_timesteps():
    user = [14.6, 3.0, 1.0, 0.1, 0.0]
    torch.testing.assert_close(P.sigmas_from_user(user), torch.tensor(user, dtype=F64))
    assert P.sigmas_from_user(user[:-1], final_sigma="zero")[-1] == 0
    for bad in ([1.0, 2.0], [1.0, float("nan")], [1.0, -0.5], []):
        with pytest.raises(ValueError, match="sigmas"):
            P.sigmas_from_user(bad)
    sched = S.DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)
    table = P.sigmas_from_timesteps(sched, [999, 500, 0])
    torch.testing.assert_close(table[:-1], sched.sigmas[[999, 500, 0]], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="timesteps"):
        P.sigmas_from_timesteps(sched, [0, 500])


def test_betas_do_not_depend_on_the_platform():
    """The host tables are the kernels' reference (fastdiff/reference/schedule.py), so their
    rounding must not depend on the libm or the CPU's SIMD width: linear ramps by torch's scalar
    linspace formula, the zero-SNR rescale with an IEEE sqrt, cosine betas in a form without
    cancellation, within 8 ulps of the exact value (the direct 1 - cos^2 y / cos^2 x is 5e-12 off
    at t = 0 for n = 1000, 1.6e-11 for n = 4000)."""
    n = 1000
    step = (0.02 - 0.0001) / (n - 1)
    scalar = [0.0001 + step * i if i < n // 2 else 0.02 - step * (n - 1 - i) for i in range(n)]
    assert S.make_betas("linear", n).tolist() == scalar
    betas = S.make_betas("scaled_linear", n, 0.00085, 0.012).numpy()
    root = np.sqrt(np.cumprod(1 - betas))
    root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))
    abar = root * root
    want = 1 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    assert S.rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy().tolist() == want.tolist()
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50

    def alpha_bar(t):
        return mpmath.cos((t + mpmath.mpf("0.008")) / mpmath.mpf("1.008") * mpmath.pi / 2) ** 2

    for n in (7, 1000, 4000):
        cosine = S.make_betas("squaredcos_cap_v2", n).tolist()
        for i in range(n):
            exact = min(1 - alpha_bar(mpmath.mpf(i + 1) / n) / alpha_bar(mpmath.mpf(i) / n), 0.999)
            assert abs(cosine[i] / float(exact) - 1) <= 8 * 2.0**-53, (n, i)
