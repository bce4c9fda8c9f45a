"""Reference of the fused GroupNorm: the specification every backend must match.

    y = GN(x) * weight + beta                    Wu & He 2018, "Group Normalization", eq. 1-2
    y = y * (1 + scale[n, c]) + shift[n, c]      scale-shift norm of the ADM UNet
                                                 (Dhariwal & Nichol 2021, "Diffusion Models Beat
                                                 GANs on Image Synthesis", sec. 3: AdaGN)
    y = silu(y) = y * sigmoid(y)                 optional

GN normalises each (sample, group of C / num_groups channels) by its mean and biased variance
(as torch.nn.GroupNorm, with the same eps; torch's own kernel computes them, numerically
stable for large means). Everything is computed in float32 (float64 for
float64 data) from the upcast input and rounded once to x's dtype; the result has x's memory
layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_channel(t: torch.Tensor, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """[N, C] (or [N, C, 1, ...]) -> [N, C, 1, ...] broadcastable against x, in `acc`."""
    return t.to(acc).reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    # torch.group_norm is F.group_norm without its Python-side refusal of groups holding a
    # single value (whose normalised value is simply 0). Contiguous: torch's channels-last CPU
    # kernel accumulates sum and sum of squares, which cancels for data with a large mean.
    y = torch.group_norm(x.to(acc).contiguous(), num_groups, w, b, eps, False)
    if scale is not None:
        y = y * (1 + _per_channel(scale, x, acc))
    if shift is not None:
        y = y + _per_channel(shift, x, acc)
    if silu:
        y = F.silu(y)
    return torch.empty_like(x).copy_(y)
