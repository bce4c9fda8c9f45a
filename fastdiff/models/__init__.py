"""Models: the exact Gaussian mixture, the UNet (diffusers UNet2DModel layout) and the embedded
digits model. The UNet and digits modules load lazily (`fastdiff.models.UNet` imports them on
first use), so `import fastdiff.models` stays light."""

import importlib

from .gmm import GaussianMixture

_LAZY = {"UNet": ("unet", "UNet"), "load_digits_model": ("digits", "load_digits_model")}
_SUBMODULES = ("unet", "digits", "classifier")


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GaussianMixture", "UNet", "load_digits_model"]
