"""The step arguments of the drop-ins beyond diffusers' usual `(model_output, timestep, sample)`.

- CogVideoXDPMScheduler's step takes the previous step's x0 and timestep back from its pipeline
  (`old_pred_original_sample`, `timestep_back`; positionally, between the usual three): the step
  is bound by diffusers' signature, the tensor is one more input of the fused launch (source
  ("arg", name)), and which tensors are present and the timesteps' values are part of the traced
  state's key.
- DDPMWuerstchenScheduler's pipelines pass `t.expand(batch)`: one schedule entry for the whole
  batch, traced once at shape [1].
"""

from __future__ import annotations

import functools
import inspect

import torch

from fastdiff.diffusers._shared import FALLBACK, freeze, host_only

STEP_SPECIAL = ("self", "model_output", "timestep", "sample", "generator", "variance_noise",
                "return_dict")
_NO_DEFAULT = object()


@functools.cache
def signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


@functools.cache
def _parameters(fn) -> tuple[tuple, frozenset, tuple] | None:
    """(positional names after self, every name, the names without a default) of `fn`, or
    None when it takes *args or **kwargs (then only inspect's bind knows)."""
    params = list(signature(fn).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    positional = tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD)
    required = tuple(p.name for p in params if p.default is p.empty)
    return positional, frozenset(p.name for p in params), required


def bind(fn, self, args: tuple, kwargs: dict) -> dict:
    """The arguments a call `fn(self, *args, **kwargs)` passes, by name (inspect's
    `bind(...).arguments` without self; no defaults): done by hand for the usual call, as
    inspect's bind costs ~15 us of every first set_timesteps."""
    params = _parameters(fn)
    if params is not None:
        positional, names, required = params
        arguments = {**dict(zip(positional, args)), **kwargs}
        if (len(args) <= len(positional) and all(k in names for k in kwargs)
                and not any(n in kwargs for n in positional[:len(args)])
                and all(n in arguments for n in required)):
            return arguments
    arguments = dict(signature(fn).bind(self, *args, **kwargs).arguments)
    arguments.pop(next(iter(signature(fn).parameters)))
    return arguments


def same(a, b) -> bool:
    """Whether an argument equals its default (a tensor or an array never does)."""
    if a is b:
        return True
    if hasattr(a, "shape") or hasattr(b, "shape"):
        return False
    return a == b


def kind(timestep):
    """What a trace keeps of the caller's timestep: its number type, or a tensor's dtype and
    shape."""
    if isinstance(timestep, torch.Tensor):
        return ("tensor", timestep.dtype, tuple(timestep.shape))
    return type(timestep)


def twin_timestep(kind, value):
    """The timestep as the twin gets it: the caller's kind (a number type, or a tensor's dtype
    and shape), on the CPU."""
    if isinstance(kind, tuple):
        return torch.full(kind[2], value, dtype=kind[1])
    return kind(value)


def named_step(self, args, kwargs):
    """`step` of a class with more tensor or timestep arguments, bound by diffusers'
    signature (CogVideoXDPM's positional order differs)."""
    base = self._fd_base
    if self.fastdiff_backend == "reference":
        return base.step(self, *args, **kwargs)
    sig = signature(base.step)
    bound = sig.bind(self, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    inputs = {n: arguments.pop(n) for n in self._fd_step_inputs}
    times = {n: arguments.pop(n) for n in self._fd_step_timesteps}
    defaults = {k: p.default for k, p in sig.parameters.items()}
    extra = {k: v for k, v in arguments.items() if k not in STEP_SPECIAL
             and not same(defaults.get(k, _NO_DEFAULT), v)}
    plan, key = self._fd_plan(arguments["timestep"], extra, inputs, times)
    if plan is None or plan is FALLBACK:
        out = base.step(self, *args, **kwargs)
        if plan is None and key is not None:
            state = self._fd_state()
            self._fd_unfused(key, state.shared, state.trace_error)
        return out
    return self._fd_run(plan, arguments["model_output"], arguments["timestep"],
                        arguments["sample"], arguments.get("generator"),
                        arguments.get("variance_noise"), arguments["return_dict"], inputs)


def nearest_index(schedule: list, dtype: torch.dtype, value) -> int:
    """FlowMapEulerDiscrete's first step index: the nearest entry of the schedule in float32
    within 1e-3, else 0 (diffusers' rule, on a CPU copy of the host values: no device read)."""
    with host_only():  # (fastdiff's own CPU arithmetic, outside the caller's torch modes)
        diffs = (torch.tensor(schedule, dtype=dtype).float() - float(value)).abs()
        index = int(diffs.argmin())
        return index if float(diffs[index]) <= 1e-3 else 0


def uniform(self, timestep):
    """(value, position) of a timestep tensor holding one value for the whole batch (what
    `t.expand(batch)` gives: a view of one schedule entry, located without reading it;
    otherwise read on the host, one copy), or None when its values differ."""
    first = timestep[(0,) * timestep.dim()]  # a 0-dim view of the first entry
    if all(stride == 0 for stride in timestep.stride()):
        position = self._fd_position(first)
        if position is not None and position < len(self._fd_schedule()):
            return self._fd_schedule()[position], position
    values = timestep.detach().reshape(-1).cpu()
    if not bool((values == values[0]).all()):
        return None
    value, _ = self._fd_host_timestep(values[0])
    schedule = self._fd_schedule()
    return value, (schedule.index(value) if value in schedule else None)


def named_options(self, extra: dict, inputs: dict, times: dict):
    """(the options part of the state key, what _fd_trace gets) for a named step: the extra
    options, which tensor arguments are present, each timestep argument's kind and value."""
    trace_kwargs, named = dict(extra), []
    for name, t in times.items():
        if t is None:
            named.append((name, None, None))
            trace_kwargs[name] = None
        else:
            t_value, _ = self._fd_host_timestep(t)
            named.append((name, kind(t), t_value))
    present = tuple(n for n, v in inputs.items() if v is not None)
    for name in inputs:
        trace_kwargs.setdefault(name, None)
    return (freeze(extra), present, tuple(named)), (trace_kwargs, present, named)
