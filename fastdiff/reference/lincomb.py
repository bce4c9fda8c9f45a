"""Reference of the fused linear combination: the specification every backend must match.

    out_j = sum_k coef[row, j, k] * in_k                (j < num_out <= 3, k < num_in <= 6)
          + sum_m coef[row, j, num_in + m] * z_m        (m < 2 noise terms, optional)

z_m is the counter-based normal of fastdiff/reference/noise.py for (seeds[b], counters[m],
element), the element counted within each sample in the tensors' memory order.

With `clip` ([B, 2]: per-sample bound b_n and divisor d_n), x0 clipping is fused in: coef is
[rows, num_out + 1, num_in + num_noise + 1], its last output row is the pre-clip row and its
last column the weight of the clipped value (diffusers' clip_sample is clip = (r, 1); dynamic
thresholding, Saharia et al. 2022, is clip = (s_n, s_n): fastdiff/reference/threshold.py):

    w     = sum_k coef[row, num_out, k] * in_k                     (inputs only)
    y     = clamp(w, -b_n, b_n) / d_n                               (n: index along dim 0)
    out_j = (the sums above) + coef[row, j, num_in + num_noise] * y

y stays in the accumulation dtype; torch.clamp's semantics (NaN in w or b_n stays NaN).

Accumulation happens in the coefficients' dtype (float32, or float64 for float64 data), in the
order k = 0, 1, ... starting from the first term, as the kernels do; each output is rounded
once to the data dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff.reference.noise import philox_normal


def noise_like(x: torch.Tensor, seeds: torch.Tensor, counter: int) -> torch.Tensor:
    """The noise term for tensor x (dense, batch dim outermost in memory), as x's layout."""
    if x.numel() == 0:  # no samples (or empty samples): nothing to draw
        return torch.zeros_like(x, dtype=torch.float64)
    flat = philox_normal(seeds, counter, x.numel() // x.shape[0]).reshape(-1)
    return torch.as_strided(flat, x.shape, x.stride())


def coef_row(coef: torch.Tensor, row: int | torch.Tensor) -> torch.Tensor:
    """coef[row]. A device-resident row is not checked on the host (that would sync): out of
    range gives NaN coefficients, exactly as the kernels do."""
    if not isinstance(row, torch.Tensor):
        return coef[row]
    rows = coef.shape[0]
    r = row.reshape(())
    valid = (r >= 0) & (r < rows)
    return torch.where(valid, coef[r.clamp(0, rows - 1)], torch.full_like(coef[0], float("nan")))


def combine(c: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_k c[k] * inputs[k] in c's dtype, from the first term (a zero keeps its sign)."""
    acc = c[0] * inputs[0].to(c.dtype)
    for k in range(1, len(inputs)):
        acc = acc + c[k] * inputs[k].to(c.dtype)
    return acc


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values [B] shaped to broadcast along dim 0 of `like`."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def clip_value(w: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """clamp(w, -b_n, b_n) / d_n per sample n (dim 0 of w)."""
    bound, divisor = per_sample(clip[:, 0], w), per_sample(clip[:, 1], w)
    return torch.clamp(w, -bound, bound) / divisor


def lincomb(
    inputs: Sequence[torch.Tensor], coef: torch.Tensor, row: int | torch.Tensor = 0,
    noise: tuple[torch.Tensor, Sequence[int]] | None = None,
    clip: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    dtype = inputs[0].dtype
    c = coef_row(coef, row)
    num_out = coef.shape[1] - (clip is not None)
    terms = list(inputs)
    if noise is not None:  # the noise terms come after the inputs, in the kernels' order
        seeds, counters = noise
        terms += [noise_like(inputs[0], seeds, counter) for counter in counters]
    if clip is not None:
        y = clip_value(combine(c[num_out, :len(inputs)], inputs), clip.to(coef.dtype))
        terms.append(y)
    return [combine(c[j], terms).to(dtype) for j in range(num_out)]
