"""Steps whose StepPlan is read straight from the schedule instead of traced (_trace.py).

Tracing runs diffusers' step on symbols plus ~60 us of bookkeeping around it. For diffusers'
cheapest step, FlowMatchEulerDiscreteScheduler's (one Euler step of the flow ODE, Lipman et al.
2023, arXiv:2210.02747: prev = sample + (sigma_next - sigma) * model_output, ~20 us warm),
that alone made fastdiff's first call at 10 steps cost more than diffusers' whole loop (issue
15 item 6). Its plan is a function of the step index and `sigmas` only, so it is written here
with the arithmetic diffusers does (float32 scalar ops on the float32 schedule, the products
with the float64 symbols in float64), giving the plan tracing would give bit for bit: the
chunk, the step-index update, the output class. tests/test_diffusers_direct.py checks that
against trace_step itself, for every step of many schedules and both sampling modes.

Whatever is not the plain case returns None and is traced as before (then diffusers' own step
raises what it raises): step options, an integer timestep (diffusers rejects it), an unset or
out-of-range step index, a coefficient that is zero or not finite (tracing's lowering turns
those into moves, dropped columns or limits), or an unknown diffusers output class.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from fastdiff.diffusers._trace import Chunk, StepPlan, _field_names

# What diffusers' step reads of the scheduler (its `reads` in tracing's terms; a plan holds for
# every state agreeing on these): a superset of the traced set is always safe.
_FLOW_READS = frozenset({"_step_index", "step_index", "sigmas", "config", "_internal_dict",
                         "step"})


def flow_match_euler(twin, timestep, kwargs: dict) -> StepPlan | None:
    """FlowMatchEulerDiscreteScheduler.step's plan from `twin`'s state (the shared twin, in the
    caller's state), advancing the twin as the step would; None: trace it instead."""
    if any(k != "generator" or v is not None for k, v in kwargs.items()) or not (
            type(timestep) is float or (isinstance(timestep, torch.Tensor)
                                       and timestep.is_floating_point())):
        return None
    attrs = twin.__dict__
    index, sigmas = attrs.get("_step_index"), attrs.get("sigmas")
    if (type(index) is not int or not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1
            or sigmas.dtype != torch.float32 or not 0 <= index < len(sigmas) - 1):
        return None
    out_cls = getattr(sys.modules[type(twin).step.__module__],
                      "FlowMatchEulerDiscreteSchedulerOutput", None)
    if out_cls is None:
        return None
    # diffusers' 0-dim float32 tensor ops as numpy float32 scalars: both round the exact result
    # of each operation to float32 (a few us less than indexing the tensor)
    sigma, sigma_next = map(np.float32, sigmas[index:index + 2].tolist())
    if twin.config.stochastic_sampling:
        # x0 = sample - sigma * model_output; prev = (1 - sigma_next) * x0 + sigma_next * noise
        keep = float(np.float32(1.0) - sigma_next)
        coefs = [keep, keep * -float(sigma), float(sigma_next)]
        sources = [("sample",), ("model_output",), ("noise", 0)]
        noise_f32 = [True]  # randn_tensor(dtype=sample.dtype): the float32 up-cast sample's
    else:
        coefs = [1.0, float(sigma_next - sigma)]
        sources = [("sample",), ("model_output",)]
        noise_f32 = []
    if not all(c != 0 and math.isfinite(c) for c in coefs):
        return None
    plan = StepPlan()
    plan.chunks.append(Chunk(sources, [("field", "prev_sample")],
                             torch.tensor([[coefs]], dtype=torch.float64)))
    plan.consts.append((("slot", "_step_index", None), index + 1))
    plan.noise_f32 = noise_f32
    plan.out_cls, plan.out_fields = out_cls, list(_field_names(out_cls))
    plan.reads = _FLOW_READS
    attrs["_step_index"] = index + 1  # the twin after the step, as tracing leaves it
    return plan
