"""Running fastdiff on "cuda" fake tensors on a machine without a GPU (issue 13, section 2).

Under torch's FakeTensorMode tensors carry a device, shape, dtype and strides but no data, so
code runs on device "cuda" on a CPU-only build, and

  - reading a value on the host (`.item()`, `bool()`, `.tolist()`, `nonzero()`, a boolean mask)
    raises DataDependentOutputException / DynamicOutputShapeException: a host sync on a GPU;
  - mixing devices in one op raises FakeTensorDeviceMismatchError, as on a GPU;
  - fastdiff's ops go through their torch.library registrations, whose fake implementations
    check what the kernels need (one device, dense seeds and tables);

and `Transfers` below records every host <-> device copy with the model call it happened in.

A CPU-only torch build has no CUDA device guard at all, so even `x[0]` or `.contiguous()` on a
"cuda" fake tensor raises "PyTorch is not linked with support for cuda devices". FakeTensorMode
installs c10's FakeGuardImpl<CUDA> (torch._C._ensureCUDADeviceGuardSet) only where a CUDA guard
with no devices exists (a CUDA build without a GPU); `fake_cuda()` gives it one to replace: the
guard of the Lazy device (which reports no devices) is registered for CUDA just before the mode
is entered and unregistered after. On CUDA builds nothing is patched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_CUDA, _LAZY = 1, 17  # c10::DeviceType
_REGISTRY = "_ZN3c104impl26device_guard_impl_registryE"  # c10::impl::device_guard_impl_registry
_REGISTER = "_ZN3c104impl19registerDeviceGuardENS_10DeviceTypeEPKNS0_24DeviceGuardImplInterfaceE"

DEVICE = torch.device("cuda", 0)


@contextlib.contextmanager
def _cuda_device_guard():
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    registry = (ctypes.c_void_p * (_LAZY + 1)).in_dll(lib, _REGISTRY)  # (entries 0.._LAZY)
    if registry[_CUDA]:  # a CUDA build: FakeTensorMode handles it
        yield
        return
    register = getattr(lib, _REGISTER)
    register.argtypes = [ctypes.c_int8, ctypes.c_void_p]
    if not registry[_LAZY]:
        raise RuntimeError("no device guard to stand in for CUDA's in this torch build")
    register(_CUDA, registry[_LAZY])
    torch._C._ensureCUDADeviceGuardSet()  # replaces it by FakeGuardImpl<CUDA>
    try:
        if registry[_CUDA] == registry[_LAZY]:
            raise RuntimeError("torch did not install its fake CUDA device guard")
        yield
    finally:
        register(_CUDA, None)


class Transfers(TorchDispatchMode):
    """Records ops that move data between the host and a device (copies, `.to()`, factory calls
    from host data) and calls of fastdiff's registered ops. A CPU 0-dim tensor used with device
    tensors is a host scalar passed by value, not a copy. `step` is the number of model calls
    made so far (advanced by the test's model)."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.copies: list[tuple[int, str, tuple]] = []  # (step, op, devices)
        self.ops: list[str] = []  # fastdiff ops, in call order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "fastdiff":
            self.ops.append(func.__name__)
        elif func.namespace != "prim":
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                   and not (t.device.type == "cpu" and t.dim() == 0)]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            devices = {t.device.type for t in ins + outs}
            if len(devices) > 1:
                self.copies.append((self.step, str(func), tuple(sorted(devices))))
        return out

    def tick(self, *_) -> None:
        """One more model call (usable as a forward pre-hook)."""
        self.step += 1

    def after(self, step: int) -> list:
        """The copies made after the first `step` model calls."""
        return [c for c in self.copies if c[0] > step]


@contextlib.contextmanager
def fake_cuda(transfers: Transfers | None = None):
    """`with fake_cuda() as transfers:` tensors made inside are fakes (on "cuda:0" when asked);
    real tensors made before (host sigmas, plans, weights) may be used inside."""
    transfers = Transfers() if transfers is None else transfers
    with _cuda_device_guard():
        with FakeTensorMode(allow_non_fake_inputs=True), transfers:
            yield transfers


def counting(model, transfers: Transfers):
    """`model` advancing transfers.step at each call."""

    def counted(*args, **kwargs):
        transfers.tick()
        return model(*args, **kwargs)

    return counted
