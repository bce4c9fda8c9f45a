"""What every drop-in scheduler with the same class, config and `set_timesteps` arguments shares:
its CPU twin (a plain diffusers scheduler with that schedule, on which `step` is traced), the
twin's schedule, and every StepPlan traced so far, keyed by the state it was traced from
(_trace.state_key). A pipeline calls `set_timesteps` on every call and builds a new scheduler
per pipeline: both find the plans traced by the first.

The twin is built once per (class, config, arguments), without diffusers' __init__ where
possible (KDPM2's builds a 1000-step schedule: 0.66 s): a shallow copy of the caller's own
scheduler right after diffusers' `set_timesteps`, whose tables are then on the CPU; for a
schedule on a GPU, that copy runs `set_timesteps` again on the CPU (no device-to-host copy).
Twins never repeat diffusers' warnings: the caller's scheduler has already shown them.
"""

from __future__ import annotations

import collections
import contextlib
import warnings

import numpy as np
import torch

from fastdiff.diffusers import _learned
from fastdiff.diffusers._trace import StepPlan, recording_class, state_key, twin_value

# Never part of the traced state: fastdiff's own attribute, the warning flag of
# scale_model_input (the twin's is always set), the config's storage, the library marker.
PRIVATE = frozenset({"_fd", "fastdiff_backend", "is_scale_input_called", "_internal_dict",
                     "__module__"})
FALLBACK = object()  # a state whose step runs diffusers' own code (see FusedStepMixin.step)


_PLAIN = frozenset({int, float, str, bool, type(None)})


def freeze(value):
    """A hashable, exact stand-in for a config or argument value (lists, arrays, tensors)."""
    if type(value) in _PLAIN:  # (most config values)
        return value
    if hasattr(value, "tolist") and not isinstance(value, (int, float)):
        value = value.tolist()
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def host_only():
    """Suspends the caller's torch modes (FakeTensorMode, dispatch-counting modes, a
    `torch.device` context) for host arithmetic on fastdiff's own CPU tensors (tracing the
    twin, probing diffusers' behaviour), never on the caller's tensors."""
    from torch._ops import _len_torch_dispatch_stack_pre_dispatch

    if not (torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()
            or _len_torch_dispatch_stack_pre_dispatch()):
        return _NO_MODES  # no mode to suspend (the usual case: ~15 us less per trace)
    return _suspended()


_NO_MODES = contextlib.nullcontext()  # (cheaper to enter than a generator's context)


@contextlib.contextmanager
def _suspended():
    from torch.utils._python_dispatch import _disable_current_modes

    saved = [torch._C._pop_torch_function_stack()
             for _ in range(torch._C._len_torch_function_stack())]
    try:
        with _disable_current_modes():
            yield
    finally:
        for mode in reversed(saved):
            torch._C._push_on_torch_function_stack(mode)


