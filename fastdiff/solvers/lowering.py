"""Lowering a plan to kernel launches: per stage, which tensors the fused linear combination
reads and writes, and its coefficient row (one device table per run, built once).

The model side is folded in, because everything is linear (DESIGN.md):
  - registers F[k] are stored as the *network input* c_in_k * F_k, so no separate scaling op;
  - the current stage's denoised output is D_k = c_skip_k F_k + c_out_k * out, with
    classifier-free guidance out = w_u * u + w_c * c read from the two halves of the batched
    network output (two pointers into one tensor, no copy);
  - a past D_j is read from the history tensor stage j wrote (a second kernel output), or is
    the model's own output when the model is a plain denoiser;
  - CFG++ solvers also read U_k = c_skip_k F_k + c_out_k * u, the unconditional denoised output
    (the first guidance half alone; without guidance U_k = D_k), and may keep U as history;
  - with x0 clipping or dynamic thresholding (Scalings.clip), the current D_k is the kernel's
    clipped value y = clamp(w, -b, b) / d of the pre-clip combination w = c_skip F + c_out out
    (fastdiff.ops.lincomb's clip row), so every use of D_k, history included, reads y.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from itertools import chain, repeat

import torch

from fastdiff.solvers.plan import Plan, PlanBuilder, Ref

MAX_INPUTS = 6
MAX_NOISE = 2


@dataclass(frozen=True)
class Scalings:
    """Per model call: D = c_skip * F + c_out * sum_p w_p * part_p, network input = c_in * F."""

    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]
    c_in: tuple[float, ...]
    weights: tuple[float, ...] = (1.0,)  # (1,) plain; (w_u, w_c) with guidance
    clip: bool = False  # D is clipped / thresholded in the kernel

    @functools.cached_property  # read per stage: computed once, not O(steps) each time
    def plain(self) -> bool:
        """D is exactly the model output: no conversion, no guidance, no input scaling."""
        return (self.weights == (1.0,) and not self.clip and all(c == 0 for c in self.c_skip)
                and all(c == 1 for c in self.c_out) and all(c == 1 for c in self.c_in))


@dataclass(frozen=True)
class Launch:
    """One fused kernel call: outputs = tables[arity][row] @ (inputs, in-kernel noise)."""

    inputs: tuple[Ref, ...]  # Ref kinds: x, F, D, E, z (a drawn tensor), "part" (output half)
    # "F" (next model input), "out" (sample), "H" (history entry), "HU" (CFG++'s U entry),
    # "T<n>" (the partial sum of a stage split in two: `lower`'s split)
    outputs: tuple[str, ...]
    row: int  # row in the table of this launch's arity
    call: int  # the model call it follows (-1: the prologue, before the first call)
    noise: tuple[int, ...] = ()  # noise symbols generated in-kernel (Philox counters)
    clip: bool = False  # the table has the pre-clip row and the clipped value's column

    @property
    def arity(self) -> tuple[int, int, bool]:
        return len(self.outputs), len(self.inputs) + len(self.noise), self.clip


def _accumulate(acc: dict[Ref, float], ref: Ref, value: float) -> None:
    acc[ref] = acc.get(ref, 0.0) + value


# the network output's parts (one plain, two guided), built once: _expand runs per stage
_PARTS = tuple(Ref("part", p) for p in range(MAX_INPUTS))


def _expand(plan: Plan, terms, call: int, sc: Scalings, scale: float) -> dict[Ref, float]:
    """scale * sum(coef * ref) over kernel-readable tensors (the loop of a plan's lowering:
    attribute lookups hoisted, each branch's arithmetic as written once)."""
    acc: dict[Ref, float] = {}
    get, c_in = acc.get, sc.c_in
    for ref, c in terms:
        c = c * scale
        kind, index = ref
        if kind == "F":
            acc[ref] = get(ref, 0.0) + c / c_in[index]
        elif index != call:  # x_T, a past history entry (D, E, U, V) or a noise draw
            acc[ref] = get(ref, 0.0) + c
        elif kind == "D" and sc.clip:  # the kernel's clipped value
            _accumulate(acc, Ref("y", call), c)
        elif kind == "D":  # this call's output, converted in-kernel
            if sc.c_skip[call] != 0:
                _accumulate(acc, Ref("F", call), c * sc.c_skip[call] / sc.c_in[call])
            for p, w in enumerate(sc.weights):
                _accumulate(acc, _PARTS[p], c * sc.c_out[call] * w)
        elif kind == "U":  # CFG++: the unconditional half alone
            if sc.c_skip[call] != 0:  # (without guidance, part 0 is the output: U = D)
                _accumulate(acc, Ref("F", call), c * sc.c_skip[call] / sc.c_in[call])
            _accumulate(acc, _PARTS[0], c * sc.c_out[call])
        elif kind == "V":  # V_k = F_k - U_k of this call
            for r, v in _expand(plan, [(Ref("F", call), 1.0), (Ref("U", call), -1.0)], call,
                                sc, c).items():
                _accumulate(acc, r, v)
        elif kind == "E":  # E_k = F_k - D_k of this call
            for r, v in _expand(plan, [(Ref("F", call), 1.0), (Ref("D", call), -1.0)], call,
                                sc, c).items():
                _accumulate(acc, r, v)
        else:  # x_T or a noise draw whose index is the call's
            acc[ref] = get(ref, 0.0) + c
    if 0.0 in acc.values():  # (== 0.0: -0.0 too) most stages have no zero: no second dict
        return {r: c for r, c in acc.items() if c != 0.0}
    return acc


class NotNarrower(Exception):
    """`lower(..., narrower_than=w)` met a launch reading w tensors or more."""


def lower(plan: Plan | PlanBuilder, sc: Scalings, in_kernel_noise: bool = False,
          narrower_than: int | None = None
          ) -> tuple[list[Launch], dict[tuple[int, int], torch.Tensor]]:
    """Launches (prologue first, then one per stage) and their float64 coefficient tables, one
    [rows, num_out, width] table per arity (the kernel reads row `launch.row` of its own).
    With `in_kernel_noise`, noise symbols become Philox terms of the kernel instead of inputs.
    With `narrower_than`, raises NotNarrower at the first launch reading that many tensors or
    more: the Sampler keeps another plan unless this one's widest launch is narrower, and
    stopping there halves its lowering work (issue 14)."""
    launches: list[Launch] = []
    zeros = repeat(0.0)  # the default of combo.get per column (add's table rows)
    rows: dict[tuple[int, int], list[list[list[float]]]] = {}

    def add(outputs: tuple[str, ...], combos: list[dict[Ref, float]], call: int) -> None:
        clipped = sc.clip and any(r.kind == "y" for combo in combos for r in combo)
        if clipped:  # the pre-clip row: D_k before clipping, over tensors only
            combos = combos + [_expand(plan, [(Ref("D", call), 1.0)], call,
                                       dataclasses.replace(sc, clip=False), 1.0)]
            refs = tuple(dict.fromkeys(r for combo in combos for r in combo if r.kind != "y"))
        else:  # (a stage's first combination holds most of its inputs)
            refs = tuple(dict.fromkeys(chain.from_iterable(combos)) if len(combos) > 1
                         else combos[0])
        noise = tuple([r for r in refs if r[0] == "z"]) if in_kernel_noise else ()
        tensors = tuple([r for r in refs if r[0] != "z"]) if noise else refs
        if len(tensors) > MAX_INPUTS and not clipped:
            combos = split(combos, tensors, call)
            refs = tuple(dict.fromkeys(r for combo in combos for r in combo))
            tensors = tuple(r for r in refs if r not in noise)
        if len(tensors) > MAX_INPUTS or len(noise) > MAX_NOISE:
            raise RuntimeError(f"{plan.solver}: a stage reads {len(tensors)} tensors and"
                               f" {len(noise)} noise terms ({', '.join(map(str, refs))}); the"
                               f" fused kernel takes {MAX_INPUTS} and {MAX_NOISE}")
        if narrower_than is not None and len(tensors) >= narrower_than:
            raise NotNarrower
        arity = (len(outputs), len(tensors) + len(noise), clipped)
        table = rows.get(arity)
        if table is None:
            table = rows[arity] = []
        launches.append(Launch(tensors, outputs, len(table), call,
                               tuple([r[1] for r in noise]) if noise else (), clipped))
        columns = tensors + noise + ((Ref("y", call),) if clipped else ())
        # a combination's coefficient per column, 0.0 where it does not read that column
        table.append([list(map(combo.get, columns, zeros)) for combo in combos])

    def split(combos: list[dict[Ref, float]], tensors: tuple[Ref, ...], call: int
              ) -> list[dict[Ref, float]]:
        """A stage wider than one launch (e.g. SA-Solver's after a guided epsilon network's
        call with drawn noise: 7 tensors) as two: a launch first sums some of the inputs that
        do not come from this call (past history, drawn noise) into one partial per output
        that reads them, T; the stage then reads T instead. Exact up to one rounding of T
        (fp32 accumulation, as every launch); never done for a clipped stage, whose clip row
        must see every input."""
        own = {Ref("F", call)}
        movable = [r for r in tensors if r.kind != "part" and r not in own]
        # inputs read by fewer outputs first (fewer partials), oldest first
        movable.sort(key=lambda r: sum(r in combo for combo in combos))
        for m in range(2, min(len(movable), MAX_INPUTS) + 1):
            moved = movable[:m]
            users = [j for j, combo in enumerate(combos) if any(r in combo for r in moved)]
            if len(tensors) - m + len(users) <= MAX_INPUTS:
                break
        else:
            return combos  # cannot be split: add() raises with the stage's inputs
        parts = [{r: combos[j][r] for r in moved if r in combos[j]} for j in users]
        names = [Ref("T", 3 * (call + 1) + n) for n in range(len(users))]
        add(tuple(f"T{t.index}" for t in names), parts, call)
        out = [dict(combo) for combo in combos]
        for j, t in zip(users, names):
            for r in moved:
                out[j].pop(r, None)
            out[j][t] = 1.0
        return out

    try:
        first = _expand(plan, plan.prologue, -1, sc, sc.c_in[0])
        if first != {Ref("x"): 1.0}:  # F[0] is not simply the user's noise
            add(("F",), [first], -1)
        # A later stage reads this call's history entry: write it, unless it is the plain
        # model's own output (history D of a denoiser model). (The sets fill in place as a
        # PlanBuilder compiles: read once here, not per stage.)
        writes = not (sc.plain and plan.history_kind == "D")
        history, uncond_history = (plan.history, plan.uncond_history) if writes else ((), ())
        for stage in plan.stages:
            k = stage.call
            scale = 1.0 if stage.target == "out" else sc.c_in[k + 1]
            combos = [_expand(plan, stage.terms, k, sc, scale)]
            outputs = (stage.target,)
            if k in history:
                combos.append(_expand(plan, [(Ref(plan.history_kind, k), 1.0)], k, sc, 1.0))
                outputs += ("H",)
            if k in uncond_history:
                # CFG++: U_k (or V_k = F_k - U_k with E history) kept for a later stage
                ukind = "U" if plan.history_kind == "D" else "V"
                combos.append(_expand(plan, [(Ref(ukind, k), 1.0)], k, sc, 1.0))
                outputs += ("HU",)
            add(outputs, combos, k)
    finally:
        # add and split reach each other through their closures: a reference cycle that would
        # keep `rows` (two lists per stage) for the cyclic collector's next pass (issue 14)
        add = split = None
    tables = {key: torch.tensor(r, dtype=torch.float64) for key, r in rows.items()}
    return launches, tables
