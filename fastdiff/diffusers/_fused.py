"""The fused, sync-free `step` shared by every drop-in scheduler (see _trace.py for the maths).

`set_timesteps` is diffusers' own (so `timesteps`, `sigmas`, ... are exactly diffusers'). `step`
names the scheduler's state (_trace.state_key: scalars, which history is present, the timestep
given, the step options; no tensor value is read) and looks the StepPlan for it up among the
plans traced so far by any scheduler with the same class, config and `set_timesteps` arguments
(_shared.py). A state not traced yet is traced on the spot, from that state, on the CPU twin:
whatever the loop (img2img starting mid-schedule, a timestep outside the schedule, a step
before `set_timesteps`), the numbers are diffusers' for exactly that state and timestep.

Tracing is incremental so the first call is cheap: a miss traces one step; a miss at the
timestep the previous trace predicted next (the loop goes on as diffusers' loops do) traces
twice as many steps as last time, ahead along the schedule. A loop of n steps thus traces each
step once, in about log2(n) batches, each uploaded to the device in one non-blocking copy from
pinned memory (on the CPU each plan's own table is used); a later loop with the same settings
traces and copies nothing. Inside a CUDA graph capture the rest of the schedule is traced at
once (one captured copy; its host buffer is kept alive).

The step itself (_run.py) only does host bookkeeping and launches `fastdiff.ops.lincomb` once (up to
three outputs per launch: UniPC's corrected sample, history entry and next sample; a step
reading more than six tensors adds a partial-sum launch): no `.item()`, no `nonzero()`, no
device-to-host copy, so it is CUDA-graph capturable. The history tensors live in diffusers' own
attributes (`model_outputs`, `last_sample`, `timestep_list`, ...), so the state stays
inspectable exactly as in diffusers. What the trace cannot express (a tensor-valued step option
such as FlowMatch's `per_token_timesteps`) runs diffusers' own step, with a warning once.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import torch

from fastdiff.diffusers import _arguments, _learned, _noise, _run
from fastdiff.diffusers._arguments import STEP_SPECIAL as _STEP_SPECIAL
from fastdiff.diffusers._arguments import same as _same
from fastdiff.diffusers._limits import limit_plan
from fastdiff.diffusers._shared import FALLBACK, Shared, config_key, freeze, host_only, shared_for
from fastdiff.diffusers._trace import StepPlan, trace_step


@functools.cache
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


class _State:
    """fastdiff's per-scheduler bookkeeping, in one attribute (`_fd`) outside diffusers' state."""

    def __init__(self):
        self.shared: Shared | None = None
        self.window = 0  # steps traced by this scheduler's last trace
        self.expect = None  # (kind, timestep, options) of the step that trace predicted next
        self.host_schedule = (None, [])  # (self.timesteps it was read from, its values)
        self.clips: dict = {}
        self.noise_tables: dict = {}
        self.made: dict = {}  # the schedule tensors set_timesteps made, by name
        self.trace_error = "this step"  # why the last trace failed
        self.host_values: dict = {}  # id(a 0-dim timestep step() stored) -> (it, CPU copy)
        self.config_key = None  # (the config object, its frozen form): _shared.config_key


def _values(plan: StepPlan) -> list:
    """Every coefficient of a plan, as Python floats (one read of a few dozen numbers)."""
    return [a for c in plan.chunks for a in c.coef.view(-1).tolist()]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FusedStepMixin:
    """Mixed in before a diffusers scheduler class; see fused_class()."""

    _fd_base: type  # the diffusers class
    _fd_learned = None  # how a learned variance is handled: "slice" or "ddpm" (_learned.py)
    _fd_noise_f32 = False  # diffusers draws float32 noise even for half inputs
    _fd_noise_formula: str | None = None  # _noise.SIGMA / ALPHA_SIGMA / FLOW
    _fd_seed_from_generator = False  # a Brownian tree seeded by the step's generator
    # Step arguments beyond diffusers' usual three (CogVideoXDPM): tensors of the sample's shape
    # (history the pipeline passes back in) and timesteps; the step is then bound by name.
    _fd_step_inputs: tuple = ()
    _fd_step_timesteps: tuple = ()
    _fd_batched_timestep = False  # the pipeline passes t.expand(batch) (DDPMWuerstchen)
    _fd_index_nearest = False  # the step index is the nearest timestep's (FlowMapEuler)
    # (twin, timestep, kwargs) -> the StepPlan tracing would give, read from the schedule, or
    # None: trace it (_direct.py)
    _fd_direct = None
    # (kind, t_value of this step, upcoming=(value, position) of the next, schedule=the host
    # schedule) -> (tensor arguments present, ((name, kind, value), ...)) of the next step as
    # the class's pipelines call it, so tracing can look ahead
    _fd_next_arguments = None
    # Which implementation runs `step`: "auto" (the fastest fused kernel for the device), a
    # fastdiff.ops backend ("cuda", "triton", "cpu") for the fused launch, or "reference":
    # diffusers' own step, the specification the fused step is traced from (bitwise diffusers'
    # results: the check that swapping the scheduler changes nothing else). Set it before a loop.
    fastdiff_backend = "auto"

    def _fd_state(self) -> _State:
        state = self.__dict__.get("_fd")
        if state is None:
            state = self.__dict__["_fd"] = _State()
        return state

    # ---- set_timesteps: diffusers' schedule, then the shared twin ----------------------------
    def _fd_set_timesteps(self, *args, **kwargs):
        signature = _signature(self._fd_base.set_timesteps)
        arguments = _arguments.bind(self._fd_base.set_timesteps, self, args, kwargs)
        steps = arguments.get("num_inference_steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")
        result = self._fd_base.set_timesteps(self, *args, **kwargs)
        device = arguments.get("device")
        if "device" in signature.parameters:
            arguments["device"] = "cpu"
        on_host = device is None or torch.device(device).type == "cpu"
        state = self._fd_state()
        state.shared = shared_for(self, arguments, on_host)
        state.window, state.expect = 0, None
        state.host_schedule = (self.timesteps, state.shared.schedule)
        state.made = {name: self.__dict__.get(name) for name in ("timesteps", "sigmas")
                      if isinstance(state.shared.fresh.get(name), torch.Tensor)}
        return result

    def _fd_shared(self) -> Shared:
        state = self._fd_state()
        if state.shared is None:  # used before set_timesteps: the construction schedule
            state.shared = shared_for(self, None, True)
        return state.shared

    # ---- the timestep on the host, without a device sync -------------------------------------
    def _fd_schedule(self) -> list:
        """`self.timesteps` as Python numbers (read once per schedule; no copy when it came
        from set_timesteps)."""
        state = self._fd_state()
        source, values = state.host_schedule
        timesteps = self.timesteps
        if timesteps is not source:
            values = (timesteps.tolist() if hasattr(timesteps, "tolist")
                      else list(timesteps))  # a device schedule set from outside: one copy
            state.host_schedule = (timesteps, values)
        return values

    def _fd_position(self, timestep) -> int | None:
        """Where an element of `self.timesteps` (what pipelines pass) sits, by its storage
        offset: no value is read."""
        ts = self.timesteps
        if (isinstance(timestep, torch.Tensor) and isinstance(ts, torch.Tensor)
                and timestep.numel() == 1 and ts.dim() == 1 and ts.stride(0) == 1
                and timestep.device == ts.device and _same_storage(timestep, ts)):
            pos = timestep.storage_offset() - ts.storage_offset()
            if 0 <= pos < len(ts):
                return pos
        return None

    def _fd_host_timestep(self, timestep):
        """(the timestep's value as a Python number, its schedule position or None). A number
        or a CPU tensor is read on the host; another device tensor costs one copy."""
        pos = self._fd_position(timestep)
        schedule = self._fd_schedule()
        if pos is not None and pos < len(schedule):
            return schedule[pos], pos
        value = timestep.cpu().item() if isinstance(timestep, torch.Tensor) else timestep
        try:
            return value, schedule.index(value)
        except ValueError:
            return value, None

    def _fd_lookup(self, timestep, value=None) -> int:
        """diffusers' index_for_timestep (the second match when the timestep repeats), on the
        host copy of the schedule (`value`: the timestep's, when already read)."""
        if value is None:
            value, _ = self._fd_host_timestep(timestep)
        schedule = self._fd_schedule()
        if self._fd_index_nearest:
            return _arguments.nearest_index(schedule, self.timesteps.dtype, value)
        matches = [i for i, v in enumerate(schedule) if v == value]
        if not matches and not hasattr(self._fd_base, "index_for_timestep"):
            return len(schedule) - 1  # DPMSolverMultistepInverse's own _init_step_index rule
        if not matches:  # diffusers' own answer (an error, or the last index for DPM-Solver)
            return self._fd_base.index_for_timestep(
                self, torch.tensor(value), torch.tensor(schedule))
        return matches[1] if len(matches) > 1 else matches[0]

    def _fd_init_step_index(self, timestep, value=None) -> None:
        if self.__dict__.get("_begin_index") is None:  # (the inverse DPM-Solver has none)
            self._step_index = self._fd_lookup(timestep, value)
        else:
            self._step_index = self._begin_index

    # ---- the fused step ----------------------------------------------------------------------
    def _fd_step_named(self, *args, **kwargs):
        return _arguments.named_step(self, args, kwargs)

    def _fd_step(self, model_output, timestep, sample, *args, **kwargs):
        base = self._fd_base
        if self.fastdiff_backend == "reference":
            return base.step(self, model_output, timestep, sample, *args, **kwargs)
        if args or any(k not in _STEP_SPECIAL for k in kwargs):
            signature = _signature(base.step)
            bound = signature.bind(self, model_output, timestep, sample, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            extra = {k: v for k, v in arguments.items() if k not in _STEP_SPECIAL}
            if "kwargs" in extra:  # a **kwargs catch-all in diffusers' signature
                extra.update(extra.pop("kwargs"))
            defaults = {k: p.default for k, p in signature.parameters.items()}
            extra = {k: v for k, v in extra.items()
                     if not (k in defaults and _same(defaults[k], v))}
            generator = arguments.get("generator")
            variance_noise = arguments.get("variance_noise")
            return_dict = arguments.get("return_dict", True)
        else:
            extra = {}
            generator = kwargs.get("generator")
            variance_noise = kwargs.get("variance_noise")
            return_dict = kwargs.get("return_dict", True)

        plan, key = self._fd_plan(timestep, extra)
        if plan is None or plan is FALLBACK:
            out = base.step(self, model_output, timestep, sample, *args, **kwargs)
            if plan is None and key is not None:  # diffusers accepts it: remember and say so
                state = self._fd_state()
                self._fd_unfused(key, state.shared, state.trace_error)
            return out
        return self._fd_run(plan, model_output, timestep, sample, generator, variance_noise,
                            return_dict)

    def _fd_unfused(self, key, shared, reason) -> None:
        if key is not None:
            shared.store(key, FALLBACK)
        message = f"{reason}"
        if message not in shared.warned:
            shared.warned.add(message)
            warnings.warn(f"fastdiff.diffusers.{type(self).__name__}: {message} is not fused;"
                          " diffusers' own step runs instead", stacklevel=4)

    def _fd_plan(self, timestep, extra: dict, inputs: dict | None = None,
                 times: dict | None = None):
        """(the StepPlan of this state, its key); (None, key) when it cannot be traced.
        `inputs` / `times`: the extra tensor and timestep arguments of _fd_step_named."""
        shared = self._fd_shared()
        tensor_options = [k for k, v in extra.items() if isinstance(v, torch.Tensor)]
        several = isinstance(timestep, torch.Tensor) and timestep.numel() != 1
        batched = (_arguments.uniform(self, timestep)
                   if several and self._fd_batched_timestep else None)
        if tensor_options or (several and batched is None):
            why = (f"step({tensor_options[0]}=<tensor>)" if tensor_options
                   else "a timestep tensor with several elements")
            self._fd_unfused(None, shared, why)
            return FALLBACK, None
        if batched is not None:  # one value for the batch: traced at shape [1]
            value, position = batched
            kind = ("tensor", timestep.dtype, (1,))
        else:
            value, position = self._fd_host_timestep(timestep)
            kind = _arguments.kind(timestep)
        if shared.index_based and self.__dict__.get("_step_index") is None:
            # as diffusers' step would, from the host schedule (ours: with the value just read)
            init = self._init_step_index
            if getattr(init, "__func__", None) is FusedStepMixin._fd_init_step_index:
                init(timestep, None if batched is not None else value)
            else:
                init(timestep)
        options, trace_kwargs = freeze(extra), dict(extra)
        if inputs is not None:
            options, trace_kwargs = _arguments.named_options(self, extra, inputs, times)
        key = shared.key(self.__dict__, kind, value, options)
        plan = shared.find(key)
        if plan is None:
            plan = self._fd_trace(shared, key, kind, value, position, trace_kwargs, options)
        return plan, key

    def _fd_trace(self, shared: Shared, key, kind, value, position, extra, options):
        """Traces from this scheduler's state: one step, or twice the last trace's steps when
        the loop arrived where that trace predicted (see the module doc)."""
        state = self._fd_state()
        size = 2 * state.window if state.window and key[1:] == state.expect else 1
        if _capturing():
            size = len(shared.schedule) + 1
        tensor_args, named = None, ()
        if isinstance(extra, tuple):  # _fd_step_named: the class predicts the next arguments
            extra, tensor_args, named = extra
            if self._fd_next_arguments is None:
                size = 1
        kwargs = dict(extra)
        if "generator" in _signature(self._fd_base.step).parameters:
            kwargs["generator"] = None
        plans, next_key = [], None
        direct = self._fd_direct if tensor_args is None else None
        with host_only():
            shared.overlay(self.__dict__, state.host_values)
            make = functools.partial(_arguments.twin_timestep, kind)
            def set_named():  # (made here, with the caller's modes off)
                for name, t_kind, t_value in named:
                    kwargs[name] = (None if t_kind is None
                                    else _arguments.twin_timestep(t_kind, t_value))

            set_named()
            t, k = make(value), key
            while True:  # up to `size` steps
                plan = direct(shared.twin, t, kwargs) if direct is not None else None
                if plan is None:
                    before = shared.snapshot()
                    try:
                        plan = trace_step(shared.twin, t, kwargs, tensor_args)
                    except Exception as error:  # diffusers' step runs instead (and raises)
                        if not plans:
                            state.trace_error = f"this step ({error})"
                            return None
                        break
                    plan.timestep = t
                    if not all(map(math.isfinite, _values(plan))):
                        plan = limit_plan(self, shared, before, t, kwargs, plan)
                else:  # (finite: _direct.py checks)
                    plan.timestep = t
                if _learned.mode(self) in ("ddpm", "unclip"):
                    _learned.retarget_noise(self, shared.twin, plan, t, kwargs)
                shared.store(k, plan)
                plans.append(plan)
                upcoming = shared.next_timestep(position)
                if upcoming is None:
                    break
                if tensor_args is not None:  # the arguments the pipeline passes next
                    tensor_args, named = self._fd_next_arguments(
                        kind, t_value=value, upcoming=upcoming, schedule=shared.schedule)
                    options = (options[0], tensor_args, named)
                    set_named()
                value, position = upcoming
                next_key = (kind, value, options)  # (its state is the twin's: not keyed yet)
                if len(plans) == size:
                    break
                k = shared.key(shared.twin.__dict__, kind, value, options)
                if shared.find(k) is not None:
                    break
                t = make(value)
            shared.add_window(plans)
        state.window, state.expect = len(plans), next_key
        return plans[0]

    _fd_run = _run.run  # (the launch: _run.py)

    # ---- construction: diffusers' __init__, then what diffusers would only notice later ------
    _fd_orders: tuple | None = None  # the solver_order range the step supports (None: any)

    def _fd_init(self, *args, **kwargs):
        orders = self._fd_orders
        if orders is not None:  # before diffusers' __init__, which may already fail on it
            bound = _signature(self._fd_base.__init__).bind(self, *args, **kwargs)
            bound.apply_defaults()
            self._fd_check_order(orders, bound.arguments.get("solver_order"))
        self._fd_base.__init__(self, *args, **kwargs)
        config_key(self)  # the plan cache's key of this config, once (not in set_timesteps)
        # diffusers' pipelines record a component's library from `component.__module__`: a
        # pipeline saved with a drop-in then names diffusers' own class, which plain diffusers
        # loads (fastdiff's class is loaded by passing it, see the README)
        self.__dict__["__module__"] = self._fd_base.__module__

    def _fd_check_order(self, orders, order) -> None:
        if order is not None and not (
                orders[0] <= order and (orders[1] is None or order <= orders[1])):
            allowed = (f"{orders[0]} to {orders[1]}" if orders[1] is not None
                       else f">= {orders[0]}")
            raise ValueError(f"solver_order must be {allowed} for {type(self).__name__}, got"
                             f" {order!r}")

    # ---- add_noise / scale_noise: see _noise.py ----------------------------------------------
    def _fd_add_noise(self, original_samples, noise, timesteps):
        if self._fd_noise_formula not in (_noise.SIGMA, _noise.ALPHA_SIGMA):
            return self._fd_base.add_noise(self, original_samples, noise, timesteps)
        return _noise.add_noise(self, original_samples, noise, timesteps)

    def _fd_scale_noise(self, sample, timestep, noise=None):
        if self._fd_noise_formula != _noise.FLOW:
            return self._fd_base.scale_noise(self, sample, timestep, noise)
        return _noise.scale_noise(self, sample, timestep, noise)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if (a._base if a._base is not None else a) is (b._base if b._base is not None else b):
        return True  # (a view of a view: IPNDM's timesteps are a slice of a larger tensor)
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:  # a fake tensor has no data
        return False
