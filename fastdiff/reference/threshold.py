"""Reference of dynamic thresholding's per-sample statistic: the specification every backend of
fastdiff.ops.dynamic_threshold must match.

Dynamic thresholding (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with
Deep Language Understanding", Sec. 2.3; diffusers' `_threshold_sample`) clips the predicted x0
of each sample to [-s, s] and divides by s, where s is a high percentile of |x0|:

    w   = sum_k coef[row, -1, k] * in_k                        (k < num_in, in coef's dtype)
    s_n = clamp(torch.quantile(|w_n|, ratio), min=1, max=max_value)   (sample n: dim 0)
    clip = [[s_n, s_n]]  so that  lincomb(..., clip=clip)  computes clamp(w, -s, s) / s.

coef[row, -1] is the pre-clip row of a lincomb clip table ([rows, num_out + 1, ...]), or the
only row of a [rows, 1, num_in] table. torch.quantile's default 'linear' interpolation; a sample
holding NaN gives NaN, as torch.quantile does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff.reference.lincomb import coef_row, combine


def dynamic_threshold(
    inputs: Sequence[torch.Tensor], coef: torch.Tensor, row: int | torch.Tensor, ratio: float,
    max_value: float,
) -> torch.Tensor:
    w = combine(coef_row(coef, row)[-1, :len(inputs)], inputs)
    s = torch.quantile(w.reshape(w.shape[0], -1).abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value)
    return torch.stack([s, s], dim=1)
