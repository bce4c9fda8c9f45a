"""fastdiff: a fused-kernel sampling engine for diffusion models.

`import fastdiff` stays light: it imports torch and the op dispatch table; triton, scipy and
diffusers are imported only by the functions that need them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from fastdiff import ops  # noqa: E402

_LAZY_MODULES = ("k_diffusion", "schedules", "spacings", "denoisers", "models", "reference",
                 "kernels", "nn", "solvers", "sampler", "graph", "cli", "tuning")
_LAZY_NAMES = {"Sampler": "fastdiff.sampler", "sample": "fastdiff.sampler",
               "accelerate": "fastdiff.pipeline", "restore": "fastdiff.pipeline",
               "tune": "fastdiff.tuning"}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"fastdiff.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


__all__ = ["__version__", "ops", "Sampler", "accelerate", "restore", "sample", "tune",
           *_LAZY_MODULES]
