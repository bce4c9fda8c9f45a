"""fastdiff.reference: the pure-PyTorch specification of every op and solver.

Readable, cited and unfused: the fused Triton/CUDA paths are tested against it, benchmarks use it
as the baseline, and it is the fallback where no kernel applies. Solvers live in
`fastdiff.reference.solvers` (k-diffusion-style `sample_*` functions plus the `SOLVERS` registry).

Submodules are imported lazily so that `import fastdiff` stays light.
"""

import importlib

__all__ = ["solvers"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
