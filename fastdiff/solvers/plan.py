"""Plans: a solver as a short program of fused linear-combination stages.

A traced solver (trace.py) gives the model input of every call k as a linear form F_k, and the
final sample as a form, over [x_T, D_1, z_1, ...]. Executing the forms directly would need every
past D. Instead, for each call k we find the *sparsest exact* expression of the next model input
(or of the final sample) in terms of registers that are still alive:

    F_{k+1} = sum_m a_m F_m  +  sum_j b_j D_j  +  sum_n g_n z_n

over the last few model inputs F_m, the last few denoised outputs D_j and the noise. Each such
stage is one call of the fused linear-combination kernel, after the model call. The search is
exact (least squares whose residual must vanish), so a plan equals its reference solver up to
floating-point rounding; which registers a stage uses is what `print(plan)` shows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from fastdiff.solvers.trace import Trace

F_WINDOW = 4  # previous model inputs a stage may read
H_WINDOW = 12  # previous history entries a stage may read
_TOL = 1e-10

@dataclass(frozen=True)
class Ref:
    """A register: "x" (the initial noise), "F" (model input of call k), "D" (denoised output of
    call k), "E" (F - D of call k: the noise prediction times sigma, the history of
    noise-prediction solvers) or "z" (noise symbol k, in creation order)."""

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


def _fit(target, dense, units):
    """Exact target = sum a_m dense_m + sum b_i e_i (i in units) or None; terms with c != 0.
    (numpy float64: a plan costs ~1,000 of these small fits, where torch's per-op overhead
    dominates.)"""
    unit_index = sorted(units)
    free = np.ones(target.size, dtype=bool)
    free[unit_index] = False
    scale = float(np.abs(target).max()) + 1.0
    if dense:
        m = np.stack([v for _, v in dense], axis=1)  # [dim, n]
        a = np.linalg.lstsq(m[free], target[free], rcond=None)[0]
        residual = target - m @ a
    else:
        a, residual = np.zeros(0), target
    if np.abs(residual[free]).max() > _TOL * scale:
        return None
    terms = [(r, c) for (r, _), c in zip(dense, a.tolist()) if abs(c) > _TOL * scale]
    return terms + [(units[i], c) for i, c in zip(unit_index, residual[unit_index].tolist())
                    if abs(c) > _TOL * scale]


def _solve(target, dense, history, units):
    """Sparsest exact expression: every subset of the `dense` registers (few), the `history`
    registers pruned greedily (many, cheap to try), `units` read off the residual."""
    best = None
    for size in range(len(dense) + 1):
        for subset in itertools.combinations(dense, size):
            keep = list(history)
            terms = _fit(target, list(subset) + keep, units)
            if terms is None:
                continue
            while True:  # drop unused history entries, then try dropping the weakest one
                used = {r for r, _ in terms}
                keep = [h for h in keep if h[0] in used]
                if not keep:
                    break
                weakest = min(keep, key=lambda h: abs(dict(terms)[h[0]]))
                trial = _fit(target, list(subset) + [h for h in keep if h is not weakest], units)
                if trial is None:
                    break
                terms, keep = trial, [h for h in keep if h is not weakest]
            if best is None or len(terms) < len(best):
                best = terms
        if best is not None:
            return best  # the smallest dense subset that is exact
    return None


def compile_plan(trace: Trace, options: dict | None = None, history_kind: str = "D") -> Plan:
    """Turns a trace into stages (see the module docstring). The history kept for later
    stages is D (natural for data-prediction solvers) or E = F - D (noise-prediction ones);
    the Sampler compiles both and keeps the one whose widest launch reads fewer tensors."""
    if history_kind not in ("D", "E"):
        raise ValueError(f"history_kind must be 'D' or 'E', got {history_kind!r}")
    inputs = [f[0].numpy() for f in trace.inputs]
    final = trace.final[0].numpy()
    noise_index = {d.index: Ref("z", n) for n, d in enumerate(trace.noise)}
    x_t = np.zeros(trace.dim)
    x_t[0] = 1.0

    def unit(i: int) -> np.ndarray:
        e = np.zeros(trace.dim)
        e[i] = 1.0
        return e

    def registers(k: int):
        """(history, units) readable after call k."""
        first = max(0, k - H_WINDOW)
        if history_kind == "D":  # past D's are unit vectors: read off the residual
            units = {trace.outputs[j]: Ref("D", j) for j in range(first, k + 1)}
            history = []
        else:
            units = {trace.outputs[k]: Ref("D", k)} if k >= 0 else {}
            history = [(Ref("E", j), inputs[j] - unit(trace.outputs[j])) for j in range(first, k)]
        limit = trace.outputs[k + 1] if k + 1 < len(trace.outputs) else trace.dim
        units.update({i: r for i, r in noise_index.items() if i < limit})
        return history, units

    history, units = registers(-1)
    prologue = _solve(inputs[0] if inputs else final, [(Ref("x"), x_t)], [], units)
    if prologue is None:
        raise RuntimeError(f"{trace.solver}: the first model input is not linear in x_T and noise")
    stages = []
    for k in range(len(inputs)):
        last = k == len(inputs) - 1
        target = final if last else inputs[k + 1]
        dense = [(Ref("F", m), inputs[m]) for m in range(k, max(-1, k - F_WINDOW), -1)]
        if k < F_WINDOW:
            dense.append((Ref("x"), x_t))
        history, units = registers(k)
        terms = _solve(target, dense, history, units)
        if terms is None:
            raise RuntimeError(f"{trace.solver}: no exact stage after call {k} within the register"
                               f" windows (F: {F_WINDOW}, history: {H_WINDOW})")
        stages.append(Stage(k, trace.sigmas[k], "out" if last else "F", terms))
    history_calls = {r.index for s in stages for r, _ in s.terms
                     if r.kind == history_kind and r.index != s.call}
    return Plan(trace.solver, dict(options or {}), prologue, stages, trace.noise,
                trace.noise_mode, history_kind, history_calls)
