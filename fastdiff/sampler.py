"""fastdiff.Sampler and fastdiff.sample: run a solver's plan, one fused kernel per model call.

    sampler = fastdiff.Sampler(model, "dpmpp_2m", sigmas=sigmas)
    samples = sampler(noise, **cond)

The plan (fastdiff.solvers) is built once per (solver, sigmas, options) and lowered once per
(model scalings, dtype, device) into small device coefficient tables; each stage is then a model
call followed by a single fused linear-combination launch, with no host sync and no Python
branch on tensor values, so the whole loop can be captured in one CUDA graph (graph=True).

Non-finite guard (check_finite=True, the default): every stage's launch lowers a device flag to
its index when its output holds an inf or NaN (fastdiff.ops.lincomb's `flag`); nothing is read
inside the loop. An eager run reads the flag once after the loop and raises NonFiniteError
naming the first stage (model call) and its sigma. A graph replay does not read it (that would
sync): after your own sync, call `sampler.check_finite()`.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
import warnings
from collections.abc import Callable

import torch

from fastdiff.denoisers import CFGDenoiser, Denoiser, ThresholdedDenoiser, check_denoised
from fastdiff.ops import BACKENDS, dynamic_threshold, lincomb, resolve
from fastdiff.ops._backends import traced
from fastdiff.ops.lincomb import NO_NONFINITE, launch_unchecked, nonfinite_flag, same_dense_layout
from fastdiff.ops.threshold import static_bounds
from fastdiff.reference.solvers import SOLVERS
from fastdiff.reference.solvers._utils import default_noise_sampler
from fastdiff.solvers import no_gc, plans_for
from fastdiff.solvers.lowering import Launch, NotNarrower, Scalings, lower

# Solvers whose reference draws Brownian-bridge noise over overlapping intervals.
_BROWNIAN = {"dpmpp_sde", "dpmpp_sde_flow"}


class NonFiniteError(FloatingPointError):
    """A sampling run produced an inf or NaN: `stage` is the model call after which the sample
    first went non-finite (-1: before the first call), `sigma` that call's noise level."""

    def __init__(self, message: str, stage: int, sigma: float | None):
        super().__init__(message)
        self.stage, self.sigma = stage, sigma


