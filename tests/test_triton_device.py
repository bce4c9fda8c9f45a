"""Multi-GPU: every Triton launcher launches on its tensors' device, not torch's current one
(Triton launches on the current device and stream). CPU-checkable: the launchers run under the
interpreter with their device guard recorded, and the guard itself is checked on fake
"cuda:1" tensors."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton")

from fastdiff.kernels import device_guard  # noqa: E402
from fastdiff.ops import unavailable_reason  # noqa: E402

pytestmark = pytest.mark.skipif(bool(unavailable_reason("triton", torch.device("cpu"))),
                                reason="needs the Triton interpreter (CPU tensors)")


def test_guard_makes_the_tensors_device_current():
    with FakeTensorMode():
        x = torch.empty(4, device="cuda:1")
    guard = device_guard(x)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.empty(1)), contextlib.nullcontext)


def _calls():
    """One call of every launcher, through the public ops."""
    from fastdiff.ops import attention, dynamic_threshold, group_norm, lincomb
    from fastdiff.ops.schedule import schedule_tables

    x = torch.randn(2, 8, 4, 4)
    coef = torch.randn(3, 2, 3)
    seeds = torch.arange(2)
    q = torch.randn(1, 2, 8, 16)
    return {
        "lincomb": lambda: lincomb([x, x], coef, 1, noise=(seeds, [1]), backend="triton"),
        "threshold": lambda: dynamic_threshold([x, x], coef, 1, 0.9, 2.0, backend="triton"),
        "group_norm": lambda: group_norm(x, 4, backend="triton"),
        "attention": lambda: attention(q, q, q, backend="triton"),
        "schedule": lambda: schedule_tables(4, backend="triton"),
    }


@pytest.mark.parametrize("family", ["lincomb", "threshold", "group_norm", "attention",
                                    "schedule"])
def test_every_launch_runs_inside_the_device_guard(family, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module(f"fastdiff.kernels.{family}")
    entered, launches = [], []
    depth = [0]

    @contextlib.contextmanager
    def recording_guard(t):
        entered.append(t.device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    run = InterpretedFunction.run

    def checked_run(self, *args, **kwargs):
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        launches.append((self.fn.__name__, depth[0], devices))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(module, "device_guard", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", checked_run)
    _calls()[family]()
    assert launches, f"{family}: no launch"
    assert entered, f"{family}: the launcher never entered its device guard"
    for name, inside, devices in launches:
        assert inside == 1, f"{name} launched outside the device guard"
        assert devices == {entered[-1]}, f"{name}: tensors on {devices}, guard on {entered[-1]}"
