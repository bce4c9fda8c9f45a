"""The drop-ins' first call: fastdiff's `set_timesteps` + first `step` with nothing traced yet
(a fresh process: the shared plan cache emptied) against diffusers' `set_timesteps` + its whole
loop over the same timesteps, for every class at 10, 50 and 1000 steps. The first step traces
one step (tracing is incremental, fastdiff/diffusers/_fused.py), so it must cost less than
diffusers' loop at every step count (issue 15 item 6; issue 14's drop-in line at 1000 steps).

SD-sized latents (1x4x64x64, fp32) on the benchmark's device; each group holds both rows and
extra_info has the ratio's pieces (FIRST_STEP_ROUNDS=101 in the environment: 101 rounds a row,
for a tighter median). In CI's quick mode (--benchmark-disable) the 1000-step rows
are skipped (diffusers' LMS loop alone takes ~30 s there); the 10- and 50-step rows run once.
"""

from __future__ import annotations

import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.diffusers")
from fastdiff.diffusers._loops import Stepper, loop_timesteps, sd_config  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SHAPE = (1, 4, 64, 64)
STEPS = [10, 50, 1000]
# rounds per row (diffusers' 1000-step loops: 1); more for a tighter median of a borderline row
ROUNDS = int(os.environ.get("FIRST_STEP_ROUNDS", "15"))


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", fd.__all__)
@pytest.mark.parametrize("impl", ["fastdiff-first-step", "diffusers-loop"])
def bench_first_step(benchmark, impl, name, steps):
    import fastdiff.diffusers._shared as shared

    if benchmark.disabled and steps == 1000:
        pytest.skip("1000 steps: timed runs only (fastdiff bench)")
    config = sd_config(getattr(fd, name))  # SD 1.5's settings wherever the class has them
    module = fd if impl.startswith("fastdiff") else diffusers
    model_output = torch.randn(SHAPE, device=DEVICE)
    sample = torch.randn(SHAPE, device=DEVICE)
    benchmark.group = f"first call {name} {steps} steps"
    benchmark.extra_info.update(steps=steps, device=str(DEVICE), shape=list(SHAPE))

    def fresh():
        shared._SHARED.clear()  # nothing traced: as in a new process
        return (getattr(module, name)(**config),), {}

    def first_call(sched):
        sched.set_timesteps(steps, device=DEVICE)
        timesteps = loop_timesteps(sched)  # (as its pipelines call it: _loops.py)
        timesteps = timesteps if impl == "diffusers-loop" else timesteps[:1]
        x, step = sample, Stepper(sched)
        for t in timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            x = step(model_output, t, inp).prev_sample
        _sync()
        return x

    # one untimed warm-up round: one-time costs of the process (imports, the first call of
    # each code path) are not the first call of a loop; every timed round starts untraced
    long = steps == 1000 and impl == "diffusers-loop"
    benchmark.pedantic(first_call, setup=fresh, rounds=1 if long else ROUNDS,
                       warmup_rounds=0 if long else 1)
