"""Tracing a diffusers scheduler's own `step` into an exact linear form, one state at a time.

Every supported scheduler step is linear in the tensors it touches: the `sample` and
`model_output` passed in, the history the scheduler keeps between steps (DPM-Solver's
`model_outputs`, UniPC's `last_sample`, Heun's `prev_derivative`, ...) and the noise it draws
(DESIGN.md: "a diffusion solver step is a linear combination"). Running diffusers' `step` on a
CPU twin of the scheduler whose tensors are *symbols* -- fresh unit vectors of shape [1, DIM] in
float64 -- with `randn_tensor` intercepted to hand out fresh unit vectors yields every output
and every new history entry as an exact linear form over the step's inputs. The scalar
arithmetic (sigmas, alphas, orders, warm-up, the timestep it is given) is diffusers' own, so the
fused step agrees with diffusers by construction.

What a step computes depends only on (the scheduler's state, the timestep, the step options):
`state_key` names that state without reading any tensor's value, so a traced StepPlan can be
reused by any scheduler with the same class, config and `set_timesteps` arguments whenever it
is in that state again (the scheduler-side caching is in _fused.py).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from fastdiff.diffusers import _brownian
from fastdiff.ops.lincomb import MAX_OUTPUTS

DIM = 37  # symbol count per step; odd so no schedule tensor is mistaken for a [1, DIM] symbol
_F64 = torch.float64
_EYE = torch.eye(DIM, dtype=_F64)
_SCALARS = (bool, int, float, str, type(None))
# A stand-in for a history tensor while a twin is set up; _trace_one replaces it by a fresh
# symbol before diffusers' code can see it.
PLACEHOLDER = torch.zeros(1, DIM, dtype=_F64)


class Untraceable(RuntimeError):
    """diffusers' step did something the fused step cannot express (a non-linear or reshaped
    result, a second clip): the caller runs diffusers' own step instead."""


def is_symbol(t) -> bool:
    # diffusers up-casts its `sample` with .to(torch.float32): exact for a unit vector
    return (isinstance(t, torch.Tensor) and t.dtype in (_F64, torch.float32)
            and tuple(t.shape) == (1, DIM))


@dataclass(frozen=True)
class Clip:
    """The step clips its x0 prediction: ("static", r) is clamp(x0, -r, r) (`clip_sample`);
    ("dynamic", ratio, max_value) is diffusers' `_threshold_sample` (Imagen's dynamic
    thresholding, Saharia et al. 2022, arXiv:2205.11487)."""

    kind: str
    params: tuple


@dataclass
class Chunk:
    """One fused launch: outputs (targets) = coef @ inputs (sources). With `clip`, coef has one
    more row, the pre-clip x0 over the sources, and one more column, each output's weight on
    the clipped x0 (fastdiff.ops.lincomb's clip layout)."""

    sources: list[tuple]  # ("sample",), ("model_output",), ("slot", attr, idx), ("noise", k)
    targets: list[tuple]  # ("field", name) or ("slot", attr, idx)
    coef: torch.Tensor  # [1, len(targets) (+1), len(sources) (+1)] float64
    clip: Clip | None = None


@dataclass
class StepPlan:
    """diffusers' step from one state, as fused launches plus the state changes around them.
    Sources are read before anything is written: ("sample",), ("model_output",), ("noise", k),
    ("timestep",) (the object passed to step), ("slot", attr, idx) (idx None: a plain
    attribute; an int: a list entry)."""

    chunks: list[Chunk] = field(default_factory=list)
    moves: list[tuple[tuple, tuple]] = field(default_factory=list)  # (target, source)
    consts: list[tuple[tuple, object]] = field(default_factory=list)  # (target, value)
    list_lengths: dict = field(default_factory=dict)  # lists rebuilt by the step: new length
    deleted: list[str] = field(default_factory=list)
    noise_f32: list[bool] = field(default_factory=list)  # per draw: dtype=float32 literal
    brownian: dict = field(default_factory=dict)  # draw -> (t0, t1) of a Brownian tree
    sampler_init: tuple | None = None  # (target, args): the step builds the tree (_brownian)
    out_cls: type | None = None
    out_fields: list[str] = field(default_factory=list)
    learned: tuple | None = None  # DDPM's learned std of the noise (_learned.py)
    timestep: object = None  # what the twin was given
    reads: frozenset = frozenset()  # attributes the step read before writing them
    window: object = None  # the Window holding this plan's device tables (_shared.py)
    slot_in_window: int = 0


