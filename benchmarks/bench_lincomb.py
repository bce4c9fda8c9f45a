"""The fused linear combination against the pure-PyTorch reference, per backend.

Shapes: SD latents with CFG (2x4x64x64, 2x4x128x128) and, on a GPU, a large tensor where the
op must run at copy bandwidth. Bytes moved = (num_in + num_out) * numel * itemsize.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.ops import BACKENDS, lincomb, unavailable_reason
from fastdiff.reference.lincomb import lincomb as reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SHAPES = [(2, 4, 64, 64), (2, 4, 128, 128)] + ([(8, 16, 256, 256)] if HAS_CUDA else [])
DTYPES = [torch.float16, torch.float32] if HAS_CUDA else [torch.float32]
BACKENDS_HERE = [b for b in BACKENDS if b == "reference" or not unavailable_reason(b, DEVICE)]


@pytest.mark.parametrize("arity", [(3, 1), (4, 2), (6, 3)],  # (6, 3): a UniPC order-3 step
                         ids=lambda a: f"{a[0]}in{a[1]}out")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def bench_lincomb(benchmark, measure, backend, shape, dtype, arity):
    if backend == "triton" and not HAS_CUDA and shape != SHAPES[0]:
        pytest.skip("the Triton interpreter is for correctness on small shapes")
    num_in, num_out = arity
    xs = [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(num_in)]
    coef = torch.randn(4, num_out, num_in, device=DEVICE)
    outs = [torch.empty_like(xs[0]) for _ in range(num_out)]
    if backend == "reference":
        def fn():
            return reference(xs, coef, 2)
    else:
        def fn():
            return lincomb(xs, coef, 2, out=outs, backend=backend)
    benchmark.group = f"lincomb {num_in}->{num_out} {'x'.join(map(str, shape))} {dtype}"
    measure(fn, (num_in + num_out) * xs[0].numel() * xs[0].element_size())


@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def bench_lincomb_clip(benchmark, measure, backend, shape, dtype, clip):
    """A DDIM step with x0 clipping (x, eps -> x_next, x0): the clipped term is one more
    combination of the inputs in registers, so it should cost nothing over the plain step."""
    if backend == "triton" and not HAS_CUDA and shape != SHAPES[0]:
        pytest.skip("the Triton interpreter is for correctness on small shapes")
    xs = [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2)]
    coef = torch.randn(4, 3 if clip else 2, 3 if clip else 2, device=DEVICE)
    bounds = torch.tensor([[1.5, 1.5]], device=DEVICE).expand(shape[0], 2).contiguous()
    kwargs = dict(clip=bounds) if clip else {}
    outs = [torch.empty_like(xs[0]) for _ in range(2)]
    if backend == "reference":
        def fn():
            return reference(xs, coef, 2, **kwargs)
    else:
        def fn():
            return lincomb(xs, coef, 2, out=outs, backend=backend, **kwargs)
    benchmark.group = f"lincomb clip 2->2 {'x'.join(map(str, shape))} {dtype}"
    measure(fn, 4 * xs[0].numel() * xs[0].element_size())
