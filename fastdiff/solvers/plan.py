"""Plans: a solver as a short program of fused linear-combination stages.

A traced solver (trace.py) gives the model input of every call k as a sparse linear form over
registers that are still alive -- the last few model inputs F_m, the last few denoised outputs
D_j (or noise predictions E_j), the noise z_n -- because the tracer rewrites the solver's state
over the newest registers at every model call. So the stage after call k,

    F_{k+1} = sum_m a_m F_m  +  sum_j b_j D_j  +  sum_n g_n z_n,

is read off the trace: no fit, for every solver alike (one-step solvers, DDPM, multistep,
singlestep, predictor-corrector), and a plan costs O(steps) to build (issue 14). Each stage is
one call of the fused linear-combination kernel, after the model call. The only search is a
cheap one for sparsity: the stage may be re-expressed through an older F register by
substituting a newer F's own definition (an identity of the trace), which drops terms when
intermediate registers cancel (DPM-Solver-3's last sub-step reads F at the step's start, not
its midpoint); the expression with the fewest terms is kept, newest registers on ties. Every
rewrite is an exact identity, so a plan equals its reference solver up to floating-point
rounding; which registers a stage uses is what `print(plan)` shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from fastdiff.solvers.trace import F_WINDOW, H_WINDOW, TOL, Trace

__all__ = ["F_WINDOW", "H_WINDOW", "Plan", "Ref", "Stage", "compile_plan"]

class Ref(NamedTuple):
    """A register: "x" (the initial noise), "F" (model input of call k), "D" (denoised output of
    call k), "E" (F - D of call k: the noise prediction times sigma, the history of
    noise-prediction solvers), "U" (the unconditional denoised output of call k, read by CFG++
    solvers; Chung et al. 2024, arXiv:2406.08070) or "z" (noise symbol k, in creation order).
    (A named tuple:
    plans of 1000 steps hash Refs ~10^5 times while lowering.)"""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "x_T" if self.kind == "x" else f"{self.kind}[{self.index}]"


@dataclass
class Stage:
    """After model call `call` at noise level `sigma`: target = sum(coef * ref for ref, coef)."""

    call: int
    sigma: float
    target: str  # "F" (the next model input) or "out" (the final sample)
    terms: list[tuple[Ref, float]]


@dataclass
class Plan:
    solver: str
    options: dict
    prologue: list[tuple[Ref, float]]  # F[0] in terms of x_T and noise
    stages: list[Stage]
    noise: list  # trace.NoiseDraw per noise symbol
    noise_mode: str
    history_kind: str = "D"  # what a stage keeps for later ones: "D" or "E" (= F - D)
    history: set[int] = field(default_factory=set)  # calls whose history entry is read later
    stats: dict = field(default_factory=dict)  # the work that built it (trace_nonzeros, ...)
    # CFG++: calls whose unconditional output U is read later (a second history entry, "HU")
    uncond_history: set[int] = field(default_factory=set)

    @property
    def nfe(self) -> int:
        return len(self.stages)

    def __str__(self) -> str:
        def fmt(terms):
            return " + ".join(f"{c:.6g}*{r}" for r, c in terms) or "0"

        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        lines = [f"Plan {self.solver}({opts}): {self.nfe} model calls, "
                 f"{len(self.noise)} noise draws ({self.noise_mode}), history {self.history_kind}",
                 f"  F[0] = {fmt(self.prologue)}"]
        for s in self.stages:
            name = f"F[{s.call + 1}]" if s.target == "F" else "out "
            lines.append(f"  call {s.call:>3}: D[{s.call}] = model(F[{s.call}],"
                         f" sigma={s.sigma:.6g});  {name} = {fmt(s.terms)}")
        return "\n".join(lines)


def _drop(terms: dict) -> dict:
    """terms without the coefficients that cancelled (below TOL of the largest, plus one);
    the dict itself when none did (no copy: forms are never modified in place)."""
    if not terms:
        return {}
    cut = TOL * (max(map(abs, terms.values())) + 1.0)
    if min(map(abs, terms.values())) > cut:
        return terms
    return {i: c for i, c in terms.items() if abs(c) > cut}


def _substitute(terms: dict, i: int, definition: dict) -> dict:
    out = dict(terms)
    c = out.pop(i)
    get = out.get
    for j, v in definition.items():
        out[j] = get(j, 0.0) + c * v
    return _drop(out)


class _Compiler:
    """One history kind's stages from the trace's representation of that kind."""

    def __init__(self, trace: Trace, history_kind: str):
        self.trace, self.kind = trace, history_kind
        self.rep = 0 if history_kind == "D" else 1
        self.regs = trace.registers
        self.ref, self.order = _register_tables(trace)
        self.examined = 0  # terms looked at: the compiler's work, O(steps)

    def expression(self, target: dict, k: int):
        """The sparsest of the target and its rewrites through older F registers (see the
        module docstring), as [(Ref, coef)]; None if some register is not readable."""
        inputs = self.trace.inputs[self.rep]
        form = _drop(target)
        self.examined += len(form)
        if not self.readable(form, k):
            return None
        best = form
        # The newest F register of a readable form is the first of F_k, F_{k-1}, ... (within
        # the window) that it holds: register ids grow with the call, and a rewrite through
        # F_m leaves only older ones. A few dict lookups instead of a pass over the form.
        f_ids, m, oldest = self.trace.f_ids, k, max(k - F_WINDOW, -1)
        for _ in range(F_WINDOW - 1):
            while m > oldest and f_ids[m] not in form:
                m -= 1
            if m == oldest:
                break
            form = _substitute(form, f_ids[m], inputs[m])
            self.examined += len(form)
            # Older F registers only get older: once unreadable, no later rewrite is readable;
            # a rewrite that grew did not cancel, and the next one rarely makes up for it.
            if len(form) > len(best) or not self.readable(form, k):
                break
            if len(form) < len(best):
                best = form
        return self.refs(best, k)

    def readable(self, form: dict, k: int) -> bool:
        """readable() of every register of `form` at stage k (inlined: the compiler's loop)."""
        regs, hist = self.regs, self.kind
        for i in form:
            kind, m = regs[i]
            if kind == "F":
                if not k - F_WINDOW < m <= k:
                    return False
            elif kind == hist or kind == "U" or kind == "V":
                if not k - H_WINDOW <= m <= k:
                    return False
            elif kind == "x":
                if k >= F_WINDOW:
                    return False
            elif kind != "z":
                return False
        return True

    def refs(self, form: dict, k: int) -> list:
        """Register ids -> Refs; the current call's E_k is F_k - D_k (the kernel's inputs)."""
        trace = self.trace
        if self.kind == "E" and k >= 0 and trace.e_ids[k] in form:
            form = dict(form)
            c = form.pop(trace.e_ids[k])
            form[trace.f_ids[k]] = form.get(trace.f_ids[k], 0.0) + c
            form[trace.outputs[k]] = -c
            form = _drop(form)
        if k >= 0 and trace.v_ids and trace.v_ids[k] is not None and trace.v_ids[k] in form:
            form = dict(form)  # this call's V_k = F_k - U_k, as E_k above
            c = form.pop(trace.v_ids[k])
            form[trace.f_ids[k]] = form.get(trace.f_ids[k], 0.0) + c
            form[trace.u_ids[k]] = form.get(trace.u_ids[k], 0.0) - c
            form = _drop(form)
        ref = self.ref
        return [(ref[i], form[i]) for i in sorted(form, key=self.order.__getitem__)]


_ORDER = {"x": 0, "F": 1, "E": 2, "D": 3, "V": 4, "U": 5, "z": 6}
_RANK = 1 << 40  # above any register index (|index| < 2^39 keeps the kinds' ranks apart)


def _register_tables(trace: Trace) -> tuple[list, list]:
    """Per trace, shared by both history kinds' compilers: per register its Ref and its sort
    key in a stage (x, F newest first, E, D, V, U, z)."""
    tables = getattr(trace, "_register_tables", None)
    if tables is None or len(tables[0]) != len(trace.registers):
        refs = list(map(Ref._make, trace.registers))
        # one int per register (kind's rank, then index), not a tuple: refs() sorts every
        # stage by it, and ints compare without a tuple's element-wise comparison
        order = [_ORDER[kind] * _RANK + (-m if kind == "F" else m) for kind, m in trace.registers]
        tables = trace._register_tables = (refs, order)
    return tables


def compile_plan(trace: Trace, options: dict | None = None, history_kind: str = "D") -> Plan:
    """Turns a trace into stages (see the module docstring). The history kept for later
    stages is D (natural for data-prediction solvers) or E = F - D (noise-prediction ones);
    the Sampler compiles both and keeps the one whose widest launch reads fewer tensors."""
    return PlanBuilder(trace, options, history_kind).plan()


def _no_stage(solver: str, k: int) -> RuntimeError:
    return RuntimeError(f"{solver}: no exact stage after call {k} within the register windows"
                        f" (F: {F_WINDOW}, history: {H_WINDOW})")


class PlanBuilder:
    """A plan compiled on demand, stage by stage, and the same Plan once complete: the Sampler
    lowers a second history kind only until it proves no narrower than the first
    (lowering.lower's narrower_than), and compiling it that far is all it costs (issue 14).
    Plan-like for lowering: `stages` iterates the stages, each once the stages that may still
    read its history (H_WINDOW more) are compiled, so `history` is final for it."""

    def __init__(self, trace: Trace, options: dict | None = None, history_kind: str = "D"):
        if history_kind not in ("D", "E"):
            raise ValueError(f"history_kind must be 'D' or 'E', got {history_kind!r}")
        comp = _Compiler(trace, history_kind)
        dead = trace.dead[comp.rep]
        if dead is not None:
            raise _no_stage(trace.solver, dead)
        self.trace, self.comp, self._plan = trace, comp, None
        self.solver, self.options, self.history_kind = trace.solver, dict(options or {}), \
            history_kind
        # (inputs: a list the trace may extend, trace.ensure; final: read when reached)
        self.inputs, self.calls = trace.inputs[comp.rep], len(trace.f_ids)
        self.prologue = comp.expression(self.inputs[0] if self.calls else
                                        trace.final[comp.rep], -1)
        if self.prologue is None:
            raise RuntimeError(f"{trace.solver}: the first model input is not linear in x_T"
                               " and noise")
        self.compiled: list[Stage] = []
        self.history: set[int] = set()  # complete for the stages H_WINDOW before the newest
        self.uncond_history: set[int] = set()

    def _compile_to(self, n: int) -> None:
        """Compiles the stages before n."""
        comp, inputs, compiled, trace = self.comp, self.inputs, self.compiled, self.trace
        kind = self.history_kind
        if n + 1 > len(inputs) and len(compiled) < self.calls:
            trace.ensure(comp.rep, n + 1)  # "E" may have been traced for a prefix only
            if trace.dead[comp.rep] is not None:
                raise _no_stage(self.solver, trace.dead[comp.rep])
        for k in range(len(compiled), min(n, self.calls)):
            last = k == self.calls - 1
            terms = comp.expression(trace.final[comp.rep] if last else inputs[k + 1], k)
            if terms is None:
                raise _no_stage(self.solver, k)
            compiled.append(Stage(k, self.trace.sigmas[k], "out" if last else "F", terms))
            for (rk, m), _ in terms:
                if m != k:
                    if rk == kind:
                        self.history.add(m)
                    elif rk == "U" or rk == "V":
                        self.uncond_history.add(m)

    @property
    def stages(self):
        for k in range(self.calls):
            if k + H_WINDOW >= len(self.compiled):
                self._compile_to(k + H_WINDOW + 1)
            yield self.compiled[k]

    def plan(self) -> Plan:
        """The complete plan (compiles what is left)."""
        if self._plan is None:
            self._compile_to(self.calls)
            trace = self.trace
            stats = {"trace_nonzeros": trace.nonzeros, "compile_terms": self.comp.examined}
            self._plan = Plan(self.solver, self.options, self.prologue, self.compiled,
                              trace.noise, trace.noise_mode, self.history_kind, self.history,
                              stats, self.uncond_history)
        return self._plan
