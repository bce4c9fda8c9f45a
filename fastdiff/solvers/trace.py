"""Tracing a reference solver into exact linear forms.

Every fixed-step solver is linear in its free quantities: the initial state x_T, the model's
outputs D_1, D_2, ... and the noise draws z_1, z_2, ... (DESIGN.md: "a diffusion solver step is
a linear combination"). So running the *reference* solver on coefficient vectors instead of
images — one coordinate per free quantity, a fake model that returns a fresh unit vector per
call, fake noise that does the same — yields every model input and the final output as exact
linear forms over those quantities, in float64. The plan compiler (plan.py) turns the forms
into per-stage kernel coefficients, so a plan agrees with its reference by construction.

Noise is traced two ways:
  - "calls": one symbol per noise draw of the reference (its values come from a noise_sampler
    or generator at run time: exact agreement with k-diffusion for the same noise);
  - "brownian": draws of a Brownian noise sampler (dpmpp_sde's overlapping intervals) are
    expressed through independent unit normals by the Brownian bridge, so counter-based
    in-kernel noise reproduces the right correlations.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from fastdiff.reference.solvers import SOLVERS

_F64 = torch.float64


@dataclass
class NoiseDraw:
    """One noise symbol: which coordinate, and the arguments of the reference's draw."""

    index: int
    args: tuple = ()  # (sigma, sigma_next) given to noise_sampler, () for torch.randn_like


@dataclass
class Trace:
    """The solver as linear forms over [x_T, D_1, z_1, ...] (coordinates in creation order)."""

    solver: str
    inputs: list[torch.Tensor] = field(default_factory=list)  # model input form per call
    sigmas: list[float] = field(default_factory=list)  # noise level given to the model per call
    outputs: list[int] = field(default_factory=list)  # coordinate of D_k per call
    noise: list[NoiseDraw] = field(default_factory=list)
    final: torch.Tensor | None = None  # the returned sample's form
    dim: int = 0
    noise_mode: str = "calls"


class _Symbols:
    def __init__(self, dim: int):
        self.dim = dim
        self.used = 1  # coordinate 0 is x_T

    def fresh(self) -> tuple[int, torch.Tensor]:
        if self.used >= self.dim:
            raise _OutOfSymbols
        e = torch.zeros(1, self.dim, dtype=_F64)
        e[0, self.used] = 1.0
        self.used += 1
        return self.used - 1, e


class _OutOfSymbols(Exception):
    pass


class _BrownianPath:
    """W(t) at the times asked for, as forms over independent unit normals (Brownian bridge)."""

    def __init__(self, symbols: _Symbols, trace: Trace):
        self.points: list[tuple[float, torch.Tensor]] = []  # sorted (t, W(t) form)
        self.symbols, self.trace = symbols, trace

    def _normal(self) -> torch.Tensor:
        index, e = self.symbols.fresh()
        self.trace.noise.append(NoiseDraw(index))
        return e

    def at(self, t: float) -> torch.Tensor:
        for s, w in self.points:
            if s == t:
                return w
        if not self.points:
            w = torch.zeros(1, self.symbols.dim, dtype=_F64)  # W is pinned at the first time
        else:
            before = [(s, w) for s, w in self.points if s < t]
            after = [(s, w) for s, w in self.points if s > t]
            if before and after:
                (s0, w0), (s1, w1) = before[-1], after[0]
                frac = (t - s0) / (s1 - s0)
                std = ((t - s0) * (s1 - t) / (s1 - s0)) ** 0.5
                w = w0 + frac * (w1 - w0) + std * self._normal()
            else:
                s0, w0 = (before[-1] if before else after[0])
                w = w0 + abs(t - s0) ** 0.5 * self._normal()
        self.points.append((t, w))
        self.points.sort(key=lambda p: p[0])
        return w

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0, t1 = float(sigma), float(sigma_next)
        return (self.at(t1) - self.at(t0)) / abs(t1 - t0) ** 0.5


class _NoiseIntercept(TorchFunctionMode):
    """Turns the reference's direct draws (torch.randn_like / torch.randn) into fresh symbols."""

    def __init__(self, draw):
        super().__init__()
        self.draw = draw

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.randn_like, torch.randn, torch.Tensor.normal_):
            return self.draw(())
        return func(*args, **(kwargs or {}))


def _run(name: str, sigmas: torch.Tensor, options: dict, noise_mode: str, dim: int) -> Trace:
    info = SOLVERS[name]
    trace = Trace(solver=name, dim=dim, noise_mode=noise_mode)
    symbols = _Symbols(dim)

    def draw(args: tuple) -> torch.Tensor:
        index, e = symbols.fresh()
        trace.noise.append(NoiseDraw(index, args))
        return e

    def model(x, sigma, **kwargs):
        trace.inputs.append(x.detach().clone())
        trace.sigmas.append(float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma))
        index, e = symbols.fresh()
        trace.outputs.append(index)
        return e

    x = torch.zeros(1, dim, dtype=_F64)
    x[0, 0] = 1.0
    kwargs = {**info.kwargs, **options, "disable": True}
    params = inspect.signature(info.fn).parameters
    if "noise_sampler" in params:
        if noise_mode == "brownian":
            kwargs["noise_sampler"] = _BrownianPath(symbols, trace)
        else:
            kwargs["noise_sampler"] = lambda *args: draw(tuple(float(a) for a in args))
    with torch.no_grad(), _NoiseIntercept(draw):
        trace.final = info.fn(model, x, sigmas.to(_F64).cpu(), **kwargs).detach().clone()
    return trace


def trace_solver(name: str, sigmas: torch.Tensor, noise_mode: str = "calls", **options) -> Trace:
    """Runs the reference solver `name` on linear forms (see the module docstring)."""
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    if noise_mode not in ("calls", "brownian"):
        raise ValueError(f"noise_mode must be 'calls' or 'brownian', got {noise_mode!r}")
    dim = 1 + 6 * (len(sigmas) + 2)
    while True:
        try:
            return _run(name, sigmas, options, noise_mode, dim)
        except _OutOfSymbols:
            dim *= 2