def _number(name: str, value) -> float:
    """A finite host number (a plan is host float64 math: tensors, strings and NaN are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# Per (solver, model side): the history kind the last Sampler kept (see Sampler.__init__).
_KEPT: dict[tuple, str] = {}


class _ModelAdapter:
    """How the engine calls the model, and how its output becomes D (Scalings)."""

    def __init__(self, model: Callable, guidance: float | None, param: str,
                 cond_key: str = "cond"):
        # Thresholding / clipping of the (guided) D is fused into the step kernel (lowering.py).
        self.threshold = None
        if isinstance(model, ThresholdedDenoiser):
            if model.dynamic_ratio is not None or model.clip is not None:
                self.threshold = model
            model = model.inner_model
        if isinstance(model, CFGDenoiser):
            if guidance is not None:
                raise ValueError("guidance is given twice: model is a CFGDenoiser with scale"
                                 f" {model.scale} and guidance={guidance}")
            model, guidance, cond_key = model.inner_model, model.scale, model.cond_key
        if guidance is not None:
            guidance = _number("guidance", guidance)
        self.cond_key = cond_key
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, sigma, **cond), got"
                            f" {type(model).__name__}")
        self.model, self.guidance, self.param = model, guidance, param
        self.denoiser = model if isinstance(model, Denoiser) else None
        self._clip_constants: dict = {}

    def weights(self) -> tuple[float, ...]:
        return (1.0,) if self.guidance is None else (1.0 - self.guidance, self.guidance)

    def scalings(self, sigmas: list[float]) -> Scalings:
        if self.denoiser is None:  # a k-diffusion denoiser: its output is D
            n = len(sigmas)
            return Scalings((0.0,) * n, (1.0,) * n, (1.0,) * n, self.weights(),
                            clip=self.threshold is not None)
        fn = self.denoiser.flow_scalings if self.param == "flow" else self.denoiser.scalings
        c_skip, c_out, c_in = fn(torch.tensor(sigmas, dtype=torch.float64))
        return Scalings(tuple(c_skip.tolist()), tuple(c_out.tolist()), tuple(c_in.tolist()),
                        self.weights(), clip=self.threshold is not None)

    def clip_bounds(self, inputs: list[torch.Tensor], table: torch.Tensor, row: int,
                    backend: str) -> torch.Tensor:
        """Per-sample (bound, divisor) of the kernel's clip, as ThresholdedDenoiser defines it:
        dynamic thresholding's s from a fused quantile reduction over the pre-clip row, then
        the static clip (after dividing by s, clamp(., -c, c) is a bound of c * s)."""
        th, x = self.threshold, inputs[0]
        key = (x.shape[0], table.dtype, x.device)
        if key not in self._clip_constants:  # built once: no host-to-device copy per step
            self._clip_constants[key] = static_bounds(th.clip or 1.0, *key)
        static = self._clip_constants[key]
        if th.dynamic_ratio is None:
            return static
        bounds = dynamic_threshold(inputs, table, row, th.dynamic_ratio, th.max_value,
                                   backend=backend)
        return bounds * static if th.clip is not None and th.clip < 1 else bounds

    def level_values(self, sigmas: list[float]) -> list[float]:
        """The model's noise level per call, on the host: sigma for a plain denoiser, the
        network's time input for a Denoiser (computed once per plan, never per device)."""
        d = self.denoiser
        if d is None:
            return list(sigmas)
        out = []
        for s in sigmas:
            s64 = torch.tensor(s, dtype=torch.float64)
            time = (d.flow_time_input(s64) if self.param == "flow" and d.prediction == "flow"
                    else d.time_input(s64 / (1 - s64) if self.param == "flow" else s64))
            out.append(float(time))
        return out

    def levels(self, values: list[float], batch: int, dtype, device,
               sigmas_dtype=torch.float64) -> list[torch.Tensor]:
        """What the model gets as its noise level per call ([B] or [2B] with guidance), made
        on the device: a plain denoiser gets k-diffusion's `sigmas[i] * s_in`, i.e. sigma
        rounded to the schedule's dtype, then to x's (so x / (1 + sigma**2) stays in x's
        dtype); a Denoiser's network gets its time input as `Denoiser` passes it (fp32 for
        fp16/bf16 data, as diffusers passes timesteps)."""
        b = batch if self.guidance is None else 2 * batch
        if self.denoiser is None:
            return [torch.full((b,), v, dtype=sigmas_dtype, device=device).to(dtype)
                    for v in values]
        t_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        return [torch.full((b,), v, dtype=t_dtype, device=device) for v in values]

    def batch_cond(self, cond: dict) -> dict:
        if self.guidance is None:
            return cond
        from fastdiff.denoisers import _cat

        if "cond" not in cond or "uncond" not in cond:
            raise ValueError("guidance needs the conditioning: call the sampler with cond=..."
                             " and uncond=...")
        rest = {k: v for k, v in cond.items() if k not in ("cond", "uncond")}
        return {self.cond_key: _cat(cond["uncond"], cond["cond"]), **rest}

    def __call__(self, x_in: torch.Tensor, level: torch.Tensor, cond: dict) -> list[torch.Tensor]:
        """The model's output parts: [D] or [out], or the two guidance halves."""
        if self.guidance is not None:
            x_in = torch.cat([x_in, x_in])
        fn = self.denoiser.network if self.denoiser is not None else self.model
        out = fn(x_in, level, **cond)
        # The kernels read it by pointer: a wrong shape, dtype or device is an error here.
        # A Denoiser's network may answer in any float dtype (Denoiser combines it in fp32).
        check_denoised(out, x_in, "model" if self.denoiser is None else
                       "the Denoiser's network", exact_dtype=self.denoiser is None)
        if out.dtype != x_in.dtype:
            out = out.to(x_in.dtype)
        return [out] if self.guidance is None else list(out.chunk(2))


