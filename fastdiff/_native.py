"""Loads fastdiff._C, the torch-free native module, without ever breaking `import fastdiff`.

A missing, stale (built from other sources) or ABI-incompatible module is reported as a reason
string; the backends that need it then say they are unavailable and why.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

ABI_VERSION = 5  # must equal kAbiVersion in csrc/include/fastdiff/common.h
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CSRC = Path(__file__).resolve().parent.parent / "csrc"


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """Returns (module, "") or (None, why it cannot be used)."""
    try:
        from fastdiff import _C
    except ImportError as e:
        return None, f"fastdiff._C is not built ({e}); build it with `pip install -e .`"
    if getattr(_C, "abi_version", lambda: -1)() != ABI_VERSION:
        return None, (f"fastdiff._C has ABI {_C.abi_version()}, this fastdiff needs {ABI_VERSION}:"
                      " rebuild it with `pip install -e .`")
    if _CSRC.is_dir():  # a source checkout: compare the sources it was built from
        from fastdiff._source_hash import source_hash

        built, now = _C.source_hash(), source_hash(_CSRC)
        if built != now:
            return None, (f"fastdiff._C is stale (built from csrc {built}, csrc is now {now}):"
                          " rebuild it with `pip install -e .`")
    return _C, ""


def module() -> ModuleType:
    """The native module, or a RuntimeError saying why it is unavailable."""
    mod, reason = load()
    if mod is None:
        raise RuntimeError(reason)
    return mod


def cuda_capability(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


@functools.cache
def cuda_unavailable_reason(device_index: int = 0) -> str:
    """Empty if the native CUDA kernels can run on this device, else why not."""
    mod, reason = load()
    if mod is None:
        return reason
    if not mod.has_cuda():
        return "fastdiff._C was built without CUDA (no nvcc at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    cap = cuda_capability(torch.device("cuda", device_index))
    archs = [a.rstrip("af") for a in mod.cuda_archs().split(";") if a]
    # sm_XY cubins run on compute capability X.Y' with Y' >= Y of the same major; the PTX of
    # the newest arch is JIT-compiled for newer GPUs.
    runnable = any(a[:-1] == cap[:-1] and int(a[-1]) <= int(cap[-1]) for a in archs) or (
        archs and int(cap) > max(int(a) for a in archs))
    if not runnable:
        return (f"fastdiff._C was built for sm_{mod.cuda_archs()}, this GPU is sm_{cap}:"
                f" rebuild with FASTDIFF_CUDA_ARCHS={cap}")
    return ""
