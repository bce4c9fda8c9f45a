"""The drop-ins added for issue 15 item 5 (every other diffusers class whose update is linear in
the model outputs) against diffusers' own classes: full loops with the same initial noise, the
same generator and a deterministic non-linear fake model, fp32, relative error <= 1e-5 on the
final sample and every step's extra outputs (the README tolerance); the step sync-free (no
value read-back inside scale_model_input + step) with one fused launch per step; the step
options each class has (eta, s_churn, ...) traced per value; clip_sample / clip_denoised fused.
"""

from __future__ import annotations

import inspect

import pytest
import torch

D = pytest.importorskip("diffusers")
F = pytest.importorskip("fastdiff.diffusers")
from test_diffusers_schedulers import _ScalarReads, fake_model, rel_err, traced_plans  # noqa: E402

from fastdiff.diffusers._loops import Stepper, loop_timesteps  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops on a shared runner
SHAPE = (2, 3, 8, 8)
RTOL = 1e-5
V = dict(prediction_type="v_prediction")
KARRAS = dict(use_karras_sigmas=True)
# CogVideoX-5b's scheduler config (its model card's scheduler_config.json)
COGVIDEOX = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                 set_alpha_to_one=True, snr_shift_scale=1.0, timestep_spacing="trailing")

# (class, config, step kwargs, steps, clips x0)
CASES = [
    ("DPMSolverSDEScheduler", dict(noise_sampler_seed=3), {}, 8, False),
    ("DPMSolverSDEScheduler", dict(use_karras_sigmas=True, **V), dict(s_noise=0.9), 8, False),
    ("DPMSolverSDEScheduler", dict(timestep_spacing="trailing"), {}, 12, False),  # global seed
    ("TCDScheduler", {}, {}, 8, False),
    ("TCDScheduler", dict(**V, timestep_spacing="trailing"), dict(eta=0.0), 6, False),
    ("TCDScheduler", dict(clip_sample=True), dict(eta=1.0), 8, False),  # (TCD never clips)
    ("SASolverScheduler", {}, {}, 12, False),
    ("SASolverScheduler", dict(predictor_order=3, corrector_order=3, **KARRAS), {}, 12, False),
    ("SASolverScheduler", dict(algorithm_type="noise_prediction", predictor_order=1,
                               corrector_order=4), {}, 12, False),
    ("SASolverScheduler", dict(tau_func=lambda t: 0.5, **V), {}, 10, False),
    ("IPNDMScheduler", {}, {}, 12, False),
    ("IPNDMScheduler", {}, {}, 25, False),
    ("FlowMatchHeunDiscreteScheduler", {}, {}, 8, False),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0), dict(s_churn=0.5, s_tmin=0.1), 8, False),
    ("FlowMatchLCMScheduler", {}, {}, 6, False),
    ("FlowMatchLCMScheduler", dict(shift=3.0), {}, 4, False),
    ("DDIMInverseScheduler", {}, {}, 12, True),
    ("DDIMInverseScheduler", dict(clip_sample=False, set_alpha_to_one=False, **V), {}, 12,
     False),
    ("DPMSolverMultistepInverseScheduler", {}, {}, 12, False),
    ("DPMSolverMultistepInverseScheduler", dict(solver_order=3, **KARRAS), {}, 12, False),
    ("DPMSolverMultistepInverseScheduler", dict(solver_type="heun", **V), {}, 12, False),
    ("CMStochasticIterativeScheduler", {}, {}, 6, True),
    ("CMStochasticIterativeScheduler", dict(clip_denoised=False, s_noise=0.8), {}, 6, False),
    ("CMStochasticIterativeScheduler", {}, {}, 1, True),
    ("CosineDPMSolverMultistepScheduler", {}, {}, 10, False),
    ("CosineDPMSolverMultistepScheduler", dict(solver_order=1, sigma_schedule="karras"), {},
     10, False),
    ("CogVideoXDDIMScheduler", dict(clip_sample=False), {}, 10, False),
    ("CogVideoXDDIMScheduler", dict(clip_sample=False, **V, timestep_spacing="trailing",
                                    rescale_betas_zero_snr=True), dict(eta=0.5), 10, False),
    ("DDIMParallelScheduler", {}, {}, 12, True),
    ("DDIMParallelScheduler", dict(clip_sample=False, **V), dict(eta=0.7), 12, False),
    ("DDPMParallelScheduler", {}, {}, 12, True),
    ("DDPMParallelScheduler", dict(clip_sample=False, variance_type="fixed_large"), {}, 12,
     False),
    ("DDPMWuerstchenScheduler", {}, {}, 8, False),
    ("DDPMWuerstchenScheduler", dict(scaler=1.5), {}, 8, False),
    ("DDPMWuerstchenScheduler", dict(scaler=0.7, s=0.01), {}, 12, False),
    ("CogVideoXDPMScheduler", {}, {}, 10, False),
    ("CogVideoXDPMScheduler", COGVIDEOX, dict(eta=0.5), 10, False),
    ("CogVideoXDPMScheduler", dict(COGVIDEOX, snr_shift_scale=3.0, set_alpha_to_one=False), {},
     16, False),
    ("UnCLIPScheduler", {}, {}, 10, True),
    ("UnCLIPScheduler", dict(clip_sample=False, prediction_type="sample"), {}, 12, False),
    ("UnCLIPScheduler", dict(clip_sample_range=0.5), {}, 25, True),
    ("LTXEulerAncestralRFScheduler", {}, {}, 8, False),
    ("LTXEulerAncestralRFScheduler", dict(eta=0.5, s_noise=0.8), {}, 12, False),
    ("LTXEulerAncestralRFScheduler", dict(eta=0.0), {}, 6, False),
    ("FlowMapEulerDiscreteScheduler", {}, {}, 8, False),
    ("FlowMapEulerDiscreteScheduler", dict(shift=5.0), {}, 4, False),
    ("EDMEulerScheduler", {}, dict(s_churn=1.0), 12, False),
    ("EDMEulerScheduler", dict(prediction_type="v_prediction"),
     dict(s_churn=2.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003), 12, False),
]


