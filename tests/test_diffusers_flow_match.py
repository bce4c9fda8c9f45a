"""FlowMatchEulerDiscreteScheduler in the style of diffusers' own scheduler tests (its suite has
none for this class): config sweeps through save/load and step, full loops, step shapes,
tuple/dict outputs, scale_noise, custom sigmas/timesteps, begin index -- each against
diffusers' own class on the same inputs (fp32, relative 1e-5) rather than stored numbers."""

from __future__ import annotations

import inspect
import tempfile

import pytest
import torch

D = pytest.importorskip("diffusers")
F = pytest.importorskip("fastdiff.diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL = 1e-5
NAME = "FlowMatchEulerDiscreteScheduler"
STEPS = 10


def get_scheduler_config(**kwargs):
    config = dict(num_train_timesteps=1000, shift=1.0)
    config.update(kwargs)
    return config


def dummy_sample():
    return torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))


def dummy_model(sample, t):
    t = float(t) / 1000.0
    return sample * t / (t + 1) - 0.1 * (1 - t)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def set_timesteps(sched, config):
    if config.get("use_dynamic_shifting"):
        sched.set_timesteps(STEPS, mu=0.8)
    else:
        sched.set_timesteps(STEPS)


def full_loop(lib, config, **set_kwargs):
    sched = getattr(lib, NAME)(**get_scheduler_config(**config))
    if set_kwargs:
        sched.set_timesteps(**set_kwargs)
    else:
        set_timesteps(sched, config)
    sample = dummy_sample()
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        sample = sched.step(dummy_model(sample, t), t, sample, generator=g).prev_sample
    return sample, sched


CONFIGS = [dict(shift=s) for s in (1.0, 3.0)] + [
    dict(use_dynamic_shifting=True), dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(shift_terminal=0.1), dict(invert_sigmas=True), dict(use_karras_sigmas=True),
    dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
    dict(stochastic_sampling=True, shift=3.0)]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_check_over_configs(config):
    """diffusers' check_over_configs: save/load, then one step at timesteps[3] of the saved and
    loaded schedulers agrees; and both agree with diffusers."""
    outs = []
    for lib in (D, F):
        sched = getattr(lib, NAME)(**get_scheduler_config(**config))
        with tempfile.TemporaryDirectory() as folder:
            sched.save_config(folder)
            new = getattr(lib, NAME).from_pretrained(folder)
        pair = []
        for s in (sched, new):
            set_timesteps(s, config)
            t = s.timesteps[3]
            s.set_begin_index(3)
            sample = dummy_sample()
            pair.append(s.step(0.1 * sample, t, sample,
                               generator=torch.Generator().manual_seed(0)).prev_sample)
        assert torch.sum(torch.abs(pair[0] - pair[1])) < 1e-5
        outs.append(pair[0])
    assert rel_err(outs[1], outs[0]) <= RTOL


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_full_loop(config):
    want, ref = full_loop(D, config)
    got, ours = full_loop(F, config)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    assert rel_err(got, want) <= RTOL
    assert ours.step_index == ref.step_index


def test_full_loop_custom_sigmas_and_timesteps():
    sigmas = [1.0, 0.75, 0.5, 0.3, 0.1]
    for kwargs in (dict(sigmas=sigmas), dict(timesteps=[900.0, 700.0, 400.0, 100.0]),
                   dict(sigmas=sigmas, mu=0.5)):
        config = dict(use_dynamic_shifting=True) if "mu" in kwargs else {}
        want, _ = full_loop(D, config, **kwargs)
        got, _ = full_loop(F, config, **kwargs)
        assert rel_err(got, want) <= RTOL, kwargs


def test_step_shape_and_outputs_equivalence():
    sched = getattr(F, NAME)(**get_scheduler_config())
    sched.set_timesteps(STEPS)
    sample = dummy_sample()
    out_0 = sched.step(0.1 * sample, sched.timesteps[0], sample).prev_sample
    out_1 = sched.step(0.1 * sample, sched.timesteps[1], sample).prev_sample
    assert out_0.shape == sample.shape == out_1.shape
    sched.set_timesteps(STEPS)
    as_dict = sched.step(0.1 * sample, sched.timesteps[0], sample)
    sched.set_timesteps(STEPS)
    as_tuple = sched.step(0.1 * sample, sched.timesteps[0], sample, return_dict=False)
    assert len(as_tuple) == len(as_dict) and torch.equal(as_tuple[0], as_dict.prev_sample)


def test_scale_noise_and_begin_index():
    sample, noise = dummy_sample(), torch.randn(4, 3, 8, 8, generator=torch.Generator())
    for begin in (None, 2):
        got = []
        for lib in (D, F):
            sched = getattr(lib, NAME)(**get_scheduler_config(shift=3.0))
            sched.set_timesteps(STEPS)
            if begin is not None:
                sched.set_begin_index(begin)
            t = sched.timesteps[[1, 4, 4, 7]]
            got.append(sched.scale_noise(sample, t, noise))
        assert torch.equal(got[1], got[0])


def test_public_api_and_signatures():
    ours, ref = getattr(F, NAME)(), getattr(D, NAME)()
    assert hasattr(ours, "scale_noise") and not hasattr(ours, "add_noise")
    assert hasattr(ours, "scale_model_input") == hasattr(ref, "scale_model_input")
    for method in ("set_timesteps", "step", "scale_noise"):
        assert inspect.signature(getattr(ours, method)) == inspect.signature(getattr(ref, method))
    assert {"sigmas", "mu", "timesteps"} <= set(inspect.signature(ours.set_timesteps).parameters)
