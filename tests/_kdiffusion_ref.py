"""Loads k-diffusion's `sampling.py` as a standalone module (the parity reference).

`k_diffusion/__init__.py` imports torchvision, skimage, etc. which are not installed here, so
`sampling.py` is loaded from its file with a tiny fake `k_diffusion.utils` that provides the one
helper it uses (`append_dims`, copied verbatim). Returns None when k-diffusion (or one of the
packages sampling.py itself imports: scipy, torchdiffeq, torchsde) is absent, so tests can skip.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import cache
from pathlib import Path

_PKG = "_kdiffusion_ref_pkg"


def _append_dims(x, target_dims):
    """Appends dimensions to the end of a tensor until it has target_dims dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


@cache
def load_kdiffusion_sampling():
    """Returns k-diffusion's sampling module, or None if it cannot be loaded."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    if not path.is_file():
        return None
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = []  # a namespace that never imports the real k_diffusion/__init__.py
    utils = types.ModuleType(f"{_PKG}.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules.setdefault(_PKG, pkg)
    sys.modules.setdefault(f"{_PKG}.utils", utils)
    mod_spec = importlib.util.spec_from_file_location(f"{_PKG}.sampling", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except ImportError:
        return None
    sys.modules[f"{_PKG}.sampling"] = module
    return module
