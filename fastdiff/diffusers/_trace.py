"""Tracing a diffusers scheduler's own `step` into per-step linear forms.

Every supported scheduler step is linear in the tensors it touches: the `sample` and
`model_output` passed in, the history the scheduler keeps between steps (DPM-Solver's
`model_outputs`, UniPC's `last_sample`, Heun's `prev_derivative`, ...) and the noise it draws
(DESIGN.md: "a diffusion solver step is a linear combination"). Running diffusers' `step` on
coefficient vectors — every such tensor replaced by a fresh unit vector of shape [1, DIM] in
float64, `randn_tensor` intercepted to hand out fresh unit vectors, dtype down-casts turned into
no-ops — yields every output and every new history entry as an exact linear form over the
step's inputs. The scalar arithmetic (sigmas, alphas, orders, warm-up) is diffusers' own, so the
fused step agrees with diffusers by construction, step index by step index.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from fastdiff.ops.lincomb import MAX_OUTPUTS

DIM = 37  # symbol count per step; odd so no schedule tensor is mistaken for a [1, DIM] symbol
_F64 = torch.float64
_SCALAR_TYPES = (int, float, bool, type(None))


def _is_symbol(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == _F64 and tuple(t.shape) == (1, DIM)


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
    """diffusers' step at one step index, as fused launches plus bookkeeping."""

    chunks: list[Chunk] = field(default_factory=list)
    moves: list[tuple[tuple, tuple]] = field(default_factory=list)  # (target, source)
    cleared: list[tuple] = field(default_factory=list)  # slot targets set to None
    noise_f32: list[bool] = field(default_factory=list)  # per draw: dtype=float32 literal
    scalars: dict = field(default_factory=dict)  # python-scalar attributes after the step
    list_lengths: dict = field(default_factory=dict)  # history lists' lengths after the step
    out_cls: type | None = None
    out_fields: list[str] = field(default_factory=list)
    learned: tuple | None = None  # DDPM's learned std of the noise (_learned.py)


class _KeepF64(TorchFunctionMode):
    """Symbols stay float64 through diffusers' `.to(torch.float32)` / `.float()` up-casts; a
    symmetric clamp of a symbol (clip_sample) becomes the clip symbol."""

    def __init__(self, clip=None):
        super().__init__()
        self.clip = clip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in (torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.type)
                and args and _is_symbol(args[0])):
            return args[0]
        if func in (torch.Tensor.clamp, torch.clamp) and args and _is_symbol(args[0]):
            lo = args[1] if len(args) > 1 else kwargs.get("min")
            hi = args[2] if len(args) > 2 else kwargs.get("max")
            if self.clip is None or lo is None or hi is None or float(lo) != -float(hi):
                raise RuntimeError("fastdiff.diffusers: only a symmetric clamp of x0 is fused")
            return self.clip(args[0], Clip("static", (float(hi),)))
        return func(*args, **kwargs)


def _slots(sched) -> dict[tuple, torch.Tensor | None]:
    """Every symbol-shaped tensor the scheduler holds: ("slot", attr, idx) -> tensor or None
    (idx None for a plain attribute, an int for a list entry)."""
    found = {}
    for name, value in vars(sched).items():
        if _is_symbol(value):
            found[("slot", name, None)] = value
        elif (isinstance(value, list) and all(v is None or _is_symbol(v) for v in value)
              and any(v is not None for v in value)):  # model_outputs, ets, derivatives, ...
            for i, v in enumerate(value):
                found[("slot", name, i)] = v
    return found


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


def _scalars(sched) -> dict:
    return {k: v for k, v in vars(sched).items()
            if (isinstance(v, _SCALAR_TYPES) or (isinstance(v, torch.Tensor) and v.dim() == 0))
            and not k.startswith("_fd") and k not in ("_step_index", "_begin_index")}


def trace_steps(tracer, start: int, stop: int, timesteps: list, step_kwargs: dict,
                index_based: bool) -> dict[int, StepPlan]:
    """Runs diffusers' `step` of `tracer` (a plain diffusers scheduler after set_timesteps, on
    CPU) for step indices start..stop-1 on symbols; returns {index: StepPlan}."""
    kwargs = dict(step_kwargs)
    if "generator" in inspect.signature(tracer.step).parameters:
        kwargs["generator"] = None
    if index_based:
        tracer._step_index = start
    return {i: _trace_one(tracer, timesteps[i], kwargs) for i in range(start, stop)}


