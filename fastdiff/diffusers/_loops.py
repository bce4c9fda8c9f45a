"""How diffusers' pipelines call `step`, for the tests and benchmarks that loop over every class,
and the SD 1.5 settings those benchmarks build every class with (sd_config).

Three classes are called their own way: DDPMWuerstchenScheduler (Stable Cascade, Wuerstchen)
gets the per-sample timestep `t.expand(batch)` and the loop stops before the schedule's final
0; CogVideoXDPMScheduler (CogVideoX) gets back the x0 and the timestep of the previous step
(`old_pred_original_sample`, `timestep_back`) and returns a bare tuple; UnCLIPScheduler
(unCLIP, the Kandinsky priors) gets `prev_timestep=timesteps[i + 1]` (None at the last step).
Every other class is called as `step(model_output, t, sample, ...)`.
"""

from __future__ import annotations

import inspect

from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

# the classes called their own way, and the pipelines that call them
OWN_PIPELINES = {"DDPMWuerstchenScheduler": "Stable Cascade, Wuerstchen",
                 "CogVideoXDPMScheduler": "CogVideoX",
                 "UnCLIPScheduler": "unCLIP, Kandinsky 2.1 / 2.2 priors"}


# SD 1.5's scheduler settings: its betas, no clipping, LCM's and TCD's 1000 original steps and
# 1000 training steps (the consistency models' default is 40)
SD_SETTINGS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   clip_sample=False, original_inference_steps=1000, num_train_timesteps=1000)


def sd_config(cls) -> dict:
    """SD_SETTINGS restricted to what `cls` (a diffusers class or its drop-in) takes (unCLIP's
    one beta schedule is squaredcos_cap_v2: it keeps its own betas)."""
    known = inspect.signature(cls.__init__).parameters
    if cls.__name__ == "UnCLIPScheduler":
        known = [k for k in known if not k.startswith("beta_")]
    return {k: v for k, v in SD_SETTINGS.items() if k in known}


def loop_timesteps(sched, timesteps=None):
    timesteps = sched.timesteps if timesteps is None else timesteps
    return timesteps[:-1] if type(sched).__name__ == "DDPMWuerstchenScheduler" else timesteps


class Stepper:
    """`stepper(model_output, t, sample, **kwargs)` calls `sched.step` as its pipelines do."""

    def __init__(self, sched):
        self.sched, self.old, self.previous = sched, None, None

    def __call__(self, model_output, t, sample, **kwargs):
        name = type(self.sched).__name__
        if name == "DDPMWuerstchenScheduler":
            return self.sched.step(model_output, t.expand(sample.shape[0]), sample, **kwargs)
        if name == "CogVideoXDPMScheduler":
            x, self.old = self.sched.step(model_output, self.old, t, self.previous, sample,
                                          return_dict=False, **kwargs)
            self.previous = t
            return DDIMSchedulerOutput(prev_sample=x, pred_original_sample=self.old)
        if name == "UnCLIPScheduler":
            return self.sched.step(model_output, t, sample, prev_timestep=self._next(t), **kwargs)
        return self.sched.step(model_output, t, sample, **kwargs)

    def _next(self, t):
        """The schedule entry after `t` (a view, as `timesteps[i + 1]`), located by storage;
        None at the end or for a timestep that is no entry of it."""
        ts = self.sched.timesteps
        if not (hasattr(t, "storage_offset") and t.dim() == 0 and ts.stride(0) == 1
                and (t._base is ts or t._base is ts._base and ts._base is not None)):
            return None  # (an element of `ts` from iterating or indexing it is a view of it)
        i = t.storage_offset() - ts.storage_offset() + 1
        return ts[i] if 0 < i < len(ts) else None
