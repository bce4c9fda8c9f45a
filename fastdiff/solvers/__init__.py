"""Solvers as plan builders: every fixed-step reference solver compiles into a Plan (plan.py)
by tracing it on linear forms (trace.py)."""

import contextlib
import functools
import gc

from fastdiff.solvers.plan import Plan, PlanBuilder, Ref, Stage, compile_plan
from fastdiff.solvers.trace import Trace, trace_solver

__all__ = ["Plan", "PlanBuilder", "Ref", "Stage", "Trace", "build_plan", "compile_plan", "no_gc",
           "plans_for", "trace_solver"]

HISTORY_KINDS = ("D", "E")


def build_plan(solver: str, sigmas, noise_mode: str = "calls", history_kind: str = "D",
               **options) -> Plan:
    """The plan of `solver` on `sigmas` (1-D, descending) with the solver's keyword options,
    keeping history `history_kind` ("D" or "E"), for inspection; fastdiff.Sampler picks the
    history kind itself, after lowering against its model."""
    import torch

    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    with no_gc():
        trace = trace_solver(solver, sigmas, noise_mode=noise_mode, **options)
        return compile_plan(trace, options, history_kind)


@contextlib.contextmanager
def no_gc():
    """Tracing and lowering allocate O(steps) small objects and no reference cycles: the
    cyclic collector's passes over them would make a plan's build quadratic again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def plans_for(solver: str, sigmas, noise_mode: str = "calls", later: str = "E", **options
              ) -> tuple[tuple[float, ...], dict[str, PlanBuilder | RuntimeError]]:
    """The noise level of every model call, and the plan for each history kind as a
    PlanBuilder (compiled on demand: `.plan()`, or lowered stage by stage) or the RuntimeError
    saying why there is none, memoised: tracing and compiling cost O(steps) on the host
    (0.1-1 ms per step), and `fastdiff.sample` or a server builds the same settings again and
    again. Plans are shared between callers, so they must not be modified. `later`: the
    history kind the caller expects to lose, traced only as far as it is read (trace.py)."""
    import torch

    key = tuple(torch.as_tensor(sigmas, dtype=torch.float64).cpu().tolist())
    try:
        return _plans(solver, key, noise_mode, later, tuple(sorted(options.items())))
    except TypeError:  # an unhashable option value: build without the cache
        return _plans.__wrapped__(solver, key, noise_mode, later, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=64)
def _plans(solver: str, sigmas: tuple, noise_mode: str, later: str, options: tuple):
    import torch

    options = dict(options)
    with no_gc():
        trace = trace_solver(solver, torch.tensor(sigmas, dtype=torch.float64),
                             noise_mode=noise_mode, later=later, **options)
        plans: dict[str, PlanBuilder | RuntimeError] = {}
        for kind in HISTORY_KINDS:
            try:
                plans[kind] = PlanBuilder(trace, options, kind)
            except RuntimeError as e:
                plans[kind] = e
    return tuple(trace.sigmas), plans