def _lifetimes(launches: list[Launch], history_kind: str) -> list[list[tuple]]:
    """Per launch, the registers read for the last time by it (or by the model call before
    it), so their buffers can hold later outputs. The final output is never released."""
    last: dict[tuple, int] = {}
    buffered = frozenset(("F", "D", "E", "U", "V", "T"))
    for i, launch in enumerate(launches):
        if launch.call >= 0:
            last[("F", launch.call)] = i
        for ref in launch.inputs:
            if ref[0] in buffered:
                last[ref] = i  # (a Ref is the tuple (kind, index): the same key)
        for name in launch.outputs:  # written, possibly never read (e.g. a history entry)
            key = (("F", launch.call + 1) if name == "F" else
                   ("U" if history_kind == "D" else "V", launch.call) if name == "HU"
                   else ("T", int(name[1:])) if name[0] == "T"  # a split stage's partial
                   else (history_kind, launch.call))
            if name != "out":
                last.setdefault(key, i)
    dead: list[list[tuple]] = [[] for _ in launches]
    for key, i in last.items():
        dead[i].append(key)
    return dead


class _Buffers:
    """Output buffers of one run, recycled once the plan says their register is dead.

    Every stage writes a fresh state (and often a history entry); allocating each anew costs,
    on CPU, page faults on every first touch (measured: 62 faults and ~80 us per DPM++(2M)
    step at 2x4x64x64, more than the fused kernel itself). A run needs only a few live
    buffers; on CPU the spare ones also carry over to the next run. (On CUDA the caching
    allocator recycles memory already, and buffers must stay inside one run so a captured
    graph never shares them with an eager run.)"""

    def __init__(self, like: torch.Tensor, spare: dict):
        self.like = like
        self.key = (like.shape, like.dtype, like.device, like.stride())
        self.spare = spare.setdefault(self.key, []) if like.device.type == "cpu" else []
        self.owned: list[torch.Tensor] = []
        self.recycle = not traced(like)  # a traced run (torch.compile, fakes) plans its own memory

    def take(self) -> torch.Tensor:
        try:
            t = self.spare.pop()
        except IndexError:
            t = torch.empty_like(self.like)
        self.owned.append(t)
        return t

    def release(self, t: torch.Tensor | None, live: dict) -> None:
        """Recycles `t` if this run allocated it and no live register shares its storage (a
        model may return its input, or a view of it)."""
        if t is None or not self.recycle or not any(t is o for o in self.owned):
            return
        storage = t.untyped_storage()._cdata  # (fake tensors have storages, not pointers)
        if any(r.untyped_storage()._cdata == storage for r in live.values()
               if isinstance(r, torch.Tensor)):
            return
        self.owned = [o for o in self.owned if o is not t]
        self.spare.append(t)

    def close(self) -> None:
        if len(self.spare) > 8:  # bound what an unusual plan leaves behind
            del self.spare[8:]