class _Columns:
    """The step's inputs in coordinate order: sample, model_output, history slots, noise."""

    def __init__(self):
        self.keys: list[tuple] = []
        self.eye = torch.eye(DIM, dtype=_F64)

    def fresh(self, key: tuple) -> torch.Tensor:
        if len(self.keys) >= DIM:
            raise RuntimeError("fastdiff.diffusers: scheduler state too large to trace")
        self.keys.append(key)
        return self.eye[len(self.keys) - 1: len(self.keys)].clone()


def _trace_one(tracer, timestep, kwargs: dict) -> StepPlan:
    module = sys.modules[type(tracer).step.__module__]
    cols, plan = _Columns(), StepPlan()
    sample, model_output = cols.fresh(("sample",)), cols.fresh(("model_output",))
    for key, value in _slots(tracer).items():
        if value is not None:
            set_slot(tracer, key, cols.fresh(key))
    # pristine copies: diffusers may update history in place (PNDM: cur_model_output += ...)
    inputs = {("sample",): sample.clone(), ("model_output",): model_output.clone()}
    inputs.update({k: get_slot(tracer, k).clone() for k in cols.keys[2:]})
    scalars_before = _scalars(tracer)

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None, **kw):
        key = ("noise", len(plan.noise_f32))
        plan.noise_f32.append(dtype == torch.float32)
        sym = cols.fresh(key)
        inputs[key] = sym.clone()
        return sym

    clips: list[tuple[torch.Tensor, Clip]] = []

    def clip_symbol(x0: torch.Tensor, spec: Clip) -> torch.Tensor:
        """x0 clipped: a fresh symbol the kernel computes from x0's form (one per step)."""
        if clips:
            raise RuntimeError("fastdiff.diffusers: a step that clips twice is not fused")
        clips.append((x0[0].clone(), spec))
        return cols.fresh(("clip",))

    def fake_threshold(x0):
        cfg = tracer.config
        return clip_symbol(x0, Clip("dynamic", (float(cfg.dynamic_thresholding_ratio),
                                                float(cfg.sample_max_value))))

    saved = getattr(module, "randn_tensor", None)
    if saved is not None:
        module.randn_tensor = fake_randn
    tracer._threshold_sample = fake_threshold  # an instance attribute shadows the method
    try:
        with _KeepF64(clip_symbol):
            out = tracer.step(model_output, timestep, sample, return_dict=True, **kwargs)
    finally:
        if saved is not None:
            module.randn_tensor = saved
        del tracer._threshold_sample
    plan.out_cls = type(out)
    plan.out_fields = [f.name for f in dataclasses.fields(out)]
    targets = [(("field", n), getattr(out, n)) for n in plan.out_fields]
    after = _slots(tracer)
    targets += list(after.items())
    for _, name, idx in after:
        if idx is not None:
            plan.list_lengths[name] = len(getattr(tracer, name))
    computed: list[tuple[tuple, torch.Tensor]] = []
    for target, value in targets:
        if value is None:
            if target[0] == "slot":
                plan.cleared.append(target)
            continue
        if not _is_symbol(value):
            raise RuntimeError(f"fastdiff.diffusers: {type(tracer).__name__}.step produced a"
                               f" non-linear or reshaped {target[1]!r}; this option is not"
                               " supported by the fused step")
        src = next((k for k, s in inputs.items() if torch.equal(value, s)), None)
        if src is not None:
            plan.moves.append((target, src))
        else:
            computed.append((target, value[0]))
    clip_col = cols.keys.index(("clip",)) if clips else None
    # One launch per MAX_OUTPUTS targets: a UniPC step's three (corrected sample, history
    # entry, next sample) are one launch.
    for c in range(0, len(computed), MAX_OUTPUTS):
        part = computed[c:c + MAX_OUTPUTS]
        forms = torch.stack([f for _, f in part])  # [nout, DIM]
        clip = None
        if clip_col is not None and forms[:, clip_col].abs().max() > 0:
            x0_form, clip = clips[0]
            forms = torch.cat([forms, x0_form[None]])  # the pre-clip row, last (lincomb clip)
        used = [k for k in range(len(cols.keys)) if k != clip_col
                and forms[:, k].abs().max() > 0] or [0]
        coef = forms[:, used]
        if clip is not None:  # the clipped x0's column, last; the pre-clip row has none
            coef = torch.cat([coef, forms[:, clip_col:clip_col + 1]], dim=1)
        plan.chunks.append(Chunk([cols.keys[k] for k in used], [t for t, _ in part],
                                 coef.unsqueeze(0).contiguous(), clip))
    plan.scalars = {k: v for k, v in _scalars(tracer).items()
                    if k not in scalars_before or scalars_before[k] is not v}
    return plan
