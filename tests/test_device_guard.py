"""Issue 13, item 10 (native half): a launch on tensors of cuda:1 leaves the caller's current
device alone (csrc/device.cu CudaDeviceGuard; _C's static cudart shares the driver's current
context with torch, so a bare cudaSetDevice changed torch.cuda.current_device())."""

from __future__ import annotations

import pytest
import torch

from fastdiff.ops import group_norm, lincomb, unavailable_reason

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA GPUs")
def test_native_launches_restore_the_current_device():
    other = torch.device("cuda", 1)
    if unavailable_reason("cuda", other):
        pytest.skip(unavailable_reason("cuda", other))
    torch.cuda.set_device(0)
    x = torch.randn(2, 8, 4, 4, device=other)
    want = lincomb([x, x], torch.tensor([[[0.5, 0.25]]], device=other), backend="reference")
    got = lincomb([x, x], torch.tensor([[[0.5, 0.25]]], device=other), backend="cuda")
    assert torch.cuda.current_device() == 0
    assert torch.equal(got[0], want[0])
    group_norm(x, 4, backend="cuda")
    assert torch.cuda.current_device() == 0
