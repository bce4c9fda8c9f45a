"""ComfyUI's sigma schedules and the published tables (fastdiff.schedules.model_sampling,
fastdiff.schedules.published, fastdiff.comfyui.schedulers): each against its definition, with
golden values derived here -- closed forms from the paper or ComfyUI's definition, model tables
rebuilt from their betas, published numbers typed from the publications -- never from the code
under test; then the shape every schedule must have, and each of the three ways to use one.
ComfyUI itself is not needed (its numbers were compared by hand; see the README).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastdiff.comfyui as C
from fastdiff import schedules as S
from fastdiff.schedules import ModelSampling

SD15 = S.DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)


def sd15_table() -> list[float]:
    """SD1.5's training sigmas from its betas, in plain Python floats (no fastdiff code)."""
    root0, root1, abar, out = 0.00085**0.5, 0.012**0.5, 1.0, []
    for i in range(1000):
        w = i / 999
        abar *= 1 - ((1 - w) * root0 + w * root1) ** 2
        out.append(math.sqrt((1 - abar) / abar))
    return out


TABLE = sd15_table()


def loglinear_sigma(t: float) -> float:
    """sigma at a fractional SD1.5 timestep: log sigma linear between the two entries."""
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(TABLE[lo]) + w * math.log(TABLE[hi]))


def shift(u: float, s: float) -> float:
    return s * u / (1 + (s - 1) * u)  # SD3's shift (Esser et al. 2024, eq. 23)


def close(got, want, rtol=1e-12, atol=0.0):
    got = torch.as_tensor(got, dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=rtol,
                               atol=atol)


def test_the_model_tables():
    close(SD15.sigmas, TABLE, rtol=1e-13)  # guards the goldens below
    flow = ModelSampling.of(S.FlowSchedule(1000, shift=3.0))
    close(flow.sigmas, [shift(i / 1000, 3.0) for i in range(1, 1001)])
    flux = ModelSampling.flux(1.15)
    close(flux.sigmas[[0, 4999, 9999]],
          [math.exp(1.15) / (math.exp(1.15) + 1 / u - 1) for u in (1e-4, 0.5, 1.0)])
    assert S.FlowSchedule(1000, shift=3.0).t_min == pytest.approx(1000 * shift(1e-3, 3.0))


