"""Tracing a reference solver into exact linear forms, in time linear in the step count.

Every fixed-step solver is linear in its free quantities: the initial state x_T, the model's
outputs D_1, D_2, ... and the noise draws z_1, z_2, ... (DESIGN.md: "a diffusion solver step is
a linear combination"). So running the *reference* solver on symbolic linear forms instead of
images -- a fake model that returns a fresh symbol per call, fake noise that does the same --
yields every model input and the final output as an exact linear form, in float64. The plan
compiler (plan.py) turns the forms into per-stage kernel coefficients, so a plan agrees with
its reference by construction.

Forms (forms.py) are sparse over *registers*: x_T, F_k (the model input of call k), D_k (its
output) and the noise symbols. At every model call the tracer adds the register F_k with its
definition F_k = v_k (the form it was called on) and uses that identity to eliminate the oldest
state register of v_k (F_{k-1}, say) from every form that still holds it -- one step of Gaussian
elimination, done lazily when a form is next read. A solver's state (x, UniPC's corrected x,
LMS's derivatives) is thereby always written over the newest few F registers plus recent D's
and noise, so a form holds O(window) terms whatever the step count and the whole trace costs
O(steps) (issue 14; before, forms were dense vectors over all 6n symbols). The form a model is
called on *is* the stage that produces it: the plan compiler reads it off, no fit needed.

A CFG++ solver also reads U_k, the unconditional denoised output of call k
(`_utils.denoise_with_uncond`): one more free register per call, read in-kernel from the first
guidance half at its own stage and from a history tensor of its own later (U, or in the "E"
representation V = F - U, as D and E).

Each form is kept in two representations at once, one per history kind of the plan (plan.py):
"D", where a model output is the symbol D_k, and "E", where it is F_k - E_k with E_k the
(scaled) noise prediction, so that noise-prediction solvers' histories (x - D) / sigma come out
as single E symbols. The two never mix: each is the same trace alone. So when both are still
kept after JOINT_CALLS calls (a representation that loses is dropped within the first few), one
is left for later (`later`: the history kind the Sampler expects to lose, "E" unless told) and
the other traced on alone: the Sampler lowers its second history kind only until it proves no
narrower, usually within a step, and `Trace.ensure` traces the rest of the one left (the
reference run again, that one alone) only when a plan reads past the prefix. The result is
the joint trace's, whichever way it is built: the pruning below sees the same widths (those of
the one traced on, recorded on the first run).

Noise is traced two ways:
  - "calls": one symbol per noise draw of the reference (its values come from a noise_sampler
    or generator at run time: exact agreement with k-diffusion for the same noise);
  - "brownian": draws of a Brownian noise sampler (dpmpp_sde's overlapping intervals) are
    expressed through independent unit normals by the Brownian bridge, so counter-based
    in-kernel noise reproduces the right correlations.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastdiff.reference.solvers import SOLVERS
from fastdiff.solvers.forms import (
    _F64,
    SHAPE,
    Form,
    Untraceable,
    _combine,
    _form,
    _fresh,
    _tensor_form,
    _what,
)

__all__ = ["F_WINDOW", "H_WINDOW", "SHAPE", "TOL", "Form", "NoiseDraw", "Trace", "Untraceable",
           "readable", "trace_solver"]

F_WINDOW = 4  # previous model inputs a stage may read
H_WINDOW = 12  # previous history entries (D or E) a stage may read
TOL = 1e-10  # relative size of a coefficient left by cancellation, dropped by the compiler
# A stage over more registers (noise aside) than this can never be one fused launch: the kernel
# reads lowering.MAX_INPUTS = 6 tensors, and the compiler's rewrites cancel at most a term or
# so. Tracing stops keeping a representation whose forms grow wider (its plan would not lower).
MAX_TERMS = 7
DOMINATED = 1
_DROP = 1e-13  # relative size below which an elimination's round-off residue is dropped
_PIVOT = 1e-3  # a pivot's coefficient is at least this fraction of the largest state one
REPS = ("D", "E")
# Model calls traced in both representations before one is left for later (module docstring):
# a representation that loses to the other is dropped by the 12th call in every solver here.
JOINT_CALLS = 24


@dataclass
class NoiseDraw:
    """One noise symbol: its register, and the arguments of the reference's draw."""

    index: int
    args: tuple = ()  # (sigma, sigma_next) given to noise_sampler, () for torch.randn_like


