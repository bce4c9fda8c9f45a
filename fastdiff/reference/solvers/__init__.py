"""Reference solvers: k-diffusion-style `sample_*` functions and the merged `SOLVERS` registry.

Every solver module defines `SOLVERS: dict[str, SolverInfo]` (see `_utils.SolverInfo`); this
package merges them into one `SOLVERS` dict (a name defined twice is an error) and re-exports
every `sample_*` function, so `from fastdiff.reference.solvers import sample_euler` works.
"""

from . import (
    ddim,
    deis,
    dpm_solver,
    dpmpp,
    euler,
    exponential,
    flow,
    lms,
    pndm,
    sa_solver,
    sde,
    unipc,
)
from ._utils import SolverInfo

_MODULES = (euler, lms, dpm_solver, dpmpp, unipc, deis, ddim, pndm, flow, exponential, sde,
            sa_solver)

SOLVERS: dict[str, SolverInfo] = {}
__all__ = ["SOLVERS", "SolverInfo"]

for _mod in _MODULES:
    for _key, _info in _mod.SOLVERS.items():
        if _key in SOLVERS:
            raise RuntimeError(f"solver {_key!r} is registered twice (again in {_mod.__name__})")
        SOLVERS[_key] = _info
    for _attr in getattr(_mod, "__all__", dir(_mod)):
        if _attr.startswith("sample_"):
            globals()[_attr] = getattr(_mod, _attr)
            __all__.append(_attr)

del _mod, _key, _info, _attr
