"""Shared test configuration.

The Triton interpreter must be switched on before `triton` is first imported, so it is set
here, at collection time, whenever no CUDA device is visible: Triton kernels then run on CPU
tensors (small shapes only; the interpreter cannot do bf16 arithmetic).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# One tolerance table per dtype, for fused-vs-reference comparisons of elementwise ops that
# accumulate in fp32. Low-precision rows follow FlashAttention's rule of thumb (error at most
# ~2x the dtype's own rounding error): a few ulps of the output dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


@pytest.fixture
def tolerances():
    return TOLERANCES


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
