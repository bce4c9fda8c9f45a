"""Plan build time against the step count (issue 14): plans are traced, compiled and lowered in
O(steps), so the log-log slope of build time over 10 ... 1000 steps is about 1 (the report's
"plan build time" table fits it per solver, and plan_scaling.png draws it).

- every solver with a plan: the first `fastdiff.Sampler(model, solver, sigmas)` with the plan
  cache cold (trace, compile both history kinds, lower), Karras sigmas on [0.03, 14.6] (flow
  solvers: s from 1 to 0);
- every drop-in scheduler class: everything the fused step traces for a whole schedule, with
  nothing traced before (a new process): `set_timesteps` and one loop of `step` over all the
  timesteps on a 1x1x4x4 sample, so the step arithmetic itself is negligible.

The build runs on the host, so the time is pytest-benchmark's (the device plays no part). In
CI's quick mode (--benchmark-disable, `fastdiff bench --quick`) only 10 and 50 steps run.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastdiff
from fastdiff.reference.solvers import SOLVERS
from fastdiff.solvers import _plans
from fastdiff.spacings import get_sigmas_karras

STEPS = [10, 50, 100, 250, 1000]
SOLVER_NAMES = list(SOLVERS)  # every entry (dpm_adaptive, data-dependent steps, has none)
QUICK = os.environ.get("FASTDIFF_BENCH_QUICK", "") == "1"  # set by `fastdiff bench --quick`
try:
    import fastdiff.diffusers as fd
    from fastdiff.diffusers._loops import Stepper, loop_timesteps, sd_config

    DROPINS = list(fd.__all__)
except ImportError:  # diffusers is an optional extra
    fd, DROPINS = None, []


def _rounds(steps: int) -> int:
    return 1 if QUICK else 3 if steps >= 250 else 5


def _skip_long(benchmark, steps: int) -> None:
    if (benchmark.disabled or QUICK) and steps > 50:
        pytest.skip("more than 50 steps: timed runs only (fastdiff bench)")


def _sigmas(name: str, steps: int) -> torch.Tensor:
    if SOLVERS[name].param == "flow":
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return get_sigmas_karras(steps, 0.03, 14.6, dtype=torch.float64)


def _denoiser(x, sigma, **kwargs):  # never called: building a plan runs no model
    return x


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def bench_plan_solver(benchmark, name, steps):
    _skip_long(benchmark, steps)
    sigmas = _sigmas(name, steps)
    benchmark.group = f"plan {name}"
    benchmark.extra_info.update(steps=steps, kind="solver")

    def cold():
        _plans.cache_clear()
        return (), {}

    sampler = benchmark.pedantic(lambda: fastdiff.Sampler(_denoiser, name, sigmas), setup=cold,
                                 rounds=_rounds(steps), warmup_rounds=0 if QUICK else 1)
    benchmark.extra_info["model_calls"] = sampler.plan.nfe


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", DROPINS)
def bench_plan_dropin(benchmark, name, steps):
    import fastdiff.diffusers._shared as shared

    _skip_long(benchmark, steps)
    cls = getattr(fd, name)
    config = sd_config(cls)  # SD 1.5's settings wherever the class has them
    sample = torch.randn(1, 1, 4, 4)
    benchmark.group = f"plan {name}"
    benchmark.extra_info.update(steps=steps, kind="drop-in")

    def fresh():
        shared._SHARED.clear()  # nothing traced: as in a new process
        return (cls(**config),), {}

    def trace_schedule(sched):
        sched.set_timesteps(steps)
        x, step = sample, Stepper(sched)  # (as its pipelines call it: _loops.py)
        for t in loop_timesteps(sched):
            x = step(sample, t, x).prev_sample
        return x

    benchmark.pedantic(trace_schedule, setup=fresh, rounds=_rounds(steps),
                       warmup_rounds=0 if QUICK else 1)