@dataclass
class Trace:
    """The solver as sparse linear forms over registers (ids in creation order; `registers`
    names each: ("x", 0), ("F", k), ("D", k), ("E", k) or ("z", n)). Per representation r
    (REPS): `inputs[r][k]` is the definition of F_k, `pivots[r][k]` the register that call k
    eliminated and its expression (None if none), `final[r]` the returned sample."""

    solver: str
    registers: list[tuple[str, int]] = field(default_factory=list)
    inputs: tuple[list[dict], list[dict]] = ((), ())
    pivots: tuple[list, list] = ((), ())
    sigmas: list[float] = field(default_factory=list)  # noise level given to the model per call
    f_ids: list[int] = field(default_factory=list)  # register of F_k per call
    outputs: list[int] = field(default_factory=list)  # register of D_k per call
    e_ids: list[int] = field(default_factory=list)  # register of E_k per call
    # register of U_k, the unconditional denoised output CFG++ reads, per call (None: not read)
    u_ids: list[int | None] = field(default_factory=list)
    v_ids: list[int | None] = field(default_factory=list)  # register of V_k = F_k - U_k
    noise: list[NoiseDraw] = field(default_factory=list)
    final: tuple[dict, dict] | None = None
    noise_mode: str = "calls"
    dead: list = field(default_factory=lambda: [None, None])  # per rep: first unreadable stage
    # the representation left for later (module docstring) and what traces the rest of it
    later: int | None = None
    resume: Callable[[Trace], None] | None = field(default=None, repr=False, compare=False)

    @property
    def nonzeros(self) -> int:
        """Terms stored over all forms and eliminations: the trace's work, O(steps)."""
        count = sum(len(f) for r in range(2) for f in self.inputs[r])
        count += sum(len(p[1]) for r in range(2) for p in self.pivots[r] if p is not None)
        return count + sum(len(f) for f in (self.final or ()))

    def ensure(self, r: int, n: int) -> None:
        """Representation r traced through the definitions of its first n model inputs (and
        the final sample if n exceeds the calls): the rest of it if it was left for later."""
        if r == self.later and self.resume is not None and n > len(self.inputs[r]):
            self.resume(self)


def readable(kind: str, m: int, k: int, history: str) -> bool:
    """Whether register (kind, m) can be read by the stage after call k (k = -1: before the
    first call) of a plan keeping history `history`."""
    if kind == "z":
        return True
    if kind == "x":
        return k < F_WINDOW
    if kind == "F":
        return k - F_WINDOW < m <= k
    if kind in ("U", "V"):  # CFG++'s U_k (or V_k = F_k - U_k): history of their own
        return k - H_WINDOW <= m <= k
    return kind == history and k - H_WINDOW <= m <= k

class _Retrace(Exception):
    """The representation kept failed after the other was dropped: trace again unpruned."""


class _Rejoin(Exception):
    """The representation traced on failed with the other left behind: trace both together
    after all (the pruning would have needed the other's widths)."""


