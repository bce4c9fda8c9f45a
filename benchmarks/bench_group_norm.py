"""Fused GroupNorm + SiLU against eager PyTorch (F.group_norm then F.silu) and the reference,
per backend.

Shapes: the Stable Diffusion 1.5 UNet's (batch 2 = CFG: 320x64x64, 640x32x32, 1280x16x16) and,
on a GPU, its VAE decoder's largest (1x128x512x512). Targets (issue 5): >= 80% of copy bandwidth
at the VAE shape, >= 3x eager PyTorch at the UNet shapes. Bytes moved = read x + write y (the
minimum; the statistics pass is not counted).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops import BACKENDS, group_norm, unavailable_reason
from fastdiff.reference.group_norm import group_norm as reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
UNET = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]
SHAPES = UNET + ([(1, 128, 512, 512)] if HAS_CUDA else [])
DTYPES = [torch.float16] if HAS_CUDA else [torch.float32]
LAYOUTS = ["nchw", "channels_last"] if HAS_CUDA else ["nchw"]
PATHS = ["eager", *(b for b in BACKENDS if b == "reference" or not unavailable_reason(b, DEVICE))]
# torch.compile (inductor fuses GroupNorm + SiLU into one Triton kernel): a baseline on the GPU,
# where it runs in seconds; on the 2-core CPU its C++ compile of every shape would dominate CI.
PATHS += ["torch.compile"] if HAS_CUDA else []


def _eager_gn_silu(x, weight, bias):
    return F.silu(F.group_norm(x, 32, weight, bias, 1e-5))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", PATHS)
def bench_group_norm_silu(benchmark, measure, path, shape, dtype, layout):
    if path == "triton" and not HAS_CUDA and shape != UNET[-1]:
        pytest.skip("the Triton interpreter is for correctness on small shapes")
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], device=DEVICE, dtype=dtype)
    bias = torch.randn_like(weight)
    if path == "eager":
        def fn():
            return _eager_gn_silu(x, weight, bias)
    elif path == "torch.compile":
        compiled = torch.compile(_eager_gn_silu, mode="max-autotune-no-cudagraphs")
        benchmark.extra_info["compile_mode"] = "max-autotune-no-cudagraphs"

        def fn():
            return compiled(x, weight, bias)
    elif path == "reference":
        def fn():
            return reference(x, 32, weight, bias, 1e-5, silu=True)
    else:
        def fn():
            return group_norm(x, 32, weight, bias, 1e-5, silu=True, backend=path)
    benchmark.group = f"group_norm_silu {'x'.join(map(str, shape))} {dtype} {layout}"
    measure(fn, 2 * x.numel() * x.element_size())