@pytest.mark.parametrize("n", [1, 3, 10, 33, 1000])
def test_simple_normal_sgm_ddim_uniform(n):
    stride = 1000 / n
    close(C.calculate_sigmas(SD15, "simple", n),
          [TABLE[-(1 + int(i * stride))] for i in range(n)] + [0.0])
    # normal: uniform in the timestep from 999 to 0; sgm_uniform: n + 1 points, the last dropped
    ts = np.linspace(999, 0, n)
    close(C.calculate_sigmas(SD15, "normal", n), [loglinear_sigma(t) for t in ts] + [0.0])
    ts = np.linspace(999, 0, n + 1)[:-1]
    close(C.calculate_sigmas(SD15, "sgm_uniform", n), [loglinear_sigma(t) for t in ts] + [0.0])
    # ddim_uniform: entries 1, 1 + k, ... (k = 1000 // n) from the top, then 0
    k = max(1000 // n, 1)
    close(C.calculate_sigmas(SD15, "ddim_uniform", n),
          [TABLE[i] for i in range(1, 1000, k)][::-1] + [0.0])


def test_flow_normal_shifts_twice():
    """On a flow model the timestep is s N and sigma(t) shifts t / N: ComfyUI's "normal" is the
    uniform grid between the shifted ends, shifted again."""
    n, a = 7, 3.0
    ends = np.linspace(shift(1.0, a), shift(1e-3, a), n)
    close(C.calculate_sigmas(S.FlowSchedule(shift=a), "normal", n),
          [shift(u, a) for u in ends] + [0.0])


@pytest.mark.parametrize("n", [2, 9, 20, 57])
def test_beta_is_on_timesteps(n):
    """Lee et al. 2024 as ComfyUI: timesteps rint(ppf(1 - i/n) * 999), repeats dropped."""
    scipy_stats = pytest.importorskip("scipy.stats")
    want, last = [], None
    for i in range(n):
        t = int(np.rint(scipy_stats.beta.ppf(1 - i / n, 0.6, 0.6) * 999))
        if t != last:
            want.append(TABLE[t])
        last = t
    close(C.calculate_sigmas(SD15, "beta", n), want + [0.0])
    # and it differs from the sigma-space beta of diffusers (fastdiff.schedules.get_sigmas_beta)
    other = S.get_sigmas_beta(n, TABLE[0], TABLE[-1])
    assert other.shape != (len(want) + 1,) or not torch.allclose(other, torch.tensor(want + [0.0],
                                                                 dtype=torch.float64))


@pytest.mark.parametrize("n, linear", [(2, None), (10, None), (25, 7)])
def test_linear_quadratic(n, linear):
    """Mochi: 1 - s linear from 0 with slope tau / L for L steps, then the quadratic q with
    q(L) = tau, q'(L) = tau / L, q(n) = 1 (solved here), times sigma_max."""
    tau, big_l = 0.025, n // 2 if linear is None else linear
    a, b, c = np.linalg.solve([[big_l**2, big_l, 1], [2 * big_l, 1, 0], [n**2, n, 1]],
                              [tau, tau / big_l, 1.0])
    one_minus = [tau * i / big_l for i in range(big_l)] + [a * i * i + b * i + c
                                                          for i in range(big_l, n + 1)]
    got = C.linear_quadratic_scheduler(SD15, n, linear_steps=linear)
    close(got, [(1 - v) * TABLE[-1] for v in one_minus], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [2, 5, 40])
def test_kl_optimal_karras_exponential(n):
    lo, hi = TABLE[0], TABLE[-1]
    close(C.calculate_sigmas(SD15, "kl_optimal", n),
          [math.tan((1 - i / (n - 1)) * math.atan(hi) + i / (n - 1) * math.atan(lo))
           for i in range(n)] + [0.0])
    close(C.calculate_sigmas(SD15, "karras", n),
          [(hi ** (1 / 7) + i / (n - 1) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
           for i in range(n)] + [0.0])
    close(C.calculate_sigmas(SD15, "exponential", n),
          [math.exp(math.log(hi) + i / (n - 1) * (math.log(lo) - math.log(hi)))
           for i in range(n)] + [0.0])


def test_sd_turbo_and_laplace():
    close(C.sd_turbo_scheduler(SD15, 4), [TABLE[999], TABLE[899], TABLE[799], TABLE[699], 0.0])
    close(C.sd_turbo_scheduler(SD15, 2, denoise=0.5), [TABLE[499], TABLE[399], 0.0])
    # Laplace(mu, beta)'s quantile at 1 - x (Hang et al. 2024), with ComfyUI's 1e-5 in the log
    n, mu, beta, lo, hi = 9, 0.3, 0.7, 0.0291675, 14.614642
    want = []
    for i in range(n):
        x = i / (n - 1)
        lam = mu - beta * math.copysign(1, 0.5 - x) * math.log(1 - 2 * abs(0.5 - x) + 1e-5)
        want.append(min(max(math.exp(lam), lo), hi))
    if n % 2:
        want[n // 2] = math.exp(mu + beta * 0.0 * math.log(1 + 1e-5))  # sign(0) = 0
    close(C.laplace_scheduler(n, hi, lo, mu, beta), want)
    close(S.get_sigmas_laplace(n, lo, hi, mu, beta), want + [0.0])


AYS_TIMESTEPS = {"SD1": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0],
                 "SDXL": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0]}
# research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html
AYS_SVD = [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002]


def loglinear(table, m):
    """The AYS how-to's resampling, with plain Python: log sigma linear in position."""
    logs, out = [math.log(v) for v in table[::-1]], []
    for j in range(m):
        x = j / (m - 1) * (len(logs) - 1)
        k = min(int(x), len(logs) - 2)
        out.append(math.exp(logs[k] + (x - k) * (logs[k + 1] - logs[k])))
    return out[::-1]


def test_align_your_steps():
    for model, ts in AYS_TIMESTEPS.items():
        # the published 10-digit sigmas are SD1.5's table at the published timesteps
        close(S.get_sigmas_ays(model, 10)[:-1], [TABLE[t] for t in ts[:-1]], rtol=2e-9)
        want = loglinear([TABLE[t] for t in ts], 21)
        close(S.get_sigmas_ays(model, 20), want[:-1] + [0.0], rtol=2e-9)
    close(S.get_sigmas_ays("SVD", 10), AYS_SVD[:-1] + [0.0])
    close(S.get_sigmas_ays("SVD", 4), loglinear(AYS_SVD, 5)[:-1] + [0.0], rtol=1e-12)
    # denoise: the last round(steps * denoise) + 1 of the steps + 1 values
    close(S.get_sigmas_ays("SVD", 10, denoise=0.5), AYS_SVD[-6:-1] + [0.0])
    assert S.get_sigmas_ays("SD1", 10, denoise=0.0).numel() == 0


def test_gits():
    """Published schedules (github.com/zju-pi/diff-sampler, gits-main) typed in; the grid is
    SD1.5's 100-step time-uniform grid t = 9.99 i (computed by GITS in float32)."""
    close(S.get_sigmas_gits(1.20, 10),
          [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381,
           0.32104823, 0.19894916, 0.09824532, 0.0])
    close(S.get_sigmas_gits(0.80, 2), [14.61464119, 7.49001646, 0.0])
    row = [14.61464119, 2.45070267, 1.41535246, 0.95350921, 0.72133851, 0.57119018, 0.4783645,
           0.43325692, 0.38853383, 0.36617002, 0.34370604, 0.32104823, 0.29807833, 0.27464288,
           0.25053367, 0.22545385, 0.19894916, 0.17026083, 0.13792117, 0.09824532, 0.02916753]
    close(S.get_sigmas_gits(1.50, 20), row[:-1] + [0.0])
    close(S.get_sigmas_gits(1.50, 30), loglinear(row, 31)[:-1] + [0.0], rtol=1e-12)
    for i, sigma in S.gits.GRID.items():
        assert sigma == pytest.approx(loglinear_sigma(9.99 * i), rel=3e-5), i


def test_optimal_steps():
    flux = [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001]
    close(S.get_sigmas_optimal_steps("FLUX", 10), flux[:-1] + [0.0])
    close(S.get_sigmas_optimal_steps("FLUX", 20), loglinear(flux, 21)[:-1] + [0.0], rtol=1e-12)
    assert S.get_sigmas_optimal_steps("Wan", 20).numel() == 21
    assert S.get_sigmas_optimal_steps("Chroma", 40).numel() == 41


MODELS = {"sd15": SD15, "sd3": S.FlowSchedule(shift=3.0), "flux": ModelSampling.flux(),
          "edm": S.EDMSchedule(0.002, 80.0)}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", C.SCHEDULER_NAMES)
@pytest.mark.parametrize("n", [1, 2, 10, 57])
def test_every_schedule_is_a_schedule(model, name, n):
    sigmas = C.calculate_sigmas(MODELS[model], name, n)
    assert sigmas.dtype == torch.float64 and bool(torch.isfinite(sigmas).all())
    assert sigmas[-1] == 0 and bool((sigmas[:-1] > 0).all())
    assert bool((sigmas[1:] < sigmas[:-1]).all()), sigmas  # strictly decreasing
    if name not in ("ddim_uniform", "beta"):  # those read the table's grid, dropping repeats
        assert sigmas.numel() == n + 1


@pytest.mark.parametrize("n", [2, 3, 10, 11, 25, 64])
def test_every_published_schedule_is_a_schedule(n):
    runs = [S.get_sigmas_ays(m, n) for m in S.AYS_MODELS]
    runs += [S.get_sigmas_gits(c, n) for c in S.GITS_COEFFS]
    runs += [S.get_sigmas_optimal_steps(m, n) for m in S.OPTIMAL_STEPS_MODELS if n >= 3]
    runs += [C.laplace_scheduler(n), C.vp_scheduler(n), C.polyexponential_scheduler(n)]
    for sigmas in runs:
        assert sigmas.dtype == torch.float64 and bool(torch.isfinite(sigmas).all())
        assert bool((sigmas[1:] < sigmas[:-1]).all()), sigmas


def test_bad_inputs():
    with pytest.raises(ValueError, match="scheduler_name"):
        C.calculate_sigmas(SD15, "karras2", 10)
    with pytest.raises(TypeError, match="model_sampling"):
        C.calculate_sigmas(object(), "simple", 10)
    with pytest.raises(ValueError, match="steps"):
        C.calculate_sigmas(SD15, "simple", 0)
    with pytest.raises(ValueError, match="model_type"):
        S.get_sigmas_ays("SD2", 10)
    with pytest.raises(ValueError, match="coeff"):
        S.get_sigmas_gits(1.23, 10)
    with pytest.raises(ValueError, match="denoise"):
        S.get_sigmas_optimal_steps("FLUX", 10, denoise=1.5)
    with pytest.raises(ValueError, match="shift"):
        S.FlowSchedule(shift=0.0)


# --- the three ways to use a schedule -----------------------------------------------------
def test_used_by_the_sampler_and_k_diffusion():
    """A schedule is just sigmas: the fused Sampler and fastdiff.k_diffusion run it, and agree
    with a plain Euler loop written here."""
    from fastdiff import k_diffusion as K
    from fastdiff.models.gmm import GaussianMixture
    from fastdiff.sampler import Sampler

    gmm = GaussianMixture.default(d=6)
    sigmas = C.calculate_sigmas(SD15, "beta", 12)
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * sigmas[0]
    want = x.clone()
    for i in range(sigmas.numel() - 1):
        d = (want - gmm(want, sigmas[i] * torch.ones(4, dtype=torch.float64))) / sigmas[i]
        want = want + d * (sigmas[i + 1] - sigmas[i])
    torch.testing.assert_close(K.sample_euler(gmm, x, sigmas, disable=True), want,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Sampler(gmm, "euler", sigmas, backend="cpu")(x), want,
                               rtol=1e-10, atol=1e-10)


def test_used_by_the_drop_in_schedulers():
    F = pytest.importorskip("fastdiff.diffusers")
    ays = S.get_sigmas_ays("SD1", 10)
    f32 = 1000 * 2.0**-24  # diffusers' float32 training table (as tests/test_schedules.py)
    # sigmas=: diffusers' Euler takes all n + 1, the final 0 included, at t(sigma)
    euler = F.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012)
    euler.set_timesteps(sigmas=ays.tolist())
    close(euler.sigmas, ays.tolist(), rtol=2.0**-24)  # stored as float32
    close(euler.timesteps, [float(t) for t in AYS_TIMESTEPS["SD1"][:-1]], rtol=f32)
    # timesteps=: the published AYS timesteps land on SD1.5's table, the AYS sigmas
    dpm = F.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012)
    dpm.set_timesteps(timesteps=AYS_TIMESTEPS["SD1"][:-1])
    close(dpm.sigmas[:-1], ays[:-1].tolist(), rtol=f32)
    # a flow schedule: OptimalSteps' s values (diffusers appends the 0) on the flow-matching
    # Euler, against Euler in s
    oss = S.get_sigmas_optimal_steps("FLUX", 10)
    flow = F.FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(sigmas=oss[:-1].tolist())
    x = torch.ones(2, 3)
    want = x.double().clone()
    for i, t in enumerate(flow.timesteps):
        v = -0.5 * x
        x = flow.step(v, t, x).prev_sample
        want = want + (oss[i + 1] - oss[i]) * (-0.5 * want)
    close(x, want.tolist(), rtol=1e-5)