def run(sched, steps, step_kwargs, dtype=torch.float32):
    """A full loop; returns the final sample and every step's extra outputs. (The global seed:
    DPMSolverSDE without a noise_sampler_seed seeds its Brownian tree from torch's generator.)"""
    torch.manual_seed(123)
    sched.set_timesteps(steps, device="cpu")
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    kwargs = dict(step_kwargs, generator=torch.Generator().manual_seed(0)) if takes_gen \
        else dict(step_kwargs)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    extras, step = [], Stepper(sched)  # (as the class's pipelines call it: _loops.py)
    for t in loop_timesteps(sched):
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = step(fake_model(inp, t), t, x, **kwargs)
        extras.append([v for k, v in out.items() if k != "prev_sample" and v is not None])
        x = out.prev_sample
    return x, extras


@pytest.mark.parametrize("name,config,step_kwargs,steps,clips", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parity(name, config, step_kwargs, steps, clips):
    ref, ours = getattr(D, name)(**config), getattr(F, name)(**config)
    x_ref, extras_ref = run(ref, steps, step_kwargs)
    x, extras = run(ours, steps, step_kwargs)
    plans = traced_plans(ours)
    assert plans, "nothing was fused"
    assert ({c.clip for p in plans for c in p.chunks} != {None}) == clips
    assert torch.isfinite(x_ref).all() and torch.isfinite(x).all()
    assert rel_err(x, x_ref) <= RTOL
    for e, e_ref in zip(extras, extras_ref, strict=True):
        assert len(e) == len(e_ref)
        for a, b in zip(e, e_ref):
            assert rel_err(a, b) <= RTOL
    if hasattr(ref, "_step_index"):
        assert ours.step_index == ref.step_index


def test_step_options_change_the_numbers():
    """Positive controls: the traced options are really applied (s_churn > 0 re-noises EDM
    Euler; TCD's eta and CM's s_noise move the result), each still diffusers' number."""
    for name, config, a, b in [("EDMEulerScheduler", {}, {}, dict(s_churn=1.0)),
                               ("TCDScheduler", {}, dict(eta=0.0), dict(eta=0.9)),
                               ("CMStochasticIterativeScheduler", dict(s_noise=0.5), {}, {})]:
        xa, _ = run(getattr(F, name)(), 8, a)
        xb, _ = run(getattr(F, name)(**config), 8, b)
        assert rel_err(xa, xb) > 1e-3, name


NAMES = sorted({c[0] for c in CASES})


@pytest.mark.parametrize("name", NAMES)
def test_step_is_sync_free(name, monkeypatch):
    """No value read-back in scale_model_input + step, one fused launch per step."""
    import fastdiff.diffusers._run as fused  # (the launch)

    launches = []
    for op in ("lincomb", "launch_unchecked"):
        real = getattr(fused, op)
        monkeypatch.setattr(fused, op,
                            lambda *a, _real=real, **k: launches.append(1) or _real(*a, **k))
    sched = getattr(F, name)()
    sched.set_timesteps(10, device="cpu")
    kwargs = ({"generator": torch.Generator().manual_seed(0)}
              if "generator" in inspect.signature(sched.step).parameters else {})
    x, model_output = torch.randn(2, *SHAPE)
    step = Stepper(sched)
    for t in loop_timesteps(sched):
        with _ScalarReads() as mode:
            if hasattr(sched, "scale_model_input"):
                x = sched.scale_model_input(x, t)
            x = step(model_output, t, x, **kwargs).prev_sample
        assert mode.bad == [], mode.bad
    assert 0 < len(launches) <= len(sched.timesteps)


def test_sasolver_stored_timesteps_are_not_read_on_the_device():
    """SASolver's step reads the value of the last timestep it stored (tau_func): a later trace
    takes it from the CPU copy the fused step kept, so a device timestep is never read."""
    sched = F.SASolverScheduler()
    sched.set_timesteps(6)
    x = torch.randn(SHAPE)
    for t in sched.timesteps:
        x = sched.step(fake_model(x, t), t, x).prev_sample
    kept = sched._fd_state().host_values
    stored = [v for v in sched.timestep_list if isinstance(v, torch.Tensor)]
    assert stored and all(kept[id(v)][0] is v for v in stored)
    assert all(kept[id(v)][1].device.type == "cpu" and float(kept[id(v)][1]) == float(v)
               for v in stored)


def test_wuerstchen_timestep_copies_and_mixed_batches():
    """Stable Cascade in half precision passes `t.expand(b).to(dtype)`, a copy: its one value is
    read on the host (one copy) and gets diffusers' numbers; a batch whose timesteps differ
    runs diffusers' own step, said once."""
    ref, ours = D.DDPMWuerstchenScheduler(), F.DDPMWuerstchenScheduler()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for s in (ref, ours):
        s.set_timesteps(6)
    for t in (ref.timesteps[2].expand(2).to(torch.float16), torch.tensor([0.8, 0.8])):
        want = ref.step(fake_model(x, 0), t, x, generator=torch.Generator().manual_seed(0))
        got = ours.step(fake_model(x, 0), t, x, generator=torch.Generator().manual_seed(0))
        assert rel_err(got.prev_sample, want.prev_sample) <= RTOL
    assert traced_plans(ours)
    mixed = torch.tensor([0.8, 0.9])
    with pytest.warns(UserWarning, match="several elements"):
        got = ours.step(fake_model(x, 0), mixed, x, generator=torch.Generator().manual_seed(0))
    want = ref.step(fake_model(x, 0), mixed, x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(want.prev_sample).all() and torch.equal(got.prev_sample, want.prev_sample)


def test_cogvideox_dpm_checks_the_history_it_is_given():
    sched = F.CogVideoXDPMScheduler()
    sched.set_timesteps(4)
    x = torch.randn(SHAPE)
    t = sched.timesteps
    with pytest.raises(ValueError, match="old_pred_original_sample"):
        sched.step(x, x[:1], t[1], t[0], x, return_dict=False)


def test_unclip_learned_range_and_prev_timestep():
    """unCLIP's learned_range (twice the channels: the noise prediction, then v) scales the
    noise by exp(a_t + b_t v) with a_t, b_t from the step's own beta at prev_timestep; full
    loops with and without prev_timestep (then t - 1: one DDPM step) equal diffusers'."""
    for with_prev in (True, False):
        config = dict(variance_type="learned_range", clip_sample=False)
        ref, ours = D.UnCLIPScheduler(**config), F.UnCLIPScheduler(**config)
        out = []
        for s in (ref, ours):
            s.set_timesteps(12)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
            for i, t in enumerate(s.timesteps):
                v = torch.tanh(x[:, :1] * 3.0).expand_as(x)  # a variance channel in [-1, 1]
                prev = (s.timesteps[i + 1] if i + 1 < len(s.timesteps) else None) if with_prev \
                    else None
                model_output = torch.cat([fake_model(x, t), v], dim=1)
                x = s.step(model_output, t, x, prev_timestep=prev, generator=gen).prev_sample
            out.append(x)
        assert traced_plans(ours)
        assert any(p.learned is not None for p in traced_plans(ours))
        assert rel_err(out[1], out[0]) <= RTOL
    # without the variance channels: diffusers' last step (t = 0, no noise) needs no v, the
    # others fail (diffusers: a TypeError deep in _get_variance; here a ValueError saying why)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    last = [s.step(fake_model(x, 0), s.timesteps[-1], x).prev_sample for s in (ref, ours)]
    assert rel_err(last[1], last[0]) <= RTOL
    with pytest.raises(ValueError, match="model_output must have twice"):
        ours.step(fake_model(x, 0), ours.timesteps[0], x, prev_timestep=ours.timesteps[1])


def test_flow_map_any_step_and_ltx_custom_sigmas():
    """FlowMapEuler's any-step sampling (an r_timestep, number or tensor, an off-schedule
    timestep) and LTX's ComfyUI-style sigma schedule: diffusers' numbers, fused."""
    ref, ours = D.FlowMapEulerDiscreteScheduler(), F.FlowMapEulerDiscreteScheduler()
    x, eps = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    calls = [lambda s: (s.timesteps[0], dict(r_timestep=0.0)),
             lambda s: (s.timesteps[1], dict(r_timestep=s.timesteps[3])),
             lambda s: (537.25, dict(r_timestep=120.5)),
             lambda s: (torch.tensor(float(s.timesteps[2]), dtype=torch.float64), {})]
    for s in (ref, ours):
        s.set_timesteps(4)
    for call in calls:
        got = []
        for s in (ref, ours):
            t, kwargs = call(s)
            s._step_index = None
            got.append(s.step(eps, t, x, **kwargs).prev_sample)
        assert rel_err(got[1], got[0]) <= RTOL
        assert ours.step_index == ref.step_index
    assert len(traced_plans(ours)) >= len(calls) - 1
    for s in (ref, ours):  # off the schedule without an r_timestep: diffusers' own error
        with pytest.raises(ValueError, match="r_timestep"):
            s.step(eps, 537.25, x)
    sigmas = [1.0, 0.9, 0.7, 0.4, 0.15, 0.0]
    ref, ours = D.LTXEulerAncestralRFScheduler(), F.LTXEulerAncestralRFScheduler()
    out = []
    for s in (ref, ours):
        s.set_timesteps(sigmas=sigmas)
        gen, y = torch.Generator().manual_seed(0), x
        for t in s.timesteps:
            y = s.step(fake_model(y, t), t, y, generator=gen).prev_sample
        out.append(y)
    assert traced_plans(ours) and rel_err(out[1], out[0]) <= RTOL