def state_key(attrs: dict, static: frozenset) -> frozenset:
    """What diffusers' step can branch on, without reading a tensor value: every attribute not
    in `static` (the schedule) by value for Python scalars, by structure for lists (a value per
    scalar entry, "T" per tensor), by presence for a history tensor, and by identity for a 0-dim
    tensor (Heun's `dt`: the object a traced plan put there)."""
    return frozenset([(name, _sig(v, True)) for name, v in attrs.items() if name not in static])


def _sig(v, top: bool):
    if isinstance(v, _SCALARS):
        return v
    if isinstance(v, torch.Tensor):
        return ("0d", id(v)) if top and v.dim() == 0 else "T"
    if isinstance(v, list):
        return tuple([_sig(e, False) for e in v])
    return ("obj", type(v).__name__)


_record: list | None = None  # [reads, writes] of the step being traced


def recording_class(base: type) -> type:
    """`base` with attribute accesses recorded while a step is traced: which state the step
    reads before it writes it. A plan holds for any state that agrees on those (the step's
    code path and arithmetic are functions of what it reads), e.g. UniPC's `this_order` left
    from the previous loop, which the first step overwrites."""
    cls = _RECORDING.get(base)
    if cls is None:
        def __getattribute__(self, name):
            if _record is not None and name not in _record[1]:
                _record[0].add(name)
            return object.__getattribute__(self, name)

        def __setattr__(self, name, value):
            if _record is not None and name not in _record[0]:
                _record[1].add(name)
            object.__setattr__(self, name, value)

        cls = _RECORDING[base] = type(base.__name__, (base,), {
            "__getattribute__": __getattribute__, "__setattr__": __setattr__,
            "__module__": base.__module__})
    return cls


_RECORDING: dict = {}


def twin_value(v, top: bool = True, host: dict | None = None):
    """Ours' state value as the twin holds it: history tensors become placeholders (symbols in
    the trace), lists are copied, a 0-dim timestep a fused step stored (SASolver's
    `timestep_list`, whose values its step reads) is the twin's CPU copy of it from `host`
    (id -> (tensor, copy)), so a device timestep is never read; everything else is shared."""
    if isinstance(v, torch.Tensor):
        if v.dim() >= 1:
            return PLACEHOLDER
        known = host.get(id(v)) if host else None
        return known[1] if known is not None and known[0] is v else v
    if isinstance(v, list):
        return [twin_value(e, False, host) for e in v]
    return v


_CASTS = frozenset({torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.type})
_CLAMPS = frozenset({torch.Tensor.clamp, torch.clamp})
_INTERCEPTED = _CASTS | _CLAMPS


class _Intercept(TorchFunctionMode):
    """Only for clip_sample configurations: a symmetric clamp of a symbol becomes the clip
    symbol, and symbols stay float64 through dtype casts."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _INTERCEPTED:  # (most ops: the first-call cost is per op here)
            return func(*args, **kwargs)
        if func in _CASTS and args and is_symbol(args[0]):
            return args[0]
        if func in _CLAMPS and args and is_symbol(args[0]):
            lo = args[1] if len(args) > 1 else kwargs.get("min")
            hi = args[2] if len(args) > 2 else kwargs.get("max")
            if lo is None or hi is None or float(lo) != -float(hi):
                raise Untraceable("only a symmetric clamp of x0 is fused")
            return self.clip(args[0], Clip("static", (float(hi),)))
        return func(*args, **kwargs)


class _Columns:
    """The step's inputs in coordinate order: sample, model_output, history slots, noise."""

    def __init__(self):
        self.keys: list[tuple] = []

    def fresh(self, key: tuple) -> torch.Tensor:
        n = len(self.keys)
        if n >= DIM:
            raise Untraceable("scheduler state too large to trace")
        self.keys.append(key)
        return _EYE[n:n + 1].clone()


def get_slot(sched, key):
    _, name, idx = key
    value = getattr(sched, name)
    return value if idx is None else value[idx]


def set_slot(sched, key, value) -> None:
    _, name, idx = key
    if idx is None:
        setattr(sched, name, value)
    else:
        getattr(sched, name)[idx] = value