class _Tracer:
    """Registers, the Gaussian elimination at model calls, and the noise symbols."""

    def __init__(self, trace: Trace, prune: bool = True, suspend_at: int | None = None,
                 later: int = 1, shadow: tuple[int, list] | None = None):
        self.trace = trace
        self.epoch = 0  # eliminations so far; a form records the epoch it is reduced to
        self.pivots: tuple[dict, dict] = ({}, {})  # eliminated register -> its expression
        self.alive = [True, True]  # per representation: can it still give a plan?
        self.prune = prune  # drop a representation dominated by the other (see settle)
        self.dominated = [False, False]
        self.widest = [0, 0]  # per representation: its widest form so far
        # the call at which representation `later` is left for later if both are still kept
        # (None: never), and per settle the width of the other's form (None: not kept)
        self.suspend_at, self.later, self.suspended = suspend_at, later, False
        self.widths: list = []
        # tracing one representation alone after a first run: (the other, its widths per
        # settle then), for the pruning between them
        self.shadow = shadow
        if shadow is not None:
            self.alive[shadow[0]] = False
        trace.inputs, trace.pivots = ([], []), ([], [])

    def register(self, kind: str, index: int) -> int:
        self.trace.registers.append((kind, index))
        return len(self.trace.registers) - 1

    def symbol(self, kind: str, index: int) -> Form:
        i = self.register(kind, index)
        return _form(self, self.pair({i: 1.0}, {i: 1.0}), self.epoch)

    def initial(self) -> Form:
        """x_T, as a tensor (the reference checks it is one)."""
        return _tensor_form(self, self.symbol("x", 0).t, self.epoch)

    def pair(self, d: dict, e: dict) -> list:
        return [d if self.alive[0] else {}, e if self.alive[1] else {}]

    def draw(self, args: tuple) -> Form:
        n = len(self.trace.noise)
        z = self.symbol("z", n)
        self.trace.noise.append(NoiseDraw(len(self.trace.registers) - 1, args))
        return z

    def noise_form(self, terms: dict) -> Form:
        return _form(self, self.pair(dict(terms), dict(terms)), self.epoch)

    def reduce(self, f: Form) -> None:
        """Substitutes every eliminated register (lazily, when a form is read)."""
        t, alive = f.t, self.alive
        f.t = [self.reduced(t[0], 0) if alive[0] else {}, self.reduced(t[1], 1) if alive[1] else {}]
        f.epoch = self.epoch

    def settle(self, forms: list, k: int) -> list:
        """Checks that the stage after call k can read `forms` (one per representation). A
        representation whose form cannot be read, or is too wide for one launch, can give no
        plan of its history kind and is no longer traced; so is one whose form is wider than
        every form of the other so far by DOMINATED terms (the Sampler keeps the narrower plan)
        -- unless the other then fails, which restarts the trace without that shortcut.
        Returns per representation the form's state terms (x_T, F: what a model call on it
        eliminates one of), None for one no longer traced."""
        regs, widths, states = self.trace.registers, [None, None], [None, None]
        alive = self.alive
        for r in (0, 1):
            if not alive[r]:
                continue
            v, hist = forms[r], REPS[r]
            cut = TOL * (max(map(abs, v.values()), default=0.0) + 1.0)
            width, ok, state = 0, True, []
            for i, c in v.items():  # readable() and the width, inlined (once per model call)
                kind, m = regs[i]
                if kind == "F" or kind == "x":
                    state.append((i, c))
                if -cut <= c <= cut or kind == "z":
                    continue
                width += 1
                if kind == "F":
                    ok = k - F_WINDOW < m <= k
                elif kind == hist or kind == "U" or kind == "V":
                    ok = k - H_WINDOW <= m <= k
                else:
                    ok = kind == "x" and k < F_WINDOW
                if not ok:
                    break
            if ok and width <= MAX_TERMS:
                widths[r], states[r] = width, state
                continue
            alive[r] = False
            self.trace.dead[r] = k
            if self.dominated[1 - r]:
                raise _Retrace
            if self.suspended:
                raise _Rejoin
        self.widths.append(widths[1 - self.later])
        shadow = self.shadow
        if shadow is not None and not self.dominated[shadow[0]]:  # the other as it was
            widths[shadow[0]] = shadow[1][k + 1]
        w0, w1 = widths
        if self.prune and w0 is not None and w1 is not None:
            widest = self.widest
            if w0 > widest[0]:
                widest[0] = w0
            if w1 > widest[1]:
                widest[1] = w1
            for r, w in ((0, w0), (1, w1)):
                if w > widest[1 - r] + DOMINATED:
                    alive[r], self.dominated[r] = False, True
                    self.trace.dead[r] = k
                    states[r] = None
                    break
        return states

    def reduced(self, terms: dict, r: int) -> dict:
        pivots = self.pivots[r]
        hit = [*filter(pivots.__contains__, terms)]
        if not hit:
            return terms
        out = dict(terms)
        get = out.get
        while hit:
            for k in hit:
                c = out.pop(k)
                for j, v in pivots[k].items():
                    out[j] = get(j, 0.0) + c * v
            hit = [*filter(pivots.__contains__, out)]
        cut = _DROP * max(map(abs, out.values()), default=0.0)
        return {k: v for k, v in out.items() if abs(v) > cut}

    def call(self, x: Form) -> Form:
        """Model call k on x: F_k := x, eliminate x's oldest state register, return D_k."""
        trace = self.trace
        k = len(trace.f_ids)
        t = _fresh(x)
        regs = trace.registers
        f = len(regs)
        d, e = f + 1, f + 2
        regs += (("F", k), ("D", k), ("E", k))
        trace.f_ids.append(f)
        trace.outputs.append(d)
        trace.e_ids.append(e)
        trace.u_ids.append(None)
        trace.v_ids.append(None)
        if k == self.suspend_at and self.alive[0] and self.alive[1]:
            self.alive[self.later], self.suspended = False, True  # left for later (not dead)
        states = self.settle(t, k - 1)
        for r in (0, 1):
            v = t[r]
            trace.inputs[r].append(v)
            state = states[r]
            pivot = None
            if state:
                if len(state) == 1:
                    p, cp = state[0]
                else:
                    cut = _PIVOT * max([abs(c) for _, c in state])
                    p, cp = min([(i, c) for i, c in state if abs(c) >= cut])
                # p = (F_k - sum_{i != p} v_i i) / v_p
                inv = -1.0 / cp
                expr = {i: c * inv for i, c in v.items() if i != p}
                expr[f] = -inv
                self.pivots[r][p] = expr
                pivot = (p, expr)
            trace.pivots[r].append(pivot)
        self.epoch += 1
        x.t, x.epoch = self.pair({f: 1.0}, {f: 1.0}), self.epoch  # exactly the new register
        return _form(self, self.pair({d: 1.0}, {f: 1.0, e: -1.0}), self.epoch)


    def uncond(self) -> Form:
        """U_k of the call just made (CFG++): the register U_k in representation "D", and
        F_k - V_k in "E" (V_k = F_k - U_k, the unconditional noise prediction times sigma), as
        D_k is; a later stage reads a U (or V) history tensor of its own."""
        k = len(self.trace.f_ids) - 1
        u = self.register("U", k)
        v = self.register("V", k)
        self.trace.u_ids[k] = u
        self.trace.v_ids[k] = v
        return _form(self, self.pair({u: 1.0}, {self.trace.f_ids[k]: 1.0, v: -1.0}), self.epoch)


