"""Which backends can run here, and why not when they cannot (shown by `fastdiff info`).

Backends: "reference" (pure PyTorch, always), "cpu" (native C++ on CPU tensors), "cuda" (native
CUDA C++ on CUDA tensors), "triton" (Triton on CUDA tensors, or on CPU tensors when the Triton
interpreter is on: TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor

from fastdiff import _native

BACKENDS = ("reference", "cpu", "cuda", "triton")


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return ""


def unavailable_reason(backend: str, device: torch.device) -> str:
    """Empty when `backend` can run ops on tensors of `device`, else the reason."""
    if backend == "reference":
        return ""
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device.type}"
        return _native.load()[1]
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device.type}"
        return _native.cuda_unavailable_reason(device.index or 0)
    if backend == "triton":
        if err := _triton_import_error():
            return err
        if device.type == "cpu" and not triton_interpreter():
            return "triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
        if device.type == "cuda" and triton_interpreter():
            return "TRITON_INTERPRET=1 is set: triton runs on CPU tensors only"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return ""
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


def native_target(device: torch.device) -> tuple[int, int]:
    """(device index, stream handle) the native launchers take: torch's current stream of a CUDA
    device, or (-1, 0) for the CPU."""
    if device.type == "cuda":
        return device.index or 0, torch.cuda.current_stream(device).cuda_stream
    return -1, 0


def traced(t) -> bool:
    """True when an op must go through its torch.library registration instead of a kernel:
    under torch.compile, and for fake tensors (FakeTensorMode, torch.export), whose data no
    kernel can read. The registrations' fake implementations check what the kernels need
    (one device, dense seeds and tables), so a CPU test on "cuda" fake tensors sees it."""
    return torch.compiler.is_compiling() or isinstance(t, FakeTensor)


def resolve(backend: str, device: torch.device) -> str:
    """Maps "auto" to the fastest backend available for `device`; checks an explicit choice."""
    if backend == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        return next(b for b in order if not unavailable_reason(b, device))
    if reason := unavailable_reason(backend, device):
        raise RuntimeError(f"backend {backend!r} is unavailable for {device} tensors: {reason}")
    return backend


def status() -> dict[str, str]:
    """Backend name -> "" if available, else the reason (for `fastdiff info`)."""
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    report = {"reference": "", "cpu-native": unavailable_reason("cpu", torch.device("cpu"))}
    report["cuda-native"] = (unavailable_reason("cuda", cuda) if cuda is not None
                             else _native.load()[1] or "no CUDA device visible to torch")
    if cuda is not None and not triton_interpreter():
        report["triton"] = unavailable_reason("triton", cuda)
    else:
        report["triton"] = _triton_import_error() or (
            "TRITON_INTERPRET=1 is set" if triton_interpreter() else "no CUDA device visible")
    report["triton-interpreter"] = _triton_import_error() or (
        "" if triton_interpreter() else "set TRITON_INTERPRET=1 before importing triton")
    return report
