"""fastdiff.accelerate(pipe): a diffusers pipeline made faster without changing what it computes.

    pipe = fastdiff.accelerate(pipe)        # returns the same pipe
    fastdiff.restore(pipe)                  # undoes it

1. The scheduler is swapped for its fused, sync-free twin in fastdiff.diffusers (same class
   name and config; one fused kernel per step). backend="reference" keeps diffusers' own step
   arithmetic in the twin (and the reference modules in 2.), so with kernels=False and
   graph=False the pipeline's output is bitwise the original's.
2. kernels=True: GroupNorm modules of the UNet and VAE become fastdiff.nn.GroupNorm (a
   torch.nn.GroupNorm subclass; same parameters and state-dict keys) and their diffusers
   Attention modules get fastdiff.nn.AttnProcessor through diffusers' processor API, so
   `unet.attn_processors`, `set_attn_processor`, `set_default_attn_processor` and attention
   slicing keep working (fastdiff.nn.swap_modules; a user's own processor is kept).
   A pipeline saved while accelerated loads with plain diffusers (same weights and keys; the
   scheduler is recorded as diffusers' class of the same name).
3. graph=True: the UNet's forward is captured in CUDA graphs keyed by its input signature
   (fastdiff.graph.GraphedCallable); each pipeline step then replays one graph. Where capture is
   impossible (CPU tensors, a model that syncs) it runs eagerly, with a warning.

Classifier-free guidance, callbacks and num_images_per_prompt are untouched: the pipeline's own
loop still runs, calling the (graphed) UNet and the (fused) scheduler. Works on any object with
`scheduler` / `unet` / `vae` attributes, not only DiffusionPipeline. Needs diffusers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

_STATE = "_fastdiff_accelerate"


class _GraphedForward:
    """A module's forward replayed from CUDA graphs for CUDA inputs, eager otherwise."""

    def __init__(self, module: nn.Module):
        from fastdiff.graph import GraphedCallable

        self.eager = module.forward
        self.graphed = GraphedCallable(self.eager)
        self.warned = False

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled() or not _has_cuda_tensor((args, kwargs)):
            if not self.warned:
                why = "autograd is on" if torch.is_grad_enabled() else "the inputs are not CUDA"
                warnings.warn(f"fastdiff.accelerate: graph=True but {why}; the UNet runs eagerly",
                              stacklevel=2)
                self.warned = True
            return self.eager(*args, **kwargs)
        return self.graphed(*args, **kwargs)


def _has_cuda_tensor(v) -> bool:
    from fastdiff.graph import tensors_in

    return any(t.is_cuda for t in tensors_in(v))


def accelerate(pipe, graph: bool = True, kernels: bool = True, backend: str = "auto"):
    """Swaps in fastdiff's fused scheduler, kernels and UNet graphs (see the module doc)."""
    import fastdiff.diffusers as fused_schedulers
    from fastdiff.nn import swap_modules
    from fastdiff.ops import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if getattr(pipe, _STATE, None) is not None:
        return pipe  # already accelerated
    state: dict = {}
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        twin = getattr(fused_schedulers, type(scheduler).__name__, None)
        if twin is None or isinstance(scheduler, twin):
            if twin is None:
                warnings.warn(f"fastdiff.accelerate: no fused twin of {type(scheduler).__name__};"
                              " the scheduler is kept", stacklevel=2)
        else:
            state["scheduler"] = scheduler
            pipe.scheduler = twin.from_config(scheduler.config)
            pipe.scheduler.fastdiff_backend = backend
    if kernels:
        state["swapped"] = [name for name in ("unet", "vae")
                            if isinstance(getattr(pipe, name, None), nn.Module)]
        for name in state["swapped"]:
            swap_modules(getattr(pipe, name), backend)
    unet = getattr(pipe, "unet", None)
    if graph and isinstance(unet, nn.Module):
        unet.forward = _GraphedForward(unet)  # an instance attribute shadows the method
        state["graphed"] = True
    object.__setattr__(pipe, _STATE, state)  # bypasses DiffusionPipeline's config bookkeeping
    return pipe


def restore(pipe):
    """Undoes `accelerate(pipe)` (the original scheduler object, modules and forward)."""
    from fastdiff.nn import restore_modules

    state = getattr(pipe, _STATE, None)
    if state is None:
        return pipe
    if "scheduler" in state:
        pipe.scheduler = state["scheduler"]
    for name in state.get("swapped", ()):
        restore_modules(getattr(pipe, name))
    if state.get("graphed"):
        del pipe.unet.forward  # back to the class's forward
    object.__delattr__(pipe, _STATE)
    return pipe
