"""Schedule tables: a sampling run's per-step timesteps, sigmas, alpha_t, sigma_t and lambda for
a discrete VP schedule, built on the device by one schedule-arithmetic kernel in float64 (the
plan's tables, DESIGN.md). The natural device path::

    tables = fastdiff.ops.schedule_tables(
        20, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        spacing="trailing", grid="karras", device="cuda")
    tables.sigmas, tables.timesteps      # float64 views into one device buffer

or, for a schedule object, ``tables_from_schedule(DiscreteVPSchedule.from_betas(...), 20,
grid="karras", device="cuda")``. A request with new settings costs one launch and no
host-device copy: every setting travels as a kernel argument, and the kernel writes one float64
buffer (pass ``out=``, of `buffer_numel` values, to reuse one, e.g. in a captured CUDA graph).
Backends: "cuda" (CUDA C++, one block), "triton" (one program), "cpu" (the same C++ element
math on the host) and "reference": the host float64 path (fastdiff/reference/schedule.py), the
specification, copied to the device.

What is computed (see the reference's docstring): diffusers' timestep spacing of a scheduler
``family`` ("euler", "ddim", "dpmsolver"), sigmas interpolated at those timesteps, optionally
replaced by a karras / exponential / polyexponential ``grid`` (then the timesteps are t(sigma),
fractional except for dpmsolver), a final sigma ("zero" or "sigma_min"), and alpha_t =
1 / sqrt(1 + sigma^2), sigma_t = alpha_t sigma, lambda = -log sigma (+inf at sigma = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastdiff import _native
from fastdiff.ops._backends import native_target, resolve, traced

# Names in the order of the codes in csrc/include/fastdiff/schedule.h.
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")
SPACINGS = ("linspace", "leading", "trailing")
FAMILIES = ("euler", "ddim", "dpmsolver")
GRIDS = ("discrete", "karras", "exponential", "polyexponential")
FINAL_SIGMAS = ("zero", "sigma_min")
ROWS = ("timesteps", "sigmas", "alpha_t", "sigma_t", "lam")
MAX_TRAIN_TIMESTEPS = 1 << 16
_INTS = ("betas", "num_train_timesteps", "rescale_zero_snr", "spacing", "family", "steps_offset",
         "num_inference_steps", "grid", "final_sigma", "round_karras")
_FLOATS = ("beta_start", "beta_end", "rho")


def buffer_numel(num_inference_steps: int, num_train_timesteps: int = 1000) -> int:
    """Values in the buffer: the table [5, n + 1], then the training table [2, T]."""
    return len(ROWS) * (num_inference_steps + 1) + 2 * num_train_timesteps


@dataclass(frozen=True)
class ScheduleTables:
    """Views into one float64 buffer: ``table`` [5, n + 1] (rows `ROWS`; column n is the final
    sigma, at timestep 0) and ``train`` [2, T] (alphas_cumprod, training sigmas)."""

    buffer: Tensor
    table: Tensor
    train: Tensor

    @classmethod
    def of(cls, buffer: Tensor, num_inference_steps: int, num_train_timesteps: int):
        cols = num_inference_steps + 1
        return cls(buffer, buffer[:len(ROWS) * cols].view(len(ROWS), cols),
                   buffer[len(ROWS) * cols:].view(2, num_train_timesteps))

    timesteps = property(lambda self: self.table[0], doc="model time input per step [n + 1]")
    sigmas = property(lambda self: self.table[1], doc="VE sigma per step, last the final [n + 1]")
    alpha_t = property(lambda self: self.table[2], doc="1 / sqrt(1 + sigma^2) [n + 1]")
    sigma_t = property(lambda self: self.table[3], doc="alpha_t * sigma (VP noise std) [n + 1]")
    lam = property(lambda self: self.table[4], doc="-log sigma, +inf at sigma = 0 [n + 1]")
    alphas_cumprod = property(lambda self: self.train[0], doc="the training table's abar [T]")
    train_sigmas = property(lambda self: self.train[1], doc="the training table's sigmas [T]")


def _choice(name: str, value, options: tuple) -> int:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return options.index(value)


def _int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def _real(name: str, value, low: float, high: float, open_low: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if open_low else low <= value) and value < high
    if not ok:
        bound = "(" if open_low else "["
        raise ValueError(f"{name} must be a finite number in {bound}{low}, {high}), got {value!r}")
    return float(value)


def _validate_steps(num_inference_steps, num_train_timesteps, spacing, steps_offset, family,
                    grid, rho, final_sigma) -> dict:
    """The settings shared by every schedule (codes for the kernels)."""
    big_t = _int("num_train_timesteps", num_train_timesteps, 2, MAX_TRAIN_TIMESTEPS)
    return dict(
        num_train_timesteps=big_t,
        num_inference_steps=_int("num_inference_steps", num_inference_steps, 1, big_t),
        spacing=_choice("spacing", spacing, SPACINGS),
        steps_offset=_int("steps_offset", steps_offset, 0, big_t - 1),
        family=_choice("family", family, FAMILIES),
        grid=_choice("grid", grid, GRIDS),
        rho=_real("rho", rho, 0.0, math.inf),
        final_sigma=_choice("final_sigma", final_sigma, FINAL_SIGMAS),
    )


def _validate(num_inference_steps, beta_schedule, num_train_timesteps, beta_start, beta_end,
              rescale_betas_zero_snr, spacing, steps_offset, family, grid, rho,
              final_sigma) -> dict:
    if beta_schedule not in BETAS:
        raise ValueError(f"beta_schedule must be one of {BETAS} (closed forms; for a schedule of"
                         " your own use tables_from_schedule(DiscreteVPSchedule(alphas_cumprod),"
                         f" ...)), got {beta_schedule!r}")
    codes = _validate_steps(num_inference_steps, num_train_timesteps, spacing, steps_offset,
                            family, grid, rho, final_sigma)
    if beta_schedule in ("linear", "scaled_linear", "sigmoid"):  # the others ignore the range
        beta_start = _real("beta_start", beta_start, 0.0, 1.0)
        beta_end = _real("beta_end", beta_end, 0.0, 1.0)
    else:
        beta_start, beta_end = 0.0001, 0.02
    if not isinstance(rescale_betas_zero_snr, bool):
        raise ValueError(f"rescale_betas_zero_snr must be a bool, got {rescale_betas_zero_snr!r}")
    # diffusers' DPMSolverMultistepScheduler does not round karras timesteps for this schedule
    return dict(codes, betas=BETAS.index(beta_schedule), beta_start=beta_start,
                beta_end=beta_end, rescale_zero_snr=rescale_betas_zero_snr,
                round_karras=beta_schedule != "squaredcos_cap_v2")


def _buffer(codes: dict, device, out: Tensor | None) -> Tensor:
    numel = buffer_numel(codes["num_inference_steps"], codes["num_train_timesteps"])
    if out is None:
        return torch.empty(numel, dtype=torch.float64, device="cpu" if device is None else device)
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.float64 or not out.is_contiguous() or out.numel() != numel:
        raise ValueError(f"out must be a contiguous float64 tensor of buffer_numel(n, T) = {numel}"
                         f" values, got {out.dtype} with {out.numel()} values"
                         f"{'' if out.is_contiguous() else ', not contiguous'}")
    if device is not None:
        want = torch.device(device)
        if want.type != out.device.type or want.index not in (None, out.device.index):
            raise ValueError(f"out is on {out.device}, but device={device!r}")
    return out


def _reference(codes: dict) -> Tensor:
    """The host float64 tables, flat in the buffer's layout (CPU)."""
    from fastdiff.reference.schedule import schedule_tables as reference

    table, train = reference(
        codes["num_inference_steps"], beta_schedule=BETAS[codes["betas"]],
        num_train_timesteps=codes["num_train_timesteps"], beta_start=codes["beta_start"],
        beta_end=codes["beta_end"], rescale_betas_zero_snr=bool(codes["rescale_zero_snr"]),
        spacing=SPACINGS[codes["spacing"]], steps_offset=codes["steps_offset"],
        family=FAMILIES[codes["family"]], grid=GRIDS[codes["grid"]], rho=codes["rho"],
        final_sigma=FINAL_SIGMAS[codes["final_sigma"]],
        round_karras=bool(codes["round_karras"]))
    return torch.cat([table.flatten(), train.flatten()])


