"""Whole-loop CUDA graphs: a sampler's N steps, model calls included, captured once and replayed.

The engine never syncs with the host and never branches on tensor values, and each stage's
coefficients are a row of a device table, so the eager loop records as one graph. Inputs are
copied into static buffers before each replay (noise, per-sample seeds, tensor conditioning);
one graph is kept per input signature (shapes, dtypes, device), with a private memory pool
shared by all of them. Capture failures (a model that syncs, e.g. with .item()) fall back to
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
    noise: torch.Tensor
    seeds: torch.Tensor | None
    cond: dict
    out: torch.Tensor


def _signature(noise: torch.Tensor, seeds, cond: dict) -> tuple:
    def sig(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.device, v.stride())
        if isinstance(v, dict):
            return tuple(sorted((k, sig(x)) for k, x in v.items()))
        return ("value", v)

    return (sig(noise), sig(seeds), sig(cond))


def _static(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _static(x) for k, x in v.items()}
    return v


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])


class GraphCache:
    """`cache(noise, seeds, **cond)` replays the captured `run(noise, seeds=..., **cond)`."""

    def __init__(self, run: Callable[..., torch.Tensor], warmup: int = 2):
        self.run, self.warmup = run, warmup
        self.entries: dict[tuple, _Entry | None] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __bool__(self) -> bool:
        return True

    def __call__(self, noise: torch.Tensor, seeds: torch.Tensor | None, **cond) -> torch.Tensor:
        key = _signature(noise, seeds, cond)
        if key not in self.entries:
            self.entries[key] = self._capture(noise, seeds, cond)
        entry = self.entries[key]
        if entry is None:  # capture failed for this signature: eager
            return self.run(noise, seeds=seeds, **cond)
        entry.noise.copy_(noise)
        if seeds is not None:
            entry.seeds.copy_(seeds)
        _copy_into(entry.cond, cond)
        entry.graph.replay()
        return entry.out.clone()  # the static output is overwritten by the next replay

    def _capture(self, noise, seeds, cond) -> _Entry | None:
        static_noise, static_seeds, static_cond = noise.clone(), _static(seeds), _static(cond)
        side = torch.cuda.Stream(noise.device)
        side.wait_stream(torch.cuda.current_stream(noise.device))
        try:
            # Warm-up off the capture: Triton compiles, cuBLAS creates handles, caches fill.
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.run(static_noise, seeds=static_seeds, **static_cond)
            torch.cuda.current_stream(noise.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.run(static_noise, seeds=static_seeds, **static_cond)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            torch.cuda.synchronize(noise.device)
            warnings.warn(f"fastdiff: CUDA graph capture failed ({type(e).__name__}: {e});"
                          " running this input signature eagerly", stacklevel=3)
            return None
        return _Entry(graph, static_noise, static_seeds, static_cond, out)
