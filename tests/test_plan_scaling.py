"""Plans are built in time linear in the step count (issue 14), measured without a clock: the
terms the tracer stores (its forms and eliminations) and the terms the compiler examines grow
like the number of steps, for every solver with a plan. Quadratic work -- dense forms over all
~6n symbols, fits over all of them -- would make the 1000-step count ~100x the 100-step one."""

from __future__ import annotations

import pytest
import torch

from fastdiff.reference.solvers import SOLVERS, SolverInfo
from fastdiff.solvers import build_plan, compile_plan, trace_solver
from fastdiff.solvers.trace import Untraceable
from fastdiff.spacings import get_sigmas_karras

FIXED_STEP = list(SOLVERS)  # every entry (dpm_adaptive, data-dependent steps, has none)
CASES = [(n, "calls") for n in FIXED_STEP] + [("dpmpp_sde", "brownian")]


def sigmas(name: str, steps: int) -> torch.Tensor:
    if SOLVERS[name].param == "flow":
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return get_sigmas_karras(steps, 0.03, 14.6, dtype=torch.float64)


def work(name: str, steps: int, noise_mode: str) -> tuple[int, int]:
    """(terms stored by the trace, terms examined by the compiler over both history kinds)."""
    trace = trace_solver(name, sigmas(name, steps), noise_mode=noise_mode)
    examined, plans = 0, 0
    for kind in ("D", "E"):
        try:
            plan = compile_plan(trace, {}, kind)
        except RuntimeError:  # no plan of this kind (the other one exists: checked below)
            continue
        plans += 1
        examined += plan.stats["compile_terms"]
        assert plan.stats["trace_nonzeros"] == trace.nonzeros
    assert plans >= 1, f"{name}: no plan at {steps} steps"
    return trace.nonzeros, examined


@pytest.mark.parametrize("name,noise_mode", CASES)
def test_plan_work_grows_linearly_with_the_steps(name, noise_mode):
    small, large = work(name, 100, noise_mode), work(name, 1000, noise_mode)
    assert small[0] > 100 and small[1] > 100  # the counts do count the work
    assert large[0] <= 12 * small[0], f"trace: {small[0]} terms at 100 steps, {large[0]} at 1000"
    assert large[1] <= 12 * small[1], f"compile: {small[1]} at 100 steps, {large[1]} at 1000"


def test_a_stage_is_the_traced_model_input():
    """Euler's stage is read off the trace: F[k+1] = (sigma_{k+1}/sigma_k) F[k]
    + (1 - sigma_{k+1}/sigma_k) D[k], the k-diffusion update x + (x - D)/sigma * dt."""
    s = sigmas("euler", 30)
    plan = build_plan("euler", s)
    for stage in plan.stages[:-1]:
        k = stage.call
        ratio = float(s[k + 1] / s[k])
        terms = {str(r): c for r, c in stage.terms}
        assert terms.keys() == {f"F[{k}]", f"D[{k}]"}
        assert abs(terms[f"F[{k}]"] - ratio) < 1e-14 and abs(terms[f"D[{k}]"] - (1 - ratio)) < 1e-14
    assert [(str(r), c) for r, c in plan.stages[-1].terms] == [(f"D[{len(s) - 2}]", 1.0)]


def _nonlinear(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return model(x, sigmas[0]).abs()


def _constant(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return model(x, sigmas[0]) + torch.ones(x.shape)


def _direct_randn(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return model(x, sigmas[0]) + torch.randn(x.shape) * 0.5


def _builtin_abs(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return abs(model(x, sigmas[0]))


def _compared(model, x, sigmas, extra_args=None, callback=None, disable=None):
    d = model(x, sigmas[0])
    return d if d > 0 else x


def _truth(model, x, sigmas, extra_args=None, callback=None, disable=None):
    d = model(x, sigmas[0])
    return d if d else x


# Forms are tensor-like objects, not tensors (forms.py): operators Python would otherwise
# answer itself (truth, comparisons, abs) must still reach the tracer and be refused.
@pytest.mark.parametrize("fn,match", [(_nonlinear, "cannot apply abs"),
                                      (_builtin_abs, "cannot apply abs"),
                                      (_compared, "cannot apply __gt__"),
                                      (_truth, "cannot apply __bool__"),
                                      (_constant, "constant offset"),
                                      (_direct_randn, "direct torch.randn")])
def test_a_non_linear_reference_is_a_clear_error(monkeypatch, fn, match):
    monkeypatch.setitem(SOLVERS, "bad", SolverInfo(fn, 1, 1, False, "test"))
    with pytest.raises(Untraceable, match=match):
        trace_solver("bad", sigmas("euler", 4))


def _torch_style(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A solver written with torch calls instead of operators (ComfyUI's style)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x.float(), sigmas[i] * s_in)
        d = torch.sub(x, denoised).div(sigmas[i])
        x = torch.add(x, d, alpha=float(sigmas[i + 1] - sigmas[i]))
        x = torch.lerp(x.clone(), denoised, 0.0) + torch.zeros_like(x)
    return x


def test_torch_calls_trace_like_operators(monkeypatch):
    monkeypatch.setitem(SOLVERS, "torch_style", SolverInfo(_torch_style, 1, 1, False, "test"))
    s = sigmas("euler", 12)
    want, got = build_plan("euler", s), build_plan("torch_style", s)
    assert [[str(r) for r, _ in st.terms] for st in got.stages[:-1]] == \
        [[str(r) for r, _ in st.terms] for st in want.stages[:-1]]
    for a, b in zip(got.stages[:-1], want.stages[:-1], strict=True):
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.terms, b.terms, strict=True)) < 1e-14
