"""The second representation ("E") left for later (trace.py, JOINT_CALLS): a trace built that
way, with "E" traced on when a plan reads past the prefix, is the trace of both together --
the same forms, eliminations, failures and plans of both history kinds -- for every solver,
and also when the prefix is so short that the pruning between the two (a representation
dominated by the other, a failure after the other was dropped) happens after it."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.reference.solvers import SOLVERS
from fastdiff.solvers import compile_plan, plans_for, trace_solver
from fastdiff.solvers import trace as trace_mod
from fastdiff.spacings import get_sigmas_karras

CASES = [(n, "calls") for n in SOLVERS if n != "dpm_adaptive"] + [("dpmpp_sde", "brownian"),
                                                                  ("dpmpp_sde_flow", "brownian")]


def _sigmas(name: str, steps: int) -> torch.Tensor:
    if SOLVERS[name].param == "flow":
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return get_sigmas_karras(steps, 0.03, 14.6, dtype=torch.float64)


def _plan(trace, kind):
    try:
        plan = compile_plan(trace, {}, kind)
    except RuntimeError as e:
        return "no plan: " + str(e)
    return (plan.prologue, [(s.call, s.sigma, s.target, s.terms) for s in plan.stages],
            plan.history, plan.uncond_history)


def _everything(trace):
    """Both kinds' plans (D first, as the Sampler builds them) and what they are built from."""
    plans = _plan(trace, "D"), _plan(trace, "E")
    for r in (0, 1):
        trace.ensure(r, len(trace.f_ids) + 1)
    kept = [(trace.inputs[r], trace.pivots[r], trace.final[r]) if trace.dead[r] is None
            else None for r in (0, 1)]
    return (trace.registers, trace.sigmas, trace.dead, kept, plans)


@pytest.mark.parametrize("name,noise_mode", CASES)
def test_a_trace_with_one_representation_left_for_later_is_the_joint_trace(monkeypatch, name,
                                                                            noise_mode):
    s = _sigmas(name, 12)  # 12-36 model calls: past every prefix below
    monkeypatch.setattr(trace_mod, "JOINT_CALLS", 10**9)
    joint = _everything(trace_solver(name, s, noise_mode=noise_mode))
    for later in ("E", "D"):
        for prefix in (1, 3, 6, 24):  # before, around and after the calls where pruning happens
            monkeypatch.setattr(trace_mod, "JOINT_CALLS", prefix)
            lazy = trace_solver(name, s, noise_mode=noise_mode, later=later)
            assert _everything(lazy) == joint, f"later={later}, JOINT_CALLS = {prefix}"


def test_a_data_prediction_plan_never_traces_the_rest_of_E(monkeypatch):
    """seeds_3 at 1000 steps (2998 calls: one at the last step, to sigma 0) with a denoiser:
    the Sampler keeps history D and rejects E within its first stages, so E is traced for
    JOINT_CALLS calls only."""
    import fastdiff.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "_KEPT", {})
    s = _sigmas("seeds_3", 1000)
    sampler = fastdiff.Sampler(lambda x, sigma, **kw: x, "seeds_3", s)
    assert sampler.plan.history_kind == "D"
    trace = plans_for("seeds_3", s)[1]["E"].trace  # the memoised trace the Sampler used
    assert len(trace.f_ids) == 3 * 999 + 1 and len(trace.inputs[0]) == 3 * 999 + 1
    assert trace.resume is not None and len(trace.inputs[1]) == trace_mod.JOINT_CALLS


def test_a_noise_prediction_plan_is_traced_in_full_first_the_next_time(monkeypatch):
    """dpm_2 with an epsilon network keeps history E (E_k = sigma * eps reads the network
    output alone): the first Sampler traces the rest of E when it proves narrower; the next
    one (another schedule) traces E in full first and D for JOINT_CALLS calls only."""
    import fastdiff.sampler as sampler_mod
    from fastdiff.denoisers import Denoiser

    monkeypatch.setattr(sampler_mod, "_KEPT", {})
    model = Denoiser(lambda x, t, **kw: x, "epsilon")
    first, second = _sigmas("dpm_2", 40), get_sigmas_karras(40, 0.1, 10.0, dtype=torch.float64)
    assert fastdiff.Sampler(model, "dpm_2", first).plan.history_kind == "E"
    trace = plans_for("dpm_2", first)[1]["E"].trace
    assert trace.resume is None and len(trace.inputs[1]) == len(trace.f_ids) == 2 * 39 + 1
    assert fastdiff.Sampler(model, "dpm_2", second).plan.history_kind == "E"
    trace = plans_for("dpm_2", second, later="D")[1]["E"].trace
    assert trace.resume is not None and len(trace.inputs[0]) == trace_mod.JOINT_CALLS
    assert len(trace.inputs[1]) == len(trace.f_ids)

class _Always(dict):
    """A _KEPT that says the same history kind was kept before, for every solver."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def get(self, key, default=None):
        return self.kind


def _built(model, name, s, **kwargs):
    from fastdiff.solvers import _plans

    _plans.cache_clear()
    sampler = fastdiff.Sampler(model, name, s, **kwargs)
    return (sampler.plan.history_kind, sampler.plan.prologue,
            [(st.call, st.terms) for st in sampler.plan.stages], sampler.launches,
            {k: t.tolist() for k, t in sampler._tables64.items()})


@pytest.mark.parametrize("name", [n for n in SOLVERS if n != "dpm_adaptive"])
def test_the_kept_history_kind_does_not_depend_on_which_is_lowered_first(monkeypatch, name):
    """The Sampler lowers the kind kept last time for this solver and model side in full
    first and the other until it proves no narrower; D is kept on a tie either way."""
    import fastdiff.sampler as sampler_mod
    from fastdiff.denoisers import Denoiser

    s = _sigmas(name, 12)
    eps = Denoiser(lambda x, t, **kw: x, "flow" if SOLVERS[name].param == "flow" else "epsilon")
    for model, kwargs in ((lambda x, sigma, **kw: x, {}), (eps, {}), (eps, {"guidance": 3.0})):
        monkeypatch.setattr(sampler_mod, "_KEPT", _Always("D"))
        want = _built(model, name, s, **kwargs)
        monkeypatch.setattr(sampler_mod, "_KEPT", _Always("E"))
        assert _built(model, name, s, **kwargs) == want