def _run(buffer: Tensor, codes: dict, backend: str) -> None:
    backend = resolve(backend, buffer.device)
    if backend == "reference":
        buffer.copy_(_reference(codes))  # one host-to-device copy
    elif backend == "triton":
        from fastdiff.kernels.schedule import schedule_tables as schedule_triton

        schedule_triton(buffer, **codes)
    else:
        index, stream = native_target(buffer.device)
        _native.module().schedule_tables(device=index, out=buffer.data_ptr(), stream=stream,
                                         **codes)


def schedule_tables(
    num_inference_steps: int,
    *,
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    rescale_betas_zero_snr: bool = False,
    spacing: str = "linspace",
    steps_offset: int = 0,
    family: str = "euler",
    grid: str = "discrete",
    rho: float = 7.0,
    final_sigma: str = "zero",
    device: torch.device | str | None = None,
    out: Tensor | None = None,
    backend: str = "auto",
) -> ScheduleTables:
    """The tables of a sampling run with ``num_inference_steps`` steps, in one launch.

    Args:
        num_inference_steps: n, 1..num_train_timesteps.
        beta_schedule, num_train_timesteps, beta_start, beta_end, rescale_betas_zero_snr: the
            training schedule, as diffusers' configs name them (`reference.schedule.make_betas`; the
            range matters for "linear", "scaled_linear" and "sigmoid" only).
        spacing: "linspace", "leading" or "trailing" (Lin et al. 2023, arXiv:2305.08891,
            Table 2); steps_offset is added to "leading" timesteps, as in diffusers.
        family: whose set_timesteps to follow: "euler" (EulerDiscrete, Heun, LMS: fractional
            'linspace'), "ddim" (DDIM, DDPM, PNDM: rounded) or "dpmsolver" (DPMSolverMultistep,
            UniPC, DEIS: integer timesteps, grids over the whole training range).
        grid: "discrete" (sigmas at the timesteps), "karras" (Karras et al. 2022, eq. 5, with
            ``rho``), "exponential" or "polyexponential" (``rho``).
        final_sigma: "zero" or "sigma_min" (the training table's smallest sigma).
        device: where the tables are made (default: out's device, else the CPU).
        out: optional buffer to write, float64, contiguous, `buffer_numel` values.
        backend: "auto", "reference", "cpu", "cuda" or "triton" (see `fastdiff info`).

    Returns:
        `ScheduleTables`: views into the buffer (``out`` when given).
    """
    codes = _validate(num_inference_steps, beta_schedule, num_train_timesteps, beta_start,
                      beta_end, rescale_betas_zero_snr, spacing, steps_offset, family, grid, rho,
                      final_sigma)
    buffer = _buffer(codes, device, out)
    if traced(buffer):
        torch.ops.fastdiff.schedule_tables_out(buffer, [int(codes[k]) for k in _INTS],
                                               [codes[k] for k in _FLOATS], backend)
    else:
        _run(buffer, codes, backend)
    return ScheduleTables.of(buffer, num_inference_steps, num_train_timesteps)


