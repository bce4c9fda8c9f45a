"""Compatibility: `fastdiff.spacings` is `fastdiff.schedules.spacings` and
`fastdiff.schedules.diffusers` (the schedules package, fastdiff/schedules/)."""

from fastdiff.schedules import diffusers as _diffusers
from fastdiff.schedules import spacings as _spacings
from fastdiff.schedules.diffusers import *  # noqa: F401,F403
from fastdiff.schedules.spacings import *  # noqa: F401,F403

__all__ = sorted({*_spacings.__all__, *_diffusers.__all__})
