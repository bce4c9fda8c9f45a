"""Steps whose diffusers coefficients are NaN/inf: fastdiff uses their limit (see limit_plan)."""

from __future__ import annotations

import warnings

import torch

from fastdiff.diffusers._trace import StepPlan, trace_step


def limit_plan(self, shared, before: dict, t, kwargs, plan) -> StepPlan:
    """A step whose diffusers coefficients are NaN/inf; fastdiff uses their limit:
    - the final step to sigma = 0 (UniPC solver_type="bh1": B(h) = h = inf): evaluated at
      sigma_next = 1e-12 (error ~1e-12);
    - a step of length h = 0 (final_sigmas_type="sigma_min" repeats the last sigma; the
      third-order DPM-Solver divides by h**2 when lower_order_final is off): the limit
      sigma_next -> sigma, Richardson-extrapolated from sigma_next = sigma * (1 - d) at
      d = 1e-4 and 5e-5 in float64 (error O(d**2))."""
    after = shared.snapshot()
    index = before.get("_step_index")
    sigmas = before.get("sigmas")
    limits = []
    if isinstance(sigmas, torch.Tensor) and index is not None and index + 1 < len(sigmas):
        for d in (1e-4, 5e-5):
            patched = sigmas.double().clone()
            if patched[index + 1] == 0:
                patched[index + 1] = 1e-12
            elif patched[index + 1] == patched[index]:
                patched[index + 1] = patched[index] * (1 - d)
            shared.restore({**before, "sigmas": patched})
            try:
                limits.append(trace_step(shared.twin, t, kwargs))
            except Exception:
                break
    shared.restore(after)
    if len(limits) == 2:
        pa, pb = limits
        if ([(ca.sources, ca.targets) for ca in pa.chunks]
                == [(cb.sources, cb.targets) for cb in pb.chunks]):
            for ca, cb in zip(pa.chunks, pb.chunks):
                cb.coef = 2 * cb.coef - ca.coef  # exact for a zero sigma (no d there)
        if all(c.coef.isfinite().all() for c in pb.chunks):
            pb.consts = plan.consts  # the state after the step is the unpatched one's
            pb.moves, pb.list_lengths, pb.deleted = plan.moves, plan.list_lengths, \
                plan.deleted
            return pb
    warnings.warn(f"fastdiff.diffusers.{type(self).__name__}: diffusers' step is NaN/inf"
                  f" at step index {index} for this configuration", stacklevel=5)
    return plan