def tables_from_schedule(schedule, num_inference_steps: int, *, spacing: str = "linspace",
                         steps_offset: int = 0, family: str = "euler", grid: str = "discrete",
                         rho: float = 7.0, final_sigma: str = "zero",
                         device: torch.device | str | None = None,
                         out: Tensor | None = None, backend: str = "auto") -> ScheduleTables:
    """The same tables for a `fastdiff.schedules.DiscreteVPSchedule` (read through its
    attributes; this layer imports no schedule). One made by ``from_betas`` carries its closed
    form in ``config``: one kernel launch (`schedule_tables`, any ``backend``). One made from a
    table of its own has none: the host float64 path, copied to ``device`` (``backend`` "auto"
    or "reference")."""
    from fastdiff.reference.schedule import tables_from_schedule as reference

    kw = dict(spacing=spacing, steps_offset=steps_offset, family=family, grid=grid, rho=rho,
              final_sigma=final_sigma, device=device, out=out)
    config = getattr(schedule, "config", None)
    if config is not None:
        return schedule_tables(num_inference_steps, **config, **kw, backend=backend)
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend={backend!r}: this schedule was given as a table, which the"
                         " kernels cannot rebuild; use backend='reference' (or 'auto')")
    codes = _validate_steps(num_inference_steps, schedule.num_train_timesteps, spacing,
                            steps_offset, family, grid, rho, final_sigma)
    buffer = _buffer(codes, device, out)
    table, train = reference(schedule, num_inference_steps, spacing=spacing,
                             steps_offset=steps_offset, family=family, grid=grid, rho=rho,
                             final_sigma=final_sigma)
    buffer.copy_(torch.cat([table.flatten(), train.flatten()]))
    return ScheduleTables.of(buffer, num_inference_steps, schedule.num_train_timesteps)


# torch.library registration: torch.compile traces this instead of the Python above.
@torch.library.custom_op("fastdiff::schedule_tables_out", mutates_args=("out",))
def _schedule_tables_out_op(out: Tensor, ints: list[int], floats: list[float],
                            backend: str) -> None:
    codes = dict(zip(_INTS, ints, strict=True)) | dict(zip(_FLOATS, floats, strict=True))
    codes["rescale_zero_snr"], codes["round_karras"] = (bool(codes["rescale_zero_snr"]),
                                                        bool(codes["round_karras"]))
    _run(out, codes, backend)


@_schedule_tables_out_op.register_fake
def _(out, ints, floats, backend):
    return None
