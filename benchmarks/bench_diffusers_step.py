"""diffusers' scheduler `step` vs fastdiff.diffusers' drop-in fused `step`, same scheduler config.

Each benchmark runs the full 20-step loop (scale_model_input + step) with a model that costs
nothing (a fixed model_output tensor), so the time is the scheduler's own work; extra_info
carries the time per step. The drop-in's plans are built by set_timesteps, outside the timing
(as in a pipeline, where set_timesteps runs once per generation).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.diffusers")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.float16 if HAS_CUDA else torch.float32
STEPS = 20
SHAPE = (2, 4, 64, 64)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          num_train_timesteps=1000)
CONFIGS = {
    "DDIMScheduler": dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "EulerDiscreteScheduler": {},
    "DPMSolverMultistepScheduler": dict(solver_order=2),
    "UniPCMultistepScheduler": dict(solver_order=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["diffusers", "fastdiff"])
def bench_scheduler_step(benchmark, impl, name):
    module = diffusers if impl == "diffusers" else fd
    s = getattr(module, name)(**SD, **CONFIGS[name])
    model_output = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE)
    x = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"scheduler step {name} {'x'.join(map(str, SHAPE))}"
    benchmark.extra_info.update(steps=STEPS, device=str(DEVICE), dtype=str(DTYPE))

    def loop():
        sample = x
        for t in s.timesteps:
            sample = s.step(model_output, t, s.scale_model_input(sample, t)).prev_sample
        if HAS_CUDA:
            torch.cuda.synchronize()
        return sample

    def reset():  # schedulers keep a step index and history: start over, untimed
        s.set_timesteps(STEPS, device=DEVICE)

    reset()
    loop()  # warm-up
    benchmark.pedantic(loop, setup=reset, rounds=10, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_step"] = benchmark.stats.stats.median * 1e3 / STEPS