class _BrownianPath:
    """W(t) at the times asked for, as increments between consecutive query times over
    independent unit normals (Brownian bridge); each increment is a sparse form, so a query
    over a short interval is a short form whatever the step count."""

    def __init__(self, tracer: _Tracer):
        self.tracer = tracer
        self.times: list[float] = []  # sorted query times
        self.steps: list[dict] = []  # steps[i]: W(times[i + 1]) - W(times[i])

    def _normal(self, scale: float) -> dict:
        self.tracer.draw(())
        return {self.tracer.trace.noise[-1].index: scale}

    def _insert(self, t: float) -> int:
        i = bisect.bisect_left(self.times, t)
        if i < len(self.times) and self.times[i] == t:
            return i
        if not self.times:
            self.times.append(t)  # W is pinned at the first time
            return 0
        if i == 0:  # before every known time
            self.steps.insert(0, self._normal((self.times[0] - t) ** 0.5))
        elif i == len(self.times):  # after every known time
            self.steps.append(self._normal((t - self.times[-1]) ** 0.5))
        else:  # between s0 and s1: the bridge splits that increment
            s0, s1 = self.times[i - 1], self.times[i]
            frac = (t - s0) / (s1 - s0)
            z = self._normal(((t - s0) * (s1 - t) / (s1 - s0)) ** 0.5)
            inc = self.steps[i - 1]
            left = _combine(inc, frac, z, 1.0)
            right = _combine(inc, 1.0 - frac, z, -1.0)
            self.steps[i - 1:i] = [left, right]
        self.times.insert(i, t)
        return i

    def __call__(self, sigma, sigma_next) -> Form:
        t0, t1 = float(sigma), float(sigma_next)
        self._insert(t0)
        self._insert(t1)
        i0 = bisect.bisect_left(self.times, t0)
        i1 = bisect.bisect_left(self.times, t1)
        lo, hi, sign = (i0, i1, 1.0) if i0 < i1 else (i1, i0, -1.0)
        w: dict = {}
        for inc in self.steps[lo:hi]:
            w = _combine(w, 1.0, inc, 1.0)
        scale = sign / abs(t1 - t0) ** 0.5
        return self.tracer.noise_form({k: scale * v for k, v in w.items()})


def trace_solver(name: str, sigmas: torch.Tensor, noise_mode: str = "calls", later: str = "E",
                 **options) -> Trace:
    """Runs the reference solver `name` on linear forms (see the module docstring); `later`:
    the representation to leave for later if both are kept past JOINT_CALLS calls."""
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    if noise_mode not in ("calls", "brownian"):
        raise ValueError(f"noise_mode must be 'calls' or 'brownian', got {noise_mode!r}")
    if later not in REPS:
        raise ValueError(f"later must be 'D' or 'E', got {later!r}")
    sigmas = sigmas.to(_F64).cpu().clone()
    try:
        try:
            return _lazy(name, sigmas, noise_mode, options, REPS.index(later))
        except _Rejoin:  # the one traced on failed with the other left behind: both together
            return _traced(_Tracer(Trace(name, noise_mode=noise_mode)), sigmas, options)
    except _Retrace:  # the representation kept failed after the other was dropped
        return _traced(_Tracer(Trace(name, noise_mode=noise_mode), prune=False), sigmas, options)


