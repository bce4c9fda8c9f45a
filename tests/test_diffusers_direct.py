"""fastdiff/diffusers/_direct.py: FlowMatchEulerDiscreteScheduler's StepPlan read from the
schedule must be the plan tracing diffusers' own step gives (_trace.trace_step), bit for bit,
from every state of many schedules; whatever it does not cover must be left to tracing; and a
loop must then trace nothing and still give diffusers' numbers."""

from __future__ import annotations

import pytest
import torch

D = pytest.importorskip("diffusers")
F = pytest.importorskip("fastdiff.diffusers")

from fastdiff.diffusers import _direct  # noqa: E402
from fastdiff.diffusers._trace import trace_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "FlowMatchEulerDiscreteScheduler"

CONFIGS = [  # (config, set_timesteps arguments)
    ({}, dict(num_inference_steps=10)),
    ({}, dict(num_inference_steps=1)),
    ({}, dict(num_inference_steps=50)),
    (dict(shift=3.0), dict(num_inference_steps=28)),
    (dict(use_dynamic_shifting=True), dict(num_inference_steps=20, mu=1.1)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"),
     dict(num_inference_steps=7, mu=0.6)),
    (dict(shift_terminal=0.1, shift=2.0), dict(num_inference_steps=12)),
    (dict(invert_sigmas=True), dict(num_inference_steps=9)),
    (dict(use_karras_sigmas=True), dict(num_inference_steps=11)),
    (dict(use_exponential_sigmas=True), dict(num_inference_steps=8)),
    (dict(use_beta_sigmas=True), dict(num_inference_steps=8)),
    ({}, dict(sigmas=[1.0, 0.7, 0.7, 0.3, 0.05])),  # a repeated sigma: a zero step
    (dict(stochastic_sampling=True), dict(num_inference_steps=10)),
    (dict(stochastic_sampling=True, shift=3.0), dict(num_inference_steps=25)),
    (dict(stochastic_sampling=True, invert_sigmas=True), dict(num_inference_steps=6)),
]


def _twin(config, arguments):
    sched = getattr(F, NAME)(**config)
    sched.set_timesteps(**arguments)
    shared = sched._fd_shared()
    shared.overlay(sched.__dict__)
    return sched, shared


def _same_plan(direct, traced):
    assert [(c.sources, c.targets, c.clip) for c in direct.chunks] == \
        [(c.sources, c.targets, c.clip) for c in traced.chunks]
    for a, b in zip(direct.chunks, traced.chunks):
        assert a.coef.dtype == b.coef.dtype and torch.equal(a.coef, b.coef), (a.coef, b.coef)
    for name in ("moves", "consts", "list_lengths", "deleted", "noise_f32", "brownian",
                 "sampler_init", "out_cls", "out_fields", "learned"):
        assert getattr(direct, name) == getattr(traced, name), name
    assert direct.reads >= traced.reads  # (the set a plan is shared by: a superset is safe)


def _timestep(value, how):
    return {"tensor": torch.tensor(value), "float": float(value),
            "shape1": torch.tensor([value]), "float64": torch.tensor(value, dtype=torch.float64),
            }[how]


@pytest.mark.parametrize("config,arguments", CONFIGS,
                         ids=[f"{i}" for i in range(len(CONFIGS))])
def test_direct_plan_is_the_traced_plan(config, arguments):
    sched, shared = _twin(config, arguments)
    twin = shared.twin
    sigmas = twin.sigmas
    covered = 0
    for index, value in enumerate(shared.schedule):
        for how in ("tensor", "float", "shape1", "float64"):
            start = shared.snapshot()
            twin.__dict__["_step_index"] = index
            t = _timestep(value, how)
            direct = _direct.flow_match_euler(twin, t, {"generator": None})
            after_direct = dict(twin.__dict__)
            shared.restore(start)
            twin.__dict__["_step_index"] = index
            traced = trace_step(twin, t, {"generator": None})
            if direct is None:  # left to tracing: only where its lowering is not one chunk
                step = sigmas[index + 1] - sigmas[index]
                degenerate = step == 0 or (config.get("stochastic_sampling")
                                           and (sigmas[index + 1] == 0 or sigmas[index] == 0
                                                or sigmas[index + 1] == 1))
                assert degenerate, (index, traced)
            else:
                covered += 1
                _same_plan(direct, traced)
                assert after_direct["_step_index"] == twin.__dict__["_step_index"] == index + 1
            shared.restore(start)
    assert covered >= 2 * len(shared.schedule)  # most steps are read directly


def test_what_it_leaves_to_tracing():
    sched, shared = _twin({}, dict(num_inference_steps=10))
    twin = shared.twin
    t = torch.tensor(shared.schedule[0])
    twin.__dict__["_step_index"] = 0
    for timestep in (1000, torch.tensor(1000), torch.tensor(1000, dtype=torch.int32)):
        assert _direct.flow_match_euler(twin, timestep, {}) is None  # diffusers raises
    assert _direct.flow_match_euler(twin, t, {"s_churn": 0.5}) is None
    assert _direct.flow_match_euler(twin, t, {"generator": torch.Generator()}) is None
    for index in (None, -1, 10, 11):  # unset or outside the schedule's steps
        twin.__dict__["_step_index"] = index
        assert _direct.flow_match_euler(twin, t, {}) is None
    assert twin.__dict__["_step_index"] == 11  # (nothing advanced)
    twin.__dict__["_step_index"] = 0
    twin.__dict__["sigmas"] = shared.fresh["sigmas"].double()
    assert _direct.flow_match_euler(twin, t, {}) is None


@pytest.mark.parametrize("stochastic", [False, True])
def test_a_loop_traces_nothing_and_gives_diffusers_numbers(stochastic, monkeypatch):
    import fastdiff.diffusers._fused as fused
    import fastdiff.diffusers._shared as shared

    monkeypatch.setattr(shared, "_SHARED", type(shared._SHARED)())
    traced = []
    real = fused.trace_step
    monkeypatch.setattr(fused, "trace_step", lambda *a, **k: traced.append(1) or real(*a, **k))
    config = dict(shift=3.0, stochastic_sampling=stochastic)
    out = []
    for lib in (F, D):
        sched = getattr(lib, NAME)(**config)
        sched.set_timesteps(10)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(2)
        for t in sched.timesteps:
            eps = 0.3 * x + 0.01 * float(t)
            x = sched.step(eps, t, x, generator=gen).prev_sample
        out.append((x, sched.step_index))
    (ours, ours_index), (theirs, their_index) = out
    # the last stochastic step goes to sigma 0 (a zero noise column): traced
    assert len(traced) == (1 if stochastic else 0)
    assert ours_index == their_index == 10
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
