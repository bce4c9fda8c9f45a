"""Reference of the fused linear combination: the specification every backend must match.

    out_j = sum_k coef[row, j, k] * in_k                (j < num_out <= 2, k < num_in <= 6)
          + sum_m coef[row, j, num_in + m] * z_m        (m < 2 noise terms, optional)

z_m is the counter-based normal of fastdiff/reference/noise.py for (seeds[b], counters[m],
element), the element counted within each sample in the tensors' memory order.

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


def lincomb(
    inputs: Sequence[torch.Tensor], coef: torch.Tensor, row: int | torch.Tensor = 0,
    noise: tuple[torch.Tensor, Sequence[int]] | None = None,
) -> list[torch.Tensor]:
    dtype = inputs[0].dtype
    if noise is not None:  # the noise terms come after the inputs, in the kernels' order
        seeds, counters = noise
        inputs = list(inputs) + [noise_like(inputs[0], seeds, c) for c in counters]
    rows, num_out, num_in = coef.shape
    if isinstance(row, torch.Tensor):
        # A device-resident row is not checked on the host (that would sync); out of range
        # gives NaN coefficients, exactly as the kernels do.
        r = row.reshape(())
        valid = (r >= 0) & (r < rows)
        c = torch.where(valid, coef[r.clamp(0, rows - 1)], torch.full_like(coef[0], float("nan")))
    else:
        c = coef[row]
    outputs = []
    for j in range(num_out):
        acc = c[j, 0] * inputs[0].to(coef.dtype)
        for k in range(1, num_in):
            acc = acc + c[j, k] * inputs[k].to(coef.dtype)
        outputs.append(acc.to(dtype))
    return outputs
