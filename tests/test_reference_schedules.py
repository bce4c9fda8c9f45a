"""Reference solvers compute their per-step host numbers for the whole schedule at once (issue
14: at 1000 steps the per-step 0-d tensor arithmetic was half of a plan's build time). Plans and
seeded samples must not change, so each vectorised table is checked here bit for bit against
the per-step 0-d arithmetic it replaces (k-diffusion's / ComfyUI's, written out as they read),
on several schedules and step counts up to 1000."""

from __future__ import annotations

import pytest
import torch

from fastdiff.reference.solvers import dpmpp_multistep as multi
from fastdiff.reference.solvers import dpmpp_singlestep as single
from fastdiff.reference.solvers._utils import get_ancestral_step, offset_first_sigma
from fastdiff.spacings import get_sigmas_exponential, get_sigmas_karras

STEPS = [10, 50, 1000]


def ve_schedules(n):
    return {"karras": get_sigmas_karras(n, 0.03, 14.6, dtype=torch.float64),
            "exponential": get_sigmas_exponential(n, 0.0292, 80.0, dtype=torch.float64),
            "karras wide, no final 0": get_sigmas_karras(n, 0.002, 80.0,
                                                         dtype=torch.float64)[:-1]}


def flow_schedules(n):
    lin = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    first, _ = offset_first_sigma(lin, lin.tolist(), "flow", 1 - 1e-4)
    return {"linear from 1 (moved)": first, "shift 3": (3 * lin / (1 + 2 * lin))[1:],
            "0.9 to 0.05": lin[:-1] * 0.85 + 0.05}


