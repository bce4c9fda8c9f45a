"""Compatibility: `fastdiff.betas` is `fastdiff.schedules.betas` (fastdiff/schedules/)."""

from fastdiff.schedules.betas import *  # noqa: F401,F403
from fastdiff.schedules.betas import __all__  # noqa: F401