TUPLE_FIELDS = ("prev_sample", "pred_original_sample")  # a step returning a bare tuple


def trace_step(tracer, timestep, kwargs: dict, tensor_args=None) -> StepPlan:
    """Runs diffusers' `step` of `tracer` (a CPU diffusers scheduler in the state to trace, its
    history tensors any [1, DIM] stand-ins) at `timestep`; returns the StepPlan and leaves the
    tracer in the state after the step (history as result symbols). `tensor_args`: names of
    step arguments holding tensors (sources ("arg", name)); the step is then called by name."""
    global _record
    module = sys.modules[type(tracer).step.__module__]
    cols, plan = _Columns(), StepPlan()
    attrs = tracer.__dict__
    brownian = _brownian.install(module, attrs, plan, cols.fresh)
    sample, model_output = cols.fresh(("sample",)), cols.fresh(("model_output",))
    if tensor_args is not None:
        kwargs = dict(kwargs, **{name: cols.fresh(("arg", name)) for name in tensor_args})
    objects = {id(timestep): ("timestep",)}  # pre-step objects by identity (not symbols)
    before = {}
    for name, value in list(attrs.items()):
        if isinstance(value, _SCALARS):  # (most of the state: nothing to replace)
            pass
        elif is_symbol(value):
            attrs[name] = cols.fresh(("slot", name, None))
        elif isinstance(value, list):
            value = attrs[name] = list(value)  # diffusers updates history lists in place
            for i, v in enumerate(value):
                if is_symbol(v):
                    value[i] = cols.fresh(("slot", name, i))
                elif not isinstance(v, _SCALARS):
                    objects.setdefault(id(v), ("slot", name, i))
            before[name] = list(value)
            continue
        else:
            objects.setdefault(id(value), ("slot", name, None))
        before[name] = attrs[name]
    objects.pop(id(PLACEHOLDER), None)

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None, **kw):
        plan.noise_f32.append(dtype == torch.float32)
        return cols.fresh(("noise", len(plan.noise_f32) - 1))

    clips: list[tuple[torch.Tensor, Clip]] = []

    def clip_symbol(x0: torch.Tensor, spec: Clip) -> torch.Tensor:
        """x0 clipped: a fresh symbol the kernel computes from x0's form (one per step)."""
        if clips:
            raise Untraceable("a step that clips twice is not fused")
        clips.append((x0[0].double().clone(), spec))
        return cols.fresh(("clip",))

    def fake_threshold(x0):
        cfg = tracer.config
        return clip_symbol(x0, Clip("dynamic", (float(cfg.dynamic_thresholding_ratio),
                                                float(cfg.sample_max_value))))

    saved = getattr(module, "randn_tensor", None)
    if saved is not None:
        module.randn_tensor = fake_randn
    attrs["_threshold_sample"] = fake_threshold  # an instance attribute shadows the method
    # (clip_denoised: the consistency models' clamp of x0 to [-1, 1])
    clipping = tracer.config.get("clip_sample", False) or tracer.config.get("clip_denoised",
                                                                           False)
    reads: set = set()
    try:
        _record = [reads, set()]
        # diffusers' class's step, never an instance attribute `step` copied from the caller
        # (a user's wrapper around the fused step would run it on the symbols)
        step = functools.partial(type(tracer).step, tracer)
        if tensor_args is not None:
            kwargs = dict(kwargs, model_output=model_output, timestep=timestep, sample=sample)
            call = functools.partial(step, return_dict=True, **kwargs)
        else:
            call = functools.partial(step, model_output, timestep, sample,
                                     return_dict=True, **kwargs)
        if clipping:
            with _Intercept(clip_symbol):
                out = call()
        else:
            out = call()
    finally:
        _record = None
        _brownian.uninstall(brownian)
        if saved is not None:
            module.randn_tensor = saved
        attrs.pop("_threshold_sample", None)
    plan.reads = frozenset(reads)

    plan.out_cls = type(out)
    if isinstance(out, tuple):
        plan.out_cls, plan.out_fields = tuple, list(TUPLE_FIELDS[:len(out)])
        out = dict(zip(plan.out_fields, out))
    else:
        plan.out_fields = list(_field_names(type(out)))
    symbols: list[tuple] = []  # (target, symbol, its own input column or None)

    def settle(target, value, own=None):
        """Records what `target` holds after the step."""
        if is_symbol(value):
            symbols.append((target, value, own))
        elif not isinstance(value, _SCALARS) and id(value) in objects:
            plan.moves.append((target, objects[id(value)]))
        elif isinstance(value, torch.Tensor) and value.dim() >= 1:
            raise Untraceable(f"{type(tracer).__name__}.step produced a non-linear or reshaped"
                              f" {target[1]!r}")
        else:
            plan.consts.append((target, value))

    for name in plan.out_fields:
        value = out[name] if isinstance(out, dict) else getattr(out, name)
        if value is not None:
            settle(("field", name), value)
    for name, value in list(attrs.items()):
        old = before.get(name, _MISSING)
        if value is old and isinstance(value, _SCALARS):
            continue
        if isinstance(value, list):
            if isinstance(old, list) and len(old) == len(value) and not any(
                    _moved(v, _own_column(cols, ("slot", name, i))) if is_symbol(v)
                    else v is not old[i] for i, v in enumerate(value)):
                continue  # the list is as it was
            plan.list_lengths[name] = len(value)  # rebuilt: every entry is assigned
            for i, v in enumerate(value):
                if v is not None:
                    settle(("slot", name, i), v, _own_column(cols, ("slot", name, i)))
        elif is_symbol(value):
            own = _own_column(cols, ("slot", name, None))
            if _moved(value, own):
                settle(("slot", name, None), value, own)
        elif value is not old:
            settle(("slot", name, None), value)
    plan.deleted = [name for name in before if name not in attrs]
    _brownian.finish(plan)
    _lower(plan, cols, symbols, clips)
    return plan