def bits(values):
    """host floats -> their exact bits (NaN-safe equality)."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64).view(torch.int64)


def assert_table(table, per_step, steps):
    for key, values in per_step.items():
        got = table[key]
        got = [got[i] for i in steps] if not isinstance(got, float) else [got] * len(steps)
        assert torch.equal(bits(got), bits(values)), key


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("schedule", ["karras", "exponential", "karras wide, no final 0"])
@pytest.mark.parametrize("r,eta", [(0.5, 1.0), (0.3, 0.5), (0.5, 0.0)])
def test_dpmpp_sde(n, schedule, r, eta):
    sigmas = ve_schedules(n)[schedule]
    steps = [i for i in range(len(sigmas) - 1) if sigmas[i + 1] > 0]
    per_step = {k: [] for k in ("sigma_t", "sigma_s", "sigma_next", "scale_1", "expm1_1",
                                "up_1", "scale_2", "expm1_2", "up_2")}
    for i in steps:  # k-diffusion's sample_dpmpp_sde
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = t_next - t
        s = t + h * r
        sigma_t, sigma_s = t.neg().exp(), s.neg().exp()
        sd, su = get_ancestral_step(sigma_t, sigma_s, eta)
        s_ = sd.log().neg()
        per_step["scale_1"].append(s_.neg().exp() / sigma_t)
        per_step["expm1_1"].append((t - s_).expm1())
        per_step["up_1"].append(su)
        sd, su = get_ancestral_step(sigma_t, t_next.neg().exp(), eta)
        t_next_ = sd.log().neg()
        per_step["scale_2"].append(t_next_.neg().exp() / sigma_t)
        per_step["expm1_2"].append((t - t_next_).expm1())
        per_step["up_2"].append(su)
        per_step["sigma_t"].append(sigma_t)
        per_step["sigma_s"].append(sigma_s)
        per_step["sigma_next"].append(t_next.neg().exp())
    assert_table(single._sde_schedule(sigmas, r, eta), per_step, steps)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("schedule", ["linear from 1 (moved)", "shift 3", "0.9 to 0.05"])
@pytest.mark.parametrize("r,eta", [(0.5, 1.0), (0.3, 0.5), (0.5, 0.0)])
def test_dpmpp_sde_flow(n, schedule, r, eta):
    sigmas = flow_schedules(n)[schedule]
    steps = [i for i in range(len(sigmas) - 1) if sigmas[i + 1] > 0]
    per_step = {k: [] for k in ("sigma_1", "alpha_1", "alpha_t", "scale_1", "weight_1", "up_1",
                                "scale_2", "weight_2", "up_2")}
    for i in steps:  # ComfyUI's sample_dpmpp_sde, CONST branch
        lam_s, lam_t = sigmas[i].logit().neg(), sigmas[i + 1].logit().neg()
        h = lam_t - lam_s
        lam_1 = lam_s + r * h
        sigma_1 = lam_1.neg().sigmoid()
        alpha_s, alpha_1 = sigmas[i] * lam_s.exp(), sigma_1 * lam_1.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        for k, lam, alpha in ((1, lam_1, alpha_1), (2, lam_t, alpha_t)):
            sd, su = get_ancestral_step(lam_s.neg().exp(), lam.neg().exp(), eta)
            h_ = sd.log().neg() - lam_s
            per_step[f"scale_{k}"].append((alpha / alpha_s) * (-h_).exp())
            per_step[f"weight_{k}"].append(alpha * (-h_).expm1())
            per_step[f"up_{k}"].append(su)
        per_step["sigma_1"].append(sigma_1)
        per_step["alpha_1"].append(alpha_1)
        per_step["alpha_t"].append(alpha_t)
    assert_table(single._sde_flow_schedule(sigmas, r, eta), per_step, steps)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("kind,schedule", [("ve", "karras"), ("ve", "exponential"),
                                           ("ve", "karras wide, no final 0"),
                                           ("flow", "linear from 1 (moved)"), ("flow", "shift 3"),
                                           ("flow", "0.9 to 0.05")])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_dpmpp_3m_sde(n, kind, schedule, eta):
    sigmas = (ve_schedules if kind == "ve" else flow_schedules)(n)[schedule]
    steps = [i for i in range(len(sigmas) - 1) if sigmas[i + 1] > 0]
    per_step = {k: [] for k in ("decay", "w_0", "w_phi_2", "w_phi_3", "r0", "r1", "noise")}
    h_1 = h_2 = None
    for i in steps:  # k-diffusion's / ComfyUI's sample_dpmpp_3m_sde
        lam = (lambda v: v.log().neg()) if kind == "ve" else (lambda v: v.logit().neg())
        t, s = lam(sigmas[i]), lam(sigmas[i + 1])
        h = s - t
        h_eta = h * (eta + 1)
        if kind == "ve":
            alpha_t, decay = 1.0, torch.exp(-h_eta)
        else:
            alpha_t = sigmas[i + 1] * s.exp()
            decay = sigmas[i + 1] / sigmas[i] * (-h * eta).exp()
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        per_step["decay"].append(decay)
        per_step["w_0"].append(alpha_t * (-h_eta).expm1().neg())
        per_step["w_phi_2"].append(alpha_t * phi_2)
        per_step["w_phi_3"].append(alpha_t * phi_3)
        per_step["r0"].append(h_1 / h if h_1 is not None else float("nan"))
        per_step["r1"].append(h_2 / h if h_2 is not None else float("nan"))
        per_step["noise"].append((-2 * h * eta).expm1().neg().sqrt())
        h_1, h_2 = h, h_1
    assert_table(multi._3m_sde_schedule(sigmas, eta, kind), per_step, steps)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("schedule", ["karras", "exponential", "karras wide, no final 0"])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_dpmpp_2s_ancestral(n, schedule, eta):
    sigmas = ve_schedules(n)[schedule]
    per_step = {k: [] for k in ("dt", "sigma_s", "scale_1", "w_1", "scale_2", "w_2", "up")}
    steps = []
    for i in range(len(sigmas) - 1):  # k-diffusion's sample_dpmpp_2s_ancestral
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        per_step["dt"].append(sigma_down - sigmas[i])
        per_step["up"].append(sigma_up)
        if sigma_down == 0:
            for k in ("sigma_s", "scale_1", "w_1", "scale_2", "w_2"):
                per_step[k].append(float("nan"))  # not compared: Euler's step
            continue
        steps.append(i)
        t, t_next = sigmas[i].log().neg(), sigma_down.log().neg()
        h = t_next - t
        s = t + h / 2
        per_step["sigma_s"].append(s.neg().exp())
        per_step["scale_1"].append(s.neg().exp() / t.neg().exp())
        per_step["w_1"].append((-h / 2).expm1())
        per_step["scale_2"].append(t_next.neg().exp() / t.neg().exp())
        per_step["w_2"].append((-h).expm1())
    table = single._2s_ancestral_schedule(sigmas, eta)
    everywhere = list(range(len(sigmas) - 1))
    assert_table({k: table[k] for k in ("dt", "up")},
                 {k: per_step[k] for k in ("dt", "up")}, everywhere)
    assert_table({k: table[k] for k in ("sigma_s", "scale_1", "w_1", "scale_2", "w_2")},
                 {k: [per_step[k][i] for i in steps]
                  for k in ("sigma_s", "scale_1", "w_1", "scale_2", "w_2")}, steps)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("schedule", ["linear from 1 (moved)", "shift 3", "0.9 to 0.05"])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_dpmpp_2s_ancestral_rf(n, schedule, eta):
    sigmas = flow_schedules(n)[schedule]
    if schedule == "linear from 1 (moved)":  # ComfyUI's _RF sampler starts at s = 1 itself
        sigmas = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    steps = [i for i in range(len(sigmas) - 1) if sigmas[i + 1] > 0]
    per_step = {k: [] for k in ("sigma_s", "ratio_s", "ratio_down", "scale", "renoise")}
    for i in steps:  # ComfyUI's sample_dpmpp_2s_ancestral_RF, euler._rf_step written out
        sigma_down = sigmas[i + 1] * (1 + (sigmas[i + 1] / sigmas[i] - 1) * eta)
        alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
        renoise = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
        t_i, t_down = sigmas[i].logit().neg(), sigma_down.logit().neg()
        sigma_s = (t_i + (t_down - t_i) / 2).neg().sigmoid()
        per_step["sigma_s"].append(sigma_s)
        per_step["ratio_s"].append((0.9999 if sigmas[i] == 1 else sigma_s) / sigmas[i])
        per_step["ratio_down"].append(sigma_down / sigmas[i])
        per_step["scale"].append(alpha_ip1 / alpha_down)
        per_step["renoise"].append(renoise)
    table = single._2s_ancestral_rf_schedule(sigmas, sigmas.tolist(), eta)
    mid = [k for k, i in enumerate(steps) if sigmas[i] != 1]  # at s = 1 it is 0.9999 instead
    sigma_s = per_step.pop("sigma_s")
    assert_table(table, {"sigma_s": [sigma_s[k] for k in mid]}, [steps[k] for k in mid])
    assert_table(table, per_step, steps)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("schedule", ["karras", "exponential", "karras wide, no final 0"])
def test_dpmpp_2m(n, schedule):
    sigmas = ve_schedules(n)[schedule]
    steps = [i for i in range(len(sigmas) - 1) if sigmas[i + 1] > 0]
    per_step = {k: [] for k in ("w_new", "w_old", "scale", "expm1")}
    for i in steps:  # k-diffusion's sample_dpmpp_2m
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = t_next - t
        if i > 0:
            r = (t - sigmas[i - 1].log().neg()) / h
            per_step["w_new"].append(1 + 1 / (2 * r))
            per_step["w_old"].append(1 / (2 * r))
        else:
            per_step["w_new"].append(float("nan"))
            per_step["w_old"].append(float("nan"))
        per_step["scale"].append(t_next.neg().exp() / t.neg().exp())
        per_step["expm1"].append((-h).expm1())
    assert_table(multi._2m_schedule(sigmas), per_step, steps)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("kind,schedule", [("ve", "karras"), ("ve", "exponential"),
                                           ("ve", "karras wide, no final 0"),
                                           ("flow", "linear from 1 (moved)"), ("flow", "shift 3"),
                                           ("flow", "0.9 to 0.05")])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde(n, kind, schedule, eta, solver_type):
    sigmas = (ve_schedules if kind == "ve" else flow_schedules)(n)[schedule]
    steps = [i for i in range(len(sigmas) - 1) if sigmas[i + 1] > 0]
    per_step = {k: [] for k in ("decay", "w_0", "w_1", "noise")}
    h_last = None
    for i in steps:  # k-diffusion's / ComfyUI's sample_dpmpp_2m_sde
        lam = (lambda v: v.log().neg()) if kind == "ve" else (lambda v: v.logit().neg())
        t, s = lam(sigmas[i]), lam(sigmas[i + 1])
        h = s - t
        eta_h = eta * h
        alpha_t = 1.0 if kind == "ve" else sigmas[i + 1] * s.exp()
        per_step["decay"].append(sigmas[i + 1] / sigmas[i] * (-eta_h).exp())
        per_step["w_0"].append(alpha_t * (-h - eta_h).expm1().neg())
        if h_last is None:
            per_step["w_1"].append(float("nan"))
        else:
            r = h_last / h
            if solver_type == "heun":
                w = (-h - eta_h).expm1().neg() / (-h - eta_h) + 1
            else:
                w = 0.5 * (-h - eta_h).expm1().neg()
            per_step["w_1"].append(alpha_t * w * (1 / r))
        per_step["noise"].append((-2 * eta_h).expm1().neg().sqrt())
        h_last = h
    assert_table(multi._2m_sde_schedule(sigmas, eta, solver_type, kind), per_step, steps)


@pytest.mark.parametrize("n", [2, 3] + STEPS)
@pytest.mark.parametrize("schedule", ["karras", "exponential", "karras wide, no final 0"])
@pytest.mark.parametrize("churn", [{}, {"s_churn": 1.0}])
def test_heunpp2_is_the_per_step_arithmetic(n, schedule, churn):
    """sample_heunpp2's weights come from the whole schedule at once; its result is bit for bit
    that of ComfyUI's per-step 0-d arithmetic, written out here (float32 and float64 states)."""
    from fastdiff.reference.solvers._utils import to_d
    from fastdiff.reference.solvers.euler import _churn, sample_heunpp2

    def model(x, sigma, **kwargs):
        return torch.tanh(x) / (1 + sigma[:, None] ** 2) + 0.1 * x.sin()

    def per_step(x, sigmas):
        sig = sigmas.tolist()
        s_in, s_end = x.new_ones([x.shape[0]]), sig[-1]
        for i in range(len(sig) - 1):
            x, sigma_hat = _churn(x, sigmas, sig, i, churn.get("s_churn", 0.0), 0.0,
                                  float("inf"), 1.0)
            d = to_d(x, sigma_hat, model(x, sigma_hat * s_in))
            dt = sigmas[i + 1] - sigma_hat
            if sig[i + 1] == s_end:
                x = x + d * dt
                continue
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in))
            if sig[i + 2] == s_end:
                w2 = sigmas[i + 1] / (2 * sigmas[0])
                x = x + (d * (1 - w2) + d_2 * w2) * dt
                continue
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in))
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
        return x

    sigmas = ve_schedules(n)[schedule]
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(n), dtype=dtype) * 10
        torch.manual_seed(0)
        got = sample_heunpp2(model, x, sigmas.to(dtype), disable=True, **churn)
        torch.manual_seed(0)
        assert torch.equal(got, per_step(x, sigmas.to(dtype)))


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("kind,schedule", [("ve", "karras"), ("ve", "exponential"),
                                           ("ve", "karras wide, no final 0"),
                                           ("flow", "shift 3"), ("flow", "0.9 to 0.05")])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_dpm_2_ancestral_midpoints(n, kind, schedule, eta):
    """euler._dpm_2_mid on the whole schedule's (sigma_i, sigma_down) against k-diffusion's
    per-step 0-d midpoint, with the ancestral / flow split per step too."""
    from fastdiff.reference.solvers.euler import _dpm_2_mid, _rf_step

    sigmas = (ve_schedules if kind == "ve" else flow_schedules)(n)[schedule]
    if kind == "flow":
        down = _rf_step(torch.stack([sigmas[:-1], sigmas[1:]]), 0, eta)[0]
    else:
        down = get_ancestral_step(sigmas[:-1], sigmas[1:], eta=eta)[0]
    table = [v.tolist() for v in _dpm_2_mid(sigmas[:-1], down)]
    steps = [i for i in range(len(sigmas) - 1) if float(down[i]) > 0]
    per_step = {0: [], 1: [], 2: []}
    for i in steps:
        if kind == "flow":
            sigma_down = _rf_step(sigmas, i, eta)[0]
        else:
            sigma_down = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)[0]
        sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
        for k, v in enumerate((sigma_mid, sigma_mid - sigmas[i], sigma_down - sigmas[i])):
            per_step[k].append(v)
    assert_table(dict(enumerate(table)), per_step, steps)
