"""Backends, inputs and coefficients shared by the lincomb tests (test_lincomb*.py)."""

from __future__ import annotations

import pytest
import torch

from fastdiff.ops import unavailable_reason

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
KERNEL_BACKENDS = [b for b in ("cpu", "cuda", "triton") if not unavailable_reason(b, DEVICE)]
ALL_BACKENDS = ["reference", *KERNEL_BACKENDS]
INTERPRETED = DEVICE.type == "cpu"  # Triton runs under its interpreter here


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot do bf16 arithmetic")


def make_inputs(shape, n, dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    xs = [x.to(DEVICE, dtype) for x in xs]
    if layout == "channels_last":
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    elif layout == "transposed":
        xs = [x.transpose(0, -1) for x in xs]
    elif layout == "sliced":  # every other element along the last dim: not dense
        xs = [torch.cat([x, x], dim=-1)[..., ::2] for x in xs]
    elif layout == "mixed":  # inputs in different dense layouts
        xs = [x.contiguous(memory_format=torch.channels_last) if i % 2 else x
              for i, x in enumerate(xs)]
    return xs


def make_coef(rows, num_out, num_in, dtype, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (scale * torch.randn(rows, num_out, num_in, generator=g, dtype=torch.float64)).to(
        DEVICE, acc)
