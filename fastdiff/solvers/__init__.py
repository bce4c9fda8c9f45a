"""Solvers as plan builders: every fixed-step reference solver compiles into a Plan (plan.py)
by tracing it on linear forms (trace.py)."""

from fastdiff.solvers.plan import Plan, Ref, Stage, compile_plan
from fastdiff.solvers.trace import Trace, trace_solver

__all__ = ["Plan", "Ref", "Stage", "Trace", "build_plan", "compile_plan", "trace_solver"]


def build_plan(solver: str, sigmas, noise_mode: str = "calls", history_kind: str = "D",
               **options) -> Plan:
    """The plan of `solver` on `sigmas` (1-D, descending) with the solver's keyword options,
    keeping history `history_kind` ("D" or "E"), for inspection; fastdiff.Sampler picks the
    history kind itself, after lowering against its model."""
    import torch

    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    trace = trace_solver(solver, sigmas, noise_mode=noise_mode, **options)
    return compile_plan(trace, options, history_kind)