def _lazy(name: str, sigmas: torch.Tensor, noise_mode: str, options: dict, later: int) -> Trace:
    """The trace with representation `later` left for later after JOINT_CALLS calls if both
    are still kept."""
    tracer = _Tracer(Trace(name, noise_mode=noise_mode), suspend_at=JOINT_CALLS, later=later)
    trace = _traced(tracer, sigmas, options)
    if not tracer.suspended:
        return trace
    del trace.inputs[later][JOINT_CALLS:], trace.pivots[later][JOINT_CALLS:]  # (not traced)
    # (a partial, not a closure over the trace: no reference cycle for the collector)
    trace.later = later
    trace.resume = functools.partial(_resume, sigmas=sigmas, options=options,
                                     widths=tracer.widths, lock=threading.Lock())
    # The one traced on can still be dominated after the prefix unless each later width is
    # within DOMINATED of the other's widest in the prefix (which only grows): otherwise
    # decide it now, before any plan of its kind is built.
    if max(tracer.widths[JOINT_CALLS:]) > tracer.widest[later] + DOMINATED:
        trace.ensure(later, len(trace.f_ids) + 1)
    return trace


def _resume(trace: Trace, sigmas: torch.Tensor, options: dict, widths: list,
            lock: threading.Lock) -> None:
    """The rest of the representation left for later: the reference run again, that one
    alone, pruned against the other's widths as a joint trace would be."""
    with lock:
        if trace.resume is None:  # another thread did it
            return
        r, kept = trace.later, 1 - trace.later
        rerun = _Tracer(Trace(trace.solver, noise_mode=trace.noise_mode), shadow=(kept, widths))
        try:
            _traced(rerun, sigmas, options)
        except _Retrace:  # it failed after dominating the other: as unpruned, the other stands
            pass
        else:
            if rerun.dominated[kept]:  # (only when the check in _lazy could not rule it out)
                trace.dead[kept] = rerun.trace.dead[kept]
        part = rerun.trace
        if part.registers != trace.registers[:len(part.registers)]:
            raise RuntimeError(f"{trace.solver}: the reference traced differently run again")
        done = len(trace.inputs[r])
        trace.inputs[r].extend(part.inputs[r][done:])
        trace.pivots[r].extend(part.pivots[r][done:])
        final = list(trace.final)
        final[r] = part.final[r] if part.final else {}
        trace.final = tuple(final)
        trace.dead[r] = part.dead[r]
        trace.resume = None


def _traced(tracer: _Tracer, sigmas: torch.Tensor, options: dict) -> Trace:
    trace = tracer.trace
    name, noise_mode = trace.solver, trace.noise_mode
    info = SOLVERS[name]

    def model(x, sigma, **kwargs):
        if not isinstance(x, Form):
            raise Untraceable(f"{name} called the model on {_what(x)}, not the traced state")
        trace.sigmas.append((float(sigma) if sigma.numel() == 1 else
                             float(sigma.reshape(-1)[0])) if torch.is_tensor(sigma)
                            else float(sigma))
        return tracer.call(x)

    def denoise_with_uncond(x, sigma, **kwargs):
        """CFG++'s call (_utils.denoise_with_uncond): D_k and U_k, two free registers."""
        d = model(x, sigma, **kwargs)
        return d, tracer.uncond()

    model.denoise_with_uncond = denoise_with_uncond
    x = tracer.initial()
    kwargs = {**info.kwargs, **options, "disable": True}
    params = inspect.signature(info.fn).parameters
    if "noise_sampler" in params:
        if noise_mode == "brownian":
            kwargs["noise_sampler"] = _BrownianPath(tracer)
        else:
            kwargs["noise_sampler"] = lambda *args: tracer.draw(tuple(float(a) for a in args))
    # Inference mode: the reference's 0-d tensor arithmetic skips autograd's bookkeeping (~20%
    # of its cost; the same kernels, so the same values), its schedule an inference tensor too.
    try:
        with torch.inference_mode():
            out = info.fn(model, x, sigmas.clone(), **kwargs)
    finally:  # the two closures' reference cycle would keep the tracer for the cyclic collector
        del model.denoise_with_uncond
    if not isinstance(out, Form):
        raise Untraceable(f"{name} returned {_what(out)}, not the traced state")
    t = _fresh(out)
    trace.final = (t[0], t[1])
    tracer.settle(t, len(trace.f_ids) - 1)
    return trace
