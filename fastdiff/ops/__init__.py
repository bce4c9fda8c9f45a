"""The dispatch table: op -> {reference, cpu, cuda, triton}. Inputs are validated here, once;
ops are registered with torch.library (namespace `fastdiff`) so torch.compile can trace them."""

from fastdiff.ops._backends import BACKENDS, resolve, status, unavailable_reason
from fastdiff.ops.lincomb import lincomb

OPS = {"lincomb": lincomb}

__all__ = ["BACKENDS", "OPS", "lincomb", "resolve", "status", "unavailable_reason"]
