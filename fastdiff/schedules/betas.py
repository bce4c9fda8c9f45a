"""Betas of discrete VP (DDPM-family) schedules, in float64, the same on every platform.

diffusers' schedulers build their tables from these (linear, scaled-linear, cosine, sigmoid,
Laplace, exp and trained betas; zero-terminal-SNR rescaling). The schedule kernels
(csrc/include/fastdiff/schedule.h, fastdiff/kernels/schedule.py) reproduce them bitwise, so
their definition is the kernels' specification, fastdiff/reference/schedule.py; this module is
their public home in the schedules package.
"""

from fastdiff.reference.schedule import (
    BETA_SCHEDULES,
    alphas_cumprod_from_betas,
    betas_for_alpha_bar,
    make_betas,
    rescale_zero_terminal_snr,
)

__all__ = ["BETA_SCHEDULES", "alphas_cumprod_from_betas", "betas_for_alpha_bar", "make_betas",
           "rescale_zero_terminal_snr"]
