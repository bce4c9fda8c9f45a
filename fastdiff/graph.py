"""Whole-loop CUDA graphs: a sampler's N steps, model calls included, captured once and replayed.

The engine never syncs with the host and never branches on tensor values, and each stage's
coefficients are a row of a device table, so the eager loop records as one graph. Inputs are
copied into static buffers before each replay (noise, per-sample seeds, tensor conditioning);
one graph is kept per input signature (shapes, dtypes, device), with a private memory pool
shared by all of them. The same machinery graphs any callable: a diffusers UNet's forward in
fastdiff.accelerate. Capture failures (a model that syncs, e.g. with .item()) fall back to
eager with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    args: tuple
    kwargs: dict
    out: object


def _signature(v) -> tuple:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device, v.stride())
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _signature(x)) for k, x in v.items())))
    if isinstance(v, list | tuple):
        return (type(v).__name__, tuple(_signature(x) for x in v))
    return ("value", v if isinstance(v, int | float | str | bool | type(None)) else id(v))


def _static(v):
    """A private copy of every tensor in v (the graph's input buffers)."""
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _static(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(_static(x) for x in v)
    return v


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, list | tuple):
        for d, s in zip(dst, src):
            _copy_into(d, s)


def _clone_out(v):
    """A copy of the outputs the next replay will overwrite (tensors, tuples, dict-likes such
    as diffusers' BaseOutput)."""
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return type(v)(**{k: _clone_out(x) for k, x in v.items()})
    if isinstance(v, list | tuple):
        return type(v)(_clone_out(x) for x in v)
    return v


class GraphedCallable:
    """`graphed(*args, **kwargs)` replays `fn(*args, **kwargs)` captured in a CUDA graph, one per
    input signature (shapes, dtypes, devices, strides, plain values); tensors are copied into the
    graph's static inputs, and the outputs are cloned out. Capture failures run `fn` eagerly
    (with one warning; `entries[key] is None` for such a signature). The first call of a
    signature runs `fn` `warmup` times eagerly, records it once, then replays."""

    def __init__(self, fn: Callable, warmup: int = 1):
        self.fn, self.warmup = fn, warmup
        self.entries: dict[tuple, _Entry | None] = {}
        self.pool = None  # created at the first capture (a CPU-only torch cannot make one)

    def __call__(self, *args, **kwargs):
        key = (_signature(args), _signature(kwargs))
        if key not in self.entries:
            self.entries[key] = self._capture(args, kwargs)
        entry = self.entries[key]
        if entry is None:  # capture failed for this signature: eager
            return self.fn(*args, **kwargs)
        _copy_into(entry.args, args)
        _copy_into(entry.kwargs, kwargs)
        entry.graph.replay()
        return _clone_out(entry.out)  # the static output is overwritten by the next replay

    def _capture(self, args, kwargs) -> _Entry | None:
        device = next(t.device for t in tensors_in((args, kwargs)) if t.is_cuda)
        static_args, static_kwargs = _static(args), _static(kwargs)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            # Warm-up off the capture: Triton compiles and autotunes, cuBLAS and cuDNN create
            # their handles and workspaces, fastdiff's per-run constants are built. One run does
            # all of it (the first sampler call used to run the loop 3 times before replaying).
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*static_args, **static_kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*static_args, **static_kwargs)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            torch.cuda.synchronize(device)
            warnings.warn(f"fastdiff: CUDA graph capture failed ({type(e).__name__}: {e});"
                          " running this input signature eagerly", stacklevel=3)
            return None
        return _Entry(graph, static_args, static_kwargs, out)


def tensors_in(v):
    """Every tensor in nested tuples, lists and dicts."""
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from tensors_in(x)
    elif isinstance(v, list | tuple):
        for x in v:
            yield from tensors_in(x)
