"""Triton kernels, one file per op family, each beside its launcher. Imported lazily by
fastdiff.ops (importing triton is slow, and TRITON_INTERPRET must be set before it)."""

from __future__ import annotations

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """The context every launcher launches in: Triton launches on torch's current device and
    stream, so a tensor on another GPU (cuda:1 while cuda:0 is current) needs its device made
    current for the launch, and the caller's restored after. CPU tensors (the interpreter) need
    none."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