class Sampler:
    """Samples with a fixed-step solver, every step one fused kernel launch.

    Args:
        model: a denoiser `model(x, sigma, **cond) -> x0` (k-diffusion convention), a
            `fastdiff.denoisers.Denoiser` wrapping a network (its parameterisation and input
            scaling are fused into the step), or a `CFGDenoiser`.
        solver: a name from `fastdiff.reference.solvers.SOLVERS` (adaptive solvers excluded).
        sigmas: the noise levels, descending (flow solvers: the flow times s, 1 -> 0), or a tuned
            plan (`fastdiff.tune`, `fastdiff.tuning.load_plan`; warns if made for another
            model or solver).
        guidance: classifier-free guidance scale; then call with cond=... and uncond=..., which
            reach the network batched as `cond_key` (a CFGDenoiser model brings its own).
        backend: "auto", "cuda", "triton", "cpu" or "reference" for the fused steps.
        graph: capture the whole loop, model calls included, in one CUDA graph.
        noise: for stochastic solvers: "philox" (default) generates the noise inside the step
            kernels from per-sample seeds (sample i is the same in any batch, on any backend;
            Brownian-bridge solvers get correctly correlated increments), "generator" draws
            noise tensors like the reference solvers do (from `noise_sampler`, or `generator` /
            torch's global generator), for exact agreement with k-diffusion.
        noise_sampler: a k-diffusion noise sampler `noise_sampler(sigma, sigma_next) -> tensor`
            (implies noise="generator"; the same one gives the same samples as k-diffusion).
        check_finite: the non-finite guard (default on): an eager run raises NonFiniteError
            with the first stage and sigma whose output held an inf or NaN (one read of a
            device flag after the loop, none inside it); with graph=True call
            `check_finite()` after your own sync. False: no flag, no read.
        **options: the solver's keyword options (eta, s_noise, order, ...).

    Call as `sampler(noise, seed=None, seeds=None, generator=None, **cond)`: Philox seeds are
    `seeds` (int64 [B]), else `seed + arange(B)`, else drawn from `generator`.
    """

    def __init__(self, model: Callable, solver: str = "dpmpp_2m", sigmas=None, *,
                 guidance: float | None = None, backend: str = "auto", graph: bool = False,
                 noise: str | None = None, noise_sampler: Callable | None = None,
                 cond_key: str = "cond", check_finite: bool = True, **options):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
        if sigmas is None:
            raise ValueError("sigmas is required (e.g. fastdiff.spacings.get_sigmas_karras(...))")
        if hasattr(sigmas, "check_model"):  # a fastdiff.tuning.TunedPlan: warns if not ours
            sigmas.check_model(model, solver)
            sigmas = sigmas.sigmas
        info = SOLVERS[solver]
        noise = noise or ("generator" if noise_sampler is not None else "philox")
        if noise not in ("philox", "generator"):
            raise ValueError(f"noise must be 'philox' or 'generator', got {noise!r}")
        if noise == "philox" and noise_sampler is not None:
            raise ValueError("noise_sampler draws noise tensors: use noise='generator' with it")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
        self.solver, self.backend, self.graph, self.noise = solver, backend, graph, noise
        self.guard = check_finite
        self._flag = None  # the last run's non-finite flag (and its noise), for check_finite()
        self.options = {**info.kwargs, **options}
        self.noise_sampler = noise_sampler
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
        defaults = inspect.signature(info.fn).parameters
        for key, value in options.items():  # NaN/inf options end in obscure errors or NaN samples
            default = defaults[key].default if key in defaults else None
            numeric = isinstance(default, numbers.Real) and not isinstance(default, bool)
            if numeric and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"{key} must be a number (default {default!r}), got"
                                f" {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value) and not (
                    key == "s_tmax" and value == math.inf):  # k-diffusion's default: no limit
                raise ValueError(f"{key} must be finite, got {value}")
        try:
            self.sigmas = torch.as_tensor(sigmas)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"sigmas must be a 1-D tensor or sequence of floats, got"
                            f" {type(sigmas).__name__}") from None
        if self.sigmas.dim() == 1 and self.sigmas.numel() > 0 and bool(self.sigmas[0] <= 0):
            raise ValueError(f"sigmas must start above 0 (the initial noise level), got"
                             f" sigmas[0] = {float(self.sigmas[0])}")
        # the dtype the model's noise level is rounded to first (k-diffusion: sigmas[i] * s_in)
        self._sigmas_dtype = (self.sigmas.dtype if self.sigmas.is_floating_point()
                              else torch.float64)
        self.adapter = _ModelAdapter(model, guidance, info.param, cond_key)
        mode = "brownian" if noise == "philox" and solver in _BROWNIAN else "calls"
        # The history a stage keeps (D, or E = F - D) is chosen after lowering: the model side
        # (parameterisation, the two guidance halves) decides how many tensors a stage reads.
        # The kind kept last time for this solver and model side is lowered in full first, the
        # other only until it proves no narrower, so that one is traced only that far too.
        d = self.adapter.denoiser
        side = (solver, self.adapter.param, d.prediction if d is not None else None,
                self.adapter.guidance is None, self.adapter.threshold is None)
        first = _KEPT.get(side, "D")
        second = "E" if first == "D" else "D"
        call_sigmas, plans = plans_for(solver, self.sigmas, noise_mode=mode, later=second,
                                       **self.options)
        self.scalings = self.adapter.scalings(list(call_sigmas))
        lowered, errors = [], {}
        for kind in (first, second):
            plan = plans[kind]
            if isinstance(plan, RuntimeError):  # no plan with this history kind
                errors[kind] = f"history {kind}: {plan}"
                continue
            # the second kind replaces the first only if narrower (D if no wider: on a tie D
            # is kept); lowering stops once it is not
            try:
                with no_gc():
                    # A plan lowered without a bound is read to its end: compiled in one pass
                    # first, not stage by stage between lowering's (measured ~8 ms of 60 at
                    # seeds_3's 1000 steps); the stage-by-stage build is for a bounded one.
                    launches, tables = lower(plan.plan() if not lowered else plan, self.scalings,
                                             in_kernel_noise=noise == "philox",
                                             narrower_than=lowered[0][0] + (kind == "D")
                                             if lowered else None)
            except NotNarrower:
                continue
            except RuntimeError as e:
                errors[kind] = f"history {kind}: {e}"
                continue
            lowered = [(max(len(la.inputs) for la in launches), plan.plan(), launches, tables)]
        if not lowered:  # every history kind's reason (the first is often the one to fix)
            raise RuntimeError("; ".join(errors[k] for k in sorted(errors)))
        _KEPT[side] = lowered[0][1].history_kind
        _, self.plan, self.launches, tables = lowered[0]
        self._tables64 = tables
        self._dead_after = _lifetimes(self.launches, self.plan.history_kind)
        self._level_values = self.adapter.level_values([s.sigma for s in self.plan.stages])
        # Noise tensors are drawn (generator noise, or the reference's randn_like) only if a
        # launch reads one; the Brownian tree's interval is fixed here, on the host.
        self._draws = any(r.kind == "z" for la in self.launches for r in la.inputs)
        positive = [s for s in self.sigmas.double().tolist() if s > 0] if self._draws else [1.0]
        self._sigma_range = (min(positive), max(positive))
        self._spare: dict[tuple, list[torch.Tensor]] = {}  # CPU buffers kept between runs
        self._cache: dict = {}
        self._graphs = None

    def __repr__(self) -> str:
        return f"Sampler({self.solver}, {self.plan.nfe} model calls, backend={self.backend!r})"

    # -- per-run constants, cached by (batch, dtype, device) --------------------------------

    def _constants(self, x: torch.Tensor):
        key = (x.shape[0], x.dtype, x.device)
        if key not in self._cache:
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            tables = {k: t.to(x.device, acc) for k, t in self._tables64.items()}
            levels = self.adapter.levels(self._level_values, x.shape[0], x.dtype, x.device,
                                         self._sigmas_dtype)
            self._cache[key] = (tables, levels)
        return self._cache[key]

    def _noise_source(self, x: torch.Tensor, generator):
        """The reference's noise sampler, for launches that read drawn noise tensors (never
        built when all noise is generated in-kernel: a Brownian tree seeds a generator and
        draws on the host, which a CUDA graph capture cannot contain)."""
        if self.noise_sampler is not None:
            return self.noise_sampler
        if self.solver in _BROWNIAN and self.plan.noise:
            from fastdiff.reference.solvers._utils import BrownianTreeNoiseSampler

            seed = None if generator is None else int(
                torch.randint(0, 2**62, (), generator=generator, device=generator.device))
            return BrownianTreeNoiseSampler(x, *self._sigma_range, seed=seed)
        return default_noise_sampler(x, generator=generator)

    # -- execution ---------------------------------------------------------------------------

    def seeds_for(self, noise: torch.Tensor, seed: int | None = None,
                  seeds: torch.Tensor | None = None, generator: torch.Generator | None = None
                  ) -> torch.Tensor | None:
        """Per-sample Philox seeds (int64 [B] on noise's device), or None without noise."""
        batch = noise.shape[0]
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None:
            try:
                seed = operator.index(seed)  # an int (numpy's too), never a float or a string
            except TypeError:
                raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
            if not -(2**63) <= seed <= 2**63 - batch:  # seed + arange(batch) in int64
                raise ValueError(f"seed must be in [-2**63, 2**63 - batch] (int64 seeds"
                                 f" seed + arange(batch)), got {seed}")
        if self.noise != "philox" or not self.plan.noise:
            return None
        if seeds is not None:
            if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or \
                    seeds.shape != (batch,):
                raise ValueError(f"seeds must be an int64 tensor of shape ({batch},)")
            # the kernels read the seeds densely: a strided view must be made contiguous
            return seeds.to(noise.device).contiguous()
        if seed is not None:
            return torch.arange(seed, seed + batch, dtype=torch.int64, device=noise.device)
        # drawn on the generator's device (the CPU's global generator without one)
        return torch.randint(-(2**63), 2**63 - 1, (batch,), generator=generator,
                             dtype=torch.int64,
                             device=generator.device if generator is not None else "cpu"
                             ).to(noise.device)

    def run(self, noise: torch.Tensor, generator: torch.Generator | None = None,
            seed: int | None = None, seeds: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """One eager run: the loop of model calls and fused stage launches."""
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError("noise must be a floating-point tensor")
        if noise.dim() < 1 or noise.numel() == 0:
            raise ValueError(f"noise must have a batch dimension and elements, got shape"
                             f" {tuple(noise.shape)}")
        tables, levels = self._constants(noise)
        philox_seeds = self.seeds_for(noise, seed, seeds, generator)
        # (traced: the registered ops resolve the backend themselves, when they run)
        backend = self.backend if traced(noise) else resolve(self.backend, noise.device)
        cond = self.adapter.batch_cond(cond)
        draws = ((self._noise_source(noise, generator),
                  default_noise_sampler(noise, generator=generator))  # the reference's randn_like
                 if self._draws else None)
        regs: dict = {("x", 0): noise}
        flag = nonfinite_flag(noise.device) if self.guard else None  # a device fill
        buffers = _Buffers(noise, self._spare)
        drawn: list[torch.Tensor] = []
        result, called = None, -1
        for i, launch in enumerate(self.launches):
            k = launch.call
            # a stage split in two launches (lowering.split) calls the model once, before both
            if k >= 0 and k != called:
                called = k
                if ("F", k) not in regs:  # F[0] is the user's noise (never written to)
                    regs[("F", k)] = noise
                parts = self.adapter(regs[("F", k)], levels[k], cond)
                for p, part in enumerate(parts):
                    regs[("part", p)] = part
                if self.scalings.plain:  # D (and, without guidance, U) is the output itself
                    regs[("D", k)] = regs[("U", k)] = parts[0]
            result = self._launch(launch, regs, tables, backend, buffers, drawn, draws,
                                  philox_seeds, flag, i)
            for key in self._dead_after[i]:
                buffers.release(regs.pop(key, None), regs)
        buffers.close()
        if flag is not None:
            self._flag = (flag, noise)
            # the one read, after the loop: not when tracing (no data) or capturing a graph
            if not (traced(noise) or self._graphing or noise.is_cuda
                    and torch.cuda.is_current_stream_capturing()):
                self.check_finite()
                self._flag = (flag, None)  # checked: keep no reference to the caller's noise
        return result

    def check_finite(self) -> None:
        """Raises NonFiniteError if the last run's output went non-finite (inf or NaN), naming
        the first stage (model call) and its sigma; ValueError if that was the initial noise.
        Reads the device flag once (a sync): after a graph replay, call it after your own."""
        if self._flag is None:
            return
        flag, noise = self._flag
        first = int(flag.item())
        if first == NO_NONFINITE:
            return
        call = self.launches[first].call
        if call <= 0 and noise is not None and not bool(torch.isfinite(noise).all()):
            # (read only on the failure path)
            raise ValueError("noise holds inf or NaN: the initial sample must be finite")
        sigma = self.plan.stages[call].sigma if call >= 0 else None
        where = (f"stage {call} (model call {call}, sigma {sigma:.6g})" if call >= 0
                 else "the prologue, before the first model call")
        raise NonFiniteError(f"fastdiff: the sample went non-finite (inf or NaN) at {where};"
                             " check the model's output there (or pass check_finite=False)",
                             call, sigma)

    def _launch(self, launch: Launch, regs, tables, backend, buffers, drawn, draws, seeds,
                flag=None, index=0):
        for ref in launch.inputs:
            if ref.kind == "z":  # drawn in the reference's order, with its arguments
                draw, plain_draw = draws
                while len(drawn) <= ref.index:
                    args = self.plan.noise[len(drawn)].args
                    drawn.append(draw(*args) if args else plain_draw(None, None))
                regs[("z", ref.index)] = drawn[ref.index]
        inputs = [regs[(r.kind, r.index)] for r in launch.inputs]
        outs = [buffers.take() for _ in launch.outputs]
        table = tables[launch.arity]
        clip = (self.adapter.clip_bounds(inputs, table, launch.row, backend) if launch.clip
                else None)
        if same_dense_layout([*inputs, *outs], batch_outermost=launch.clip):  # the common case:
            # skip per-call validation
            launch_unchecked(inputs, table, launch.row, outs, backend, seeds, list(launch.noise),
                             clip=clip, flag=flag, stage=index)
        else:  # e.g. a model answering channels-last for contiguous input: the checked op copies
            noise = (seeds, list(launch.noise)) if launch.noise else None
            lincomb(inputs, table, launch.row, out=outs, noise=noise, clip=clip, flag=flag,
                    stage=index, backend=backend)
        for name, t in zip(launch.outputs, outs):
            if name == "F":
                regs[("F", launch.call + 1)] = t
            elif name == "H":
                regs[(self.plan.history_kind, launch.call)] = t
            elif name == "HU":  # CFG++: the unconditional output, for a later stage
                regs[("U" if self.plan.history_kind == "D" else "V", launch.call)] = t
            elif name[0] == "T":  # the partial sum of a stage split in two (lowering.split)
                regs[("T", int(name[1:]))] = t
        return outs[0]

    _graphing = False

    def _run_graphed(self, noise, **kwargs):
        """run() as a graph captures it: the result and the flag, not read (no sync)."""
        self._graphing = True
        try:
            out = self.run(noise, **kwargs)
        finally:
            self._graphing = False
        return out, (self._flag[0] if self.guard else None)

    def __call__(self, noise: torch.Tensor, generator: torch.Generator | None = None,
                 seed: int | None = None, seeds: torch.Tensor | None = None,
                 **cond) -> torch.Tensor:
        if self.graph and self._graphs is not False:
            reason = ("graph=True needs CUDA tensors" if noise.device.type != "cuda" else
                      "a torch.Generator's draws cannot be replayed by a graph: use seeds (Philox)"
                      if self.noise == "generator" and generator is not None else "")
            if reason:
                warnings.warn(f"fastdiff: {reason}; running eagerly", stacklevel=2)
                self._graphs = False
            else:
                from fastdiff.graph import GraphedCallable

                if self._graphs is None:
                    self._graphs = GraphedCallable(self._run_graphed)
                out, flag = self._graphs(noise, seeds=self.seeds_for(noise, seed, seeds,
                                                                     generator), **cond)
                # the replay's flag (a device copy): read by check_finite() after the caller syncs
                self._flag = (flag, noise) if flag is not None else None
                return out
        return self.run(noise, generator=generator, seed=seed, seeds=seeds, **cond)


def sample(model: Callable, x: torch.Tensor, sigmas, solver: str = "dpmpp_2m",
           **options) -> torch.Tensor:
    """One-shot: `Sampler(model, solver, sigmas, **options)(x)`; cond via `extra_args=dict`."""
    extra = options.pop("extra_args", None) or {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra_args must be a dict of conditioning, got {type(extra).__name__}")
    call = {k: options.pop(k) for k in ("generator", "seed", "seeds") if k in options}
    return Sampler(model, solver, sigmas, **options)(x, **call, **extra)
