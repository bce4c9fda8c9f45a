"""Dynamic thresholding's per-sample quantile (fastdiff.ops.dynamic_threshold) against
torch.quantile as diffusers' `_threshold_sample` computes it, per backend.

Shapes: SD latents with CFG (2x4x64x64, 2x4x128x128) and, on a GPU, DeepFloyd IF's
pixel-space stage I with a batch of 8 (8x3x64x64, which IF thresholds) and a large
latent batch. Bytes moved = the inputs read once (the minimum; the kernels re-read them
from L2 or shared memory once per radix pass).
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.ops import BACKENDS, dynamic_threshold, unavailable_reason

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SHAPES = [(2, 4, 64, 64), (2, 4, 128, 128)] + (
    [(8, 3, 64, 64), (16, 4, 128, 128)] if HAS_CUDA else [])
DTYPES = [torch.float16, torch.float32] if HAS_CUDA else [torch.float32]
PATHS = ["torch.quantile", *(b for b in BACKENDS
                             if b == "reference" or not unavailable_reason(b, DEVICE))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", PATHS)
def bench_dynamic_threshold(benchmark, measure, path, shape, dtype):
    """x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), s = clamp(quantile(|x0|, 0.995), 1, 1.5)."""
    if path == "triton" and not HAS_CUDA and shape != SHAPES[0]:
        pytest.skip("the Triton interpreter is for correctness on small shapes")
    xs = [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2)]
    abar = 0.3
    coef = torch.tensor([[[1 / abar**0.5, -((1 - abar) / abar) ** 0.5]]], device=DEVICE)
    out = torch.empty(shape[0], 2, device=DEVICE)
    if path == "torch.quantile":  # diffusers: x0 formed, upcast, reshaped, quantile, clamp
        def fn():
            x0 = (xs[0] - (1 - abar) ** 0.5 * xs[1]) / abar**0.5
            s = torch.quantile(x0.float().reshape(shape[0], -1).abs(), 0.995, dim=1)
            return torch.clamp(s, min=1, max=1.5)
    else:
        def fn():
            return dynamic_threshold(xs, coef, 0, 0.995, 1.5, out=out, backend=path)
    benchmark.group = f"dynamic_threshold {'x'.join(map(str, shape))} {dtype}"
    measure(fn, 2 * xs[0].numel() * xs[0].element_size())
