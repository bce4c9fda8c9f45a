"""fastdiff: a fused-kernel sampling engine for diffusion models.

`import fastdiff` stays light: it imports torch and the op dispatch table; triton, scipy and
diffusers are imported only by the functions that need them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from fastdiff import ops  # noqa: E402

_LAZY_MODULES = ("k_diffusion", "schedules", "denoisers", "models", "reference", "kernels", "cli")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"fastdiff.{name}")
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


__all__ = ["__version__", "ops", *_LAZY_MODULES]