_MISSING = object()


@functools.cache
def _field_names(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls))


def _own_column(cols: _Columns, key: tuple) -> int | None:
    try:
        return cols.keys.index(key)
    except ValueError:
        return None


def _moved(value, own) -> bool:
    """Whether a symbol differs from its own input (its own unit vector)."""
    form = value[0]
    return not (own is not None and form[own] == 1 and int((form != 0).sum()) == 1)


def _lower(plan: StepPlan, cols: _Columns, symbols: list, clips: list) -> None:
    """Symbol targets -> moves (a target equal to one input) and fused launches. Plain Python
    on the forms' values: a step has 1-3 rows of DIM numbers, too few for numpy to pay."""
    if not symbols:
        return
    keys = cols.keys
    forms = [v[0].tolist() for _, v, _ in symbols]  # [targets][columns], float64 values
    nonzero = [[k for k, a in enumerate(form) if a != 0] for form in forms]
    computed = []
    for row, (target, _, _) in enumerate(symbols):
        only = nonzero[row]
        if len(only) == 1 and forms[row][only[0]] == 1 and keys[only[0]] != ("clip",):
            plan.moves.append((target, keys[only[0]]))
            continue
        computed.append(row)
    clip_col = keys.index(("clip",)) if clips else None
    # One launch per MAX_OUTPUTS targets: a UniPC step's three (corrected sample, history
    # entry, next sample) are one launch.
    for c in range(0, len(computed), MAX_OUTPUTS):
        rows = computed[c:c + MAX_OUTPUTS]
        part = [forms[r] for r in rows]
        columns = {k for r in rows for k in nonzero[r]}
        clip = None
        if clip_col in columns and not _has_nan([p[clip_col] for p in part]):
            x0_form, clip = clips[0]
            part.append(x0_form.tolist())  # the pre-clip row, last
            columns.update(k for k, a in enumerate(part[-1]) if a != 0)
        # a column holding a NaN is dropped (as the max(|column|) > 0 rule this replaces)
        used = sorted(k for k in columns
                      if k != clip_col and not _has_nan([p[k] for p in part])) or [0]
        # the clipped x0's column, last; the pre-clip row has none
        coef = [[p[k] for k in used] + ([p[clip_col]] if clip is not None else [])
                for p in part]
        plan.chunks.append(Chunk([keys[k] for k in used], [symbols[r][0] for r in rows],
                                 torch.tensor([coef], dtype=_F64), clip))


def _has_nan(column: list) -> bool:
    return any(a != a for a in column)