@contextlib.contextmanager
def quiet():
    """diffusers' logger and Python warnings silenced (a twin repeats what ours just said)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def _is_schedule(value) -> bool:
    """A value that set_timesteps fixes and step never changes: tables (at most 1-D: history
    tensors have the sample's shape), arrays, other objects (the config). Lists and scalars
    are state."""
    if isinstance(value, torch.Tensor):
        return value.dim() <= 1
    return not isinstance(value, (list, bool, int, float, str, type(None)))


class Shared:
    """One (class, config, set_timesteps arguments)."""

    def __init__(self, sched, arguments: dict | None, on_host: bool):
        base = sched._fd_base
        self.twin = self._make_twin(sched, base, arguments, on_host)
        self.overrides = dict(_learned.trace_overrides(sched), is_scale_input_called=True)
        fresh = dict(self.twin.__dict__)
        if "variance_type" in self.overrides:  # the twin's step without the variance output
            from diffusers.configuration_utils import FrozenDict

            fresh["_internal_dict"] = FrozenDict({**fresh["_internal_dict"],
                                                  "variance_type":
                                                      self.overrides["variance_type"]})
        self.fresh = fresh
        self.static = frozenset(PRIVATE | set(self.overrides)
                                | {k for k, v in fresh.items() if _is_schedule(v)})
        self.dynamic_fresh = [k for k in fresh if k not in self.static]
        timesteps = fresh.get("timesteps")
        if isinstance(timesteps, (torch.Tensor, np.ndarray)):
            self.schedule = timesteps.tolist()
        else:
            self.schedule = list(timesteps) if timesteps is not None else []
        self.index_based = "_step_index" in fresh
        self.twin.__class__ = recording_class(base)
        self.plans: dict = {}  # state key -> StepPlan (or FALLBACK)
        self.by_reads: dict = {}  # a plan's reads -> {the key restricted to them: plan}
        self.noise_tables: dict = {}  # add_noise's device copies of the schedule (_noise.py)
        self.by_coefs: dict = {}  # a plan's coefficients (bytes) -> a plan holding them
        self.warned: set = set()

    @staticmethod
    def _make_twin(sched, base, arguments, on_host):
        twin = base.__new__(base)
        twin.__dict__.update({k: (list(v) if isinstance(v, list) else v)
                              for k, v in sched.__dict__.items() if k not in PRIVATE
                              or k == "_internal_dict"})
        if arguments is not None and on_host:
            on_cpu = all(v.device.type == "cpu" for v in twin.__dict__.values()
                         if isinstance(v, torch.Tensor) and v.dim() <= 1)
            if on_cpu:  # ours' own schedule, already on the CPU: nothing to recompute
                return twin
        with quiet():  # diffusers code that may warn again what ours has said
            if arguments is not None and not on_host:
                twin.set_timesteps(**arguments)
            on_cpu = all(v.device.type == "cpu" for v in twin.__dict__.values()
                         if isinstance(v, torch.Tensor) and _is_schedule(v))
            if arguments is None or not on_cpu:  # from the config: diffusers' own __init__
                twin = base.from_config(sched.config)
                if arguments is not None:
                    twin.set_timesteps(**arguments)
        return twin

    def overlay(self, ours: dict, host: dict | None = None) -> None:
        """Puts the twin in the state of `ours` (a scheduler's __dict__): the schedule stays
        the twin's, every state attribute is ours' (history tensors as placeholders)."""
        d = self.twin.__dict__
        d.clear()
        d.update(self.fresh)
        static = self.static
        for name, value in ours.items():
            if name not in static:
                d[name] = twin_value(value, host=host)
        for name in self.dynamic_fresh:
            if name not in ours:
                del d[name]
        d.update(self.overrides)

    def key(self, attrs: dict, kind, value, options) -> tuple:
        return state_key(attrs, self.static), kind, value, options

    @staticmethod
    def _restrict(key: tuple, reads: frozenset) -> tuple:
        return (frozenset([e for e in key[0] if e[0] in reads]),) + key[1:]

    def store(self, key: tuple, plan) -> None:
        self.plans[key] = plan
        if isinstance(plan, StepPlan):
            self.by_reads.setdefault(plan.reads, {})[self._restrict(key, plan.reads)] = plan

    def find(self, key: tuple):
        """The plan for this state: one traced from this very state, or from one that differs
        only in what the traced step never read (then remembered under this key too)."""
        plan = self.plans.get(key)
        if plan is None:
            for reads, table in self.by_reads.items():
                plan = table.get(self._restrict(key, reads))
                if plan is not None:
                    self.plans[key] = plan
                    break
        return plan

    def add_window(self, plans: list[StepPlan]) -> None:
        """Device tables for new plans. A plan whose coefficients some plan already has (the
        same step from a state differing only in bookkeeping, e.g. UniPC's timestep_list left
        from the last loop) shares that plan's tables: no new upload."""
        new, same = [], []
        for plan in plans:
            signature = tuple((tuple(c.coef.shape), c.coef.numpy().tobytes())
                              for c in plan.chunks)
            known = self.by_coefs.get(signature)
            if known is not None:
                same.append((plan, known))
            else:
                self.by_coefs[signature] = plan
                new.append(plan)
        if new:
            Window(new)
        for plan, known in same:
            plan.window, plan.slot_in_window = known.window, known.slot_in_window

    def snapshot(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v)
                for k, v in self.twin.__dict__.items()}

    def restore(self, snapshot: dict) -> None:
        d = self.twin.__dict__
        d.clear()
        d.update({k: (list(v) if isinstance(v, list) else v) for k, v in snapshot.items()})

    def next_timestep(self, position):
        """(value, position) of the timestep the loop passes next, or None at the end: the
        twin's step index for index-based classes, else the next schedule position."""
        if self.index_based:
            position = self.twin.__dict__.get("_step_index")
        elif position is not None:
            position += 1
        if position is None or not 0 <= position < len(self.schedule):
            return None
        return self.schedule[position], position


_SHARED: collections.OrderedDict = collections.OrderedDict()  # least recently used first
_SHARED_SIZE = 32


def config_key(sched):
    """freeze(config), remembered with the config object it was made from (diffusers'
    register_to_config replaces that object): made once, when the scheduler is built."""
    state = sched._fd_state()
    internal = sched.__dict__.get("_internal_dict")
    if state.config_key is None or state.config_key[0] is not internal:
        state.config_key = (internal, freeze(dict(sched.config)))
    return state.config_key[1]


def shared_for(sched, arguments: dict | None, on_host: bool) -> Shared:
    """The Shared state of (type(sched), its config, arguments): arguments None for a
    scheduler used before set_timesteps (its construction schedule)."""
    try:
        key = (type(sched), config_key(sched), freeze(arguments))
        hash(key)
    except TypeError:  # an unhashable value: this scheduler traces for itself
        return Shared(sched, arguments, on_host)
    shared = _SHARED.get(key)
    if shared is None:
        shared = _SHARED[key] = Shared(sched, arguments, on_host)
        while len(_SHARED) > _SHARED_SIZE:
            _SHARED.popitem(last=False)
    else:
        _SHARED.move_to_end(key)
    return shared


class Window:
    """Plans traced together, with their coefficients uploaded to a device in one copy."""

    def __init__(self, plans: list[StepPlan]):
        self.plans = plans
        self.coefs = [c.coef for p in plans for c in p.chunks]
        self.copies: dict = {}
        for i, p in enumerate(plans):
            p.window, p.slot_in_window = self, i

    def tables(self, device: torch.device, dtype: torch.dtype) -> list[list[torch.Tensor]]:
        """Per plan, its chunks' coefficients on `device` (pinned, non-blocking on CUDA)."""
        key = (device, dtype)
        tables = self.copies.get(key)
        if tables is None and device.type == "cpu":  # no copy to make: each plan's own
            tables = [[c.coef.to(dtype) for c in p.chunks] for p in self.plans]
            self.copies[key] = tables
        elif tables is None:
            from fastdiff.diffusers._noise import upload

            flat = torch.cat([c.reshape(-1) for c in self.coefs] or [torch.zeros(1)])
            flat, host = upload(flat.to(dtype), device)
            parts = iter(flat.split([c.numel() for c in self.coefs] + [flat.numel()
                                    - sum(c.numel() for c in self.coefs)]))
            tables = [[next(parts).view(c.coef.shape) for c in p.chunks] for p in self.plans]
            self.copies[key] = tables
            self.copies[key, "host"] = host  # kept for as long as the device copy is
        return tables
